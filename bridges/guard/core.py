"""The guard's state and its effect on open gateway channels (no p4p import).

:class:`GuardCore` owns the lock feed, the registry map and every open client channel
(:class:`GuardedChannel`). p4p's ACF engine calls :meth:`GuardedChannel.access` with the site's
ACF grant; the core combines it with the lock decision and sets the real channel's permissions.
When the lock state or the registry changes, the core re-applies every open channel at once
(``put``/``rpc`` flags of the live channel: no reconnect).

The real channel is anything with p4p ``_gw.Channel``'s ``access(put=, rpc=, uncached=,
audit=, holdoff=)``, ``name`` and ``expired``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pvdb.devicemap import DeviceMap as PvdbDeviceMap
from pvdb.models import BEAMLINE
from pvdb.policy import HostRolesCache, Policy

from .decision import (
    STALE_AFTER,
    Decision,
    DeviceMap,
    HeldLock,
    LockFeed,
    LockState,
    Verdict,
    decide,
)

_log = logging.getLogger(__name__)

HISTORY = 16
"""Permission changes remembered per channel, to classify audit lines that arrive late."""


class RawChannel(Protocol):
    """What the core needs of a gateway channel (p4p ``_gw.Channel``)."""

    @property
    def name(self) -> bytes:  # noqa: D102
        ...

    @property
    def expired(self) -> bool:  # noqa: D102
        ...

    def access(  # noqa: D102
        self,
        put: bool | None = None,
        rpc: bool | None = None,
        uncached: bool | None = None,
        audit: bool | None = None,
        holdoff: float | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Grant:
    """Permissions as set on a channel (or as the site ACF grants them)."""

    put: bool = False
    rpc: bool = False
    uncached: bool = False
    audit: bool = False


NO_GRANT = Grant()


class GuardedChannel:
    """One client's channel through the guard: who, which PV, what the ACF and the locks allow.

    Stands in for the real channel in p4p's ACF engine (``Engine.create`` / ``_recompute`` call
    :meth:`access` with the ACF's grant), so site ACF changes (INP PVs) and lock changes both end
    here.
    """

    def __init__(
        self,
        core: GuardCore,
        chan: RawChannel,
        dsname: str,
        usname: str,
        account: str,
        host: str,
        peer: str,
        roles: Sequence[str],
    ) -> None:
        self.core = core
        self.chan = chan
        self.dsname = dsname
        self.usname = usname
        self.account = account
        self.host = host
        self.peer = peer
        self.roles = list(roles)
        self.acf: Grant | None = None
        self.applied: Grant | None = None
        self.decision: Decision | None = None
        self.device: str | None = None
        """The registry device of ``usname`` in :attr:`device_map` (None: no device)."""
        self.device_map: DeviceMap | None = None
        # (epoch s after the change took effect, put allowed, decision)
        self.history: deque[tuple[float, bool, Decision]] = deque(maxlen=HISTORY)

    @property
    def name(self) -> bytes:
        """Client-side PV name (p4p's engine logs it)."""
        return self.dsname.encode()

    @property
    def expired(self) -> bool:
        """Whether the client has closed the channel."""
        return self.chan.expired

    def access(
        self,
        put: bool | None = None,
        rpc: bool | None = None,
        uncached: bool | None = None,
        audit: bool | None = None,
        holdoff: float | None = None,
    ) -> None:
        """Receive the site ACF's grant (called by p4p's ACF engine) and apply it with the locks."""
        self.acf = Grant(bool(put), bool(rpc), bool(uncached), bool(audit))
        if holdoff:
            self.chan.access(holdoff=holdoff)
        self.core.apply(self)

    def at(self, t: float) -> tuple[bool, Decision] | None:
        """Put permission and decision in force at epoch time ``t`` (None if never applied)."""
        if not self.history:
            return None
        best = self.history[0]
        for entry in self.history:
            if entry[0] > t:
                break
            best = entry
        return best[1], best[2]


@dataclass(frozen=True)
class AuditLine:
    """One line of the gateway's put audit (p4p ``GWSource::auditPush`` format)."""

    time: float
    account: str
    peer: str
    dsname: str
    usname: str
    value: str

    @property
    def host(self) -> str:
        """The client's IP address (``peer`` without the port)."""
        return self.peer.rsplit(":", 1)[0] if ":" in self.peer else self.peer


_AUDIT_RE = re.compile(
    r"^(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))? "
    # PV names may contain spaces (JSON channel filters: 'rec.VAL{"ts": {}}'): a name ends at
    # the first " as " / " -> "; a line whose names contain those still parses (split early)
    r"(?:(?P<method>[^/@ ]*)/(?P<account>\S*?))?@(?P<peer>\S+) (?P<ds>.+?) as (?P<us>.+?)"
    r"(?: -> (?P<value>.*))?$",
    re.DOTALL,
)


def parse_audit_line(line: str) -> AuditLine | None:
    """Parse ``"<local time> <method>/<account>@<ip:port> <dsname> as <usname> [-> value]"``.

    Returns None for the ``... put audit log overflow`` marker and for anything unrecognised.
    """
    m = _AUDIT_RE.match(line.strip())
    if not m:
        return None
    # the gateway formats its local time (epicsTime::strftime); naive -> local epoch seconds
    t = datetime.strptime(m["date"], "%Y-%m-%d %H:%M:%S").timestamp()
    if m["frac"]:
        t += float("0." + m["frac"][:9])
    value = " ".join((m["value"] or "").split())
    typed = re.match(r"^[\w\[\]]+ = (.*)$", value)  # "double = 1.5" -> "1.5"
    if typed:
        value = typed.group(1)
    return AuditLine(t, m["account"] or "", m["peer"], m["ds"], m["us"], value)


@dataclass(frozen=True)
class AuditRecord:
    """One audited put: refused, or allowed to a locked device."""

    time: float
    action: str
    account: str
    host: str
    pv: str
    device: str
    holder: str
    value: str
    message: str

    def line(self) -> str:
        """One line of text for the log and ``Guard:LastAudit``."""
        return (
            f"{self.action} put {self.pv} = {self.value or '?'} by {self.account}@{self.host} "
            f"device={self.device or '-'} holder={self.holder or '-'}: {self.message}"
        )


class GuardCore:
    """Lock state, registry map and open channels of one guard process; thread-safe.

    Args:
        policy: the endstation policy (``unlocked_writable``, ``emergency``).
        stale_after: seconds without a heartbeat before the lock state is stale.
        monotonic: clock for staleness (injectable for tests).
    """

    def __init__(
        self,
        policy: Policy,
        stale_after: float = STALE_AFTER,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.feed = LockFeed(stale_after)
        self.devices = DeviceMap()
        self._withheld = PvdbDeviceMap()
        self._last_known: DeviceMap | None = None
        """PVs of devices that left the registry while locked (refused until confirmed)."""
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._state = LockState()
        self._channels: dict[int, GuardedChannel] = {}
        self._by_key: dict[tuple[str, str, str], GuardedChannel] = {}
        self.on_state: list[Callable[[LockState], None]] = []
        """Called (outside the lock) after the lock state changed and was applied."""
        self.roles = HostRolesCache()
        """An account's OS groups from this host's group database, read at most once a second
        per account (a channel open, a put on a closed channel, the What-if and confirm RPCs)."""

    # --- inputs -------------------------------------------------------------------------------

    def locks_update(self, locks: dict[str, HeldLock], stamp: float) -> None:
        """A new ``Coord:Locks`` table (``stamp``: its timestamp, epoch s)."""
        with self._lock:
            self.feed.locks_update(locks, stamp)
        self.refresh()

    def locks_lost(self, why: str = "") -> None:
        """``Coord:Locks`` disconnected (``why`` '') or unusable (``why`` says how)."""
        if why:
            _log.warning("lock table unusable: %s", why)
        with self._lock:
            self.feed.locks_lost(why)
        self.refresh()

    def beat(self, value: object) -> None:
        """A ``Coord:Heartbeat`` update."""
        with self._lock:
            self.feed.beat(value, self._monotonic())
        self.refresh()

    def beat_lost(self) -> None:
        """``Coord:Heartbeat`` disconnected."""
        with self._lock:
            self.feed.beat_lost()
        self.refresh()

    def set_devices(self, devices: DeviceMap) -> None:
        """A new registry map: every open channel's device is looked up again and re-applied.

        Devices that leave the registry while they are locked (in the current lock table or, while
        it is unknown, the last one received; a ``beamline`` lock holds them all) keep their PVs
        refused, by the previous map, until :meth:`confirm_registry`: a registry that shrinks or
        empties never silently unprotects a locked device.
        """
        with self._lock:
            old = self._last_known  # the last known map, also across an unknown spell
            if old is not None and devices.known:
                locks = self._state.locks if self._state.known else self._state.last_locks
                held = old.pvdb_map.devices() if BEAMLINE in locks else set(locks)
                # entries (PVs, prefixes) of locked devices that the new map lacks, also when
                # the device itself is still there by another entry (a registry that shrinks in
                # steps: Registry:DevicePVs and Registry:Devices arrive one after the other)
                lost = old.pvdb_map.restricted(held).without(devices.pvdb_map)
                if len(lost.devices()):
                    _log.warning("registry lost PVs of locked device(s) %s: they stay refused "
                                 "until an operator confirms", ", ".join(sorted(lost.devices())))
                    self._withheld = self._withheld.merged(lost)
            if devices.known and len(self._withheld.devices()):
                # entries that are back in the registry follow the normal rules again
                self._withheld = self._withheld.without(devices.pvdb_map)
            self.devices = devices
            if devices.known:
                self._last_known = devices
            self._apply_all()

    def withheld_devices(self) -> list[str]:
        """Devices that left the registry while locked and are still refused, sorted."""
        with self._lock:
            return sorted(self._withheld.devices())

    def confirm_registry(
        self,
        account: str,
        roles: Iterable[str],
        devices: Iterable[str] | None = None,
        host: str | None = None,
    ) -> list[str]:
        """An operator confirms that ``devices`` (default: all withheld) left the registry.

        Allowed to the policy's ``force_release`` accounts (``host``: the caller's peer address,
        for host-bound principals). Returns the devices released.

        Raises:
            PermissionError: the account may not confirm.
            ValueError: a named device is not withheld.
        """
        roles = list(roles)
        if not self.policy.may_force_release(account, roles, host):
            raise PermissionError(
                f"{account} may not confirm registry changes (policy force_release: "
                f"{', '.join(self.policy.access.force_release) or 'nobody'})")
        with self._lock:
            held = self._withheld.devices()
            names = set(devices) if devices else set(held)
            unknown = sorted(names - held)
            if unknown:
                raise ValueError(f"not withheld: {', '.join(unknown)} (withheld: "
                                 f"{', '.join(sorted(held)) or 'none'})")
            self._withheld = self._withheld.restricted(held - names)
            _log.warning("%s confirmed the registry change for %s", account,
                         ", ".join(sorted(names)))
            self._apply_all()
        return sorted(names)

    def _decide(
        self, pv: str, account: str, roles: Iterable[str] = (), host: str | None = None
    ) -> Decision:
        """:func:`decide`, after the withheld devices of a shrunken registry (caller locks)."""
        if len(self._withheld.devices()) and self.devices.device_of(pv) is None:
            gone = self._withheld.device_of(pv)
            if gone is not None:
                return Decision(
                    False, Verdict.UNKNOWN_STATE,
                    f"device {gone} left the registry while it was locked: writes to its PVs are "
                    f"refused until an operator confirms (Guard:ConfirmRegistry device={gone})",
                    device=gone, locked=True)
        return decide(self.policy, self._state, self.devices, pv, account, roles, host)

    # --- state --------------------------------------------------------------------------------

    @property
    def state(self) -> LockState:
        """The lock state decisions are currently made with."""
        return self._state

    def refresh(self) -> bool:
        """Recompute the lock state (staleness included); re-apply channels if it changed.

        Returns whether it changed. Call it periodically so a stopped heartbeat is noticed.
        """
        return self.set_state(lambda: self.feed.state(self._monotonic()))

    def set_state(self, source: Callable[[], LockState]) -> bool:
        """Decide with the state ``source()`` gives from now on; re-apply channels if it changed.

        ``source`` is called under the core's lock, so of two callers the later one always applies
        the newer state (e.g. ``lambda: view.state`` of a :class:`bridges.lockview.LockView`, read
        by its listener and by a ticker). A caller that follows the PVs itself uses this instead of
        the ``locks_*``/``beat*`` inputs and :meth:`refresh` (which read :attr:`feed`). Returns
        whether the known flag or the locks changed.
        """
        with self._lock:
            new = source()
            old = self._state
            if new.known == old.known and new.locks == old.locks:
                if new.stamp != old.stamp or new.why_unknown != old.why_unknown:
                    self._state = new  # same permissions; keep the reason current
                return False
            self._state = new
            if new.known != old.known:
                _log.warning(
                    "lock state %s", "fresh again" if new.known else f"UNKNOWN: {new.why_unknown}"
                )
            self._apply_all(self._changed_devices(old, new))
        for cb in self.on_state:
            try:
                cb(new)
            except Exception:
                _log.exception("state listener failed")
        return True

    def decide(
        self, pv: str, account: str, roles: Iterable[str] = (), host: str | None = None
    ) -> Decision:
        """The lock part of the decision for ``account`` (at ``host``) writing ``pv`` now."""
        with self._lock:
            return self._decide(pv, account, roles, host)

    # --- channels -----------------------------------------------------------------------------

    def track(
        self,
        chan: RawChannel,
        dsname: str,
        usname: str,
        account: str,
        host: str,
        peer: str,
        roles: Sequence[str],
    ) -> GuardedChannel:
        """Start enforcing on a new client channel; returns its stand-in for the ACF engine."""
        # roles from this host's group database only: a client's claimed account that does not
        # exist here has none (PVA would give it a group of its own name)
        roles = sorted(self.roles(account))
        gc = GuardedChannel(self, chan, dsname, usname, account, host, peer, roles)
        with self._lock:
            self._channels[id(gc)] = gc
            self._by_key[(dsname, peer, account)] = gc
        return gc

    def channel_count(self) -> int:
        """Open channels being enforced."""
        return len(self._channels)

    def sweep(self) -> int:
        """Forget channels the clients have closed; returns how many were dropped."""
        with self._lock:
            dead = [k for k, gc in self._channels.items() if gc.expired]
            for k in dead:
                gc = self._channels.pop(k)
                key = (gc.dsname, gc.peer, gc.account)
                if self._by_key.get(key) is gc:
                    del self._by_key[key]
        return len(dead)

    def apply(self, gc: GuardedChannel) -> None:
        """Set ``gc``'s real permissions from its ACF grant and the current decision."""
        with self._lock:
            self._apply(gc, None)

    def _changed_devices(self, old: LockState, new: LockState) -> set[str] | None:
        """The devices whose channels a change from ``old`` to ``new`` can affect (None: all).

        With both states known and the registry known, a decision on a device's PV depends only
        on that device's lock and a ``beamline`` lock (:func:`decide`), so only the devices whose
        row changed are re-decided: a lock change costs the channels of its devices, not every
        open channel. Anything else (known flag, ``beamline``, no registry) re-decides all.
        """
        if not (old.known and new.known and self.devices.known):
            return None
        changed = {d for d in old.locks.keys() | new.locks.keys()
                   if old.locks.get(d) != new.locks.get(d)}
        return None if BEAMLINE in changed else changed

    def _device_of(self, gc: GuardedChannel) -> str | None:
        if gc.device_map is not self.devices:
            gc.device_map, gc.device = self.devices, self.devices.device_of(gc.usname)
        return gc.device

    def _apply_all(self, only: set[str] | None = None) -> None:
        """Re-decide the open channels (``only``: those of these devices)."""
        cache: dict[tuple[str, str, tuple[str, ...], str], Decision] = {}
        for gc in list(self._channels.values()):
            if gc.acf is None:
                continue  # the ACF engine has not decided yet; it will call access()
            if only is not None and self._device_of(gc) not in only:
                continue
            key = (gc.usname, gc.account, tuple(gc.roles), gc.host)
            d = cache.get(key)
            if d is None:
                d = cache[key] = self._decide(gc.usname, gc.account, gc.roles, gc.host)
            self._apply(gc, d)

    def _apply(self, gc: GuardedChannel, d: Decision | None) -> None:
        if d is None:
            d = self._decide(gc.usname, gc.account, gc.roles, gc.host)
        acf = gc.acf or NO_GRANT
        put = acf.put and d.allowed
        grant = Grant(
            put=put,
            rpc=acf.rpc and d.allowed,
            uncached=acf.uncached,
            # audit puts the guard must report: refused ones, and any to a locked device
            audit=acf.audit or not put or d.locked,
        )
        prev = gc.applied
        if grant != prev:
            chan = gc.chan
            # switch auditing on before narrowing, off after: no put escapes the audit
            if grant.audit and not (prev and prev.audit):
                chan.access(audit=True)
            chan.access(put=grant.put, rpc=grant.rpc, uncached=grant.uncached)
            if not grant.audit and (prev is None or prev.audit):
                chan.access(audit=False)
            gc.applied = grant
        if grant != prev or d != gc.decision:
            gc.decision = d
            gc.history.append((time.time(), grant.put, d))

    # --- audit --------------------------------------------------------------------------------

    def classify(self, line: AuditLine) -> tuple[AuditRecord | None, bool]:
        """Turn one gateway audit line into an :class:`AuditRecord` if the guard must report it.

        Returns ``(record or None, acf_trap)``; ``acf_trap`` is whether the site ACF asked for
        this put to be logged (TRAPWRITE), which pvagw reports on the ``p4p.gw.audit`` logger.
        """
        with self._lock:
            gc = self._by_key.get((line.dsname, line.peer, line.account))
            found = gc.at(line.time) if gc is not None else None
            trap = bool(gc and gc.acf and gc.acf.audit)
            if found is None:
                d = self._decide(line.usname, line.account, self.roles(line.account), line.host)
                put, note = d.allowed, " (channel already closed: decided with the current state)"
            else:
                (put, d), note = found, ""
        if put and not d.locked:
            return None, trap
        if put:
            action, message = "allowed", d.reason
        else:
            action = "refused"
            message = d.reason if not d.allowed else "refused by the site's ACF"
        return AuditRecord(
            line.time, action, line.account, line.host, line.dsname, d.device, d.holder,
            line.value, message + note,
        ), trap
