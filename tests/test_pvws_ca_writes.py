"""``ca://`` writes over Channel Access on the device network (decision 0136), real processes.

The demo devices run in a softIoc on the device network; the registry and coordination IOCs on
the client network; the bridge (``python -m bridges.pvws``, writes on, password login) with
``--device-ca-conf`` naming the device network's CA port, and ``--device-conf`` naming PVA ports
where nothing answers (``nowhere``), so only a write over Channel Access reaches the IOC. Its own
``EPICS_CA_*`` (for ``ca://`` reads) point at the device network too, so the page sees what was
written. A write is decided for the web user like
any other: allowed when free, refused naming the holder when another user holds the device.
"""

from __future__ import annotations

import pytest

from bridges.pvws.auth import generate_password, set_password
from pvcoord.demo import devices
from pvcoord.procs import (
    LOOPBACK,
    ManagedProcess,
    free_port,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo
from pvdb.names import COORD_HEALTH, REGISTRY_DEVICE_PVS

from .pvwshelpers import POLICY, REPO, WS, Bridge, P

pytestmark = pytest.mark.system

M1 = demo.MOTORS[0]
SP = f"ca://{demo.motor_setpoint(P, M1)}"
WAIT = 30.0
"""Deadline (s) for a process or a CA connection on two loaded cores."""
CA_KEYS = ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT",
           "EPICS_CA_REPEATER_PORT")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pvws-ca")
    clients, dev, nowhere = loopback_env(), loopback_env(), loopback_env()
    (tmp / "p.toml").write_text(POLICY)
    devices.write_database(P, tmp / "demo.db")
    devices.write_registry(P, tmp / "registry.yaml")
    pw = tmp / "web-users"
    passwords = {u: generate_password() for u in ("alice", "bob")}
    for user, password in passwords.items():
        set_password(pw, user, password)
    procs: list[ManagedProcess] = []
    try:
        procs.append(ManagedProcess(
            "softioc", python_module("pvxslibs.ioc", "-d", str(tmp / "demo.db")),
            server_env(dev), log_dir=tmp))
        procs.append(reg := ManagedProcess(
            "registry", python_module("iocs.registry", "--prefix", P, "--registry",
                                      str(tmp / "registry.yaml")),
            server_env(clients), cwd=REPO, log_dir=tmp))
        wait_for_pv(REGISTRY_DEVICE_PVS.name(P), clients, WAIT, procs=[reg])
        procs.append(coord := ManagedProcess(
            "coordination", python_module(
                "iocs.coordination", "--prefix", P, "--policy", str(tmp / "p.toml"),
                "--store", f"sqlite:///{tmp}/locks.sqlite", "--registry-prefix", P),
            server_env(clients), cwd=REPO, log_dir=tmp))
        wait_for_pv(COORD_HEALTH.name(P), clients, WAIT, procs=[coord],
                    condition=lambda v: v == "OK")
        port = free_port()
        argv = python_module(
            "bridges.pvws", "--prefix", P, "--host", LOOPBACK, "--port", str(port), "--writes",
            "--auth", "password", "--password-file", str(pw), "--policy", str(tmp / "p.toml"),
            *(x for k in ("EPICS_PVA_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST",
                          "EPICS_PVA_BROADCAST_PORT")
              for x in ("--device-conf", f"{k}={nowhere[k]}")),
            *(x for k in CA_KEYS for x in ("--device-ca-conf", f"{k}={dev[k]}")))
        bridge_env = {**clients, **{k: dev[k] for k in CA_KEYS}}  # ca:// reads: device network
        procs.append(web := ManagedProcess("bridge", argv, bridge_env, cwd=REPO, log_dir=tmp))
        b = Bridge(web, port)

        def up() -> bool:
            if not web.alive():
                raise RuntimeError(f"the bridge exited:\n{web.output()}")
            try:
                b.get("/pvws/info")
            except OSError:
                return False
            return True

        wait_until(up, WAIT, "the bridge answering")
        yield b, passwords
    except BaseException:
        for p in procs:
            print(f"--- {p.name} ---\n{p.output()[-3000:]}")
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def _writable(ws: WS, want: bool):
    return ws.update(SP, lambda m: m.get("readonly") is (not want), timeout=WAIT)


def test_ca_write_goes_over_channel_access_and_is_decided_for_the_web_user(site):
    bridge, passwords = site
    alice = bridge.login("alice", passwords["alice"])
    bob = bridge.login("bob", passwords["bob"])
    with WS(bridge.ws_url, alice) as wa, WS(bridge.ws_url, bob) as wb:
        for ws in (wa, wb):
            ws.subscribe(SP)
            first = ws.update(SP, lambda m: "vtype" in m, timeout=WAIT)  # read over CA
            assert first["readonly"] is False, first
        # free device: alice's write reaches the IOC over CA (a PVA put would find no server)
        wa.send({"type": "write", "pv": SP, "value": 1.5})
        wb.update(SP, lambda m: m.get("value") == 1.5, timeout=WAIT)
        # bob takes m1: alice's write is refused naming bob, and the value stays
        status, body, _ = bridge.post("/api/lock", {"action": "take", "device": M1}, bob)
        assert status == 200, body
        _writable(wa, False)
        wa.send({"type": "write", "pv": SP, "value": 7})
        err = wa.error("holder-conflict")
        assert err["holder"].startswith("bob@") and err["device"] == M1, err
        # text, as cs-web-lib sends it: written as DBR_STRING, converted by the IOC
        wb.send({"type": "write", "pv": SP, "value": "2.5"})
        wa.update(SP, lambda m: m.get("value") == 2.5, timeout=WAIT)
        assert not [m for m in wb.msgs if m.get("type") == "error"], wb.msgs
        status, body, _ = bridge.post("/api/lock", {"action": "release", "device": M1}, bob)
        assert status == 200, body
    audit = bridge.get("/pvws/audit")
    pv = SP.removeprefix("ca://")
    assert [(r["user"], r["allowed"], r["value"]) for r in audit if r["pv"] == pv] == [
        ("alice", True, 1.5), ("alice", False, 7), ("bob", True, "2.5")]
    assert bridge.get("/pvws/info")  # the bridge is fine after all of it


def test_ca_writer_answers_every_request_with_the_reason():
    """The child alone: a name no CA server has, malformed requests; it keeps serving."""
    import asyncio

    from bridges.pvws.cawrite import CaWriteError, CaWriter, device_ca_env

    nowhere = loopback_env()
    conf = {k: nowhere[k] for k in CA_KEYS}

    async def run() -> tuple[str, int | None]:
        w = CaWriter(device_ca_env(conf), timeout=1.0)
        try:
            with pytest.raises(CaWriteError) as e:
                await w.put(f"{P}no:such:pv", 1.0)
            assert w.pid is not None  # still serving after a failed put
            return str(e.value), w.pid
        finally:
            await w.close()

    why, _pid = asyncio.run(run())
    assert why.startswith(f"no CA server answered for {P}no:such:pv"), why

    # malformed requests get an answer (with their id when they have one); stdin closed: exit 0
    import json
    import subprocess

    p = subprocess.run(python_module("bridges.pvws.cawrite", "--timeout", "1"),
                       input='not json\n{"id": 3, "pv": 5, "value": 1}\n[]\n', text=True,
                       capture_output=True, env=device_ca_env(conf), cwd=REPO, timeout=60)
    ready, *replies = [json.loads(line) for line in p.stdout.splitlines()]
    assert p.returncode == 0, p.stderr
    assert ready == {"ready": True}  # said first: a put's time starts after it
    assert [(r["id"], r["ok"]) for r in replies] == [(None, False), (3, False), (None, False)]
    assert all(r["error"].startswith("malformed request") for r in replies), replies


def test_a_ca_writer_that_does_not_start_is_a_clear_put_error(tmp_path):
    """A child that never says it is ready (here: a Python that cannot start, its PYTHONHOME
    wrong) fails the put with CaWriteError naming it, not with a put timeout."""
    import asyncio

    from bridges.pvws.cawrite import CaWriteError, CaWriter, device_ca_env

    nowhere = loopback_env()
    env = device_ca_env({k: nowhere[k] for k in CA_KEYS})
    env["PYTHONHOME"] = str(tmp_path / "no-python-here")

    async def run() -> str:
        w = CaWriter(env, timeout=1.0)
        try:
            with pytest.raises(CaWriteError) as e:
                await w.put(f"{P}m1:Setpoint", 1.0)
            assert w.pid is None
            return str(e.value)
        finally:
            await w.close()

    why = asyncio.run(run())
    assert why.startswith("the CA writer did not start"), why

