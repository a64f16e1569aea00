"""bridges.lockview's registry map, fed real p4p NTTable values (no server; the same view is
tested against the real IOCs in tests/test_flat_lockview.py)."""

from __future__ import annotations

from p4p.nt import NTScalar, NTTable

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


# --- lock table + changes (LockStream, fed through the view's monitor callbacks) ---------------

def _row(device: str, owner: str = "alice@10.0.0.1") -> tuple:
    return (device, "MANUAL_OPERATOR", 3, owner, 1.0, 4e9, "why", "")


def locks_value(rows: list[tuple], seq: int, epoch: int = 7):
    nt = NTTable(list(pvn.LOCKS_COLUMNS), extra=list(pvn.LOCK_SEQ_FIELDS))
    names = [c for c, _ in pvn.LOCKS_COLUMNS]
    v = nt.type({"labels": names, "value": {n: [r[i] for r in rows] for i, n in enumerate(names)},
                 "seq": seq, "epoch": epoch})
    return v


def changes_value(rows: dict[str, tuple | None], seq: int, epoch: int = 7):
    nt = NTTable(list(pvn.LOCK_CHANGES_COLUMNS), extra=list(pvn.LOCK_SEQ_FIELDS))
    names = [c for c, _ in pvn.LOCK_CHANGES_COLUMNS]
    out = [(*(r if r else (d, "", 0, "", 0.0, 0.0, "", "")), r is not None)
           for d, r in rows.items()]
    return nt.type({"labels": names, "value": {n: [r[i] for r in out] for i, n in enumerate(names)},
                    "seq": seq, "epoch": epoch})


def _view() -> LockView:
    view = LockView(P, tick=0)
    view._on_beat(NTScalar("i").wrap(1))  # a heartbeat: the lock part alone decides known
    return view


def holders(view: LockView) -> dict[str, str] | None:
    st = view.state
    return {d: lk.holder for d, lk in st.locks.items()} if st.known else None


def test_changes_apply_in_order_onto_the_table():
    view = _view()
    view._on_changes(changes_value({"m1": _row("m1")}, 5))
    assert holders(view) is None and "Coord:Locks not received" in view.state.why_unknown
    view._on_locks(locks_value([_row("m1")], 5))
    assert holders(view) == {"m1": "alice@10.0.0.1"}
    view._on_changes(changes_value({"m2": _row("m2", "bob@h")}, 6))
    view._on_changes(changes_value({"m1": None}, 7))
    assert holders(view) == {"m2": "bob@h"}
    # the coalesced table of an older change does not undo newer changes; a repeat is ignored
    view._on_locks(locks_value([_row("m1")], 6))
    view._on_changes(changes_value({"m1": _row("m1")}, 7))
    assert holders(view) == {"m2": "bob@h"}
    view._on_locks(locks_value([_row("m2", "bob@h")], 7))
    assert holders(view) == {"m2": "bob@h"}


def test_a_missed_change_fails_closed_until_the_table_catches_up():
    view = _view()
    view._on_locks(locks_value([], 10))
    view._on_changes(changes_value({"m1": _row("m1")}, 12))  # 11 was squashed
    assert holders(view) is None and "change 12" in view.state.why_unknown
    view._on_locks(locks_value([_row("m3")], 10))  # the same table again: still behind
    assert holders(view) is None
    view._on_locks(locks_value([_row("m3")], 11))  # the table of 11: change 12 applies on top
    assert holders(view) == {"m1": "alice@10.0.0.1", "m3": "alice@10.0.0.1"}
    view._on_changes(changes_value({"m4": _row("m4")}, 14))  # 13 missed
    assert holders(view) is None
    view._on_locks(locks_value([_row("m1"), _row("m3")], 14))  # a table at the change itself
    assert holders(view) == {"m1": "alice@10.0.0.1", "m3": "alice@10.0.0.1"}


def test_out_of_order_changes_are_held_until_the_gap_closes():
    view = _view()
    view._on_locks(locks_value([], 1))
    view._on_changes(changes_value({"m2": _row("m2")}, 3))
    assert holders(view) is None
    view._on_changes(changes_value({"m1": _row("m1")}, 2))
    assert holders(view) == {"m1": "alice@10.0.0.1", "m2": "alice@10.0.0.1"}


def test_a_new_ioc_run_replaces_the_table_and_a_disconnect_forgets_it():
    view = _view()
    view._on_locks(locks_value([_row("m1")], 40, epoch=1))
    view._on_changes(changes_value({"m2": _row("m2")}, 1, epoch=2))  # restarted IOC's change
    assert holders(view) is None
    view._on_locks(locks_value([_row("m2")], 1, epoch=2))  # a lower seq, but a new run
    assert holders(view) == {"m2": "alice@10.0.0.1"}
    from p4p.client.thread import Disconnected
    view._on_changes(Disconnected())
    assert holders(view) is None
    view._on_changes(changes_value({"m2": _row("m2")}, 1, epoch=2))
    assert holders(view) is None  # the table must come again after a disconnect
    view._on_locks(locks_value([_row("m2")], 1, epoch=2))
    assert holders(view) == {"m2": "alice@10.0.0.1"}


def test_a_change_without_seq_or_held_is_unreadable_and_fails_closed():
    view = _view()
    view._on_locks(locks_value([_row("m1")], 1))
    bad = NTTable(list(pvn.LOCKS_COLUMNS)).wrap([])  # no held column, no seq
    view._on_changes(bad)
    assert holders(view) is None and "Coord:LockChanges" in view.state.why_unknown
    view._on_locks(locks_value([_row("m1")], 1))
    assert holders(view) == {"m1": "alice@10.0.0.1"}
    view._on_locks(NTTable(list(pvn.LOCKS_COLUMNS)).wrap([]))  # an older IOC's table: no seq
    assert holders(view) is None and "no seq field" in view.state.why_unknown
