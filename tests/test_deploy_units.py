"""The systemd units of an endstation: every process has a hardened ``Type=notify`` template with
a watchdog, ``pvcoord@.target`` groups them, ``systemd-analyze verify`` passes on all of them
together, and each process really sends READY/WATCHDOG/STOPPING (a real IOC and the real guard
against a notify socket of the test's own)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pvcoord.demo.devices import write_registry
from pvcoord.procs import (
    PYTHON,
    ManagedProcess,
    free_port,
    loopback_env,
    python_module,
    wait_for_pv,
)
from pvdb.endstation import PROCESS_NAMES, to_toml
from pvdb.process import (
    FLAT_VERSION,
    GUARD_VERSION,
    REGISTRY_START_TIME,
    REGISTRY_VERSION,
    WEB_VERSION,
    pvcoord_version,
)
from tests.notifysock import Notify

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SERVICES = sorted(UNITS.glob("pvcoord-*@.service"))
VENV_PYTHON = "/opt/pvcoord/.venv/bin/python"
TIMEOUT = 30.0


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_one_unit_per_process_and_a_target():
    names = {p.name.removeprefix("pvcoord-").removesuffix("@.service") for p in SERVICES}
    assert names == set(PROCESS_NAMES)
    assert (UNITS / "pvcoord@.target").is_file()


@pytest.mark.parametrize("unit", SERVICES, ids=[u.name for u in SERVICES])
def test_unit_is_notify_with_watchdog_restart_and_hardening(unit):
    d = directives(unit)
    for key, want in [
        ("Type", "notify"), ("Restart", "on-failure"), ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("ProtectHome", "yes"),
        ("PartOf", "pvcoord@%i.target"), ("WantedBy", "pvcoord@%i.target"),
    ]:
        assert d.get(key) == [want], f"{unit.name}: {key}={d.get(key)}"
    assert 1 <= int(d["WatchdogSec"][0]) <= 60
    assert d["CapabilityBoundingSet"] == [""], "no capabilities"
    [exec_start] = d["ExecStart"]
    assert re.fullmatch(rf"{VENV_PYTHON} -m [\w.]+ --config /etc/pvcoord/%i/endstation\.toml",
                        exec_start), exec_start
    users = re.findall(r"^u (\S+)", (UNITS / "pvcoord.sysusers").read_text(), re.M)
    assert d["User"][0] in users and d["User"][0] != "root", "a dedicated account"
    for ref in re.findall(r"(pvcoord-[\w-]+@%i\.service)", unit.read_text()):
        assert (UNITS / ref.replace("%i", "")).is_file(), f"{unit.name} names missing {ref}"


def test_secrets_never_on_the_command_line():
    for unit in SERVICES:
        d = directives(unit)
        assert not re.search(r"redis://|password|secret", d["ExecStart"][0], re.I)
        for f in d.get("EnvironmentFile", []):
            assert f.startswith("-/etc/pvcoord/%i/"), f
    d = directives(UNITS / "pvcoord-coordination@.service")
    assert d["ReadWritePaths"] == ["/var/lib/pvcoord/%i"] and d["StateDirectory"] == ["pvcoord/%i"]
    assert any(c.startswith("web-users:") for c in
               directives(UNITS / "pvcoord-pvws@.service")["LoadCredential"])


def test_systemd_analyze_verify_all_units_together(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not installed (Debian package systemd)")
    files = []
    for unit in [*SERVICES, UNITS / "pvcoord@.target"]:
        text = unit.read_text().replace(VENV_PYTHON, PYTHON)
        (tmp_path / unit.name).write_text(text)
        inst = tmp_path / unit.name.replace("@.", "@bl01.")
        inst.write_text(text)
        files.append(str(inst))
    res = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    ours = [line for line in out.splitlines() if str(tmp_path) in line or "pvcoord" in line]
    assert not ours, "warnings about our units (unknown keys are only warnings):\n" + out


# --- READY / WATCHDOG / STOPPING from the real processes --------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    """A drained notify socket: one nobody reads fills up after 10 datagrams
    (``net.unix.max_dgram_qlen``) and blocks the service's event loop on its next message."""
    n = Notify(tmp_path / "notify.sock")
    try:
        yield n
    finally:
        n.close()


def endstation(tmp_path: Path, env: dict[str, str], device_env: dict[str, str]) -> Path:
    write_registry("TNOTE:", tmp_path / "registry.yaml")
    data = {
        "prefix": "TNOTE:",
        "network": {
            "client": {"interfaces": ["127.0.0.1"],
                       "pva_broadcast_port": int(env["EPICS_PVA_BROADCAST_PORT"])},
            "device": {"interfaces": ["127.0.0.1"],
                       "pva_broadcast_port": int(device_env["EPICS_PVA_BROADCAST_PORT"])},
        },
        "files": {"registry": "registry.yaml"},
        "store": {"url": f"sqlite:///{tmp_path}/locks.sqlite"},
        "registry": {"pva_server_port": free_port()},
        "coordination": {"pva_server_port": free_port()},
        "guard": {"pva_server_port": free_port()},
        "ca_bridge": {"ca_server_port": free_port()},
        "web_bridge": {"listen_port": free_port()},
        "tls": {"certificate": "cert.pem", "key": "key.pem"},  # nginx's; only checked to exist
    }
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("not read by the processes\n")
    path = tmp_path / "endstation.toml"
    path.write_text(to_toml(data))
    return path


@pytest.mark.system
@pytest.mark.parametrize("process", ["registry", "guard", "flat", "pvws"])
def test_process_notifies_ready_watchdog_and_stopping(process, tmp_path, notify_socket):
    notify = notify_socket
    env = loopback_env()
    cfg = endstation(tmp_path, env, loopback_env())
    module = {"registry": "iocs.registry", "guard": "bridges.guard", "flat": "bridges.flat",
              "pvws": "bridges.pvws"}[process]
    penv = dict(env, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="300000")
    proc = ManagedProcess(process, python_module(module, "--config", str(cfg)), penv,
                          cwd=tmp_path, log_dir=tmp_path)
    try:
        got = notify.until("READY=1", proc, TIMEOUT, since=0)
        assert not any("WATCHDOG=1" in m for m in got), "READY comes first"
        version = {"registry": REGISTRY_VERSION, "guard": GUARD_VERSION, "flat": FLAT_VERSION,
                   "pvws": WEB_VERSION}[process]
        v = wait_for_pv(version.name("TNOTE:"), env, TIMEOUT, procs=[proc])
        assert str.__str__(v) == pvcoord_version()
        if process == "registry":
            start = wait_for_pv(REGISTRY_START_TIME.name("TNOTE:"), env, TIMEOUT, procs=[proc])
            assert 0 <= time.time() - float(start) < TIMEOUT + 60
        # the watchdog keeps coming (300 ms WatchdogSec: every 150 ms)
        for _ in range(3):
            notify.until("WATCHDOG=1", proc, 5)
        mark = len(notify.got)  # STOPPING may arrive before until() is called
        os.kill(proc.pid, signal.SIGTERM)
        notify.until("STOPPING=1", proc, 10, since=mark)
        assert proc.proc.wait(timeout=15) == 0, proc.output()
    finally:
        proc.stop()
