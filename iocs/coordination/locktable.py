"""The lock table: the coordination IOC's state of pvcoord's locks, pure Python, no network.

The rules themselves (priorities, preemption, beamline lock, refusal texts and codes) are in
:mod:`pvdb.lockmodel`; this module applies them to the table and keeps it durable:

- One active lock per device; a request preempts holders of *strictly* lower priority; an equal
  or higher holder makes it fail (``holder-conflict``) with a message naming holder, type, reason
  and expiry (:func:`pvdb.lockmodel.decide_request`, :func:`pvdb.lockmodel.conflict_text`).
- The holder is an account (``Identity.account``); its repeated request is idempotent: it renews
  (and may change the type), it never conflicts with itself.
- Every lock has a lease (``timeout`` s, default and maximum per type from the policy) and expires
  server-side (:meth:`LockTable.expire`). Leases run on the monotonic clock: the published and
  stored ``acquired`` / ``expires`` are wall-clock times, and a wall-clock step neither expires nor
  extends a lock (the wall-clock times are shifted by the step and rewritten). Across a restart
  the stored wall-clock ``expires`` is the only reference (docs/locks.md, "Time").
- Acquisition returns a secret key; only SHA-256 digests are kept. Release/renew accept the key or
  the holder's own account.
- Several devices in one request are granted all or none (try-lock, no waiting).
- ``beamline`` locks every device: it conflicts with every device lock and vice versa.
- A preempted, expired, released or force-released holder is told on its next release/renew.
  These notices are stored with the change that makes them (same transaction) and reloaded on
  start, so a request retried after a restart (a PVA client re-sends an RPC whose reply was lost
  with the connection) gets the same answer as without the restart (decision 0120).
- Every change is committed to the store before it is applied in memory; the caller replies only
  after :meth:`LockTable.durable` (the store's fsync, shared by the requests in flight); if the
  store fails nothing changes.
- Rows loaded from the store are not trusted: a row that does not parse, names an unknown device,
  a type its owner may not take, a lease beyond the policy's maximum or malformed fields is
  reported (an audit event and :attr:`LockTable.load_problems`), deleted from the store and
  skipped.
- A request may carry a client-chosen ``requestId`` (a random token per call). Its outcome is
  stored with the change it made (same transaction), keyed by a digest of the id and the caller;
  a retry with a known id (a PVA client re-sends an RPC whose reply was lost, before or after a
  restart) is answered with the first answer and applies nothing. The key of a granted acquire
  is kept only encrypted under the request id, which is never stored. The newest
  :data:`REQUESTS_KEPT` outcomes younger than :data:`REQUEST_WINDOW` are kept (decision 0160).
- Every action is an audit event.

Thread-safe: every public method takes one mutex. ``listener(devices, events)`` is called under it
after each change, so publishers see changes in order.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal, NoReturn, cast

from pydantic import BaseModel, ConfigDict, Field

from pvcoord.store import (
    UNTRUSTED_ERRORS,
    AuthorityError,
    BadRow,
    OutcomeUnknownError,
    Store,
    StoreError,
)
from pvdb import lockmodel
from pvdb.lockmodel import ErrorCode, describe, fmt_time
from pvdb.models import BEAMLINE, DEVICE_NAME_RE, EventAction, Lock, LockEvent, LockType
from pvdb.policy import Policy
from pvdb.redact import MASK, looks_like_key

__all__ = [
    "AcquireResult", "ErrorCode", "Identity", "LockError", "LockTable", "describe", "fmt_time",
    "hash_key",
]

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
REFUSAL_CLIENTS_KEPT = 4096
"""Clients (account, host) whose recent refusals are counted at most (a flood of one-shot
claimed accounts must not grow memory or the per-refusal work)."""
NOTICES_KEPT = 4096
"""How many 'your lock was preempted/expired' notices are remembered for their holders (in memory
and in the store: the store keeps exactly the ones memory keeps)."""
MAX_NOTICE = 2048
"""Longest notice message accepted when loading it from the store (characters)."""
_NOTICE_CODES = frozenset({ErrorCode.PREEMPTED, ErrorCode.EXPIRED, ErrorCode.RELEASED,
                           ErrorCode.FORCE_RELEASED})
CLOCK_STEP = 1.0
"""Seconds by which the wall clock must jump against the monotonic clock to count as a step."""
LOAD_SLACK = 5.0
"""Seconds of clock difference tolerated when checking a stored lease against the policy."""
_HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")
_NAME_MAX = 255
"""Longest stored owner, actor or host accepted on load (PVA accounts are claimed freely)."""
REQUEST_WINDOW = 600.0
"""Seconds a request outcome is kept for a retry. A PVA client re-sends an RPC only while its
call is waiting (p4p cancels the operation at the caller's timeout: 5 s by default in
:mod:`pvcoord.client`), so a retry comes within one call timeout of the first send plus the
restart; 600 s covers call timeouts of minutes and a restart by systemd several times over."""
REQUESTS_KEPT = 16384
"""Most request outcomes kept (in memory and in the store: the same ones). At the measured 250
acquire+release pairs/s with fsync (docs/benchmarks.md, 4 clients: 500 requests/s) this is the
last 30 s of requests, still six times the default call timeout. Memory when full: about 15 MB
(measured with tracemalloc: 0.9 kB per outcome with its id and ordering)."""
_OUTCOME_MESSAGE_MAX = 262_144
"""Longest stored acquire message (characters): 256 devices and their preempted holders named."""
_OutcomeName = Annotated[str, Field(max_length=1024)]


class LockError(Exception):
    """A request that was refused or invalid; ``str(e)`` is the message for the client.

    Attributes:
        code: the machine-readable reason (:class:`pvdb.lockmodel.ErrorCode`).
        holder: ``account@host`` of the lock that caused it, or ''.
        audited: true once the refusal is recorded as an audit event.
    """

    audited: bool = False

    def __init__(
        self, message: str, code: ErrorCode = ErrorCode.BAD_ARGUMENT, holder: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.holder = holder

    @property
    def text(self) -> str:
        """The RPC error text: ``[code holder=...] message`` (:func:`pvdb.lockmodel.error_text`)."""
        return lockmodel.error_text(self.code, str(self), self.holder)


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


@dataclass(frozen=True)
class Notice:
    """What a holder is told on its next release/renew about a lock it lost."""

    code: ErrorCode
    message: str
    holder: str = ""
    """``account@host`` of who took it (preempted, released, force-released), or ''."""

    def error(self, suffix: str = "", holder: str = "") -> LockError:
        """This notice as a :class:`LockError` (``suffix`` appended to the message)."""
        return LockError(self.message + suffix, self.code, holder or self.holder)

    def to_json(self, t: float) -> str:
        """The stored form: JSON with ``code``, ``message``, ``holder`` and ``time`` (epoch s)."""
        return json.dumps({"code": self.code.value, "message": self.message,
                           "holder": self.holder, "time": t})

    @staticmethod
    def from_json(text: str) -> tuple[float, Notice] | None:
        """(time, notice) from :meth:`to_json`'s text, or ``None`` if it is not one (untrusted)."""
        try:
            d = json.loads(text)
            code = ErrorCode(d["code"])
            message, holder, t = d["message"], d["holder"], float(d["time"])
        except UNTRUSTED_ERRORS:
            return None
        if (code not in _NOTICE_CODES or not isinstance(message, str)
                or not isinstance(holder, str) or not math.isfinite(t)
                or len(message) > MAX_NOTICE or len(holder) > 2 * _NAME_MAX + 1
                or not (message + holder).isprintable()):
            return None
        return t, Notice(code, message, holder)


def _notice_id(k: object) -> str:
    """The store id of a notice key: ``key:<digest>`` or ``holder:["account", "device"]``."""
    if isinstance(k, str):
        return "key:" + k
    return _holder_notice_id(*cast(tuple[str, str], k))


@functools.lru_cache(maxsize=2 * NOTICES_KEPT)
def _holder_notice_id(owner: str, device: str) -> str:
    """``holder:["account", "device"]`` (the same few holders and devices recur: cached)."""
    return "holder:" + json.dumps([owner, device])


def _shown(text: str | bytes) -> str:
    """Stored text as shown in a report, at most 64 characters.

    Bytes are decoded (bad ones replaced); control and format characters become ``?``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text[:64])


def _notice_key(nid: str) -> object | None:
    """The notice key of a store id (:func:`_notice_id`), or ``None`` if it is not one."""
    if nid.startswith("key:") and _HASH_RE.match(nid[4:]):
        return nid[4:]
    if nid.startswith("holder:"):
        try:
            v = json.loads(nid[7:])
        except UNTRUSTED_ERRORS:
            return None
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v):
            return (v[0], v[1])
    return None


class Outcome(BaseModel):
    """The stored answer to a request with a ``requestId`` (untrusted when loaded).

    ``key`` is the acquire's key sealed under the request id (:func:`seal_key`), ``key_hash``
    its digest; the other fields are what the reply carried.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rpc: Literal["acquire", "release", "renew", "force-release"]
    args: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the request's arguments (:func:`_args_digest`): a reused id is told apart."""
    time: float
    devices: tuple[_OutcomeName, ...] = Field(default=(), max_length=MAX_DEVICES)
    expires: float = 0.0
    preempted: tuple[_OutcomeName, ...] = Field(default=(), max_length=MAX_DEVICES)
    message: str = Field(default="", max_length=_OUTCOME_MESSAGE_MAX)
    key: str = Field(default="", pattern=r"^([0-9a-f]{2}){0,128}$")
    key_hash: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")


def _record_id(ident: Identity, request_id: str) -> str:
    """The store id of a request's outcome: SHA-256 of the caller and the request id.

    The caller is part of it, so another account's request with the same id is another request.
    """
    who = json.dumps(["pvcoord request", ident.actor_name, ident.account, ident.host, request_id])
    return hashlib.sha256(who.encode()).hexdigest()


def _args_digest(rpc: str, *parts: object) -> str:
    """SHA-256 of an RPC's name and canonical arguments (a key only as its digest)."""
    return hashlib.sha256(json.dumps([rpc, *parts]).encode()).hexdigest()


def _pad(request_id: str, record_id: str, n: int) -> bytes:
    """``n`` bytes of HMAC-SHA256 keystream keyed by the (secret, never stored) request id."""
    secret = request_id.encode()
    blocks = (n + 31) // 32  # one one-shot HMAC (hmac.digest, in C) per 32 bytes
    return b"".join(hmac.digest(secret, f"pvcoord reply key {record_id} {block}".encode(),
                                "sha256") for block in range(blocks))[:n]


def _xor(data: bytes, pad: bytes) -> bytes:
    """``data`` XOR ``pad`` (same length), as one integer operation."""
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")


def seal_key(key: str, request_id: str, record_id: str) -> str:
    """``key`` encrypted for the store (hex): only a holder of ``request_id`` can read it.

    Each request id seals one key once (its record id is unique), so the keystream is never
    reused; :func:`open_key` checks the result against the stored digest.
    """
    raw = key.encode()
    return _xor(raw, _pad(request_id, record_id, len(raw))).hex()


def open_key(sealed: str, request_id: str, record_id: str) -> str:
    """The key that :func:`seal_key` sealed (``ValueError`` if it is not text)."""
    raw = bytes.fromhex(sealed)
    return _xor(raw, _pad(request_id, record_id, len(raw))).decode("ascii")


@dataclass(frozen=True)
class _Request:
    """A request with a ``requestId``.

    Its record id, its arguments' digest, and the stored outcome if it was answered before (then
    nothing is applied).
    """

    request_id: str
    record_id: str
    args: str
    stored: Outcome | None


@dataclass
class _Change:
    upsert: list[Lock] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[LockEvent] = field(default_factory=list)
    notices: dict[object, Notice] = field(default_factory=dict)
    outcome: tuple[str, Outcome] | None = None
    """(record id, outcome) of the request that makes this change, stored with it."""


def _same_holder(lock: Lock, ident: Identity) -> bool:
    """Whether ``ident`` is the lock's holder (:func:`pvdb.lockmodel.same_holder`)."""
    return lockmodel.same_holder(lock, ident.account, ident.host)


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a key: what locks and the store keep instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


class LockTable:
    """Active locks of one endstation, with the policy and the store behind them.

    Args:
        policy: who may take which type; leases.
        store: durable storage; locks are reloaded from it (expired ones dropped and reported).
        devices: accepted device names, or ``None`` while unknown (then every acquire is refused
            until :meth:`set_devices` is called).
        clock: epoch seconds (tests may pass a fake clock).
        listener: called as ``listener(changed_devices, events)`` after every change.
        monotonic: the clock leases run on (seconds, any origin). Default: ``time.monotonic``
            with the default ``clock``, else ``clock`` itself (one fake clock drives both).
        roles_of: OS groups of an account, to check stored locks against the policy on load
            (default: no groups).
    """

    def __init__(
        self,
        policy: Policy,
        store: Store,
        devices: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
        listener: Callable[[set[str], list[LockEvent]], None] | None = None,
        monotonic: Callable[[], float] | None = None,
        roles_of: Callable[[str], frozenset[str]] | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.listener = listener
        self._roles_of = roles_of or (lambda _account: frozenset())
        self._mutex = threading.RLock()
        self._devices: frozenset[str] | None = None if devices is None else frozenset(devices)
        self._locks: dict[str, Lock] = {}
        self._deadline: dict[str, float] = {}  # device -> monotonic end of its lease
        self._heap: list[tuple[float, str]] = []  # (deadline, device); stale entries skipped
        self._by_key: dict[str, set[str]] = {}  # key digest -> devices it holds
        self._offset = self.clock() - self.monotonic()
        self._notices: OrderedDict[object, Notice] = OrderedDict()
        # record id -> (time, the stored JSON of its Outcome), oldest first; kept as text (a
        # pydantic object costs twice as much), parsed only when a retry comes
        self._outcomes: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._store_error: str | None = None
        self._store_error_logged = 0.0
        self._tls = threading.local()
        self._last_token = 0
        self._authority_error: str | None = None
        self._unverified: set[str] = set()  # loaded before the device list was known
        self._unstored_events: list[LockEvent] = []  # expiries made while the store failed
        self.load_problems: list[str] = []
        """One line per stored lock row rejected at start, one per kind of other rows (notices,
        request outcomes) with any rejected (shown in ``Coord:Health``)."""
        self.rows_rejected = 0
        """Stored rows (locks, notices, request outcomes) rejected at start."""
        self._refusal_times: dict[tuple[str, str], deque[float]] = {}
        self._refusals_missed: dict[tuple[str, str], int] = {}
        self.refusals_not_stored = 0
        """Refusals not stored as audit events because of the per-client rate limit."""
        rejected = self._load()
        self.startup_events: list[LockEvent] = rejected + self.expire(
            reason="while the IOC was down")

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
        """Replace the accepted device names (from the registry). Existing locks are kept.

        Locks loaded from the store before the first device list arrived are checked against
        it: one on an unknown device is rejected like any bad row (event, deleted, skipped).
        """
        with self._mutex:
            self._devices = frozenset(devices) - {BEAMLINE}
            unknown = sorted(d for d in self._unverified
                             if d != BEAMLINE and d not in self._devices and d in self._locks)
            self._unverified.clear()
            if not unknown:
                return
            bad = [BadRow(d, self._locks[d].holder, "unknown device (not in the registry)")
                   for d in unknown]
            for d in unknown:
                self._drop(d)
            events = self._reject(bad, self.clock())
            self.startup_events.extend(events)
            if self.listener is not None:
                self.listener(set(unknown), events)

    def _put(self, lk: Lock) -> None:
        """Hold ``lk`` in memory; its lease ends ``expires - now`` s from now, monotonically."""
        end = self.monotonic() + (lk.expires - self.clock())
        self._unindex(lk.device)
        self._locks[lk.device] = lk
        for h in lk.key_hashes:
            self._by_key.setdefault(h, set()).add(lk.device)
        self._deadline[lk.device] = end
        heapq.heappush(self._heap, (end, lk.device))
        if len(self._heap) > 4 * len(self._locks) + 64:  # drop stale entries now and then
            self._heap = [(e, d) for d, e in self._deadline.items()]
            heapq.heapify(self._heap)

    def _unindex(self, device: str) -> None:
        old = self._locks.get(device)
        if old is None:
            return
        for h in old.key_hashes:
            devs = self._by_key.get(h)
            if devs is not None:
                devs.discard(device)
                if not devs:
                    del self._by_key[h]

    def _drop(self, device: str) -> None:
        self._unindex(device)
        self._locks.pop(device, None)
        self._deadline.pop(device, None)

    def locks(self) -> list[Lock]:
        """Active locks sorted by device."""
        with self._mutex:
            return [self._locks[d] for d in sorted(self._locks)]

    def effective(self, device: str) -> Lock | None:
        """The lock that governs ``device`` (:func:`pvdb.lockmodel.effective`)."""
        with self._mutex:
            return lockmodel.effective(self._locks, device)

    def next_expiry(self) -> float | None:
        """Earliest expiry (epoch s) of any lock, or None."""
        with self._mutex:
            return min((lk.expires for lk in self._locks.values()), default=None)

    def get(self, device: str) -> Lock | None:
        """The lock on ``device`` itself (not a ``beamline`` lock covering it), or None."""
        return self._locks.get(device)

    def remaining(self, lock: Lock) -> float:
        """Seconds of lease left for ``lock`` on the monotonic clock (0 when over)."""
        with self._mutex:
            end = self._deadline.get(lock.device)
            if end is None:
                return max(0.0, lock.expires - self.clock())
            return max(0.0, end - self.monotonic())

    # --- loading untrusted rows ---------------------------------------------------------------

    def _check_loaded(self, lk: Lock, now: float) -> str | None:
        """Why a stored lock cannot be trusted, or None."""
        if lk.device != BEAMLINE and not DEVICE_NAME_RE.match(lk.device):
            return "not a valid device name"
        if self._devices is not None and lk.device != BEAMLINE and lk.device not in self._devices:
            return "unknown device (not in the registry)"
        for name, value in (("acquired", lk.acquired), ("expires", lk.expires)):
            if not math.isfinite(value):
                return f"{name} is not a finite time"
        lp = self.policy.lock_types[lk.lock_type]
        if lk.expires - now > lp.max_lease + LOAD_SLACK:
            return (f"lease ends in {lk.expires - now:.0f} s, beyond the {lk.lock_type.value} "
                    f"maximum of {lp.max_lease:g} s")
        if lk.acquired > now + LOAD_SLACK or lk.acquired > lk.expires:
            return "acquired lies in the future or after its expiry"
        # the checks of a request's text (_check_text): printable, bounded
        for name, value in (("owner", lk.owner), ("actor", lk.actor), ("host", lk.host)):
            if not value or len(value) > _NAME_MAX or not value.isprintable():
                return f"{name} is empty, too long or has control or format characters"
        if len(lk.reason) > MAX_REASON or len(lk.plan_uid) > MAX_PLAN_UID or not (
                lk.reason + lk.plan_uid).isprintable():
            return "reason or planUid is too long or has control or format characters"
        if len(lk.key_hashes) > KEY_HASHES_KEPT or not all(
                _HASH_RE.match(h) for h in lk.key_hashes):
            return "key digests are malformed"
        if not self.policy.may_take(lk.lock_type, lk.owner, self._roles_of(lk.owner), lk.host):
            return f"{lk.owner} may not take {lk.lock_type.value} locks (policy)"
        return None

    def _load_notices(self) -> list[LockEvent]:
        """Reload the stored notices (newest :data:`NOTICES_KEPT`).

        Bad rows are reported (:attr:`load_problems`, the returned events) and deleted.
        """
        loaded: list[tuple[float, object, Notice]] = []
        bad: list[str | bytes] = []
        for nid, data in self.store.load_notices():
            k = _notice_key(nid) if isinstance(nid, str) else None
            got = Notice.from_json(data) if k is not None else None
            if got is None:
                bad.append(nid)
                continue
            loaded.append((got[0], k, got[1]))
        loaded.sort(key=lambda x: x[0])  # stable: a store's write order stays for equal times
        cut = max(0, len(loaded) - NOTICES_KEPT)
        for _, k, n in loaded[cut:]:
            self._notices[k] = n
        drop: list[str | bytes] = [*bad, *(_notice_id(k) for _, k, _ in loaded[:cut])]
        events = self._report_bad("notice", bad)
        if drop:
            try:
                self._last_token = max(self._last_token, self.store.commit(
                    [], [], events, notices=dict.fromkeys(drop)))
            except StoreError as e:
                log.error("could not delete the rejected notice rows: %s", e)
        return events

    def _report_bad(self, kind: str, ids: list[str | bytes]) -> list[LockEvent]:
        """Report stored ``kind`` rows (notice, request outcome) rejected at start.

        One :attr:`load_problems` line and one ``refused`` event for all of them.
        """
        if not ids:
            return []
        self.rows_rejected += len(ids)
        shown = [_shown(i) for i in ids[:3]]
        line = (f"{len(ids)} stored {kind} row{'s' * (len(ids) > 1)} not valid "
                f"(e.g. {shown[0]!r})")
        self.load_problems.append(line)
        log.error("%s rejected at start and deleted: %s", line, ", ".join(map(repr, shown)))
        return [LockEvent(time=self.clock(), action=EventAction.REFUSED, device="?",
                          actor="pvcoord", message=lockmodel.error_text(
                              ErrorCode.BAD_STORED_ROW, f"{line}: rejected at start and deleted"))]

    def _load_outcomes(self, now: float) -> list[LockEvent]:
        """Reload the stored request outcomes younger than :data:`REQUEST_WINDOW`.

        The newest :data:`REQUESTS_KEPT` are kept; bad, old and surplus rows are deleted (bad
        ones reported). ``now``: the restart's reference time (:meth:`_restart_reference`).
        """
        loaded: list[tuple[float, str, Outcome]] = []
        bad: list[str | bytes] = []
        old: list[str] = []
        for rid, data in self.store.load_requests():
            try:
                if not isinstance(rid, str) or not _HASH_RE.match(rid):
                    raise ValueError("not a record id")
                out = Outcome.model_validate_json(data)
            except UNTRUSTED_ERRORS:
                bad.append(rid)
                continue
            if not now - REQUEST_WINDOW <= out.time <= now + LOAD_SLACK:
                old.append(rid)
                continue
            loaded.append((out.time, rid, out))
        loaded.sort(key=lambda x: x[0])
        cut = max(0, len(loaded) - REQUESTS_KEPT)
        for t, rid, out in loaded[cut:]:
            self._outcomes[rid] = (t, out.model_dump_json())
        drop: list[str | bytes] = [*bad, *old, *(rid for _, rid, _ in loaded[:cut])]
        events = self._report_bad("request outcome", bad)
        if drop:
            try:
                self._last_token = max(self._last_token, self.store.commit(
                    [], [], events, requests=dict.fromkeys(drop)))
            except StoreError as e:
                log.error("could not delete old or rejected request outcome rows: %s", e)
        return events

    def _load(self) -> list[LockEvent]:
        """Load the store's locks, validating each; report, delete and skip the bad rows.

        Leases are counted from :meth:`_restart_reference`: the wall clock, or the store's newest
        audit event where the clock is behind it (stepped back while the IOC was down); the
        loaded locks' times are then shifted into the clock's present and rewritten.
        """
        now = self.clock()
        ref = self._restart_reference(now)  # before any commit here adds a newer event
        back = ref - now
        reported = self._load_notices() + self._load_outcomes(ref)
        good, bad = self.store.load_rows()
        shifted: list[Lock] = []
        for lk in good:
            why = self._check_loaded(lk, ref)
            if why is not None:
                bad.append(BadRow(lk.device, lk.holder, why))
                continue
            if back:
                lk = lk.model_copy(update={"acquired": lk.acquired - back,
                                           "expires": lk.expires - back})
                shifted.append(lk)
            self._put(lk)
            if self._devices is None:
                self._unverified.add(lk.device)
        if shifted:
            text = (f"the wall clock is {back:.1f} s behind the store's newest event (stepped "
                    f"back while the IOC was down?): {len(shifted)} lease(s) counted from that "
                    f"event, their times shifted by -{back:.1f} s")
            log.warning("%s", text)
            # an event at the new clock: the next restart must not read the same step again
            reported.append(LockEvent(
                time=now, action=EventAction.CLOCK_STEP, actor="pvcoord", message=text,
                device=",".join(sorted(lk.device for lk in shifted))[:256]))
            try:
                self._last_token = max(self._last_token, self.store.commit(
                    shifted, [], reported[-1:]))
            except StoreError as e:  # memory is right; a later change rewrites the rows
                log.error("could not rewrite the shifted lease times: %s", e)
        locked = [d for d in self._locks if d != BEAMLINE]
        if BEAMLINE in self._locks and locked:  # a state the rules never produce
            for d in locked:
                bad.append(BadRow(d, self._locks[d].holder, "a device lock beside a beamline lock"))
                self._drop(d)
        return reported + self._reject(bad, now)

    def _restart_reference(self, now: float) -> float:
        """The wall-clock time a restart counts the stored leases from.

        ``now``, unless the store's newest audit event is more than :data:`CLOCK_STEP` later:
        then the clock stepped back while the IOC was down, and that event's time is the
        reference (the IOC ran at least until then). So a backward step does not lengthen a
        lease, and a lock acquired "in the future" of the stepped clock is not rejected; the
        time since that event and the downtime are not known, so a lease may come back up to
        that much longer than it had (never longer than when that event was written). A forward
        step is not detectable and shortens the leases (docs/locks.md, "Time").
        """
        try:
            tail = self.store.recent_events(1)
        except StoreError as e:
            log.warning("cannot read the newest stored event (%s): leases counted from now", e)
            return now
        newest = tail[-1].time if tail else now
        if math.isfinite(newest) and newest - now > CLOCK_STEP:
            return newest
        return now

    def _reject(self, bad: list[BadRow], now: float) -> list[LockEvent]:
        if not bad:
            return []
        events = []
        self.rows_rejected += len(bad)
        for b in bad:
            line = f"{b.key[:64]!r}: {b.why}"
            self.load_problems.append(line)
            events.append(LockEvent(
                time=now, action=EventAction.REFUSED, device=_shown(b.key[:64]) or "?",
                actor="pvcoord", holder=b.data[:128] if "@" in b.data[:128] else "",
                message=lockmodel.error_text(ErrorCode.BAD_STORED_ROW,
                                             f"stored lock rejected at start and deleted: {b.why}"),
            ))
            log.error("stored lock row %s rejected: %s (data %r)", b.key[:64], b.why, b.data)
        try:
            self._last_token = max(self._last_token, self.store.commit(
                [], [b.raw if b.raw is not None else b.key for b in bad], events))
        except StoreError as e:
            log.error("could not delete the rejected rows: %s", e)
        return events

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
            if len(self._refusal_times) > REFUSAL_CLIENTS_KEPT:
                self._forget_refusing_clients(now)
            return True

    def _forget_refusing_clients(self, now: float) -> None:
        """Bound the per-client refusal counts (call it under the mutex).

        Clients idle for a :data:`REFUSAL_WINDOW` are forgotten; if that is not enough (a flood
        of one-shot accounts), the quarter that refused longest ago too, so the scan runs once per
        :data:`REFUSAL_CLIENTS_KEPT` / 4 new clients at most.
        """
        rt = self._refusal_times
        idle = [k for k, t in rt.items() if not t or now - t[-1] > REFUSAL_WINDOW]
        if len(rt) - len(idle) > REFUSAL_CLIENTS_KEPT * 3 // 4:
            idle = sorted(rt, key=lambda k: rt[k][-1] if rt[k] else -math.inf)[
                :len(rt) - REFUSAL_CLIENTS_KEPT * 3 // 4]
        for k in idle:
            del rt[k]
            self._refusals_missed.pop(k, None)

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
                "granted until it is", ErrorCode.NOT_READY,
            )
        unknown = [d for d in devs if d != BEAMLINE and d not in self._devices]
        if unknown:
            shown = ", ".join(repr(d[:64]) for d in unknown[:5])
            raise LockError(
                f"unknown device {shown}: not in the registry (known: "
                f"{', '.join(sorted(self._devices)[:20]) or 'none'}, or '{BEAMLINE}')",
                ErrorCode.UNKNOWN_DEVICE,
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
        """While the store is failing: try to resynchronise it; clear the error if that works.

        Works means also durable: a new (empty) commit must reach stable storage, which after a
        failed fsync needs the store's checkpoint first (:meth:`pvcoord.store.SQLiteStore.durable`).
        """
        with self._mutex:
            if self._store_error is None:
                return
            try:
                self._resync_durable()
            except StoreError as e:
                self._store_error = str(e)
                return
            log.warning("store answers again")
            self._store_error = None

    def _resync(self) -> None:
        """Make the store equal to memory after a failure.

        A failed commit may still have been applied (e.g. a Redis MULTI/EXEC whose reply was
        lost); the client was told nothing changed, and memory holds what clients were told, so
        memory wins. Expiries made in memory only while the store failed are written with their
        events. Raises StoreError if the store still fails.
        """
        if self._unstored_events:
            self.store.commit([], [], self._unstored_events)
            self._unstored_events = []
        extra = [rid for rid, _ in self.store.load_requests() if rid not in self._outcomes]
        if extra:  # outcomes of changes that clients were told failed
            self.store.commit([], [], [], requests=dict.fromkeys(extra))
        stored = {lk.device: lk for lk in self.store.load_locks()}
        if stored == self._locks:
            return
        upsert = [lk for d, lk in self._locks.items() if stored.get(d) != lk]
        delete = [d for d in stored if d not in self._locks]
        log.warning("store disagreed with memory after a store failure (%d to write, %d to "
                    "delete): memory wins", len(upsert), len(delete))
        self.store.commit(upsert, delete, [])

    def _resync_durable(self) -> None:
        """:meth:`_resync`, then make sure a new commit is durable.

        After a failed fsync the store restores durability first (a checkpoint). Raises
        StoreError if it cannot.
        """
        self._resync()
        try:
            token = self.store.commit([], [], [])
        except OutcomeUnknownError as e:  # an empty commit: nothing of a request was in it
            raise StoreError(str(e)) from None
        self.store.durable(token)
        self._last_token = max(self._last_token, token)  # the tick's flush waits for this one

    def _apply(self, change: _Change) -> None:
        if self._authority_error is not None:
            raise LockError(f"this IOC is no longer the lock authority, nothing changed: "
                            f"{self._authority_error}")
        try:
            if self._store_error is not None:
                self._resync_durable()
            pops, evict, writes = self._notice_plan(change)
            gone, req_writes = self._outcome_plan(change)
            token = self.store.commit(change.upsert, change.delete, change.events,
                                      notices=writes, requests=req_writes)
        except StoreError as e:
            now = time.monotonic()
            if self._store_error is None or now - self._store_error_logged > 10:
                log.error("store failed, nothing changed: %s", e)
                self._store_error_logged = now
            self._store_error = str(e)
            if isinstance(e, OutcomeUnknownError):
                # memory is unchanged; when the store answers, _resync makes it equal to memory
                # (the change undone) unless this IOC stops first (then the store's state stands)
                raise LockError(
                    f"the lock store failed after the change may have reached it: {e}; it may "
                    "or may not stand: check with Renew or Coord:Locks once the store answers",
                    ErrorCode.OUTCOME_UNKNOWN) from None
            raise LockError(
                f"the lock store failed, nothing changed: {e}", ErrorCode.STORE_UNAVAILABLE
            ) from None
        if self._store_error is not None:
            log.warning("store works again")
            self._store_error = None
        self._tls.token = max(getattr(self._tls, "token", 0), token)
        self._last_token = max(self._last_token, token)
        self._apply_memory(change, pops, evict, gone, req_writes)

    def _apply_memory(self, change: _Change, pops: list[object], evict: list[object],
                      gone: list[str], req_writes: dict[str | bytes, str | None]) -> None:
        """The memory half of :meth:`_apply` (after the store took the change), and its posts."""
        for d in change.delete:
            self._drop(d)
        for lk in change.upsert:
            self._put(lk)
        for k in pops:
            del self._notices[k]
        for k, msg in change.notices.items():
            self._notices[k] = msg
            self._notices.move_to_end(k)
        for k in evict:
            self._notices.pop(k, None)
        for rid in gone:
            self._outcomes.pop(rid, None)
        if change.outcome is not None:
            rid, out = change.outcome
            self._outcomes[rid] = (out.time, cast(str, req_writes[rid]))
            self._outcomes.move_to_end(rid)
        if log.isEnabledFor(logging.INFO):  # the line is built only when it is logged
            for e in change.events:
                log.info("%s", e.line())
        if self.listener is not None:
            changed = {lk.device for lk in change.upsert} | set(change.delete)
            self.listener(changed, change.events)

    def _notice_plan(
        self, change: _Change
    ) -> tuple[list[object], list[object], dict[str | bytes, str | None]]:
        """How ``change`` changes the notices: (popped, evicted, the store's writes).

        A new lock makes its holder's old notice on that device stale (popped); the change's
        notices become the newest; the oldest beyond :data:`NOTICES_KEPT` are evicted. The store
        gets the same edits in the change's transaction, so after a restart it holds what memory
        held.
        """
        adds = change.notices
        pops: list[object] = list({k for k in ((lk.owner, lk.device) for lk in change.upsert)
                                   if k in self._notices and k not in adds})
        if not adds and not pops:
            return [], [], {}
        size = len(self._notices) - len(pops) + sum(1 for k in adds if k not in self._notices)
        evict: list[object] = []
        if size > NOTICES_KEPT:
            popped = set(pops)
            order = itertools.chain(
                (k for k in self._notices if k not in adds and k not in popped), adds)
            evict = list(itertools.islice(order, size - NOTICES_KEPT))
        now = self.clock()
        texts: dict[int, str] = {}  # a lock's key and holder notices share one Notice: encode once
        writes: dict[str | bytes, str | None] = {}
        for k, n in adds.items():
            text = texts.get(id(n))
            if text is None:
                text = texts[id(n)] = n.to_json(now)
            writes[_notice_id(k)] = text
        for k in (*pops, *evict):
            writes[_notice_id(k)] = None
        return pops, evict, writes

    def _outcome_plan(self, change: _Change) -> tuple[list[str], dict[str | bytes, str | None]]:
        """How ``change`` changes the stored outcomes: (evicted ids, the store's writes).

        The change's outcome becomes the newest; outcomes older than :data:`REQUEST_WINDOW`
        and the oldest beyond :data:`REQUESTS_KEPT` are evicted in the same transaction.
        """
        if change.outcome is None:
            return [], {}
        rid, out = change.outcome
        horizon = out.time - REQUEST_WINDOW
        size = len(self._outcomes) + (rid not in self._outcomes)
        gone: list[str] = []
        for old_id, (old_time, _) in self._outcomes.items():  # oldest first
            if old_id != rid and (old_time < horizon or size > REQUESTS_KEPT):
                gone.append(old_id)
                size -= 1
            elif old_id != rid:
                break
        writes: dict[str | bytes, str | None] = dict.fromkeys(gone)
        writes[rid] = out.model_dump_json()
        return gone, writes

    def _request(
        self, ident: Identity, request_id: str | None, devices: Iterable[str] | None,
        rpc: str, args: Callable[[], tuple[object, ...]],
    ) -> _Request | None:
        """The request with id ``request_id`` (``None`` without one), and its stored outcome.

        ``args()`` gives the request's canonical arguments (called only with an id: without
        one nothing is digested). A known id with another RPC or other arguments is refused
        (``request-id-reused``); a malformed id is refused (``bad-argument``); nothing changes.
        Call it under the mutex.
        """
        if request_id is None:
            return None
        problem = lockmodel.request_id_problem(request_id)
        if problem is not None:
            self._refuse(ident, devices or ("?",), None, problem)
        rid = _record_id(ident, request_id)
        digest = _args_digest(rpc, *args())
        entry = self._outcomes.get(rid)
        out = None
        if entry is not None and entry[0] >= self.clock() - REQUEST_WINDOW:
            out = Outcome.model_validate_json(entry[1])  # validated when stored or loaded
        if out is not None:
            if out.rpc != rpc or out.args != digest:
                self._refuse(
                    ident, devices or ("?",), None,
                    f"this requestId was already used for another request ({out.rpc} at "
                    f"{fmt_time(out.time)}); make a new requestId for each call",
                    ErrorCode.REQUEST_ID_REUSED)
            log.info("%s by %s retried (known requestId): answered as at %s, nothing applied",
                     rpc, ident.holder, fmt_time(out.time))
            # the reply waits for the first answer's fsync like the first reply did
            self._tls.token = max(getattr(self._tls, "token", 0), self._last_token)
        return _Request(request_id, rid, digest, out)

    def durable(self) -> None:
        """Wait until this thread's changes are on stable storage; call it before replying.

        Several threads waiting at once share one fsync (group commit). Call it without
        holding :attr:`mutex`.

        Raises:
            LockError: the store could not flush; the change is in effect (memory and the
                store's file) but may not survive a power loss of the host.
        """
        token = getattr(self._tls, "token", 0)
        self._tls.token = 0
        try:
            self.store.durable(token)
        except StoreError as e:
            self._store_error = str(e)
            log.error("store flush failed: %s", e)
            err = LockError(f"the lock store could not flush the change to disk ({e}); it is "
                            "in effect but may not survive a power loss")
            err.audited = True
            raise err from None

    @property
    def authority_error(self) -> str | None:
        """Why this IOC lost the store's authority (then every change is refused), or None."""
        return self._authority_error

    def keep_authority(self) -> None:
        """Renew the store's authority (every second); on loss refuse every further change."""
        try:
            self.store.keep_authority()
        except AuthorityError as e:
            if self._authority_error is None:
                log.error("%s: refusing every change from now on", e)
            self._authority_error = str(e)
        except StoreError as e:
            self._store_error = str(e)

    def flush(self) -> None:
        """Make every change so far durable (the IOC's tick: expiry and refusal events)."""
        try:
            self.store.durable(self._last_token)
        except StoreError as e:
            self._store_error = str(e)

    def audit_refusal(
        self, ident: Identity, devices: Iterable[str], lt: LockType | None, msg: str,
        code: ErrorCode = ErrorCode.BAD_ARGUMENT, holder: str = "",
    ) -> None:
        """Record a refused request as an audit event (best effort: a store failure is logged).

        The event's message is the refusal's RPC error text, ``[code holder=...] msg``
        (:func:`pvdb.lockmodel.error_text`; ``holder`` is the holder the refusal names, the
        event's own ``holder`` is the requester). A key-shaped device argument (a key typed where
        a device belongs) is recorded as ``***``.
        """
        devices = list(devices)
        if not self._refusal_allowed(ident):
            return
        msg = lockmodel.error_text(code, msg, holder)
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
            lock_type=lt, actor=ident.actor_name[:_NAME_MAX],
            holder=ident.holder[:2 * _NAME_MAX + 1], message=msg[:1024],
        )
        with self._mutex:
            try:
                self._apply(_Change(events=[ev]))
            except LockError:
                pass

    def _refuse(
        self, ident: Identity, devices: Iterable[str], lt: LockType | None, msg: str,
        code: ErrorCode = ErrorCode.BAD_ARGUMENT, holder: str = "",
    ) -> NoReturn:
        """Audit a refusal and raise it (as a :class:`LockError` with ``code`` and ``holder``)."""
        self.audit_refusal(ident, devices, lt, msg, code, holder)
        err = LockError(msg, code, holder)
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
        request_id: str | None = None,
    ) -> AcquireResult:
        """Grant ``lock_type`` on every one of ``devices`` to ``ident``, or none of them.

        ``request_id`` (optional, :func:`pvdb.lockmodel.request_id_problem`): a retry with an id
        this table answered before gets that answer, the same key included, and nothing changes.

        Returns:
            The result with a new secret key that releases/renews these locks.

        Raises:
            LockError: bad arguments, not allowed by the policy, or a holder of equal or higher
                priority (the message names it); nothing changed.
        """
        with self._mutex:
            devices = list(devices)
            req = self._request(ident, request_id, devices, "acquire", lambda: (
                sorted(set(devices)), lock_type.value, timeout, reason, plan_uid))
            if req is not None and req.stored is not None:
                return self._replayed_grant(ident, devices, req, req.stored)
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
                    ErrorCode.NOT_ALLOWED,
                )
            now = self.clock()
            decision = lockmodel.decide_request(self._locks, devs, ident.account, lock_type,
                                               ident.host)
            if decision.blocker is not None:
                first = decision.blocker
                self._refuse(
                    ident, devs, lock_type, lockmodel.conflict_text(first, lock_type, now),
                    ErrorCode.HOLDER_CONFLICT, first.holder,
                )
            key = secrets.token_urlsafe(24)
            kh = hash_key(key)
            expires = now + lease
            change = _Change()
            preempted: list[str] = []
            for old in decision.preempt:
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
                    change.notices[nk] = Notice(
                        ErrorCode.PREEMPTED, f"your lock on {old.device} was {msg}", ident.holder)
                if old.device not in devs:
                    change.delete.append(old.device)
            if BEAMLINE in devs:
                # the holder's own device locks are absorbed by its beamline lock
                for own in decision.own:
                    if own.device != BEAMLINE:
                        change.delete.append(own.device)
                        change.events.append(LockEvent(
                            time=now, action=EventAction.RELEASED, device=own.device,
                            lock_type=own.lock_type, actor=ident.actor_name, holder=own.holder,
                            message="absorbed by the holder's beamline lock",
                        ))
            for d in devs:
                prev = self._locks.get(d)
                mine = prev if prev is not None and _same_holder(prev, ident) else None
                hashes = ((*mine.key_hashes, kh) if mine else (kh,))[-KEY_HASHES_KEPT:]
                lock = Lock(
                    device=d, lock_type=lock_type, owner=ident.account, host=ident.host,
                    actor=ident.actor_name, acquired=mine.acquired if mine else now,
                    expires=expires, reason=reason, plan_uid=plan_uid, key_hashes=hashes,
                )
                change.upsert.append(lock)
                renewed = mine is not None and mine.lock_type == lock_type
                change.events.append(LockEvent(
                    time=now, action=EventAction.RENEWED if renewed else EventAction.ACQUIRED,
                    device=d, lock_type=lock_type, actor=ident.actor_name, holder=ident.holder,
                    message=(f"until {fmt_time(expires)}"
                             + (f", reason {reason!r}" if reason else "")
                             + (f", plan {plan_uid}" if plan_uid else "")),
                ))
            msg = f"granted {lock_type.value} on {', '.join(devs)} until {fmt_time(expires)}"
            if preempted:
                msg += f"; preempted {'; '.join(preempted)}"
            if req is not None:
                change.outcome = self._outcome(
                    req, "acquire", devices=devs, expires=expires, preempted=tuple(preempted),
                    message=msg, key=seal_key(key, req.request_id, req.record_id), key_hash=kh)
            self._apply(change)
            return AcquireResult(True, key, devs, tuple(preempted), expires, msg)

    def _outcome(self, req: _Request, rpc: str, **fields: object) -> tuple[str, Outcome]:
        """The (record id, outcome) of ``req``'s answer, to store with its change."""
        return req.record_id, Outcome.model_validate(
            {"rpc": rpc, "args": req.args, "time": self.clock(), **fields})

    def _replayed_grant(
        self, ident: Identity, devices: Iterable[str], req: _Request, out: Outcome
    ) -> AcquireResult:
        """The stored grant of a retried acquire, with its key unsealed by the request id."""
        try:
            key = open_key(out.key, req.request_id, req.record_id)
        except (ValueError, UnicodeDecodeError):
            key = ""
        if not key or hash_key(key) != out.key_hash:
            self._refuse(ident, devices, None,
                         "the stored answer to this requestId is damaged (its key does not match "
                         "its digest); nothing changed: send the request with a new requestId",
                         ErrorCode.STORE_UNAVAILABLE)
        return AcquireResult(True, key, out.devices, out.preempted, out.expires, out.message)

    def _select(
        self, ident: Identity, devices: Iterable[str] | None, key: str | None, verb: str
    ) -> list[Lock]:
        """The locks a release/renew names: by key, or the caller's own on ``devices``."""
        devs = tuple(sorted(set(devices or ())))
        self._refuse_key_shaped(devs)
        if key:
            kh = hash_key(key)
            held = [self._locks[d] for d in self._by_key.get(kh, ())]
            if not held:
                notice = self._notices.get(kh)
                if notice is not None:
                    raise notice.error()
                raise LockError(f"cannot {verb}: no active lock matches the given key",
                                ErrorCode.UNKNOWN_KEY)
            if devs:
                by_dev = {lk.device: lk for lk in held}
                missing = [d for d in devs if d not in by_dev]
                if missing:
                    raise LockError(
                        f"cannot {verb}: the given key does not hold {', '.join(missing)}",
                        ErrorCode.NOT_HOLDER,
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
                if notice is not None:
                    raise notice.error()
                raise LockError(f"cannot {verb}: {d[:64]!r} is not locked", ErrorCode.NOT_LOCKED)
            if not _same_holder(lk, ident):
                notice = self._notices.get((ident.account, d))
                if notice is not None:
                    raise notice.error(f"; it is now held by {lk.holder}", lk.holder)
                raise LockError(
                    f"cannot {verb} {d}: it is held by {lk.holder} ({lk.lock_type.value}); only "
                    "the holder's account from the holder's host, or the lock's key, may "
                    + verb + " it",
                    ErrorCode.NOT_HOLDER, lk.holder,
                )
            out.append(lk)
        return out

    def release(
        self, ident: Identity, devices: Iterable[str] | None = None, key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[str, ...]:
        """Release locks named by ``key`` (optionally narrowed to ``devices``) or by device.

        ``request_id``: as for :meth:`acquire` (a retry is answered, never applied again).

        Returns:
            The released devices.

        Raises:
            LockError: nothing matches, someone else holds one of them, or it was preempted /
                expired (the message says by whom and when); nothing changed.
        """
        with self._mutex:
            devices = None if devices is None else list(devices)
            req = self._request(ident, request_id, devices, "release", lambda: (
                sorted(set(devices or ())), hash_key(key) if key else ""))
            if req is not None and req.stored is not None:
                return req.stored.devices
            self.expire()
            try:
                locks = self._select(ident, devices, key, "release")
            except LockError as e:
                self._refuse(ident, devices or ("?",), None, str(e), e.code, e.holder)
            now = self.clock()
            change = _Change(delete=[lk.device for lk in locks])
            if req is not None:
                change.outcome = self._outcome(req, "release", devices=change.delete)
            for lk in locks:
                change.events.append(LockEvent(
                    time=now, action=EventAction.RELEASED, device=lk.device,
                    lock_type=lk.lock_type, actor=ident.actor_name, holder=lk.holder,
                    message="released",
                ))
                for nk in self._notice_keys(lk):
                    change.notices[nk] = Notice(
                        ErrorCode.RELEASED,
                        f"your lock on {lk.device} was released by {ident.holder} at "
                        f"{fmt_time(now)}", ident.holder)
            self._apply(change)
            return tuple(lk.device for lk in locks)

    def renew(
        self,
        ident: Identity,
        devices: Iterable[str] | None = None,
        key: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tuple[tuple[str, ...], float]:
        """Extend locks to ``timeout`` seconds from now (default: each type's default lease).

        ``request_id``: as for :meth:`acquire` (a retry is answered, never applied again).

        Returns:
            The renewed devices and the earliest new expiry (epoch s).

        Raises:
            LockError: as :meth:`release`, or a timeout over the type's maximum.
        """
        with self._mutex:
            devices = None if devices is None else list(devices)
            req = self._request(ident, request_id, devices, "renew", lambda: (
                sorted(set(devices or ())), hash_key(key) if key else "", timeout))
            if req is not None and req.stored is not None:
                return req.stored.devices, req.stored.expires
            self.expire()
            try:
                locks = self._select(ident, devices, key, "renew")
                leases = [self._lease(lk.lock_type, timeout) for lk in locks]
            except LockError as e:
                self._refuse(ident, devices or ("?",), None, str(e), e.code, e.holder)
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
            renewed = tuple(lk.device for lk in locks)
            until = min(lk.expires for lk in change.upsert)
            if req is not None:
                change.outcome = self._outcome(req, "renew", devices=renewed, expires=until)
            self._apply(change)
            return renewed, until

    def force_release(
        self, ident: Identity, devices: Iterable[str], reason: str = "",
        request_id: str | None = None,
    ) -> tuple[str, ...]:
        """Remove the locks on ``devices`` whoever holds them (policy ``force_release`` only).

        ``request_id``: as for :meth:`acquire` (a retry is answered, never applied again).

        Raises:
            LockError: the caller is not allowed, a device is unknown or not locked.
        """
        with self._mutex:
            devs = tuple(sorted(set(devices)))
            req = self._request(ident, request_id, devs, "force-release",
                                lambda: (list(devs), reason))
            if req is not None and req.stored is not None:
                return req.stored.devices
            self.expire()
            if not devs:
                self._refuse(ident, ("?",), None, "no device given: device=NAME[,NAME...]")
            reason = self._check_text("reason", reason, MAX_REASON)
            if not self.policy.may_force_release(ident.account, ident.roles, ident.host):
                self._refuse(
                    ident, devs, None,
                    f"{ident.account} may not force-release locks (policy force_release: "
                    f"{', '.join(self.policy.access.force_release) or 'nobody'})",
                    ErrorCode.NOT_ALLOWED,
                )
            missing = [d for d in devs if d not in self._locks]
            if missing:
                self._refuse(ident, devs, None, f"cannot force-release: "
                             f"{', '.join(m[:64] for m in missing)} not locked",
                             ErrorCode.NOT_LOCKED)
            now = self.clock()
            change = _Change(delete=list(devs))
            if req is not None:
                change.outcome = self._outcome(req, "force-release", devices=devs)
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
                    change.notices[nk] = Notice(
                        ErrorCode.FORCE_RELEASED, f"your lock on {d} was {msg}", ident.holder)
            self._apply(change)
            return devs

    def _follow_clock_step(self) -> None:
        """If the wall clock stepped, shift every lock's wall-clock times by the step (rewrite)."""
        offset = self.clock() - self.monotonic()
        step = offset - self._offset
        if abs(step) < CLOCK_STEP:
            return
        self._offset = offset
        if not self._locks:
            return
        log.warning("the wall clock stepped by %+.1f s: %d lease(s) keep their remaining time; "
                    "their wall-clock times are shifted", step, len(self._locks))
        shifted = [lk.model_copy(update={"acquired": lk.acquired + step,
                                         "expires": lk.expires + step})
                   for lk in self._locks.values()]
        # an event at the new clock: a restart takes the newest event as the clock's lower bound
        # (decision 0185), and one written before the step would read as a step while down
        event = LockEvent(
            time=self.clock(), action=EventAction.CLOCK_STEP,
            device=",".join(sorted(lk.device for lk in shifted))[:256], actor="pvcoord",
            message=f"the wall clock stepped by {step:+.1f} s: {len(shifted)} lease(s) keep "
                    "their remaining time, their wall-clock times shifted")
        try:
            self._last_token = max(self._last_token, self.store.commit(shifted, [], [event]))
        except StoreError as e:
            self._offset -= step  # try again at the next tick
            log.error("could not rewrite the shifted lease times: %s", e)
            return
        for lk in shifted:  # same monotonic deadline, new wall-clock times
            self._locks[lk.device] = lk
        if self.listener is not None:
            self.listener({lk.device for lk in shifted}, [event])

    def expire(self, now: float | None = None, reason: str = "") -> list[LockEvent]:
        """Drop every lock whose lease has run out; return the ``expired`` events.

        Leases are timed on :attr:`monotonic`; ``now`` (wall clock, for tests) additionally
        expires every lock whose wall-clock ``expires`` is not after it.
        """
        with self._mutex:
            self._follow_clock_step()
            mono = self.monotonic()
            due: set[str] = set()
            while self._heap and self._heap[0][0] <= mono:
                end, d = heapq.heappop(self._heap)
                if self._deadline.get(d) == end:
                    due.add(d)
            if now is not None:
                due |= {d for d, lk in self._locks.items() if lk.expires <= now}
            now = self.clock() if now is None else now
            gone = [self._locks[d] for d in due if d in self._locks]
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
                    change.notices[nk] = Notice(
                        ErrorCode.EXPIRED, f"your lock on {lk.device} {msg}")
            try:
                self._apply(change)
            except LockError:
                # the store fails: a lease that ran out is never honoured, so memory (what the
                # PVs, the guard and the bridges follow) drops the locks now; the store's rows
                # go when it answers again (_resync: memory wins), their events with them. A
                # restart before that drops them as expired (their stored expiry has passed).
                pops, evict, _ = self._notice_plan(change)
                self._apply_memory(change, pops, evict, [], {})
                self._unstored_events.extend(change.events)
                return []
            return change.events
