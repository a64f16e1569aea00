"""The two bridges as their systemd units run them: ``--config endstation.toml`` only.

Real processes on loopback: the registry and coordination IOCs, the CA bridge (``bridges.flat``)
and the web bridge (``bridges.pvws``), all started with ``--config`` on one endstation file the
test writes, each bridge against a notify socket of the test's own (``NOTIFY_SOCKET``,
``WATCHDOG_USEC``). Shown: READY=1 once serving, WATCHDOG=1 while running, STOPPING=1 and exit 0
on SIGTERM; a libca client reads the CA bridge's PVs (registry and lock state reached with the
file's network settings); a PVWS websocket subscribes through the web bridge both a PVA name and
a ``ca://`` name (read with Channel Access through the CA bridge, again from the file's settings);
the web users' password file comes from ``$PVCOORD_WEB_PASSWORD_FILE`` (the unit's credential),
not from the endstation file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pvcoord.demo import devices
from pvcoord.demo.flat_part import CAAgent
from pvcoord.procs import ManagedProcess, free_port, loopback_env, python_module, wait_for_pv
from pvdb import demo
from pvdb import flat as fl
from pvdb.endstation import load_endstation, to_toml
from pvdb.names import COORD_HEARTBEAT, COORD_LOCKS
from pvdb.process import pvcoord_version
from tests.conftest import REPO
from tests.notifysock import Notify
from tests.pvwshelpers import WS, Bridge

pytestmark = pytest.mark.system

P = "TBRG:"
TIMEOUT = 30.0
WATCHDOG_USEC = "300000"
"""A 300 ms WatchdogSec: WATCHDOG=1 every 150 ms."""


@dataclass
class Station:
    tmp: Path
    env: dict[str, str]
    config: Path
    web_port: int
    password: str = ""
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    notify: dict[str, Notify] = field(default_factory=dict)

    def outputs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.output()[-4000:]}" for n, p in self.procs.items())

    def start(self, name: str, module: str, **extra_env: str) -> ManagedProcess:
        env = dict(self.env, **extra_env)
        if name in self.notify:
            env.update(NOTIFY_SOCKET=self.notify[name].path, WATCHDOG_USEC=WATCHDOG_USEC)
        proc = ManagedProcess(name, python_module(module, "--config", str(self.config)), env,
                              cwd=self.tmp, log_dir=self.tmp)
        self.procs[name] = proc
        return proc


def endstation(tmp: Path, env: dict[str, str], device_env: dict[str, str], web_port: int) -> Path:
    """The endstation file: client side = ``env``'s ports, both bridges, [tls] for nginx."""
    devices.write_registry(P, tmp / "registry.yaml")
    # [web_bridge] needs [tls] (nginx's files; only their existence is checked here)
    (tmp / "cert.pem").write_text("nginx's certificate: not read by the bridges\n")
    (tmp / "key.pem").write_text("nginx's key: not read by the bridges\n")
    data = {
        "prefix": P,
        "network": {
            "client": {"interfaces": ["127.0.0.1"],
                       "pva_broadcast_port": int(env["EPICS_PVA_BROADCAST_PORT"]),
                       "ca_server_port": int(env["EPICS_CA_SERVER_PORT"]),
                       "ca_repeater_port": int(env["EPICS_CA_REPEATER_PORT"])},
            "device": {"interfaces": ["127.0.0.1"],
                       "pva_broadcast_port": int(device_env["EPICS_PVA_BROADCAST_PORT"])},
        },
        "files": {"registry": "registry.yaml"},
        "store": {"url": f"sqlite:///{tmp}/locks.sqlite"},
        "registry": {"pva_server_port": free_port()},
        "coordination": {"pva_server_port": free_port()},
        "ca_bridge": {"pva_server_port": free_port(), "stale_after": 3.0},
        "web_bridge": {"listen_port": web_port, "pva_server_port": free_port(),
                       "auth": "password", "writes": False,
                       "default_type": "ca", "admins": ["alice"]},
        "tls": {"certificate": "cert.pem", "key": "key.pem"},
    }
    path = tmp / "endstation.toml"
    path.write_text(to_toml(data))
    load_endstation(path, deep=True)  # what `pvcoord config check` accepts
    return path


@pytest.fixture(scope="module")
def st(tmp_path_factory) -> Iterator[Station]:
    tmp = tmp_path_factory.mktemp("bridges")
    env = loopback_env()  # only what the harness needs: the processes get EPICS_* from the file
    base = {k: v for k, v in env.items() if not k.startswith("EPICS_")}
    web_port = free_port()
    s = Station(tmp, base, endstation(tmp, env, loopback_env(), web_port), web_port)
    s.notify = {n: Notify(tmp / f"{n}.sock") for n in ("flat", "pvws")}
    pw = tmp / "web-users"
    r = subprocess.run(python_module("bridges.pvws", "passwd", str(pw), "alice", "--generate"),
                       capture_output=True, text=True, cwd=REPO, timeout=30, check=True)
    s.password = r.stdout.strip()
    try:
        reg = s.start("registry", "iocs.registry")
        coord = s.start("coordination", "iocs.coordination")
        wait_for_pv(COORD_LOCKS.name(P), env, TIMEOUT, procs=[reg, coord])
        s.start("flat", "bridges.flat")
        s.start("pvws", "bridges.pvws", PVCOORD_WEB_PASSWORD_FILE=str(pw))
        yield s
    except BaseException:
        print(s.outputs())
        raise
    finally:
        for p in reversed(list(s.procs.values())):
            p.stop()
        for n in s.notify.values():
            n.close()


def ca_client_env(s: Station) -> dict[str, str]:
    """A CA client's environment for the file's client side (as Phoebus there would have)."""
    cfg = load_endstation(s.config)
    c = cfg.network.client
    return dict(s.env, EPICS_CA_ADDR_LIST="127.0.0.1", EPICS_CA_AUTO_ADDR_LIST="NO",
                EPICS_CA_SERVER_PORT=str(c.ca_server_port),
                EPICS_CA_REPEATER_PORT=str(c.ca_repeater_port))


def test_ca_bridge_from_the_file_is_ready_and_serves_ca(st: Station):
    proc, notify = st.procs["flat"], st.notify["flat"]
    got = notify.until("READY=1", proc, since=0)
    assert not any("WATCHDOG=1" in m for m in got), "READY comes first"
    for _ in range(3):
        notify.until("WATCHDOG=1", proc, 5)
    agent = CAAgent(ca_client_env(st))
    try:
        deadline = time.monotonic() + TIMEOUT
        health: dict = {}
        while time.monotonic() < deadline:
            health = agent.get(fl.FLAT_HEALTH.name(P), as_string=True)
            if health.get("value") == "OK":  # registry and lock state reached, per the file
                break
            time.sleep(0.1)  # polling a value with a deadline, not a readiness sleep
        assert health.get("value") == "OK", f"{health}\n{st.outputs()}"
        names = agent.get(fl.FLAT_DEVICES.name(P))
        assert names["ok"], names
        assert set(names["value"]) >= set(demo.DEVICE_NAMES), names
    finally:
        agent.close()


def test_web_bridge_from_the_file_is_ready_and_serves_pvws(st: Station):
    proc, notify = st.procs["pvws"], st.notify["pvws"]
    got = notify.until("READY=1", proc, since=0)
    assert not any("WATCHDOG=1" in m for m in got), "READY comes first"
    notify.until("WATCHDOG=1", proc, 5)
    bridge = Bridge(proc, st.web_port)  # the port of [web_bridge] listen_port
    bridge.login("alice", st.password)  # users from $PVCOORD_WEB_PASSWORD_FILE
    with WS(bridge.ws_url) as ws:
        beat = f"pva://{COORD_HEARTBEAT.name(P)}"
        flat_beat = fl.FLAT_HEARTBEAT.name(P)  # default_type "ca": read over CA, CA bridge
        ws.subscribe(beat, flat_beat)
        first = ws.update(beat, lambda m: "value" in m, TIMEOUT)
        ws.update(beat, lambda m: m.get("value") != first["value"], TIMEOUT)
        ws.update(flat_beat, lambda m: "value" in m, TIMEOUT)


def test_status_lists_both_bridges_up_with_version_and_uptime(st: Station):
    """``pvcoord status --config``: the bridges' rows from their Version/StartTime PVs."""
    for name in ("flat", "pvws"):
        st.notify[name].until("READY=1", st.procs[name], since=0)

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            python_module("pvcoord.cli", "status", "--config", str(st.config), "--json"),
            capture_output=True, text=True, cwd=REPO, timeout=60, env=st.env)

    want = pvcoord_version()
    deadline = time.monotonic() + TIMEOUT
    while True:
        p = status()
        rows = {r["name"]: r for r in json.loads(p.stdout or "[]")}
        if p.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # polling the status with a deadline (the pvws server may be searching)
    assert p.returncode == 0, p.stdout + p.stderr
    assert list(rows) == ["registry", "coordination", "flat", "pvws"], rows
    for name in ("flat", "pvws"):
        r = rows[name]
        assert r["up"] is True and r["version"] == want, r
        assert r["heartbeat_age"] < 3 and 0 <= r["uptime"] < 600, r
    assert rows["flat"]["health"] == "OK" and rows["pvws"]["health"] == "-"


@pytest.mark.parametrize("name", ["flat", "pvws"])
def test_bridge_stops_on_sigterm_with_stopping(st: Station, name: str):
    proc, notify = st.procs[name], st.notify[name]
    notify.until("READY=1", proc, since=0)
    mark = len(notify.got)  # STOPPING may arrive before until() is called
    os.kill(proc.pid, signal.SIGTERM)
    notify.until("STOPPING=1", proc, 10, since=mark)
    assert proc.proc.wait(timeout=15) == 0, proc.output()
