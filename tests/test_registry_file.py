"""The registry file (YAML) loader and the PV -> device index: pure, no network."""

from __future__ import annotations

import pytest

from pvcoord.demo.devices import registry_devices, write_registry
from pvdb import demo
from pvdb.models import Capability, Device
from pvdb.registry_file import (
    RegistryFileError,
    RegistryIndex,
    dump_registry,
    load_registry,
    parse_registry,
    record_name,
    save_registry,
)

P = "TST:"
M1 = demo.device("m1")
DET1 = demo.device("det1")


def good_text() -> str:
    pvs = "".join(f"      - {pv}\n" for pv in M1.pv_names(P))
    return (
        "version: 1\n"
        "devices:\n"
        "  - name: m1\n"
        "    class: SimMotor\n"
        "    capabilities: [readable, movable]\n"
        f"    pv_prefix: '{M1.pv_prefix(P)}'\n"
        "    pvs:\n"
        f"{pvs}"
        "    ioc: softioc\n"
        "    description: a motor\n"
        "  - name: det1\n"
        "    class: SimDetector\n"
        "    capabilities: [readable, triggerable]\n"
        f"    pv_prefix: '{DET1.pv_prefix(P)}'\n"
    )


def test_parse_good_file():
    devs = parse_registry(good_text(), "reg.yaml")
    assert [d.name for d in devs] == ["m1", "det1"]
    m1 = devs[0]
    assert m1.device_class == "SimMotor"
    assert m1.capabilities == [Capability.READABLE, Capability.MOVABLE]
    assert m1.pvs == M1.pv_names(P)
    assert m1.pv_prefix == M1.pv_prefix(P)
    assert m1.ioc == "softioc" and m1.description == "a motor"
    assert devs[1].pvs == [] and devs[1].ioc == ""


def test_empty_devices_list_is_allowed():
    assert parse_registry("devices: []\n") == []
    assert parse_registry("devices:\n") == []


def test_round_trip_through_dump(tmp_path):
    devs = registry_devices(P)
    path = save_registry(devs, tmp_path / "r.yaml", comment="made by a test\nsecond line")
    text = path.read_text()
    assert text.startswith("# made by a test\n# second line\n")
    assert load_registry(path) == devs


def test_demo_registry_file_matches_pvdb(tmp_path):
    devs = load_registry(write_registry(P, tmp_path / "demo.yaml"))
    assert [d.name for d in devs] == list(demo.DEVICE_NAMES)
    for d in devs:
        spec = demo.device(d.name)
        assert d.pvs == spec.pv_names(P)
        assert d.pv_prefix == spec.pv_prefix(P)
        assert d.ioc == demo.SERVER
        assert tuple(d.capabilities) == spec.capabilities


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # each: the error names the line, the device and the field
        ("devices:\n  - name: m1\n    pvs: [A:b]\n    capabilities: [moveable]\n",
         ["line 4", "device #1 ('m1')", "'capabilities[0]'", "'moveable'", "readable"]),
        ("devices:\n  - name: m1\n    pvs: [A:b]\n    colour: red\n",
         ["line 4", "device #1 ('m1')", "'colour'", "unknown field"]),
        ("devices:\n  - class: X\n    pvs: [A:b]\n",
         ["line 2", "device #1", "'name'", "required"]),
        ("devices:\n  - name: 1abc\n    pvs: [A:b]\n",
         ["line 2", "'name'", "not valid"]),
        ("devices:\n  - name: beamline\n    pvs: [A:b]\n",
         ["'name'", "reserved"]),
        ("devices:\n  - name: m1\n    class: X\n",
         ["line 2", "device #1 ('m1')", "'pvs'", "pv_prefix"]),
        ("devices:\n  - name: m1\n    pvs: ['has space']\n",
         ["line 3", "'pvs'", "not a valid PV name"]),
        ("devices:\n  - name: m1\n    pvs: [A:b, A:b]\n",
         ["line 3", "'pvs'", "twice"]),
        ("devices:\n  - name: m1\n    pvs: [A:b]\n  - name: m1\n    pvs: [A:c]\n",
         ["line 4", "device #2 ('m1')", "'name'", "already used by device #1"]),
        ("devices:\n  - name: m1\n    pvs: [A:b]\n  - name: m2\n    pvs: [A:b]\n",
         ["line 5", "device #2 ('m2')", "'pvs'", "'A:b'", "already listed by device 'm1'"]),
        ("devices:\n  - name: m1\n    pv_prefix: 'A:'\n  - name: m2\n    pv_prefix: 'A:'\n",
         ["line 5", "device #2 ('m2')", "'pv_prefix'", "already used by device 'm1'"]),
        ("devices:\n  - just a string\n", ["line 2", "device #1", "mapping"]),
        ("devices: {name: m1}\n", ["'devices' must be a list"]),
        ("- name: m1\n", ["top level"]),
        ("version: 2\ndevices: []\n", ["version 2", "not supported"]),
        ("devices: []\nextra: 1\n", ["unknown top-level key", "extra"]),
        ("devices:\n  - name: m1\n    pvs: [A:b\n", ["not valid YAML", "line"]),
    ],
)
def test_bad_file_is_refused_with_a_clear_error(body, expected):
    with pytest.raises(RegistryFileError) as exc:
        parse_registry(body, "bad.yaml")
    msg = str(exc.value)
    assert msg.startswith("bad.yaml")
    for part in expected:
        assert part in msg, (part, msg)


def test_unreadable_file(tmp_path):
    with pytest.raises(RegistryFileError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RegistryFileError, match="cannot read"):
        load_registry(bad)


def test_dump_refuses_inconsistent_devices():
    a = Device(name="a", pvs=["X:1"])
    b = Device(name="b", pvs=["X:1"])
    with pytest.raises(ValueError, match="already listed"):
        dump_registry([a, b])
    with pytest.raises(ValueError, match="pv_prefix"):
        dump_registry([Device(name="c")])


@pytest.mark.parametrize(
    ("pv", "record"),
    [
        ("A:b.VAL", "A:b"),
        ("A:b.DESC$", "A:b"),
        ('A:b.{"dbnd":{"abs":1}}', "A:b"),
        ("A:b.[0:2]", "A:b"),
        ("A:b", "A:b"),
        ("A:b.c", "A:b.c"),  # lower case after a dot is part of the name, not a field
        ("A.B:c", "A.B:c"),
    ],
)
def test_record_name(pv, record):
    assert record_name(pv) == record


def test_index_lookup_order():
    devs = [
        Device(name="m1", pvs=["X:m1:Setpoint", "Y:shared:Thing"], pv_prefix="X:m1:"),
        Device(name="m1sub", pv_prefix="X:m1:Sub:"),
        Device(name="other", pv_prefix="Y:"),
    ]
    idx = RegistryIndex(devs)
    hit = idx.lookup("X:m1:Setpoint")
    assert hit is not None and (hit.device.name, hit.how) == ("m1", "pv")
    hit = idx.lookup("X:m1:Setpoint.VAL")
    assert hit is not None and (hit.device.name, hit.how) == ("m1", "field")
    # an explicit PV wins over a longer prefix of another device
    hit = idx.lookup("Y:shared:Thing")
    assert hit is not None and (hit.device.name, hit.how) == ("m1", "pv")
    # longest prefix wins
    hit = idx.lookup("X:m1:Sub:Readback")
    assert hit is not None and (hit.device.name, hit.how) == ("m1sub", "prefix")
    hit = idx.lookup("X:m1:Other")
    assert hit is not None and (hit.device.name, hit.how) == ("m1", "prefix")
    assert idx.lookup("X:m10:Setpoint") is None
    assert idx.lookup("Z:nothing") is None
    assert idx.pv_rows() == [("X:m1:Setpoint", "m1"), ("Y:shared:Thing", "m1")]
