"""bridges.lockview against the real coordination and registry IOCs (processes, loopback)."""

from __future__ import annotations

import threading

import pytest
from p4p.client.thread import Context

from bridges.lockview import LockView, Snapshot
from pvcoord.demo.devices import write_registry
from pvcoord.procs import (
    ManagedProcess,
    client_conf,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo
from pvdb import names as pvn

from .coordhelpers import PREFIX, REPO, rpc, start_coordination

pytestmark = pytest.mark.system


def test_lockview_follows_locks_registry_and_fails_closed(tmp_path):
    env = loopback_env()
    registry = ManagedProcess(
        "registry",
        python_module("iocs.registry", "--prefix", PREFIX, "--registry",
                      str(write_registry(PREFIX, tmp_path / "registry.yaml"))),
        server_env(env), cwd=REPO, log_dir=tmp_path)
    coord = None
    seen: list[Snapshot] = []
    changed = threading.Event()

    def listener(snap: Snapshot) -> None:
        seen.append(snap)
        changed.set()

    view = LockView(PREFIX, conf=client_conf(env))
    view.listeners.append(listener)
    try:
        wait_for_pv(pvn.REGISTRY_DEVICES.name(PREFIX), env, procs=[registry])
        view.start()
        # registry but no coordination IOC: map known, lock state unknown (fail closed)
        wait_until(lambda: view.devices.known, 10, "registry map")
        assert not view.state.known and "Coord:Locks" in view.state.why_unknown
        m1 = demo.MOTORS[0]
        snap = view.snapshot
        assert sorted(snap.device_names) == sorted(d.name for d in demo.DEVICES)
        assert demo.motor_setpoint(PREFIX, m1) in snap.pvs[m1]
        assert view.devices.device_of(demo.motor_setpoint(PREFIX, m1) + ".DESC") == m1

        coord = start_coordination(env, tmp_path, devices=None,
                                   extra=("--registry-prefix", PREFIX))
        wait_until(lambda: view.state.known, 10, "lock state known")
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            wait_until(lambda: c.get(pvn.COORD_HEALTH.name(PREFIX), timeout=5) == "OK", 10,
                       "coordination sees the registry")
            changed.clear()
            got = rpc(c, pvn.COORD_ACQUIRE, device=m1, type="MANUAL_OPERATOR", timeout="60",
                      reason="lockview test")
            assert got.granted
            assert changed.wait(5)
            wait_until(lambda: m1 in view.state.locks, 5, "lock seen")
            lock = view.state.locks[m1]
            assert lock.lock_type == "MANUAL_OPERATOR" and lock.reason == "lockview test"
            assert lock.account and lock.expires > 0
            assert any(m1 in s.state.locks for s in seen)
        # the coordination IOC killed: unknown within the stale window (listener told)
        n = len(seen)
        coord.kill9()
        wait_until(lambda: not view.state.known, 3.0, "fail closed after kill")
        assert any(not s.state.known for s in seen[n:])
        coord.stop()
        # back: known again, with the persisted lock
        coord = start_coordination(env, tmp_path, devices=None,
                                   extra=("--registry-prefix", PREFIX))
        wait_until(lambda: view.state.known and m1 in view.state.locks, 10, "known again")
        # the registry going away keeps the last map (membership does not go stale)
        registry.stop()
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            wait_until(lambda: "not connected" in c.get(pvn.COORD_HEALTH.name(PREFIX), timeout=5),
                       10, "registry gone (the coordination IOC noticed)")
        assert view.devices.known and view.devices.device_of(demo.motor_setpoint(PREFIX, m1))
    finally:
        view.close()
        if coord is not None:
            coord.stop()
        registry.stop()
