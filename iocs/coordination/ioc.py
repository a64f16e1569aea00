"""The p4p boundary of the coordination IOC: SharedPVs, RPC handlers, publishing.

Everything untyped (p4p ``Value``, ``ServerOperation``) stays in this module; the lock model is
:mod:`iocs.coordination.locktable`.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from p4p import Type, Value
from p4p.client.thread import Context
from p4p.nt import NTEnum, NTScalar, NTTable
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from pvdb import names as pvn
from pvdb.lockmodel import ErrorCode
from pvdb.models import BEAMLINE, Lock, LockEvent

from .. import pvutil
from . import args as rpcargs
from .locktable import Identity, LockError, LockTable

log = logging.getLogger(__name__)

TICK = 0.05
"""Seconds between expiry checks (expiry is published within this plus one post)."""

ACQUIRE_RESULT = Type(
    [("granted", "?"), ("key", "s"), ("devices", "as"), ("preempted", "as"), ("expires", "d"),
     ("message", "s")],
    id="pvcoord:AcquireResult:1.0",
)
RELEASE_RESULT = Type([("devices", "as"), ("message", "s")], id="pvcoord:ReleaseResult:1.0")
RENEW_RESULT = Type(
    [("devices", "as"), ("expires", "d"), ("message", "s")], id="pvcoord:RenewResult:1.0"
)


def roles_of(user: str) -> frozenset[str]:
    """OS groups of ``user`` on this host (empty if the account does not exist here)."""
    try:
        pw = pwd.getpwnam(user)
        return frozenset(grp.getgrgid(g).gr_name for g in os.getgrouplist(user, pw.pw_gid))
    except (KeyError, OSError):
        return frozenset()


class CoordinationIOC:
    """All PVs of the coordination IOC for one prefix, served by ``self.provider``.

    Args:
        prefix: endstation prefix ``P`` (with trailing ``:``).
        table: the lock table (its listener is set to this IOC's publisher).
        events_tail: rows in ``Coord:Events``.
    """

    def __init__(self, prefix: str, table: LockTable, events_tail: int = 50) -> None:
        self.prefix = pvn.check_prefix(prefix)
        self.table = table
        self.provider = StaticProvider("pvcoord-coordination")
        self._events: deque[LockEvent] = deque(maxlen=events_tail)
        self._events_dirty = False
        self._device_pvs: dict[str, dict[str, SharedPV]] = {}
        self._last_posted: dict[tuple[str, str], object] = {}
        self._heartbeat = 0
        self._health = ""
        self.server_conf: dict[str, str] = {}
        """The p4p server's configuration once serving (what a client needs to reach it)."""

        now = time.time()
        self._locks_nt = NTTable(pvn.LOCKS_COLUMNS)
        self._events_nt = NTTable(pvn.EVENTS_COLUMNS)
        self.pv_locks = self._add(pvn.COORD_LOCKS, SharedPV(
            initial=pvutil.table_value(self._locks_nt, pvn.LOCKS_COLUMNS, [], now)))
        self.pv_events = self._add(pvn.COORD_EVENTS, SharedPV(
            initial=pvutil.table_value(self._events_nt, pvn.EVENTS_COLUMNS, [], now)))
        self.pv_last_event = self._add(pvn.COORD_LAST_EVENT, self._scalar("s", ""))
        self.pv_lock_count = self._add(pvn.COORD_LOCK_COUNT, self._scalar("i", 0))
        self.pv_heartbeat = self._add(pvn.COORD_HEARTBEAT, self._scalar("i", 0))
        self.pv_health = self._add(pvn.COORD_HEALTH, self._scalar("s", "starting"))
        self.pv_devices = self._add(pvn.COORD_DEVICES, self._scalar("as", [BEAMLINE]))
        for spec, fn in (
            (pvn.COORD_ACQUIRE, self._acquire), (pvn.COORD_RELEASE, self._release),
            (pvn.COORD_RENEW, self._renew), (pvn.COORD_FORCE_RELEASE, self._force_release),
        ):
            self._add(spec, SharedPV(handler=_rpc_handler(self, spec, fn),
                                     initial=NTScalar("s").wrap("", timestamp=now)))
        self._add_device(BEAMLINE)
        for e in table.store.recent_events(events_tail):
            self._events.append(e)
        self._events_dirty = True
        table.listener = self._on_change
        if table.devices is not None:
            self.set_devices(table.devices)
        self._on_change(set(self._device_pvs), table.startup_events)

    # --- construction helpers ---------------------------------------------------------------

    def _add(self, spec: pvn.PVSpec, pv: SharedPV, device: str | None = None) -> SharedPV:
        self.provider.add(spec.name(self.prefix, device=device), pv)
        return pv

    @staticmethod
    def _scalar(code: str, initial: object, units: str = "") -> SharedPV:
        nt = NTScalar(code, display=bool(units))
        v = nt.wrap(initial, timestamp=time.time())
        if units:
            v["display.units"] = units
        return SharedPV(nt=nt, initial=v)

    def _add_device(self, device: str) -> None:
        if device in self._device_pvs:
            return
        now = time.time()
        enum = NTEnum()
        state = SharedPV(nt=enum, initial=enum.wrap(
            {"index": 0, "choices": list(pvn.DEVICE_STATES)}, timestamp=now))
        pvs = {
            "state": self._add(pvn.COORD_DEVICE_STATE, state, device),
            "owner": self._add(pvn.COORD_DEVICE_OWNER, self._scalar("s", ""), device),
            "reason": self._add(pvn.COORD_DEVICE_REASON, self._scalar("s", ""), device),
            "remaining": self._add(
                pvn.COORD_DEVICE_REMAINING, self._scalar("d", 0.0, units="s"), device),
            "expires": self._add(
                pvn.COORD_DEVICE_EXPIRES, self._scalar("d", 0.0, units="s"), device),
        }
        self._device_pvs[device] = pvs

    def set_devices(self, devices: Iterable[str]) -> None:
        """Accept locks for ``devices`` (from the registry) and serve their per-device PVs."""
        devices = sorted(set(devices) - {BEAMLINE})
        self.table.set_devices(devices)
        with self.table.mutex:
            for d in devices:
                self._add_device(d)
            self.pv_devices.post([*devices, BEAMLINE], timestamp=time.time())
        self._on_change(set(devices), [])

    def set_health(self, text: str) -> None:
        """Publish ``Coord:Health`` if it changed."""
        if text != self._health:
            self._health = text
            self.pv_health.post(text, timestamp=time.time())
            log.info("health: %s", text)

    # --- publishing ---------------------------------------------------------------------------

    def _post_if_changed(self, device: str, field: str, value: object, ts: float) -> None:
        key = (device, field)
        if self._last_posted.get(key) == value:
            return
        self._last_posted[key] = value
        pv = self._device_pvs[device][field]
        if field == "state":
            pv.post({"index": value}, timestamp=ts)
        else:
            pv.post(value, timestamp=ts)

    def _post_device(self, device: str, lock: Lock | None, now: float) -> None:
        if lock is None:
            vals = (0, "", "", 0.0, 0.0)
        else:
            vals = (lock.lock_type.state_index, lock.holder, lock.reason, lock.expires,
                    max(0.0, round(lock.expires - now, 1)))
        for field, v in zip(("state", "owner", "reason", "expires", "remaining"), vals,
                            strict=True):
            self._post_if_changed(device, field, v, now)

    def _on_change(self, devices: set[str], events: list[LockEvent]) -> None:
        """Listener of the lock table (called under its mutex, in order)."""
        now = time.time()
        with self.table.mutex:
            affected = set(self._device_pvs) if BEAMLINE in devices else devices
            for d in sorted(affected & set(self._device_pvs)):
                self._post_device(d, self.table.effective(d), now)
            if devices:
                locks = self.table.locks()
                rows = [(lk.device, lk.lock_type.value, lk.priority, lk.holder, lk.acquired,
                         lk.expires, lk.reason, lk.plan_uid) for lk in locks]
                self.pv_locks.post(pvutil.table_value(self._locks_nt, pvn.LOCKS_COLUMNS, rows, now))
                self.pv_lock_count.post(len(locks), timestamp=now)
            if events:
                self._events.extend(events)
                self._events_dirty = True
                self.pv_last_event.post(events[-1].line(), timestamp=now)

    def flush_events(self) -> None:
        """Post ``Coord:Events`` if events arrived since the last flush (coalesced)."""
        with self.table.mutex:
            if not self._events_dirty:
                return
            self._events_dirty = False
            rows = [(e.time, e.action.value, e.device, e.lock_type.value if e.lock_type else "",
                     e.actor, e.holder, e.message) for e in self._events]
            self.pv_events.post(
                pvutil.table_value(self._events_nt, pvn.EVENTS_COLUMNS, rows, time.time()))

    def tick(self, second: bool) -> None:
        """Periodic work: expiry; once a second heartbeat and remaining lease times."""
        self.table.expire()
        self.flush_events()
        if second:
            self.table.check_store()
            now = time.time()
            self._heartbeat += 1
            self.pv_heartbeat.post(self._heartbeat, timestamp=now)
            with self.table.mutex:
                for d in self._device_pvs:
                    lk = self.table.effective(d)
                    if lk is not None:
                        self._post_if_changed(
                            d, "remaining", max(0.0, round(lk.expires - now, 1)), now)

    # --- RPC handlers (called by _RPC, which finishes the operation) -------------------------

    def identity(self, op, args: dict[str, str]) -> Identity:
        """Who asks: the PVA account and peer host, or the user a trusted service names."""
        account = op.account() or "anonymous"
        host = (op.peer() or "unknown").rsplit(":", 1)[0]
        roles = frozenset(op.roles() or ())
        user, client_host = rpcargs.on_behalf_arg(args)
        if user is None:
            return Identity(account, host, roles)
        if not self.table.policy.is_trusted_service(account, roles):
            trusted = self.table.policy.access.trusted_services
            raise LockError(
                f"{account} is not a trusted service account: onBehalfOf is refused (policy "
                f"trusted_services: {', '.join(trusted) or 'none'})", ErrorCode.NOT_ALLOWED,
            )
        return Identity(user, client_host or host, roles_of(user), actor=account)

    def _acquire(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.ACQUIRE_ARGS, "Acquire")
        ident = self.identity(op, args)
        res = self.table.acquire(
            ident,
            rpcargs.devices_arg(args.get("device")),
            rpcargs.lock_type_arg(args.get("type")),
            rpcargs.timeout_arg(args.get("timeout")),
            args.get("reason", ""),
            args.get("planUid", ""),
        )
        return ACQUIRE_RESULT({
            "granted": res.granted, "key": res.key, "devices": list(res.devices),
            "preempted": list(res.preempted), "expires": res.expires, "message": res.message,
        })

    def _release(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.RELEASE_ARGS, "Release")
        ident = self.identity(op, args)
        devs = self.table.release(
            ident, rpcargs.devices_arg(args.get("device")), args.get("key") or None)
        return RELEASE_RESULT({"devices": list(devs), "message": f"released {', '.join(devs)}"})

    def _renew(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.RENEW_ARGS, "Renew")
        ident = self.identity(op, args)
        devs, expires = self.table.renew(
            ident, rpcargs.devices_arg(args.get("device")), args.get("key") or None,
            rpcargs.timeout_arg(args.get("timeout")),
        )
        return RENEW_RESULT({"devices": list(devs), "expires": expires,
                             "message": f"renewed {', '.join(devs)}"})

    def _force_release(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.FORCE_RELEASE_ARGS, "ForceRelease")
        ident = self.identity(op, args)
        devs = self.table.force_release(
            ident, rpcargs.devices_arg(args.get("device")), args.get("reason", ""))
        return RELEASE_RESULT({"devices": list(devs),
                               "message": f"force-released {', '.join(devs)}"})


def _rpc_handler(ioc: CoordinationIOC, spec: pvn.PVSpec, fn: Callable[[Any, dict[str, str]], Value]
                 ) -> pvutil.RPC:
    """The handler of one coordination RPC: :class:`iocs.pvutil.RPC`, auditing bad requests."""

    def audit(op: Any, args: dict[str, str], err: Exception) -> None:
        if getattr(err, "audited", False):
            return  # refused by the lock table, which audited it
        ident = Identity(op.account() or "anonymous", (op.peer() or "unknown").rsplit(":", 1)[0])
        ioc.table.audit_refusal(ident, [args.get("device", "?")], None, f"{spec.suffix}: {err}")

    return pvutil.RPC(spec.suffix, fn, (LockError,),
                      "pvcall P Coord:Acquire device=m1 type=MANUAL_OPERATOR", on_refused=audit)


class RegistryFollower:
    """Keeps the IOC's device list equal to ``Registry:Devices`` (monitor over PVA)."""

    def __init__(self, ioc: CoordinationIOC, registry_prefix: str, ctxt: Context) -> None:
        self.ioc = ioc
        self.name = pvn.REGISTRY_DEVICES.name(registry_prefix)
        self.connected = False
        self._sub = ctxt.monitor(self.name, self._update, notify_disconnect=True)

    def _update(self, value) -> None:
        if isinstance(value, Exception):
            self.connected = False
            return
        try:
            names = [str(n) for n in value["value.name"]]
        except Exception:  # a registry of another shape
            log.exception("unexpected %s value", self.name)
            return
        self.connected = True
        self.ioc.set_devices(names)

    def close(self) -> None:
        """Stop monitoring."""
        self._sub.close()


async def serve(
    prefix: str,
    table: LockTable,
    stop: asyncio.Event,
    registry_prefix: str | None = None,
    server_conf: dict[str, str] | None = None,
    client_conf: dict[str, str] | None = None,
    ready: Callable[[CoordinationIOC], None] | None = None,
    events_tail: int = 50,
) -> None:
    """Serve the coordination PVs until ``stop`` is set.

    Args:
        prefix: endstation prefix.
        table: the lock table (with policy and store).
        stop: set it to shut down.
        registry_prefix: follow ``Registry:Devices`` under this prefix (``None``: the table's
            static device list is used).
        server_conf: p4p server configuration (``None``: from the environment).
        client_conf: p4p client configuration for the registry monitor (``None``: environment).
        ready: called with the running IOC once its PVs are served (``ioc.server_conf`` is the
            server's client configuration); every IOC's ``serve`` has this form.
        events_tail: rows of ``Coord:Events``.
    """
    ioc = CoordinationIOC(prefix, table, events_tail=events_tail)
    server_kws = {"conf": server_conf, "useenv": False} if server_conf is not None else {}
    client_kws = {"conf": client_conf, "useenv": False} if client_conf is not None else {}
    follower = None
    ctxt = Context("pva", nt=False, **client_kws) if registry_prefix is not None else None
    try:
        with Server(providers=[ioc.provider], **server_kws) as server:
            ioc.server_conf = server.conf()
            if ctxt is not None and registry_prefix is not None:
                follower = RegistryFollower(ioc, registry_prefix, ctxt)
            log.info("coordination IOC serving %sCoord:* (%d locks loaded)", prefix,
                     len(table.locks()))
            if ready is not None:
                ready(ioc)
            n = 0
            while not stop.is_set():
                n += 1
                second = n % int(1 / TICK) == 0
                try:
                    ioc.tick(second)
                except Exception:  # keep serving; the health PV shows it
                    log.exception("tick failed")
                if table.store_error is not None:
                    ioc.set_health(f"store failing: {table.store_error}"[:200])
                elif follower is not None and not follower.connected:
                    ioc.set_health(f"registry {follower.name} not connected")
                elif table.devices is None:
                    ioc.set_health("no device list")
                else:
                    ioc.set_health("OK")
                try:
                    await asyncio.wait_for(stop.wait(), TICK)
                except TimeoutError:
                    pass
    finally:
        if follower is not None:
            follower.close()
        if ctxt is not None:
            ctxt.close()
