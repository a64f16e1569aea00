"""bridges.lockview's registry map, fed real p4p NTTable values (no server; the same view is
tested against the real IOCs in tests/test_flat_lockview.py)."""

from __future__ import annotations

from p4p.nt import NTTable

from bridges.lockview import LockView
from pvdb import names as pvn

P = "UT:"


def devices_value(connected: bool, prefix: str = "UT:m1", desc: str = "motor"):
    nt = NTTable(list(pvn.DEVICES_COLUMNS))
    names = [c for c, _ in pvn.DEVICES_COLUMNS]
    row = {"name": "m1", "deviceClass": "SimMotor", "capabilities": "movable", "pvPrefix": prefix,
           "ioc": "ioc1", "description": desc, "connected": connected}
    return nt.wrap([{k: row[k] for k in names if k in row}])


def pvs_value(pvs: list[str]):
    nt = NTTable(list(pvn.REGISTRY_DEVICE_PVS.columns))
    return nt.wrap([{"pv": pv, "device": "m1"} for pv in pvs])


def test_the_map_is_rebuilt_only_when_its_inputs_change():
    view = LockView(P, tick=0)
    view._on_device_pvs(pvs_value(["UT:m1:Setpoint"]))  # the p4p monitor callbacks, called here
    assert not view.devices.known  # Registry:Devices not received yet
    view._on_devices(devices_value(False))
    first = view.devices
    assert first.known and first.device_of("UT:m1:Setpoint") == "m1"
    assert first.classes == {"m1": "SimMotor"}
    # a connectivity flag or a description changes the rows, not the map
    view._on_devices(devices_value(True, desc="moved"))
    assert view.devices is first
    assert view.snapshot.rows[0].connected
    # a new prefix, PV list or class is a new map
    view._on_devices(devices_value(True, prefix="UT:mm1"))
    second = view.devices
    assert second is not first and second.device_of("UT:mm1:X") == "m1"
    view._on_device_pvs(pvs_value(["UT:m1:Setpoint", "UT:m1:Stop"]))
    assert view.devices is not second and view.devices.device_of("UT:m1:Stop") == "m1"
