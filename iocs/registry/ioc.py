"""The p4p boundary of the registry IOC: SharedPVs, the lookup RPC, the connectivity checker.

Everything untyped (p4p ``Value``, ``ServerOperation``, client contexts) stays in this module; the
logic is :mod:`iocs.registry.model`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from p4p import Type, Value
from p4p.client.asyncio import Context, Disconnected, RemoteError
from p4p.nt import NTScalar, NTTable
from p4p.server import Server, StaticProvider
from p4p.server.asyncio import SharedPV

from pvdb import names as pvn
from pvdb.models import Device

from .. import pvutil
from .model import LOOKUP_FIELDS, RegistryError, RegistryState, lookup_pv_arg

log = logging.getLogger(__name__)

LOOKUP_RESULT = Type(list(LOOKUP_FIELDS), id="pvcoord:LookupResult:1.0")
"""Type of the ``Registry:Lookup`` reply."""

DEFAULT_CHECK_PERIOD = 2.0
"""Seconds between connectivity checks of every device PV."""


def lookup_handler(state: RegistryState) -> pvutil.RPC:
    """The handler of ``Registry:Lookup`` (:class:`iocs.pvutil.RPC`)."""
    return pvutil.RPC(
        pvn.REGISTRY_LOOKUP.suffix,
        lambda _op, args: LOOKUP_RESULT(state.lookup(lookup_pv_arg(args))),
        (RegistryError,), "pvcall P Registry:Lookup pv=BL01:m1:Setpoint",
    )


def _read_only(initial: Value) -> SharedPV:
    """An asyncio SharedPV clients only read (puts and RPCs refused with a code)."""
    return SharedPV(handler=pvutil.READ_ONLY, initial=initial)


class RegistryIOC:
    """Every PV of the registry IOC for one prefix, served by ``self.provider``.

    Must be created inside a running asyncio loop (asyncio SharedPVs).
    """

    def __init__(self, prefix: str, devices: list[Device]) -> None:
        self.prefix = pvn.check_prefix(prefix)
        self.state = RegistryState(devices)
        self.provider = StaticProvider("pvcoord-registry")
        pvutil.add_process_info(self.provider, self.prefix, "registry")
        self.server_conf: dict[str, str] = {}
        """The p4p server's configuration once serving (what a client needs to reach it)."""
        self.heartbeat = 0
        now = time.time()
        self._devices_nt = NTTable(list(pvn.DEVICES_COLUMNS))
        self._pvs_nt = NTTable(list(pvn.REGISTRY_DEVICE_PVS.columns))
        self.pv_devices = self._add(pvn.REGISTRY_DEVICES, _read_only(pvutil.table_value(
            self._devices_nt, pvn.DEVICES_COLUMNS, self.state.device_rows(), now)))
        self.pv_device_pvs = self._add(pvn.REGISTRY_DEVICE_PVS, _read_only(pvutil.table_value(
            self._pvs_nt, pvn.REGISTRY_DEVICE_PVS.columns, self.state.pv_rows(), now)))
        self.pv_names = self._add(pvn.REGISTRY_NAMES, self._scalar("as", self.state.names()))
        self.pv_connected = self._add(pvn.REGISTRY_CONNECTED, self._scalar("i", 0))
        self.pv_heartbeat = self._add(pvn.REGISTRY_HEARTBEAT, self._scalar("i", 0))
        self._add(pvn.REGISTRY_LOOKUP, SharedPV(
            handler=lookup_handler(self.state), initial=NTScalar("s").wrap("", timestamp=now)))
        signals_nt = NTTable(list(pvn.SIGNALS_COLUMNS))
        self.pv_signals: dict[str, SharedPV] = {}
        for name in self.state.names():
            self.pv_signals[name] = _read_only(pvutil.table_value(
                signals_nt, pvn.SIGNALS_COLUMNS, self.state.signal_rows(name), now))
            self.provider.add(pvn.REGISTRY_DEVICE_SIGNALS.name(self.prefix, device=name),
                              self.pv_signals[name])

    def _add(self, spec: pvn.PVSpec, pv: SharedPV) -> SharedPV:
        self.provider.add(spec.name(self.prefix), pv)
        return pv

    @staticmethod
    def _scalar(code: str, initial: object) -> SharedPV:
        nt = NTScalar(code)
        return SharedPV(handler=pvutil.READ_ONLY, nt=nt,
                        initial=nt.wrap(initial, timestamp=time.time()))

    def apply_check(self, answered: dict[str, bool]) -> set[str]:
        """Record a connectivity check; publish ``Devices`` and ``Connected`` if a flag changed."""
        changed = self.state.apply_check(answered)
        if changed:
            now = time.time()
            self.pv_devices.post(pvutil.table_value(
                self._devices_nt, pvn.DEVICES_COLUMNS, self.state.device_rows(), now))
            self.pv_connected.post(self.state.connected_count(), timestamp=now)
            for name in sorted(changed):
                dev = self.state.index.by_name[name]
                if self.state.connected[name]:
                    log.info("%s connected", name)
                else:
                    missing = [pv for pv in dev.pvs if not answered.get(pv, False)]
                    log.warning("%s not connected: %s", name,
                                ", ".join(missing[:5]) or "no explicit PVs to check")
        return changed

    def beat(self) -> None:
        """Increment and publish ``Registry:Heartbeat``."""
        self.heartbeat += 1
        self.pv_heartbeat.post(self.heartbeat, timestamp=time.time())


async def _answers(ctxt: Context, pv: str, timeout: float) -> bool:
    try:
        await asyncio.wait_for(ctxt.get(pv), timeout)
    except (TimeoutError, Disconnected, RemoteError):
        return False
    except Exception as e:  # anything else also means "not answering"; say why
        log.warning("checking %s failed: %s: %s", pv, type(e).__name__, e)
        return False
    return True


async def check_once(ctxt: Context, pvs: list[str], timeout: float) -> dict[str, bool]:
    """GET every PV in parallel; ``pv -> answered within timeout``."""
    results = await asyncio.gather(*(_answers(ctxt, pv, timeout) for pv in pvs))
    return dict(zip(pvs, results, strict=True))


async def serve(
    prefix: str,
    devices: list[Device],
    stop: asyncio.Event,
    check_period: float = DEFAULT_CHECK_PERIOD,
    server_conf: dict[str, str] | None = None,
    client_conf: dict[str, str] | None = None,
    isolate: bool = False,
    ready: Callable[[RegistryIOC], None] | None = None,
) -> None:
    """Serve the registry PVs until ``stop`` is set.

    Args:
        prefix: endstation prefix ``P`` (with trailing ``:``).
        devices: the registered devices (from :func:`pvdb.registry_file.load_registry`).
        stop: set it to shut down.
        check_period: seconds between connectivity checks; a PV that does not answer a GET
            within ``min(check_period, 2)`` seconds (at least 0.2 s) counts as disconnected.
        server_conf: p4p server configuration (``None``: from the environment).
        client_conf: p4p client configuration for the checks (``None``: from the environment).
        isolate: serve on a private loopback port (in-process tests).
        ready: called with the running IOC once its PVs are served (``ioc.server_conf`` is the
            server's client configuration); every IOC's ``serve`` has this form.
    """
    if check_period <= 0:
        raise ValueError(f"check_period must be > 0 s, not {check_period}")
    ioc = RegistryIOC(prefix, devices)
    probe_timeout = max(0.2, min(check_period, 2.0))
    server_kws: dict[str, Any] = {}
    if isolate:
        server_kws["isolate"] = True
    elif server_conf is not None:
        server_kws.update(conf=server_conf, useenv=False)
    client_kws = {"conf": client_conf, "useenv": False} if client_conf is not None else {}
    probes = ioc.state.all_probe_names()

    async def heartbeat() -> None:
        while not stop.is_set():
            ioc.beat()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    async def checker(ctxt: Context) -> None:
        while not stop.is_set():
            started = time.monotonic()
            if probes:
                ioc.apply_check(await check_once(ctxt, probes, probe_timeout))
            rest = max(0.0, check_period - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), rest)
            except TimeoutError:
                pass

    with Server(providers=[ioc.provider], **server_kws) as server, \
            Context("pva", **client_kws) as ctxt:
        log.info("registry IOC serving %sRegistry:* with %d devices (%d PVs checked every %g s)",
                 prefix, len(devices), len(probes), check_period)
        ioc.server_conf = server.conf()
        if ready is not None:
            ready(ioc)
        tasks = [asyncio.create_task(heartbeat()), asyncio.create_task(checker(ctxt))]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
