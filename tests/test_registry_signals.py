"""Signals end to end: bluesky-queueserver's profile_collection_sim imported by ``pvcoord registry
import``, served by the real registry IOC process, read back over PVA and by ``pvcoord registry
show DEVICE`` (a real CLI process)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import bluesky_queueserver
import pytest
from p4p.client.thread import Context

from pvcoord import cli
from pvcoord.client import Client
from pvcoord.procs import (
    PYTHON,
    ManagedProcess,
    client_conf,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import names as pvn
from pvdb.registry_file import load_registry

from .conftest import TIMEOUT
from .coordhelpers import TEST_POLICY

pytestmark = pytest.mark.system

P = "TSIG:"
SIM = Path(bluesky_queueserver.__file__).parent / "profile_collection_sim"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(env, devices): the imported sim registry served by a real ``python -m iocs.registry``."""
    from pvcoord.procs import loopback_env

    d = tmp_path_factory.mktemp("registry-signals")
    env = loopback_env()
    target = d / "sim.yaml"
    out = io.StringIO()
    assert cli.main(["registry", "import", "--startup-dir", str(SIM), "-o", str(target)],
                    out=out) == cli.EXIT_OK
    devices = load_registry(target)
    assert out.getvalue().strip() == f"wrote 43 devices to {target}"
    proc = ManagedProcess(
        "registry", python_module("iocs.registry", "--prefix", P, "--registry", str(target)),
        server_env(env), log_dir=d)
    try:
        wait_for_pv(pvn.REGISTRY_NAMES.name(P), env, 30, procs=[proc])
        yield env, devices
    finally:
        proc.stop()


def _rows(value) -> list[tuple]:
    cols = value.value
    names = [c for c, _ in pvn.SIGNALS_COLUMNS]
    return list(zip(*(list(cols[n]) for n in names), strict=True))


def test_registry_ioc_publishes_every_device_and_its_signals(served):
    env, devices = served
    with Context("pva", conf=client_conf(env), useenv=False) as ctxt:
        names = list(ctxt.get(pvn.REGISTRY_NAMES.name(P), timeout=TIMEOUT))
        assert names == sorted(d.name for d in devices) and len(names) == 43
        # no device of this profile has a PV: the guard's PV map is empty, not broken
        assert len(ctxt.get(pvn.REGISTRY_DEVICE_PVS.name(P), timeout=TIMEOUT).value.pv) == 0
        values = ctxt.get([pvn.REGISTRY_DEVICE_SIGNALS.name(P, device=n) for n in names],
                          timeout=TIMEOUT)
    for dev, value in zip(sorted(devices, key=lambda d: d.name), values, strict=True):
        assert list(value.labels) == [c for c, _ in pvn.SIGNALS_COLUMNS]
        assert _rows(value) == [(s.name, s.kind, s.access, s.read_pv, s.write_pv)
                                for s in dev.signals], dev.name
    by_name = dict(zip(names, values, strict=True))
    motor = {r[0]: r for r in _rows(by_name["motor1"])}
    assert motor["motor1.readback"] == ("motor1.readback", "hinted", "r", "", "")
    assert "sim_bundle_A.mtrs.x.setpoint" in {r[0] for r in _rows(by_name["sim_bundle_A"])}
    assert _rows(by_name["flyer1"]) == []


def _show(env, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "pvcoord.cli", "--prefix", P, "registry", "show", *argv],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_cli_registry_show_device_prints_its_signals(served):
    env, devices = served
    motor1 = next(d for d in devices if d.name == "motor1")
    out = _show(env, "motor1")
    assert out.returncode == cli.EXIT_OK, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "CLASS"]
    assert lines[1].split()[:2] == ["motor1", "ophyd.sim.SynAxis"]
    table = lines[lines.index("") + 1:]
    assert table[0].split() == ["SIGNAL", "KIND", "ACCESS", "READ", "PV", "WRITE", "PV"]
    assert [row.split() for row in table[1:]] == [[s.name, s.kind, s.access]
                                                   for s in motor1.signals]

    js = _show(env, "motor1", "--json")
    assert js.returncode == cli.EXIT_OK, js.stderr
    data = json.loads(js.stdout)
    assert data["name"] == "motor1"
    assert [s["name"] for s in data["signals"]] == [s.name for s in motor1.signals]

    flyer = _show(env, "flyer1")
    assert flyer.returncode == cli.EXIT_OK and "flyer1 has no known signals" in flyer.stdout

    unknown = _show(env, "nosuch")
    assert unknown.returncode == cli.EXIT_REFUSED
    assert "'nosuch'" in unknown.stderr and "motor1" in unknown.stderr

    every = _show(env)
    assert every.returncode == cli.EXIT_OK
    assert len(every.stdout.splitlines()) == 1 + 43


def test_devices_without_pvs_are_locked_by_name(served, tmp_path):
    # the coordination IOC follows this registry: simulated devices are lockable like any other
    env, _ = served
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY)
    coord = ManagedProcess(
        "coordination",
        python_module("iocs.coordination", "--prefix", P, "--registry-prefix", P, "--policy",
                      str(policy), "--store", f"sqlite:///{tmp_path}/locks.sqlite"),
        server_env(env), log_dir=tmp_path)
    try:
        wait_for_pv(pvn.COORD_LOCKS.name(P), env, 30, procs=[coord])
        with Client(P, conf=client_conf(env), timeout=TIMEOUT) as c:
            wait_until(lambda: "motor1" in c.devices(), TIMEOUT, "Coord:Devices from the registry")
            grant = c.acquire("motor1,sim_bundle_A", "MANUAL_OPERATOR", 60, reason="align")
            assert sorted(grant.devices) == ["motor1", "sim_bundle_A"]
            assert sorted(lk.device for lk in c.locks()) == ["motor1", "sim_bundle_A"]
            c.release("motor1,sim_bundle_A", key=grant.key)
    finally:
        coord.stop()
