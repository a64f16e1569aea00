"""The guard's permission decision: pure, typed, no network.

Inputs are what the guard learns over PVA (the lock table and heartbeat of the coordination IOC,
the PV -> device table of the registry) and the endstation policy; the output is a
:class:`Decision` for one (PV, account) pair. The p4p layer (``gateway.py``) only translates.
The lock rules (rules 2 and 3, and the fail-closed rule for the lock state) are
:func:`pvdb.lockmodel.may_write`; this module adds what is the guard's own: which device a PV
belongs to, and whether the lock table it received is fresh.

Rules:

1. Registry not received (both tables) or unreadable, or lock state unknown/stale -> refused
   (fail closed), except for the policy's ``access.emergency`` accounts, and for them only
   when no lock of another account is known (the current table, or the last one received
   while the state is unknown): an emergency account never overrides a known lock. A PV the
   registry does not map to a device does not depend on the locks: it gets the policy default
   (``access.unlocked_writable``) even then, but only once the registry has been received (before
   that the guard cannot tell it is not a device).
2. Device held (by its own lock or a ``beamline`` lock) -> only the holder's account from the
   holder's host (the peer address the guard saw; the account alone is only a claim).
3. Device free -> ``access.unlocked_writable`` (everyone; or, in strict mode, nobody).
4. Field rules (``[fields]``, like ACF access security levels): where 2 or 3 allow, operators
   write only the value fields of the device's class; other fields and every link field (OUT,
   INP*, DOL, FLNK, OCAL, SDIS, ...) only ``fields.staff``. A PV of no registered device follows
   ``fields.unregistered`` (default ``staff``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pvdb import lockmodel
from pvdb.devicemap import DeviceMap as PvdbDeviceMap
from pvdb.devicemap import DeviceMapError, parse_channel
from pvdb.lockmodel import Decision, ErrorCode, Verdict
from pvdb.policy import Policy

__all__ = [
    "STALE_AFTER", "Decision", "DeviceMap", "ErrorCode", "HeldLock", "LockFeed", "LockState",
    "LockStream", "Verdict", "decide", "parse_lock_changes", "parse_locks", "split_owner",
]

STALE_AFTER = 2.0
"""Seconds without a ``Coord:Heartbeat`` update after which the lock state is stale (the
coordination IOC increments it every second; pvdb ``COORD_HEARTBEAT``)."""


def split_owner(owner: str) -> tuple[str, str]:
    """Split ``account@host`` into ``(account, host)`` at the last ``@`` (host may be empty)."""
    account, sep, host = owner.rpartition("@")
    if not sep:
        return owner, ""
    return account, host


@dataclass(frozen=True)
class HeldLock:
    """One row of ``Coord:Locks`` as the guard needs it."""

    device: str
    account: str
    host: str
    lock_type: str
    expires: float
    reason: str = ""

    @property
    def holder(self) -> str:
        """``account@host``, as shown everywhere."""
        return f"{self.account}@{self.host}" if self.host else self.account

    @property
    def priority(self) -> int:
        """Priority of the lock type (0 strongest; an unknown type counts as strongest)."""
        return lockmodel.priority_of(self.lock_type)


@dataclass(frozen=True)
class LockState:
    """The lock table at one moment, and whether it can be trusted.

    Attributes:
        locks: device (or ``beamline``) -> lock.
        known: False when the table is unknown or stale (then the guard fails closed).
        why_unknown: the reason when ``known`` is False.
        stamp: epoch seconds of the coordination IOC's update this state came from (0: none).
        last_locks: the last table received, kept while the state is unknown (an emergency
            account never overrides a lock the guard knew of).
    """

    locks: Mapping[str, HeldLock] = field(default_factory=dict)
    known: bool = False
    why_unknown: str = "lock state not received yet"
    stamp: float = 0.0
    last_locks: Mapping[str, HeldLock] = field(default_factory=dict)
    """The last table received (also while ``known`` is False): locks the guard knew of."""

    def known_locks_on(self, device: str) -> list[HeldLock]:
        """:meth:`locks_on` in the current table, or in the last one while unknown."""
        if self.known:
            return self.locks_on(device)
        return LockState(self.last_locks, True).locks_on(device)

    def locks_on(self, device: str) -> list[HeldLock]:
        """The locks that apply to ``device``: its own and a ``beamline`` lock, if any."""
        return lockmodel.locks_on(self.locks, device)


def parse_locks(columns: Mapping[str, Sequence[object]]) -> dict[str, HeldLock]:
    """Build device -> :class:`HeldLock` from the columns of ``Coord:Locks``.

    Args:
        columns: column name -> values, as in pvdb ``LOCKS_COLUMNS`` (``device``, ``lockType``,
            ``owner``, ``expires``, ``reason``; others ignored).

    Raises:
        ValueError: a required column is missing or the columns have different lengths.
    """
    need = ("device", "lockType", "owner", "expires")
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(f"Coord:Locks lacks column(s) {', '.join(missing)}")
    n = len(columns["device"])
    reasons = list(columns.get("reason", [""] * n))
    cols = [list(columns[c]) for c in need] + [reasons]
    if any(len(c) != n for c in cols):
        raise ValueError("Coord:Locks columns have different lengths")
    out: dict[str, HeldLock] = {}
    for device, lock_type, owner, expires, reason in zip(*cols, strict=True):
        account, host = split_owner(str(owner))
        expiry = float(expires)  # type: ignore[arg-type]
        out[str(device)] = HeldLock(str(device), account, host, str(lock_type), expiry, str(reason))
    return out


def parse_lock_changes(columns: Mapping[str, Sequence[object]]) -> dict[str, HeldLock | None]:
    """Build device -> :class:`HeldLock` (None: removed) from the columns of ``Coord:LockChanges``.

    Args:
        columns: as for :func:`parse_locks`, plus ``held`` (bool per row).

    Raises:
        ValueError: a required column is missing or the columns have different lengths.
    """
    if "held" not in columns:
        raise ValueError("Coord:LockChanges lacks column held")
    held = [bool(h) for h in columns["held"]]
    devices = [str(d) for d in columns.get("device", [])]
    if len(held) != len(devices):
        raise ValueError("Coord:LockChanges columns have different lengths")
    keep = [i for i, h in enumerate(held) if h]
    rows = parse_locks({k: [list(v)[i] for i in keep] for k, v in columns.items() if k != "held"})
    out: dict[str, HeldLock | None] = {d: None for d, h in zip(devices, held, strict=True)
                                       if not h}
    out.update(rows)
    return out


class LockStream:
    """The current lock table from ``Coord:Locks`` and ``Coord:LockChanges``.

    (Their ``seq`` and ``epoch`` fields: pvdb ``LOCK_SEQ_FIELDS``.)
    The IOC numbers its lock changes ``seq`` = 1, 2, ... within one run (``epoch``) and posts each
    change's rows before the reply of the request that made it; the whole table is posted
    coalesced, with the ``seq`` of the last change it includes. A table replaces the current one
    unless it is older (same epoch, lower or equal seq); a change ``seq + 1`` of the same epoch is
    applied; a later change (one was missed: a monitor squashed updates, or the table lags behind
    at connect) is kept until the changes before it or a table at or after it arrive. While such
    a change is waiting, or no table has arrived, :attr:`locks` is None: the follower must fail
    closed (:attr:`why_behind`). Pure, no threads; the caller serialises calls.
    """

    MAX_PENDING = 4096
    """Changes kept while waiting (the oldest are dropped beyond: a table resolves them)."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.seq = 0
        self._locks: dict[str, HeldLock] | None = None
        self._pending: dict[tuple[int, int], dict[str, HeldLock | None]] = {}

    @property
    def locks(self) -> dict[str, HeldLock] | None:
        """The current table, or None while it is not known to be current."""
        return None if self._pending or self._locks is None else self._locks

    @property
    def why_behind(self) -> str:
        """'' when :attr:`locks` is current, else why not."""
        if self._locks is None:
            return "Coord:Locks not received"
        if self._pending:
            e, s = min(self._pending)
            return (f"lock change {s} received before change {self.seq + 1}"
                    f"{'' if e == self.epoch else ' of a new IOC run'}: waiting for Coord:Locks")
        return ""

    def reset(self) -> None:
        """Forget everything (a monitor disconnected: the IOC may have restarted)."""
        self.__init__()

    def table(self, locks: Mapping[str, HeldLock], seq: int, epoch: int) -> None:
        """A ``Coord:Locks`` post arrived."""
        if self._locks is not None and epoch == self.epoch and seq <= self.seq:
            return
        self.epoch, self.seq, self._locks = epoch, seq, dict(locks)
        self._advance()

    def change(self, rows: Mapping[str, HeldLock | None], seq: int, epoch: int) -> None:
        """A ``Coord:LockChanges`` post arrived (``rows``: device -> lock, None: removed)."""
        if self._locks is not None and epoch == self.epoch and seq <= self.seq:
            return
        self._pending[(epoch, seq)] = dict(rows)
        while len(self._pending) > self.MAX_PENDING:
            del self._pending[min(self._pending)]
        self._advance()

    def _advance(self) -> None:
        new = None
        while self._locks is not None:
            rows = self._pending.pop((self.epoch or 0, self.seq + 1), None)
            if rows is None:
                break
            new = dict(self._locks) if new is None else new
            for device, lock in rows.items():
                if lock is None:
                    new.pop(device, None)
                else:
                    new[device] = lock
            self.seq += 1
        if new is not None:
            self._locks = new
        self._pending = {(e, s): r for (e, s), r in self._pending.items()
                         if e != self.epoch or s > self.seq}


class DeviceMap:
    """PV name -> device for the guard: :class:`pvdb.devicemap.DeviceMap` plus ``known``.

    Built from ``Registry:DevicePVs`` rows ``(pv, device)`` and ``Registry:Devices`` rows
    ``(device, pvPrefix)``; the lookup rules (exact PV, its record name, longest prefix; braces
    inside names are ordinary characters) are pvdb's, the same as the registry's Lookup.

    ``known`` is False until both registry tables were received and readable; ``why_unknown``
    then says what is missing or wrong (writes are refused meanwhile: fail closed). A registry
    that gives one PV or prefix to two devices is not known either (``why_unknown`` names them).
    """

    def __init__(
        self,
        pv_rows: Iterable[tuple[str, str]] = (),
        prefixes: Iterable[tuple[str, str]] = (),
        known: bool = False,
        why_unknown: str = "registry PV list not received",
        classes: Mapping[str, str] | None = None,
    ) -> None:
        self.classes: dict[str, str] = dict(classes or {})
        """Device -> device class (``Registry:Devices`` ``deviceClass``; '' when unknown)."""
        try:
            self._map = PvdbDeviceMap(pv_rows, prefixes)
        except DeviceMapError as e:
            self._map = PvdbDeviceMap()
            known, why_unknown = False, f"registry rejected: {e}"
        self.known = known
        self.why_unknown = "" if known else why_unknown

    def device_of(self, pv: str) -> str | None:
        """The device ``pv`` belongs to, or None."""
        return self._map.device_of(pv)

    @property
    def pvdb_map(self) -> PvdbDeviceMap:
        """The underlying :class:`pvdb.devicemap.DeviceMap` (empty while not known)."""
        return self._map

    def __len__(self) -> int:
        return len(self._map)


def decide(
    policy: Policy,
    state: LockState,
    devices: DeviceMap,
    pv: str,
    account: str,
    roles: Iterable[str] = (),
    host: str | None = None,
) -> Decision:
    """Decide whether ``account`` (OS groups ``roles``, peer address ``host``) may write ``pv``.

    The registry part (which device ``pv`` is) and the field rules are decided here; the device
    part is :func:`pvdb.lockmodel.may_write`. ``host`` is the client's address as the guard saw
    it: a lock taken from another host is not this client's, even with the same claimed account
    (None: the host is not checked). A refused :class:`Decision` has ``.code`` (an
    :class:`ErrorCode`) and ``.error()`` (the refusal as an error text).
    """
    roles = list(roles)
    emergency = policy.is_emergency(account, roles, host)
    if not devices.known:
        why = devices.why_unknown or "registry PV list not received"
        if emergency:
            # which device pv is cannot be told: any known lock of another account may be it
            others = [lk for lk in (state.locks if state.known else state.last_locks).values()
                      if lk.account != account]
            if others:
                first = min(others, key=lambda lk: lk.device)
                return Decision(
                    False, Verdict.UNKNOWN_STATE,
                    f"{why}; {account} is an emergency account, but {first.device} is held by "
                    f"{first.holder} and {pv} may belong to it: an emergency account does not "
                    "override a known lock (fail closed)", holder=first.holder,
                    lock_type=first.lock_type, expires=first.expires, locked=True)
            return Decision(True, Verdict.EMERGENCY, f"{why}; {account} is an emergency account")
        return Decision(False, Verdict.UNKNOWN_STATE,
                        f"{why}: the guard cannot tell which device {pv} belongs to, so writes "
                        "are refused (fail closed)")
    device = devices.device_of(pv) or ""
    if not device:
        why = policy.unregistered_refusal(account, roles, host)
        if why:
            return Decision(False, Verdict.NOT_A_DEVICE, f"{pv}: {why}")
        return Decision(True, Verdict.NOT_A_DEVICE,
                        f"{pv} belongs to no registered device: the policy lets {account} write "
                        "it (fields.unregistered)")
    d = lockmodel.may_write(policy, state.locks if state.known else None, device, account,
                            roles, state.why_unknown, host=host, last_locks=state.last_locks)
    if not d.allowed:
        return d
    field = parse_channel(pv).field
    why = policy.field_refusal(devices.classes.get(device, ""), field, account, roles, host)
    if why:
        return Decision(False, Verdict.FIELD_RULE, f"{pv}: {why}", device=device,
                        holder=d.holder, lock_type=d.lock_type, expires=d.expires,
                        locked=d.locked)
    return d


class LockFeed:
    """Tracks whether the lock table can be trusted: connected, received, heartbeat advancing.

    Times are monotonic seconds given by the caller, so this is testable without waiting.
    """

    def __init__(self, stale_after: float = STALE_AFTER) -> None:
        self.stale_after = stale_after
        self.locks: dict[str, HeldLock] | None = None
        self.last_locks: dict[str, HeldLock] = {}
        """The last table received; kept across a disconnect (never a reason to allow)."""
        self.stamp = 0.0
        self._locks_connected = False
        self._beat_connected = False
        self._last_beat: float | None = None
        self._last_beat_value: object = None
        self._locks_problem = ""
        self._locks_waiting = ""

    def locks_update(self, locks: dict[str, HeldLock], stamp: float) -> None:
        """A new ``Coord:Locks`` value arrived (``stamp``: its timestamp, epoch seconds)."""
        self._locks_connected = True
        self._locks_problem = self._locks_waiting = ""
        self.locks, self.stamp = locks, stamp
        self.last_locks = dict(locks)

    def locks_waiting(self, why: str) -> None:
        """Connected, but the table is not current: fail closed until a :meth:`locks_update`.

        ``why``: :attr:`LockStream.why_behind`.
        """
        self._locks_connected = True
        self._locks_problem = ""
        self._locks_waiting = why
        self.locks = None

    def locks_lost(self, problem: str = "") -> None:
        """The ``Coord:Locks`` monitor disconnected, or sent something unusable (``problem``)."""
        self._locks_connected = False
        self._locks_problem = problem
        self._locks_waiting = ""
        self.locks = None

    def beat(self, value: object, now: float) -> None:
        """A ``Coord:Heartbeat`` update arrived at monotonic time ``now``.

        Any update counts as life, including the first after a (re)connect; a repeated value
        (an IOC re-posting without advancing) does not.
        """
        if not self._beat_connected or value != self._last_beat_value:
            self._last_beat = now
        self._beat_connected = True
        self._last_beat_value = value

    def beat_lost(self) -> None:
        """The ``Coord:Heartbeat`` monitor disconnected."""
        self._beat_connected = False
        self._last_beat = None

    def why_unknown(self, now: float) -> str:
        """'' when the lock state is fresh at monotonic time ``now``, else the reason."""
        if self._locks_problem:
            return f"Coord:Locks unreadable: {self._locks_problem}"
        if self._locks_waiting:
            return self._locks_waiting
        if not self._locks_connected or self.locks is None:
            return "Coord:Locks disconnected or not received"
        if not self._beat_connected or self._last_beat is None:
            return "Coord:Heartbeat disconnected or not received"
        age = now - self._last_beat
        if age > self.stale_after:
            return f"Coord:Heartbeat has not advanced for {age:.1f} s"
        return ""

    def state(self, now: float) -> LockState:
        """The :class:`LockState` to decide with at monotonic time ``now``."""
        why = self.why_unknown(now)
        if why:
            return LockState({}, False, why, self.stamp, dict(self.last_locks))
        return LockState(dict(self.locks or {}), True, "", self.stamp, dict(self.last_locks))
