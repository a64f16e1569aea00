"""``import_registry``: a real profile collection loaded by bluesky-queueserver's profile_ops."""

from __future__ import annotations

import pytest

from pvcoord.registry_import import (
    RegistryImportError,
    common_prefix,
    import_registry,
    pick_prefix,
    pv_from_source,
)
from pvdb import demo
from pvdb.models import Capability
from pvdb.registry_file import load_registry, save_registry

from .conftest import REPO

STARTUP = REPO / "tests" / "data" / "profile_collection"
P = "IMPORT:"  # the prefix tests/data/profile_collection/00-base.py uses


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
    # soft (no PV) and m1_readback (its only PV belongs to m1) are left out
    assert sorted(by_name) == ["det1", "m1", "m2"]

    m1 = by_name["m1"]  # ophyd PVPositioner, lazy velocity component included
    assert m1.device_class == "DemoMotor"
    assert m1.capabilities == [Capability.READABLE, Capability.MOVABLE]
    assert m1.pv_prefix == demo.device("m1").pv_prefix(P)
    assert sorted(m1.pvs) == sorted(demo.device_pvs(P, "m1"))
    assert m1.ioc == "demo-softioc"

    det1 = by_name["det1"]  # ophyd-async, created inside init_devices() (mock-connected)
    assert det1.capabilities == [Capability.READABLE, Capability.TRIGGERABLE]
    assert sorted(det1.pvs) == sorted(demo.device_pvs(P, "det1"))
    assert det1.pv_prefix == demo.device("det1").pv_prefix(P)

    m2 = by_name["m2"]  # ophyd-async with separate read and write PVs
    assert m2.capabilities == [Capability.READABLE, Capability.MOVABLE]
    assert sorted(m2.pvs) == sorted([demo.motor_readback(P, "m2"), demo.motor_setpoint(P, "m2")])

    # what the CLI writes is a valid registry file
    assert load_registry(save_registry(devices, tmp_path / "imported.yaml")) == devices


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
