"""Issue 11, finding 3: one PV-to-device map (pvdb.devicemap) for the guard and the registry's
Lookup; NSLS-II names with braces map to the right device everywhere."""

from __future__ import annotations

import pytest

from bridges.guard.decision import DeviceMap as GuardDeviceMap
from iocs.registry.model import RegistryState
from pvdb.devicemap import DeviceMap, DeviceMapError, parse_channel
from pvdb.models import Device
from pvdb.registry_file import RegistryIndex

X = "XF:31ID1-OP:1{CMM:1-Ax:X}Mtr"
Y = "XF:31ID1-OP:1{CMM:1-Ax:Y}Mtr"
DEVICES = [
    Device(name="cmm_x", pvs=[X]),
    Device(name="cmm_y", pvs=[Y]),
    Device(name="cmm_z", pv_prefix="XF:31ID1-OP:1{CMM:1-Ax:Z}"),
    Device(name="det", pv_prefix="XF:31ID1-ES{Det:1}"),
]
# channel name -> device, as a client may spell it
CASES = {
    X: "cmm_x", Y: "cmm_y",
    f"{Y}.VAL": "cmm_y", f"{Y}.RBV": "cmm_y", f"{Y}.VAL[0]": "cmm_y", f"{Y}$": "cmm_y",
    f'{Y}.VAL{{"ts":{{}}}}': "cmm_y", f'{Y}{{"dbnd":{{"abs":1}}}}': "cmm_y",
    f"{Y}.DESC$": "cmm_y",
    "XF:31ID1-OP:1{CMM:1-Ax:Z}Mtr.VAL": "cmm_z", "XF:31ID1-OP:1{CMM:1-Ax:Z}Mtr": "cmm_z",
    "XF:31ID1-ES{Det:1}Cam:Acquire": "det", "XF:31ID1-ES{Det:1}Cam:Acquire.PROC": "det",
    "XF:31ID1-OP:1{CMM:1-Ax:W}Mtr": None, "XF:31ID1-OP:1": None,
}


def test_parse_channel_keeps_braces_of_names():
    assert parse_channel(f"{Y}.VAL") == parse_channel(f"{Y}.VAL").__class__(f"{Y}.VAL", Y, "VAL")
    assert parse_channel(Y).record == Y and parse_channel(Y).field == ""
    assert parse_channel(f'{Y}.OCAL{{"ts":{{}}}}').field == "OCAL"
    assert parse_channel("DEMO:m1:Setpoint.VAL[0]").record == "DEMO:m1:Setpoint"


@pytest.mark.parametrize(("channel", "device"), sorted(CASES.items()))
def test_guard_and_lookup_agree_on_nsls2_names(channel, device):
    """The hole: the guard cut a name at its first '{', so every {CMM:...} PV was decided on
    whichever device registered first."""
    guard = GuardDeviceMap(
        [(pv, d.name) for d in DEVICES for pv in d.pvs],
        [(d.name, d.pv_prefix) for d in DEVICES], known=True)
    assert guard.known
    assert guard.device_of(channel) == device
    hit = RegistryIndex(DEVICES).lookup(channel)
    assert (hit.device.name if hit else None) == device
    state = RegistryState(DEVICES)
    if device is None:
        with pytest.raises(Exception, match="no registered device"):
            state.lookup(channel)
    else:
        assert state.lookup(channel)["device"] == device


def test_a_pv_claimed_by_two_devices_is_an_error():
    with pytest.raises(DeviceMapError) as e:
        DeviceMap([(X, "cmm_x"), (X, "cmm_y")])
    assert e.value.code == "pv_claimed_twice" and e.value.devices == ("cmm_x", "cmm_y")
    with pytest.raises(DeviceMapError) as e:
        DeviceMap([], [("a", "XF:1{A}"), ("b", "XF:1{A}")])
    assert e.value.code == "prefix_claimed_twice"
    guard = GuardDeviceMap([(X, "cmm_x"), (X, "cmm_y")], [], known=True)
    assert not guard.known and "pv_claimed_twice" in guard.why_unknown
