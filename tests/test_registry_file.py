"""The registry file (YAML) loader and the PV -> device index: pure, no network."""

from __future__ import annotations

import pytest

from pvcoord.demo.devices import registry_devices, write_registry
from pvdb import demo
from pvdb.models import Capability, Device, DeviceSignal
from pvdb.registry_file import (
    ERROR_CODES,
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


SIG = "devices:\n  - name: m1\n    pvs: [A:b]\n    signals:\n"
"""A device m1 with PV A:b; the cases below append its signals (the list starts on line 5)."""


@pytest.mark.parametrize(
    ("body", "code", "expected"),
    [
        # each: the code, and the error names the line, the device and the field
        ("devices:\n  - name: m1\n    pvs: [A:b]\n    capabilities: [moveable]\n", "field",
         ["line 4", "device #1 ('m1')", "'capabilities[0]'", "'moveable'"]),
        ("devices:\n  - name: m1\n    pvs: [A:b]\n    colour: red\n", "field",
         ["line 4", "device #1 ('m1')", "'colour'"]),
        ("devices:\n  - class: X\n    pvs: [A:b]\n", "field", ["line 2", "device #1", "'name'"]),
        ("devices:\n  - name: 1abc\n    pvs: [A:b]\n", "field", ["line 2", "'name'"]),
        ("devices:\n  - name: beamline\n    pvs: [A:b]\n", "field", ["'name'", "reserved"]),
        ("devices:\n  - name: m1\n    pvs: ['has space']\n", "pv-name",
         ["line 3", "'pvs'", "'has space'"]),
        ("devices:\n  - name: m1\n    pvs: [A:b, A:b]\n", "duplicate", ["line 3", "'pvs'"]),
        ("devices:\n  - name: m1\n    pvs: [A:b]\n  - name: m1\n    pvs: [A:c]\n", "duplicate",
         ["line 4", "device #2 ('m1')", "'name'", "device #1"]),
        ("devices:\n  - name: m1\n    pvs: [A:b]\n  - name: m2\n    pvs: [A:b]\n", "duplicate",
         ["line 5", "device #2 ('m2')", "'pvs'", "'A:b'", "device 'm1'"]),
        ("devices:\n  - name: m1\n    pv_prefix: 'A:'\n  - name: m2\n    pv_prefix: 'A:'\n",
         "duplicate", ["line 5", "device #2 ('m2')", "'pv_prefix'", "device 'm1'"]),
        ("devices:\n  - just a string\n", "structure", ["line 2", "device #1"]),
        ("devices: {name: m1}\n", "structure", ["'devices'"]),
        ("- name: m1\n", "structure", []),
        ("version: 2\ndevices: []\n", "version", ["version 2"]),
        ("devices: []\nextra: 1\n", "structure", ["extra"]),
        ("devices:\n  - name: m1\n    pvs: [A:b\n", "yaml", ["line"]),
        # signals
        (SIG + "      - {name: m1.x, access: rw, colour: red}\n", "field",
         ["line 5", "device #1 ('m1')", "'signals[0].colour'"]),
        (SIG + "      - {name: m1.x}\n", "field", ["line 5", "'signals[0].access'"]),
        (SIG + "      - {name: m1.x, access: rx}\n", "field", ["'signals[0].access'", "'rx'"]),
        (SIG + "      - {name: m1.x, access: r, kind: shiny}\n", "field",
         ["'signals[0].kind'", "'shiny'"]),
        (SIG + "      - {name: 'm1..x', access: r}\n", "field", ["'signals[0].name'", "'m1..x'"]),
        (SIG + "      - {name: m2.x, access: r}\n", "signal", ["line 5", "signals[0]", "'m2.x'"]),
        (SIG + "      - {name: m1x, access: r}\n", "signal", ["signals[0]", "'m1x'"]),
        (SIG + "      - {name: m1.x, access: r}\n      - {name: m1.x, access: rw}\n", "duplicate",
         ["signals[1]", "'m1.x'"]),
        (SIG + "      - {name: m1.x, access: r, write_pv: A:b}\n", "signal",
         ["signals[0]", "write_pv"]),
        (SIG + "      - {name: m1.x, access: x, read_pv: A:b}\n", "signal",
         ["signals[0]", "read_pv"]),
        (SIG + "      - {name: m1.x, access: r, read_pv: 'A b'}\n", "pv-name",
         ["signals[0].read_pv", "'A b'"]),
        (SIG + "      - {name: m1.x, access: rw, read_pv: A:b, write_pv: A:c}\n", "signal-pv",
         ["line 5", "device #1 ('m1')", "'signals[0].write_pv'", "'A:c'", "'m1.x'"]),
    ],
)
def test_bad_file_is_refused_with_a_clear_error(body, code, expected):
    with pytest.raises(RegistryFileError) as exc:
        parse_registry(body, "bad.yaml")
    assert exc.value.code == code
    assert exc.value.code in ERROR_CODES
    msg = str(exc.value)
    assert msg.startswith("bad.yaml")
    for part in expected:
        assert part in msg, (part, msg)


def test_devices_without_pvs_and_signals_round_trip(tmp_path):
    text = (
        "devices:\n"
        "  - name: soft\n"                     # no PV at all: locked by name only
        "    capabilities: [readable, movable]\n"
        "    signals:\n"
        "      - {name: soft, kind: hinted, access: rw}\n"
        "  - name: m1\n"
        "    pvs: [A:m1:Rbv, A:m1:Val]\n"
        "    signals:\n"
        "      - {name: m1.user_readback, kind: hinted, access: r, read_pv: A:m1:Rbv}\n"
        "      - {name: m1.user_setpoint, access: rw, read_pv: A:m1:Val, write_pv: A:m1:Val}\n"
        "      - {name: m1.stop, access: x, write_pv: 'A:m1:Val.STOP'}\n"
        "  - name: m1_rbv\n"                   # an alias of m1's component: the PV is m1's
        "    signals:\n"
        "      - {name: m1_rbv, access: r, read_pv: A:m1:Rbv}\n"
        "  - name: det-1\n"                    # '-' is allowed in a device name
        "    signals: [{name: det-1.cam.gain, access: rw}]\n"
        "  - name: det\n"
        "    pv_prefix: 'A:det:'\n"
        "    signals:\n"
        "      - {name: det.cam.acquire, access: rw, read_pv: 'A:det:Acq', write_pv: 'A:det:Acq'}\n"
    )
    devs = parse_registry(text, "ok.yaml")
    by = {d.name: d for d in devs}
    assert by["soft"].pvs == [] and by["soft"].pv_prefix == ""
    assert [s.access for s in by["m1"].signals] == ["r", "rw", "x"]
    assert by["m1"].signals[2].pvs == ["A:m1:Val.STOP"]
    # the PV -> device map is unchanged by devices without PVs and by aliasing signals
    idx = RegistryIndex(devs)
    assert idx.pv_rows() == [("A:m1:Rbv", "m1"), ("A:m1:Val", "m1")]
    m = idx.lookup("A:m1:Rbv")
    assert m is not None and m.device.name == "m1"
    assert idx.lookup("soft") is None
    assert load_registry(save_registry(devs, tmp_path / "r.yaml")) == devs


def test_unreadable_file(tmp_path):
    with pytest.raises(RegistryFileError, match="cannot read") as exc:
        load_registry(tmp_path / "missing.yaml")
    assert exc.value.code == "unreadable"
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RegistryFileError, match="cannot read"):
        load_registry(bad)


def test_dump_refuses_inconsistent_devices():
    a = Device(name="a", pvs=["X:1"])
    b = Device(name="b", pvs=["X:1"])
    with pytest.raises(ValueError, match="already listed"):
        dump_registry([a, b])
    orphan = Device(name="c", signals=[DeviceSignal(name="c", access="r", read_pv="X:2")])
    with pytest.raises(ValueError, match="'X:2' of signal 'c' belongs to no device"):
        dump_registry([a, orphan])


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
