"""``import_registry``: a real profile collection loaded by bluesky-queueserver's profile_ops."""

from __future__ import annotations

from pathlib import Path

import bluesky_queueserver
import pytest
import yaml

from pvcoord.demo.devices import registry_devices
from pvcoord.devicewalk import pv_from_source
from pvcoord.registry_import import (
    RegistryImportError,
    common_prefix,
    import_registry,
    pick_prefix,
)
from pvdb import demo
from pvdb.models import Capability, DeviceSignal
from pvdb.registry_file import load_registry, save_registry

from .conftest import REPO

STARTUP = REPO / "tests" / "data" / "profile_collection"
P = "IMPORT:"  # the prefix tests/data/profile_collection/00-base.py uses
SIM = Path(bluesky_queueserver.__file__).parent / "profile_collection_sim"
"""bluesky-queueserver's own simulated profile collection (ships with the package)."""


@pytest.mark.parametrize(
    ("source", "pv"),
    [
        ("ca://A:b", "A:b"),
        ("pva://A:b", "A:b"),
        ("mock+ca://A:b", "A:b"),
        ("soft://x", None),
        ("", None),
        ("ca://", None),
        ("ca://has space", None),
    ],
)
def test_pv_from_source(source, pv):
    assert pv_from_source(source) == pv


def test_prefixes():
    assert common_prefix(["A:m1:X", "A:m1:Y"]) == "A:m1:"
    assert common_prefix(["X:m1.VAL", "X:m1.RBV"]) == "X:m1."
    assert common_prefix([]) == ""
    # an ophyd prefix is extended by the separator every PV has next
    assert pick_prefix("X:m1", ["X:m1.VAL", "X:m1.RBV"]) == "X:m1."
    assert pick_prefix("X:m1", ["X:m1:Setpoint", "X:m1:Readback"]) == "X:m1:"
    assert pick_prefix("X:m1:", ["X:m1:Setpoint", "Y:other"]) == ""
    # computed: two segments at least, and never for a lone signal
    assert pick_prefix("", ["BL:ES:m1:A", "BL:ES:m1:B"]) == "BL:ES:m1:"
    assert pick_prefix("", ["BL:A", "BL:B"]) == ""
    assert pick_prefix("", ["BL:ES:m1:A"]) == ""


@pytest.mark.system
def test_import_profile_collection_without_reachable_pvs(env, tmp_path):
    # env: loopback only, and no IOC serves these PVs: nothing may wait for a connection
    devices = import_registry(STARTUP, ioc="demo-softioc", env=env, timeout=60)
    by_name = {d.name: d for d in devices}
    # every device, also without PVs: soft (no PV at all) and m1_readback (its PV is m1's)
    assert sorted(by_name) == ["det1", "det2", "m1", "m1_readback", "m2", "soft"]

    m1 = by_name["m1"]  # ophyd PVPositioner, lazy velocity component included
    assert m1.device_class == "DemoMotor"
    assert m1.capabilities == [Capability.READABLE, Capability.MOVABLE]
    assert m1.pv_prefix == demo.device("m1").pv_prefix(P)
    assert sorted(m1.pvs) == sorted(demo.device_pvs(P, "m1"))
    assert m1.ioc == "demo-softioc"
    sig = {s.name: s for s in m1.signals}
    assert sorted(sig) == ["m1.done", "m1.readback", "m1.setpoint", "m1.stop_signal",
                           "m1.velocity"]
    assert sig["m1.readback"] == DeviceSignal(
        name="m1.readback", kind="hinted", access="r", read_pv=demo.motor_readback(P, "m1"))
    sp = demo.motor_setpoint(P, "m1")
    assert sig["m1.setpoint"] == DeviceSignal(
        name="m1.setpoint", kind="normal", access="rw", read_pv=sp, write_pv=sp)
    assert sig["m1.velocity"].read_pv == demo.motor_velocity(P, "m1")  # the lazy one

    alias = by_name["m1_readback"]  # a top-level signal aliasing m1.readback: the PV stays m1's
    assert alias.pvs == [] and alias.pv_prefix == ""
    assert alias.signals == [DeviceSignal(name="m1_readback", kind="hinted", access="r",
                                          read_pv=demo.motor_readback(P, "m1"))]
    soft = by_name["soft"]
    assert soft.pvs == [] and soft.capabilities == [Capability.READABLE, Capability.MOVABLE]
    assert soft.signals == [DeviceSignal(name="soft", kind="hinted", access="rw")]

    det1 = by_name["det1"]  # ophyd-async, created inside init_devices() (mock-connected)
    assert det1.capabilities == [Capability.READABLE, Capability.TRIGGERABLE]
    assert sorted(det1.pvs) == sorted(demo.device_pvs(P, "det1"))
    assert det1.pv_prefix == demo.device("det1").pv_prefix(P)
    # kinds from the device's describe()/hints: value was added as a readable, the rest not
    assert [(s.name, s.kind, s.access) for s in det1.signals] == [
        ("det1.acquire", "omitted", "rw"), ("det1.acquire_time", "omitted", "rw"),
        ("det1.value", "normal", "r")]

    m2 = by_name["m2"]  # ophyd-async with separate read and write PVs, made outside init_devices
    assert m2.capabilities == [Capability.READABLE, Capability.MOVABLE]
    assert sorted(m2.pvs) == sorted([demo.motor_readback(P, "m2"), demo.motor_setpoint(P, "m2")])
    assert m2.signals[1] == DeviceSignal(
        name="m2.user_setpoint", kind="omitted", access="rw",
        read_pv=demo.motor_readback(P, "m2"), write_pv=demo.motor_setpoint(P, "m2"))

    det2 = by_name["det2"]  # ophyd-async: DeviceVector entries are numbered; soft and x signals
    assert [(s.name, s.kind, s.access, s.read_pv, s.write_pv) for s in det2.signals] == [
        ("det2.channels.1", "normal", "r", demo.det_value(P, "det2"), ""),
        ("det2.channels.2", "normal", "r", demo.det_acquire_time(P, "det2"), ""),
        ("det2.gain", "omitted", "rw", "", ""),
        ("det2.reset", "omitted", "x", "", demo.det_acquire(P, "det2"))]

    # what the CLI writes is a valid registry file
    assert load_registry(save_registry(devices, tmp_path / "imported.yaml")) == devices


def _leaves(name: str, node: dict) -> list[str]:
    """Dotted names of the signals under a device of existing_plans_and_devices.yaml."""
    comps = node.get("components")
    if not comps:
        return [name]
    return [leaf for key, sub in comps.items() for leaf in _leaves(f"{name}.{key}", sub)]


@pytest.mark.system
def test_import_of_queueserver_profile_collection_sim(env, tmp_path):
    # bluesky-queueserver's own simulated profile: all 43 devices are ophyd.sim / soft (no PVs)
    reference = yaml.safe_load((SIM / "existing_plans_and_devices.yaml").read_text())
    expected = reference["existing_devices"]
    assert len(expected) == 43
    devices = import_registry(SIM, env=env, timeout=90)
    by_name = {d.name: d for d in devices}
    assert sorted(by_name) == sorted(expected)
    for name, node in expected.items():
        dev = by_name[name]
        got = [s.name for s in dev.signals]
        if node.get("components"):
            assert got == sorted(_leaves(name, node)), name
        else:  # a top-level signal is its own one signal; a flyer or empty device has none
            assert got in ([name], []), name
        caps = {c.value for c in dev.capabilities}
        for key, cap in (("is_readable", "readable"), ("is_movable", "movable"),
                         ("is_flyable", "flyable")):
            assert node[key] == (cap in caps), (name, key)
        assert dev.pvs == [] and dev.pv_prefix == ""
        assert all(not s.read_pv and not s.write_pv for s in dev.signals)
    assert [s.name for s in by_name["sig"].signals] == ["sig"]
    assert by_name["flyer1"].signals == []
    motor = {s.name: s for s in by_name["motor1"].signals}
    assert (motor["motor1.readback"].kind, motor["motor1.readback"].access) == ("hinted", "r")
    assert (motor["motor1.setpoint"].kind, motor["motor1.setpoint"].access) == ("normal", "rw")
    assert motor["motor1.velocity"].kind == "config"
    deep = {s.name for s in by_name["sim_bundle_A"].signals}
    assert "sim_bundle_A.mtrs.x.setpoint" in deep and "sim_bundle_A.dets.det_A.val" in deep
    assert load_registry(save_registry(devices, tmp_path / "sim.yaml")) == devices


@pytest.mark.system
def test_import_with_real_connect_reports_the_startup_failure(env):
    # without mock mode the profile's init_devices() really connects and fails (no IOC)
    with pytest.raises(RegistryImportError) as exc:
        import_registry(STARTUP, env=env, timeout=60, mock_connect=False)
    msg = str(exc.value)
    assert "20-ophyd-async.py" in msg and "NotConnected" in msg


def test_missing_directory(tmp_path):
    with pytest.raises(RegistryImportError, match="does not exist"):
        import_registry(tmp_path / "nope")


@pytest.mark.system
def test_failing_startup_file_is_named(env, tmp_path):
    (tmp_path / "00-broken.py").write_text("x = 1\nraise ValueError('broken on purpose')\n")
    with pytest.raises(RegistryImportError) as exc:
        import_registry(tmp_path, env=env, timeout=60)
    assert "00-broken.py" in str(exc.value) and "broken on purpose" in str(exc.value)


@pytest.mark.system
def test_hanging_startup_is_stopped_after_timeout(env, tmp_path):
    (tmp_path / "00-hang.py").write_text("import time\ntime.sleep(600)\n")
    with pytest.raises(RegistryImportError, match="took longer than 3 s"):
        import_registry(tmp_path, env=env, timeout=3)


@pytest.mark.system
def test_demo_registry_signals_match_the_demo_profile_collection(env):
    # the demo's registry (from pvdb.demo) and its RE worker's ophyd-async devices agree: same
    # devices, and every signal the profile has is in the registry with the same kind, access
    # and PVs (the registry also lists <motor>.moving, which the profile's motors do not read)
    startup = REPO / "pvcoord" / "demo" / "startup"
    child_env = {**env, "PVCOORD_HOOK": "off", "PVCOORD_DEVICE_PREFIX": P}
    imported = {d.name: d for d in import_registry(startup, env=child_env, timeout=60)}
    registry = {d.name: d for d in registry_devices(P)}
    assert sorted(imported) == sorted(registry)
    for name, dev in imported.items():
        served = {s.name: s for s in registry[name].signals}
        assert dev.signals and all(served[s.name] == s for s in dev.signals), name
        assert set(served) - {s.name for s in dev.signals} <= {f"{name}.moving"}, name
        assert set(dev.pvs) <= set(registry[name].pvs)


@pytest.mark.system
def test_ophyd_async_without_a_bluesky_event_loop_has_no_kinds(env, tmp_path, caplog):
    # no RunEngine: the devices cannot be described, so their kinds are not known (and said so)
    (tmp_path / "00-signals.py").write_text(
        "from ophyd_async.core import soft_signal_rw\n"
        "from ophyd_async.epics.core import epics_signal_rw\n"
        "from pvdb import demo\n"
        "gain = soft_signal_rw(float, 1.0, name='gain')\n"
        "pos = epics_signal_rw(float, 'pva://' + demo.motor_setpoint('X:', 'm1'), name='pos')\n"
    )
    with caplog.at_level("WARNING", logger="pvcoord.registry_import"):
        devices = import_registry(tmp_path, env=env, timeout=60)
    pv = demo.motor_setpoint("X:", "m1")
    assert [(d.name, d.pvs, d.signals) for d in devices] == [
        ("gain", [], [DeviceSignal(name="gain", access="rw")]),
        ("pos", [pv], [DeviceSignal(name="pos", access="rw", read_pv=pv, write_pv=pv)]),
    ]
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("gain: signal kinds not known") for m in warned), warned
