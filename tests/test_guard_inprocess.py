"""The guard's ``serve()`` in this process, between in-process p4p servers (``isolate=True``).

A stand-in coordination/registry server lets the test control the heartbeat and the lock table
exactly (the system tests use the real IOCs); the device is a p4p SharedPV upstream. Covers what
the real processes make slow or hard to provoke: a heartbeat that stops while the connection
stays up, and a site ACF ``INP`` changing permissions live together with the locks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from p4p import Value
from p4p.client.thread import Context, RemoteError
from p4p.nt import NTScalar, NTTable
from p4p.server import Server
from p4p.server.thread import SharedPV

from bridges.guard.app import serve
from bridges.guard.config import parse_config
from bridges.guard.gateway import Guard
from pvcoord.procs import wait_until
from pvdb import demo
from pvdb.guard import GUARD_HEALTH, GUARD_WHAT_IF
from pvdb.names import (
    COORD_HEARTBEAT,
    COORD_LOCK_CHANGES,
    COORD_LOCKS,
    LOCK_CHANGES_COLUMNS,
    LOCK_SEQ_FIELDS,
    LOCKS_COLUMNS,
    REGISTRY_DEVICE_PVS,
    REGISTRY_DEVICES,
)
from tests.conftest import TIMEOUT

P = "INP:"
M1 = demo.MOTORS[0]
SETPOINT = demo.motor_setpoint(P, M1)
INTERNAL = demo.MOTOR_SIM_MOVING.name(P, device=M1)  # not in Registry:DevicePVs: m1 by pvPrefix
ENABLE = demo.shutter_status(P)  # stands in for a site interlock PV read by the ACF (INPA)
ACF = f"""
ASG(DEFAULT) {{
    INPA("{ENABLE}")
    RULE(1, READ)
    RULE(1, WRITE) {{ CALC("A==1") }}
}}
"""


def server_conf_to_client(conf: dict[str, str]) -> dict:
    """pvagw-style client entry reaching an isolated in-process server."""
    return {"addrlist": conf["EPICS_PVA_ADDR_LIST"], "autoaddrlist": False,
            "bcastport": int(conf["EPICS_PVA_BROADCAST_PORT"])}


class Upstream:
    """The device side: one motor setpoint, an m1 PV known only by the prefix, the interlock."""

    def __init__(self) -> None:
        self.setpoint = SharedPV(nt=NTScalar("d"), initial=0.0)
        self.internal = SharedPV(nt=NTScalar("d"), initial=0.0)
        self.enable = SharedPV(nt=NTScalar("i"), initial=1)

        def put(pv, op):
            pv.post(op.value(), timestamp=time.time())
            op.done()

        self.setpoint.put(put)
        self.internal.put(put)
        self.server = Server(providers=[{SETPOINT: self.setpoint, INTERNAL: self.internal,
                                         ENABLE: self.enable}], isolate=True)


class Coordination:
    """Stand-in for the coordination and registry IOCs: the test posts what they would."""

    def __init__(self, with_devices: bool = True) -> None:
        self.locks_nt = NTTable(list(LOCKS_COLUMNS), extra=list(LOCK_SEQ_FIELDS))
        self.locks = SharedPV(nt=self.locks_nt, initial=[])
        # the IOC posts each change here too; this stand-in posts whole tables only (each with
        # the next seq), which a follower must take as they come
        self.seq = 0
        changes_nt = NTTable(list(LOCK_CHANGES_COLUMNS), extra=list(LOCK_SEQ_FIELDS))
        self.changes = SharedPV(nt=changes_nt, initial=[])
        self.beat = SharedPV(nt=NTScalar("i"), initial=0)
        self.pvs = SharedPV(nt=NTTable([("pv", "s"), ("device", "s")]),
                            initial=[{"pv": SETPOINT, "device": M1}])
        self.devices_nt = NTTable([("name", "s"), ("pvPrefix", "s")])
        self.devices = SharedPV(nt=self.devices_nt)  # not open: clients wait for its value
        if with_devices:
            self.open_devices()
        self.server = Server(providers=[{
            COORD_LOCKS.name(P): self.locks, COORD_HEARTBEAT.name(P): self.beat,
            COORD_LOCK_CHANGES.name(P): self.changes,
            REGISTRY_DEVICE_PVS.name(P): self.pvs, REGISTRY_DEVICES.name(P): self.devices,
        }], isolate=True)
        self.count = 0
        self._run = threading.Event()
        self._run.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(0.2):
            if self._run.is_set():
                self.count += 1
                self.beat.post(self.count, timestamp=time.time())

    def open_devices(self) -> None:
        self.devices.open(self.devices_nt.wrap([{"name": M1, "pvPrefix": f"{P}{M1}:"}],
                                               timestamp=time.time()))

    def pause_heartbeat(self) -> None:
        self._run.clear()

    def resume_heartbeat(self) -> None:
        self._run.set()

    def hold(self, owner: str | None) -> None:
        rows = [] if owner is None else [{
            "device": M1, "lockType": "MANUAL_OPERATOR", "priority": 2, "owner": owner,
            "acquired": time.time(), "expires": time.time() + 60, "reason": "test", "planUid": "",
        }]
        v = self.locks_nt.wrap(rows, timestamp=time.time())
        for col, _code in LOCKS_COLUMNS:  # NTTable.wrap([]) leaves columns unmarked: mark them
            v["value." + col] = [row[col] for row in rows]
        self.seq += 1
        v["seq"] = self.seq
        self.locks.post(v)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.stop()


@contextmanager
def running_guard(tmp: Path, up: Upstream, coord: Coordination) -> Iterator[tuple[Guard, Context]]:
    """``serve()`` in a thread between ``up`` and ``coord``; yields it and a client of it."""
    conf = parse_config(
        json.dumps({
            "version": 2,
            "clients": [{"name": "dev", **server_conf_to_client(up.server.conf())}],
            "servers": [{"name": "cli", "clients": ["dev"], "interface": ["127.0.0.1"],
                         "autoaddrlist": False, "addrlist": "127.0.0.1", "serverport": 0,
                         "bcastport": 0, "access": "site.acf"}],
            "guard": {"policy": "policy.toml", "stale_after": 1.0,
                      "coordination": server_conf_to_client(coord.server.conf())},
        }),
        "inproc.json", tmp,
    )
    ready = threading.Event()
    holder: dict = {}

    def run() -> None:
        async def main() -> None:
            holder["loop"] = asyncio.get_running_loop()
            holder["stop"] = asyncio.Event()

            def on_ready(g: Guard) -> None:
                holder["guard"] = g
                ready.set()

            await serve(P, conf, holder["stop"], ready=on_ready)

        try:
            asyncio.run(main())
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(20) and "guard" in holder, "guard did not start"
        guard = holder["guard"]
        gconf = guard.server_confs()[0]
        client = Context("pva", useenv=False, nt=False,
                         conf={k: v for k, v in gconf.items() if k.startswith("EPICS_PVA_")})
        try:
            yield guard, client
        finally:
            client.close()
    finally:
        if "loop" in holder:
            holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


def health(client: Context) -> str:
    return client.get(GUARD_HEALTH.name(P), timeout=TIMEOUT).value


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[Path, Upstream]]:
    tmp = tmp_path_factory.mktemp("guard-inproc")
    (tmp / "site.acf").write_text(ACF)
    (tmp / "policy.toml").write_text("[access]\nemergency = []\n")
    up = Upstream()
    try:
        yield tmp, up
    finally:
        up.server.stop()


@pytest.fixture(scope="module")
def setup(site) -> Iterator[tuple[Upstream, Coordination, Guard, Context]]:
    tmp, up = site
    coord = Coordination()
    try:
        with running_guard(tmp, up, coord) as (guard, client):
            wait_until(lambda: health(client) == "OK", 10.0, "guard health OK")
            yield up, coord, guard, client
    finally:
        coord.close()


def writes(client: Context, pv: str = SETPOINT) -> bool:
    try:
        client.put(pv, 1.0, wait=True, timeout=TIMEOUT)
        return True
    except RemoteError:
        return False


def what_if(client: Context, account: str) -> Value:
    from p4p.nt import NTURI

    name = GUARD_WHAT_IF.name(P)
    uri = NTURI([("pv", "s"), ("account", "s")]).wrap(name, kws={"pv": SETPOINT,
                                                               "account": account})
    return client.rpc(name, uri, timeout=TIMEOUT)


def test_heartbeat_that_stops_fails_closed_and_resumes(setup):
    _up, coord, _guard, client = setup
    assert writes(client)
    coord.pause_heartbeat()  # the connection stays up; only the counter stops
    wait_until(lambda: not writes(client), 5.0, "refused after the heartbeat stopped")
    assert "not advanced" in what_if(client, "anyone").reason
    coord.resume_heartbeat()
    wait_until(lambda: writes(client), 5.0, "allowed once the heartbeat advances")


def test_lock_and_site_acf_inp_both_change_an_open_channel(setup):
    up, coord, _guard, client = setup
    assert writes(client)
    coord.hold("someone-else@10.9.9.9")
    wait_until(lambda: not writes(client), 5.0, "refused while someone else holds m1")
    w = what_if(client, "anyone")
    assert not w.allowed and w.holder == "someone-else@10.9.9.9" and w.device == M1
    coord.hold(None)
    wait_until(lambda: writes(client), 5.0, "allowed after release")
    up.enable.post(0, timestamp=time.time())  # the site ACF now denies WRITE
    wait_until(lambda: not writes(client), 5.0, "refused by the ACF INP")
    assert "ACF" in what_if(client, "anyone").reason
    up.enable.post(1, timestamp=time.time())
    wait_until(lambda: writes(client), 5.0, "allowed by the ACF again")


def test_malformed_lock_table_fails_closed(setup):
    _up, coord, _guard, client = setup
    assert writes(client)
    # the right type, but columns of different lengths: the parse fails, not the connection
    v = coord.locks_nt.wrap([], timestamp=time.time())
    for col, _code in LOCKS_COLUMNS:
        v["value." + col] = [M1] if col == "device" else []
    coord.seq += 1
    v["seq"] = coord.seq
    coord.locks.post(v)
    wait_until(lambda: not writes(client), 5.0, "refused on a table with uneven columns")
    reason = what_if(client, "anyone").reason
    assert "Coord:Locks unreadable" in reason and "different lengths" in reason, reason
    assert "different lengths" in health(client)
    coord.hold(None)
    wait_until(lambda: writes(client), 5.0, "allowed on a good table again")
    # a table without the owner column cannot be trusted (the type changes: clients reconnect)
    coord.locks.close()
    coord.locks.open(NTTable([("device", "s")]).wrap([{"device": M1}], timestamp=time.time()))
    wait_until(lambda: not writes(client), 5.0, "refused on a malformed table")
    assert "Coord:Locks" in what_if(client, "anyone").reason
    coord.locks.close()
    coord.locks.open(coord.locks_nt.wrap([], timestamp=time.time()))
    coord.hold(None)
    wait_until(lambda: writes(client), 5.0, "allowed on a good table again")


def test_registry_counts_only_with_both_tables(site):
    """``Registry:DevicePVs`` alone is not the registry: without ``Registry:Devices`` (the
    prefixes) a PV known only by its device's prefix would look like "no device" (fail open)."""
    tmp, up = site
    coord = Coordination(with_devices=False)
    try:
        with running_guard(tmp, up, coord) as (_guard, client):
            coord.hold("someone-else@10.9.9.9")
            wait_until(lambda: "Registry:Devices not received" in health(client), 10.0,
                       "guard health names the missing table")
            assert "Coord" not in health(client)  # the lock state itself is fine
            assert not writes(client, INTERNAL)  # m1 is locked by someone else
            assert not writes(client)
            coord.open_devices()
            wait_until(lambda: health(client) == "OK", 10.0, "guard health OK")
            assert not writes(client, INTERNAL)  # m1 by its prefix: still held by someone else
            coord.hold(None)
            wait_until(lambda: writes(client, INTERNAL), 5.0, "allowed after release")
    finally:
        coord.close()


def test_unreadable_registry_table_fails_closed_and_shows_in_health(setup):
    _up, coord, _guard, client = setup
    assert writes(client)
    # a Registry:Devices without the pvPrefix column (the type changes: clients reconnect)
    coord.devices.close()
    coord.devices.open(NTTable([("name", "s")]).wrap([{"name": M1}], timestamp=time.time()))
    wait_until(lambda: "pvPrefix" in health(client), 5.0, "guard health names the bad column")
    assert "Registry:Devices unreadable" in health(client)
    assert not writes(client)
    assert not writes(client, INTERNAL)
    assert "Registry:Devices unreadable" in what_if(client, "anyone").reason
    coord.devices.close()
    coord.open_devices()
    wait_until(lambda: health(client) == "OK", 5.0, "guard health OK again")
    assert writes(client)


def _post_empty(pv: SharedPV, columns: tuple[str, ...]) -> None:
    """Post an empty table of the PV's own type (every column marked changed)."""
    v = pv._wrap([], timestamp=time.time())
    for col in columns:  # NTTable.wrap([]) leaves columns unmarked: mark them
        v["value." + col] = []
    pv.post(v)


def confirm_registry(client: Context, **kws: str):
    from p4p.nt import NTURI

    from pvdb.guard import GUARD_CONFIRM_REGISTRY

    name = GUARD_CONFIRM_REGISTRY.name(P)
    uri = NTURI([(k, "s") for k in kws]).wrap(name, kws=kws)
    return client.rpc(name, uri, timeout=TIMEOUT, throw=False)


def test_registry_that_empties_while_locked_keeps_refusing_until_confirmed(setup):
    """Issue 11, finding 7: an emptied registry made a locked m1 'no device', writable by all,
    while Guard:Health said OK."""
    _up, coord, _guard, client = setup
    coord.hold("someone-else@10.9.9.9")
    wait_until(lambda: not writes(client), 5.0, "refused while someone else holds m1")
    _post_empty(coord.pvs, ("pv", "device"))
    _post_empty(coord.devices, ("name", "pvPrefix"))
    wait_until(lambda: f"{M1} left the registry" in health(client), 5.0, "health names m1")
    assert "ConfirmRegistry" in health(client)
    assert not writes(client) and not writes(client, INTERNAL)
    assert "left the registry" in what_if(client, "anyone").reason
    r = confirm_registry(client, device="nosuch")
    assert isinstance(r, Exception) and "not withheld: nosuch" in str(r)
    r = confirm_registry(client)  # this process's account is root: force_release by default
    assert not isinstance(r, Exception) and M1 in r.message, r
    wait_until(lambda: health(client) == "OK", 5.0, "health OK after the confirmation")
    wait_until(lambda: writes(client), 5.0, "m1's PV is no device now: the policy default")
    # restore the registry and the lock table for the other tests
    coord.pvs.post([{"pv": SETPOINT, "device": M1}], timestamp=time.time())
    coord.devices.post([{"name": M1, "pvPrefix": f"{P}{M1}:"}], timestamp=time.time())
    coord.hold(None)
    wait_until(lambda: writes(client, INTERNAL), 5.0, "m1 by its prefix again, free")
