"""The lock table: pvcoord's lock model (DESIGN section 3) as pure Python, no network.

Rules implemented here:

- One active lock per device; lock types have priorities (``pvdb.models.LockType``). A request
  preempts holders of *strictly* lower priority; an equal or higher holder makes it fail with a
  message naming holder, type, reason and expiry.
- The holder is an account (``Identity.account``); its repeated request is idempotent: it renews
  (and may change the type), it never conflicts with itself.
- Every lock has a lease (``timeout`` s, default and maximum per type from the policy) and expires
  server-side (:meth:`LockTable.expire`).
- Acquisition returns a secret key; only SHA-256 digests are kept. Release/renew accept the key or
  the holder's own account.
- Several devices in one request are granted all or none (try-lock, no waiting).
- ``beamline`` locks every device: it conflicts with every device lock and vice versa.
- A preempted, expired or force-released holder is told on its next release/renew.
- Every change is committed to the store before it is applied in memory and before the caller
  replies; if the store fails nothing changes.
- Every action is an audit event.

Thread-safe: every public method takes one mutex. ``listener(devices, events)`` is called under it
after each change, so publishers see changes in order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pvcoord.store import Store, StoreError
from pvdb.models import BEAMLINE, EventAction, Lock, LockEvent, LockType
from pvdb.policy import Policy
from pvdb.redact import MASK, looks_like_key

log = logging.getLogger(__name__)

MAX_REASON = 256
"""Longest accepted ``reason`` (characters)."""
MAX_PLAN_UID = 128
"""Longest accepted ``planUid`` (characters)."""
MAX_DEVICES = 256
"""Most devices accepted in one request."""
KEY_HASHES_KEPT = 8
"""Keys (as digests) that stay valid for one lock when its holder re-requests it."""
REFUSAL_WINDOW = 60.0
"""Seconds of the refusal rate limit."""
NOTICES_KEPT = 4096
"""How many 'your lock was preempted/expired' notices are remembered for their holders."""


class LockError(Exception):
    """A request that was refused or invalid; ``str(e)`` is the message for the client.

    ``audited`` is true once the refusal is recorded as an audit event.
    """

    audited: bool = False


@dataclass(frozen=True)
class Identity:
    """Who asks: the account, the host it asks from, its OS groups.

    ``actor`` is the trusted service account when the request is made on behalf of ``account``.
    """

    account: str
    host: str
    roles: frozenset[str] = frozenset()
    actor: str | None = None

    @property
    def holder(self) -> str:
        """``account@host``."""
        return f"{self.account}@{self.host}"

    @property
    def actor_name(self) -> str:
        """The account that made the request."""
        return self.actor or self.account


@dataclass(frozen=True)
class AcquireResult:
    """Answer to a granted acquire. ``key`` is secret: return it to the requester only."""

    granted: bool
    key: str
    devices: tuple[str, ...]
    preempted: tuple[str, ...]
    expires: float
    message: str


@dataclass
class _Change:
    upsert: list[Lock] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[LockEvent] = field(default_factory=list)
    notices: dict[object, str] = field(default_factory=dict)


def _same_holder(lock: Lock, ident: Identity) -> bool:
    """Whether ``ident`` is the lock's holder: the same account from the same host.

    The account is what the client claimed; the host is the peer address the server saw, so a
    client claiming ``alice`` from another host is not alice's holder (it needs the key).
    """
    return lock.owner == ident.account and (not lock.host or lock.host == ident.host)


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a key: what locks and the store keep instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def fmt_time(t: float) -> str:
    """ISO-8601 UTC with seconds, for messages."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def describe(lock: Lock, now: float) -> str:
    """Human description of a lock for refusals: holder, type, reason, expiry."""
    reason = f", reason {lock.reason!r}" if lock.reason else ""
    left = max(0.0, lock.expires - now)
    return (
        f"{lock.device} is held by {lock.holder} ({lock.lock_type.value}{reason}, "
        f"expires {fmt_time(lock.expires)}, in {left:.0f} s)"
    )


class LockTable:
    """Active locks of one endstation, with the policy and the store behind them.

    Args:
        policy: who may take which type; leases.
        store: durable storage; locks are reloaded from it (expired ones dropped and reported).
        devices: accepted device names, or ``None`` while unknown (then every acquire is refused
            until :meth:`set_devices` is called).
        clock: epoch seconds (tests may pass a fake clock).
        listener: called as ``listener(changed_devices, events)`` after every change.
    """

    def __init__(
        self,
        policy: Policy,
        store: Store,
        devices: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
        listener: Callable[[set[str], list[LockEvent]], None] | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        self.listener = listener
        self._mutex = threading.RLock()
        self._devices: frozenset[str] | None = None if devices is None else frozenset(devices)
        self._locks: dict[str, Lock] = {lk.device: lk for lk in store.load_locks()}
        self._notices: OrderedDict[object, str] = OrderedDict()
        self._store_error: str | None = None
        self._store_error_logged = 0.0
        self._refusal_times: dict[tuple[str, str], deque[float]] = {}
        self._refusals_missed: dict[tuple[str, str], int] = {}
        self.refusals_not_stored = 0
        """Refusals not stored as audit events because of the per-client rate limit."""
        self.startup_events: list[LockEvent] = self.expire(reason="while the IOC was down")

    # --- queries ----------------------------------------------------------------------------

    @property
    def mutex(self) -> threading.RLock:
        """The table's re-entrant mutex: hold it to publish a consistent view of several locks."""
        return self._mutex

    @property
    def devices(self) -> frozenset[str] | None:
        """Accepted device names (without ``beamline``), or ``None`` while unknown."""
        return self._devices

    def set_devices(self, devices: Iterable[str]) -> None:
        """Replace the accepted device names (from the registry). Existing locks are kept."""
        with self._mutex:
            self._devices = frozenset(devices) - {BEAMLINE}

    def locks(self) -> list[Lock]:
        """Active locks sorted by device."""
        with self._mutex:
            return [self._locks[d] for d in sorted(self._locks)]

    def effective(self, device: str) -> Lock | None:
        """The lock that governs ``device``: its own, or a stronger ``beamline`` lock."""
        with self._mutex:
            own = self._locks.get(device)
            bl = self._locks.get(BEAMLINE) if device != BEAMLINE else None
            if own is None:
                return bl
            if bl is not None and bl.priority < own.priority:
                return bl
            return own

    def next_expiry(self) -> float | None:
        """Earliest expiry (epoch s) of any lock, or None."""
        with self._mutex:
            return min((lk.expires for lk in self._locks.values()), default=None)

    # --- validation -------------------------------------------------------------------------

    def _refusal_allowed(self, ident: Identity) -> bool:
        """Rate limit of stored refusals per client (account and host), counting the rest.

        At most ``access.refusal_audit_per_minute`` per :data:`REFUSAL_WINDOW` are stored.
        """
        key = (ident.actor_name, ident.host)
        now = self.clock()
        with self._mutex:
            times = self._refusal_times.setdefault(key, deque())
            while times and now - times[0] > REFUSAL_WINDOW:
                times.popleft()
            if len(times) >= self.policy.access.refusal_audit_per_minute:
                self._refusals_missed[key] = self._refusals_missed.get(key, 0) + 1
                self.refusals_not_stored += 1
                return False
            times.append(now)
            if len(self._refusal_times) > 4096:  # forget idle clients (bounded memory)
                for k in [k for k, t in self._refusal_times.items() if not t][:1024]:
                    del self._refusal_times[k]
            return True

    def _key_shaped(self, device: str) -> bool:
        """A device argument that is no known device but has the shape of a lock key."""
        return looks_like_key(device) and (self._devices is None or device not in self._devices)

    def _refuse_key_shaped(self, devices: Iterable[str]) -> None:
        if any(self._key_shaped(d) for d in devices):
            raise LockError(
                "a device argument has the shape of a lock key: give a key as key=KEY (through "
                "stdin or $PVCOORD_KEY with the CLI), never where a device belongs; it was not "
                "recorded"
            )

    def _check_devices(self, devices: Iterable[str]) -> tuple[str, ...]:
        devs = tuple(sorted(set(devices)))
        self._refuse_key_shaped(devs)
        if not devs:
            raise LockError("no device given: device=NAME[,NAME...] or device=beamline")
        if len(devs) > MAX_DEVICES:
            raise LockError(f"{len(devs)} devices in one request; the limit is {MAX_DEVICES}")
        if BEAMLINE in devs and len(devs) > 1:
            raise LockError(f"'{BEAMLINE}' already covers every device: request it alone")
        if self._devices is None:
            raise LockError(
                "the device list is not known yet (registry not connected): no lock can be "
                "granted until it is"
            )
        unknown = [d for d in devs if d != BEAMLINE and d not in self._devices]
        if unknown:
            shown = ", ".join(repr(d[:64]) for d in unknown[:5])
            raise LockError(
                f"unknown device {shown}: not in the registry (known: "
                f"{', '.join(sorted(self._devices)[:20]) or 'none'}, or '{BEAMLINE}')"
            )
        return devs

    def _lease(self, lock_type: LockType, timeout: float | None) -> float:
        lp = self.policy.lock_types[lock_type]
        if timeout is None:
            return lp.default_lease
        if not math.isfinite(timeout) or timeout <= 0:
            raise LockError(f"timeout must be a positive number of seconds, not {timeout}")
        if timeout > lp.max_lease:
            raise LockError(
                f"timeout {timeout:g} s is longer than the {lock_type.value} maximum of "
                f"{lp.max_lease:g} s set by the policy"
            )
        return timeout

    @staticmethod
    def _check_text(name: str, value: str, limit: int) -> str:
        if len(value) > limit:
            raise LockError(f"{name} is {len(value)} characters long; the limit is {limit}")
        if not value.isprintable():
            raise LockError(
                f"{name} contains control or format characters (e.g. bidi overrides); only "
                "printable text is accepted")
        return value

    # --- the store-then-memory step ---------------------------------------------------------

    @property
    def store_error(self) -> str | None:
        """The last store failure, or ``None`` once a commit succeeded again."""
        return self._store_error

    def check_store(self) -> None:
        """While the store is failing: try to resynchronise it; clear the error if that works."""
        with self._mutex:
            if self._store_error is None:
                return
            try:
                self._resync()
            except StoreError as e:
                self._store_error = str(e)
                return
            log.warning("store answers again")
            self._store_error = None

    def _resync(self) -> None:
        """Make the store equal to memory after a failure.

        A failed commit may still have been applied (e.g. a Redis MULTI/EXEC whose reply was
        lost); the client was told nothing changed, and memory holds what clients were told, so
        memory wins. Raises StoreError if the store still fails.
        """
        stored = {lk.device: lk for lk in self.store.load_locks()}
        if stored == self._locks:
            return
        upsert = [lk for d, lk in self._locks.items() if stored.get(d) != lk]
        delete = [d for d in stored if d not in self._locks]
        log.warning("store disagreed with memory after a store failure (%d to write, %d to "
                    "delete): memory wins", len(upsert), len(delete))
        self.store.commit(upsert, delete, [])

    def _apply(self, change: _Change) -> None:
        try:
            if self._store_error is not None:
                self._resync()
            self.store.commit(change.upsert, change.delete, change.events)
        except StoreError as e:
            now = time.monotonic()
            if self._store_error is None or now - self._store_error_logged > 10:
                log.error("store failed, nothing changed: %s", e)
                self._store_error_logged = now
            self._store_error = str(e)
            raise LockError(f"the lock store failed, nothing changed: {e}") from None
        if self._store_error is not None:
            log.warning("store works again")
            self._store_error = None
        for d in change.delete:
            self._locks.pop(d, None)
        for lk in change.upsert:
            self._locks[lk.device] = lk
            self._notices.pop((lk.owner, lk.device), None)  # a new lock: old news is stale
        for k, msg in change.notices.items():
            self._notices[k] = msg
            self._notices.move_to_end(k)
        while len(self._notices) > NOTICES_KEPT:
            self._notices.popitem(last=False)
        for e in change.events:
            log.info("%s", e.line())
        if self.listener is not None:
            changed = {lk.device for lk in change.upsert} | set(change.delete)
            self.listener(changed, change.events)

    def audit_refusal(
        self, ident: Identity, devices: Iterable[str], lt: LockType | None, msg: str
    ) -> None:
        """Record a refused request as an audit event (best effort: a store failure is logged).

        A key-shaped device argument (a key typed where a device belongs) is recorded as ``***``.
        """
        devices = list(devices)
        if not self._refusal_allowed(ident):
            return
        for d in devices:
            if self._key_shaped(d):
                msg = msg.replace(d, MASK)
        missed = self._refusals_missed.pop((ident.actor_name, ident.host), 0)
        if missed:
            msg = f"{msg} [{missed} more refusals of this client not stored]"
        devices = [MASK if self._key_shaped(d) else d for d in devices]
        ev = LockEvent(
            time=self.clock(), action=EventAction.REFUSED,
            device=",".join(d[:64] for d in devices)[:256] or "?",
            lock_type=lt, actor=ident.actor_name, holder=ident.holder, message=msg[:1024],
        )
        with self._mutex:
            try:
                self._apply(_Change(events=[ev]))
            except LockError:
                pass

    def _refuse(self, ident: Identity, devices: Iterable[str], lt: LockType | None, msg: str):
        """Audit a refusal and raise it."""
        self.audit_refusal(ident, devices, lt, msg)
        err = LockError(msg)
        err.audited = True
        raise err

    @staticmethod
    def _notice_keys(lock: Lock) -> list[object]:
        return [*lock.key_hashes, (lock.owner, lock.device)]

    # --- actions ----------------------------------------------------------------------------

    def acquire(
        self,
        ident: Identity,
        devices: Iterable[str],
        lock_type: LockType,
        timeout: float | None = None,
        reason: str = "",
        plan_uid: str = "",
    ) -> AcquireResult:
        """Grant ``lock_type`` on every one of ``devices`` to ``ident``, or none of them.

        Returns:
            The result with a new secret key that releases/renews these locks.

        Raises:
            LockError: bad arguments, not allowed by the policy, or a holder of equal or higher
                priority (the message names it); nothing changed.
        """
        with self._mutex:
            self.expire()  # a lease that ran out since the last tick is gone before we decide
            devs = self._check_devices(devices)
            lease = self._lease(lock_type, timeout)
            reason = self._check_text("reason", reason, MAX_REASON)
            plan_uid = self._check_text("planUid", plan_uid, MAX_PLAN_UID)
            if not self.policy.may_take(lock_type, ident.account, ident.roles, ident.host):
                self._refuse(
                    ident, devs, lock_type,
                    f"{ident.account} may not take {lock_type.value} locks (policy: "
                    f"{', '.join(self.policy.lock_types[lock_type].allow) or 'nobody'})",
                )
            now = self.clock()
            conflicts: dict[str, Lock] = {}
            for d in devs:
                if d == BEAMLINE:
                    conflicts.update(self._locks)
                else:
                    for k in (d, BEAMLINE):
                        if k in self._locks:
                            conflicts[k] = self._locks[k]
            others = [lk for lk in conflicts.values() if not _same_holder(lk, ident)]
            blocking = [lk for lk in others if lk.priority <= lock_type.priority]
            if blocking:
                first = min(blocking, key=lambda lk: (lk.priority, lk.device))
                self._refuse(
                    ident, devs, lock_type,
                    f"{describe(first, now)}; a {lock_type.value} request cannot preempt it",
                )
            key = secrets.token_urlsafe(24)
            kh = hash_key(key)
            expires = now + lease
            change = _Change()
            preempted: list[str] = []
            for old in sorted(others, key=lambda lk: lk.device):
                msg = (
                    f"preempted by {ident.holder} ({lock_type.value}"
                    f"{', reason ' + repr(reason) if reason else ''}) at {fmt_time(now)}"
                )
                preempted.append(f"{old.device} ({old.lock_type.value} of {old.holder})")
                change.events.append(LockEvent(
                    time=now, action=EventAction.PREEMPTED, device=old.device,
                    lock_type=old.lock_type, actor=ident.actor_name, holder=old.holder,
                    message=msg,
                ))
                for nk in self._notice_keys(old):
                    change.notices[nk] = f"your lock on {old.device} was {msg}"
                if old.device not in devs:
                    change.delete.append(old.device)
            if BEAMLINE in devs:
                # the holder's own device locks are absorbed by its beamline lock
                for own in conflicts.values():
                    if _same_holder(own, ident) and own.device != BEAMLINE:
                        change.delete.append(own.device)
                        change.events.append(LockEvent(
                            time=now, action=EventAction.RELEASED, device=own.device,
                            lock_type=own.lock_type, actor=ident.actor_name, holder=own.holder,
                            message="absorbed by the holder's beamline lock",
                        ))
            for d in devs:
                prev = self._locks.get(d)
                mine = prev is not None and _same_holder(prev, ident)
                hashes = ((*prev.key_hashes, kh) if mine else (kh,))[-KEY_HASHES_KEPT:]
                lock = Lock(
                    device=d, lock_type=lock_type, owner=ident.account, host=ident.host,
                    actor=ident.actor_name, acquired=prev.acquired if mine else now,
                    expires=expires, reason=reason, plan_uid=plan_uid, key_hashes=hashes,
                )
                change.upsert.append(lock)
                renewed = mine and prev.lock_type == lock_type
                change.events.append(LockEvent(
                    time=now, action=EventAction.RENEWED if renewed else EventAction.ACQUIRED,
                    device=d, lock_type=lock_type, actor=ident.actor_name, holder=ident.holder,
                    message=(f"until {fmt_time(expires)}"
                             + (f", reason {reason!r}" if reason else "")
                             + (f", plan {plan_uid}" if plan_uid else "")),
                ))
            self._apply(change)
            msg = f"granted {lock_type.value} on {', '.join(devs)} until {fmt_time(expires)}"
            if preempted:
                msg += f"; preempted {'; '.join(preempted)}"
            return AcquireResult(True, key, devs, tuple(preempted), expires, msg)

    def _select(
        self, ident: Identity, devices: Iterable[str] | None, key: str | None, verb: str
    ) -> list[Lock]:
        """The locks a release/renew names: by key, or the caller's own on ``devices``."""
        devs = tuple(sorted(set(devices or ())))
        self._refuse_key_shaped(devs)
        if key:
            kh = hash_key(key)
            held = [lk for lk in self._locks.values() if kh in lk.key_hashes]
            if not held:
                notice = self._notices.get(kh)
                raise LockError(notice or f"cannot {verb}: no active lock matches the given key")
            if devs:
                by_dev = {lk.device: lk for lk in held}
                missing = [d for d in devs if d not in by_dev]
                if missing:
                    raise LockError(
                        f"cannot {verb}: the given key does not hold {', '.join(missing)}"
                    )
                return [by_dev[d] for d in devs]
            return sorted(held, key=lambda lk: lk.device)
        if not devs:
            raise LockError(f"cannot {verb}: give device=NAME[,NAME...] or key=KEY")
        out = []
        for d in devs:
            lk = self._locks.get(d)
            if lk is None:
                notice = self._notices.get((ident.account, d))
                raise LockError(notice or f"cannot {verb}: {d[:64]!r} is not locked")
            if not _same_holder(lk, ident):
                notice = self._notices.get((ident.account, d))
                if notice:
                    raise LockError(f"{notice}; it is now held by {lk.holder}")
                raise LockError(
                    f"cannot {verb} {d}: it is held by {lk.holder} ({lk.lock_type.value}); only "
                    "the holder's account from the holder's host, or the lock's key, may "
                    + verb + " it"
                )
            out.append(lk)
        return out

    def release(
        self, ident: Identity, devices: Iterable[str] | None = None, key: str | None = None
    ) -> tuple[str, ...]:
        """Release locks named by ``key`` (optionally narrowed to ``devices``) or by device.

        Returns:
            The released devices.

        Raises:
            LockError: nothing matches, someone else holds one of them, or it was preempted /
                expired (the message says by whom and when); nothing changed.
        """
        with self._mutex:
            self.expire()
            try:
                locks = self._select(ident, devices, key, "release")
            except LockError as e:
                self._refuse(ident, devices or ("?",), None, str(e))
            now = self.clock()
            change = _Change(delete=[lk.device for lk in locks])
            for lk in locks:
                change.events.append(LockEvent(
                    time=now, action=EventAction.RELEASED, device=lk.device,
                    lock_type=lk.lock_type, actor=ident.actor_name, holder=lk.holder,
                    message="released",
                ))
                for nk in self._notice_keys(lk):
                    change.notices[nk] = (
                        f"your lock on {lk.device} was released by {ident.holder} at "
                        f"{fmt_time(now)}")
            self._apply(change)
            return tuple(lk.device for lk in locks)

    def renew(
        self,
        ident: Identity,
        devices: Iterable[str] | None = None,
        key: str | None = None,
        timeout: float | None = None,
    ) -> tuple[tuple[str, ...], float]:
        """Extend locks to ``timeout`` seconds from now (default: each type's default lease).

        Returns:
            The renewed devices and the earliest new expiry (epoch s).

        Raises:
            LockError: as :meth:`release`, or a timeout over the type's maximum.
        """
        with self._mutex:
            self.expire()
            try:
                locks = self._select(ident, devices, key, "renew")
                leases = [self._lease(lk.lock_type, timeout) for lk in locks]
            except LockError as e:
                self._refuse(ident, devices or ("?",), None, str(e))
            now = self.clock()
            change = _Change()
            for lk, lease in zip(locks, leases, strict=True):
                new = lk.model_copy(update={"expires": now + lease})
                change.upsert.append(new)
                change.events.append(LockEvent(
                    time=now, action=EventAction.RENEWED, device=lk.device,
                    lock_type=lk.lock_type, actor=ident.actor_name, holder=lk.holder,
                    message=f"until {fmt_time(new.expires)}",
                ))
            self._apply(change)
            return tuple(lk.device for lk in locks), min(lk.expires for lk in change.upsert)

    def force_release(
        self, ident: Identity, devices: Iterable[str], reason: str = ""
    ) -> tuple[str, ...]:
        """Remove the locks on ``devices`` whoever holds them (policy ``force_release`` only).

        Raises:
            LockError: the caller is not allowed, a device is unknown or not locked.
        """
        with self._mutex:
            self.expire()
            devs = tuple(sorted(set(devices)))
            if not devs:
                self._refuse(ident, ("?",), None, "no device given: device=NAME[,NAME...]")
            reason = self._check_text("reason", reason, MAX_REASON)
            if not self.policy.may_force_release(ident.account, ident.roles, ident.host):
                self._refuse(
                    ident, devs, None,
                    f"{ident.account} may not force-release locks (policy force_release: "
                    f"{', '.join(self.policy.access.force_release) or 'nobody'})",
                )
            missing = [d for d in devs if d not in self._locks]
            if missing:
                self._refuse(ident, devs, None, f"cannot force-release: "
                             f"{', '.join(m[:64] for m in missing)} not locked")
            now = self.clock()
            change = _Change(delete=list(devs))
            for d in devs:
                lk = self._locks[d]
                msg = f"force-released by {ident.holder} at {fmt_time(now)}" + (
                    f": {reason}" if reason else "")
                change.events.append(LockEvent(
                    time=now, action=EventAction.FORCE_RELEASED, device=d,
                    lock_type=lk.lock_type, actor=ident.actor_name, holder=lk.holder,
                    message=msg,
                ))
                for nk in self._notice_keys(lk):
                    change.notices[nk] = f"your lock on {d} was {msg}"
            self._apply(change)
            return devs

    def expire(self, now: float | None = None, reason: str = "") -> list[LockEvent]:
        """Drop every lock whose lease has run out; return the ``expired`` events."""
        with self._mutex:
            now = self.clock() if now is None else now
            gone = [lk for lk in self._locks.values() if lk.expires <= now]
            if not gone:
                return []
            change = _Change(delete=[lk.device for lk in gone])
            for lk in sorted(gone, key=lambda x: x.device):
                msg = f"expired at {fmt_time(lk.expires)}" + (f" {reason}" if reason else "")
                change.events.append(LockEvent(
                    time=now, action=EventAction.EXPIRED, device=lk.device,
                    lock_type=lk.lock_type, actor="pvcoord", holder=lk.holder, message=msg,
                ))
                for nk in self._notice_keys(lk):
                    change.notices[nk] = f"your lock on {lk.device} {msg}"
            try:
                self._apply(change)
            except LockError:
                return []  # store down: try again at the next tick
            return change.events
