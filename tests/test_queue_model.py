"""Unit tests of the queue IOC's pure logic (no network): PV values, items, input checks, locks."""

from __future__ import annotations

import pytest

import iocs.queue as queue_pkg
from iocs.queue import model
from iocs.queue.model import BadRequestError, HeldBy
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode
from pvdb.models import LockType
from pvdb.names import PVKind, snake_to_pascal

from .codes import raises_code

DEVICES = ["det1", "det2", "m1", "m2", "shutter"]


def test_every_queue_pv_is_in_the_ioc_help_text():
    doc = queue_pkg.__doc__
    for spec in qn.QUEUE_PVS:
        assert spec.suffix in doc, f"{spec.suffix} missing from python -m iocs.queue --help"


def test_status_pv_names_follow_the_manager_keys():
    for key, spec in qn.STATUS_SPECS.items():
        assert spec.suffix == "Queue:" + snake_to_pascal(key)
    assert qn.status_spec("items_in_queue").name("BL01:") == "BL01:Queue:ItemsInQueue"
    with pytest.raises(KeyError, match="served keys"):
        qn.status_spec("no_such_key")
    rpcs = [s for s in qn.QUEUE_PVS if s.kind is PVKind.RPC]
    assert {s.suffix for s in rpcs} >= {"Queue:QueueStart", "Queue:ItemAdd", "Queue:ReAbort"}
    assert len({s.suffix for s in qn.QUEUE_PVS}) == len(qn.QUEUE_PVS)


def test_status_values_map_enums_flags_and_lock():
    status = {
        "manager_state": "starting_queue", "re_state": None, "worker_environment_state": "idle",
        "worker_environment_exists": True, "items_in_queue": 3, "items_in_history": 7,
        "running_item_uid": None, "queue_stop_pending": False, "pause_pending": True,
        "queue_autostart_enabled": False, "lock": {"environment": True, "queue": False},
    }
    v = model.status_values(status)
    assert qn.MANAGER_STATES[v["Queue:ManagerState"]] == "starting_queue"
    assert qn.RE_STATES[v["Queue:ReState"]] == "none"
    assert qn.WORKER_ENVIRONMENT_STATES[v["Queue:WorkerEnvironmentState"]] == "idle"
    assert v["Queue:WorkerEnvironmentExists"] == 1
    assert v["Queue:ItemsInQueue"] == 3
    assert v["Queue:RunningItemUid"] == ""
    assert v["Queue:PausePending"] == 1 and v["Queue:QueueStopPending"] == 0
    assert v["Queue:LockEnvironment"] == 1 and v["Queue:LockQueue"] == 0
    # an unknown state maps to 'unknown' (index 0), missing keys are left out
    v = model.status_values({"manager_state": "brand_new_state"})
    assert v == {"Queue:ManagerState": 0}


def test_item_devices_walks_args_and_kwargs_and_components():
    item = {
        "args": [["det1", "det2"], "m1", -1, 1, "not-a-device"],
        "kwargs": {"md": {"motor": "m2.velocity"}, "num": 5},
    }
    assert model.item_devices(item, DEVICES) == ("det1", "det2", "m1", "m2")
    assert model.item_devices({"name": "park_m2", "args": [2.0]}, DEVICES) == ()


def test_args_summary_is_readable_and_bounded():
    item = {"name": "scan", "args": [["det1"], "m1", -1, 1.5], "kwargs": {"num": 5, "x": "a"}}
    assert model.args_summary(item, DEVICES) == '[det1], m1, -1, 1.5, num=5, x="a"'
    assert model.item_summary({**item, "user": "anna"}, DEVICES).startswith("scan([det1], m1")
    long = {"args": [list(range(500))]}
    s = model.args_summary(long, DEVICES)
    assert len(s) == qn.ARGS_SUMMARY_LENGTH and s.endswith("...")


def test_running_item_and_table_rows():
    running = {
        "name": "count", "args": [["det1"]], "kwargs": {"num": 3}, "user": "anna",
        "item_uid": "u1", "properties": {"time_start": 12.5},
    }
    r = model.running_item(running, DEVICES)
    assert (r.uid, r.name, r.user, r.start, r.devices) == ("u1", "count", "anna", 12.5, ("det1",))
    assert model.running_item({}, DEVICES) == model.RunningItem()
    rows = model.item_rows([running, {"name": "mv", "args": ["m2", 1], "item_uid": "u2"}], DEVICES)
    assert [r[0] for r in rows] == [0, 1]
    assert rows[1][7] == "m2" and rows[0][4] == "[det1], num=3"
    assert len(rows[0]) == len(qn.ITEMS_COLUMNS)
    hist = [{"name": "count", "item_uid": f"h{i}", "result": {"exit_status": "completed",
             "time_start": 1.0, "time_stop": 2.0, "run_uids": ["r1", "r2"]}} for i in range(5)]
    rows = model.history_rows(hist, DEVICES, rows=3)
    assert [r[0] for r in rows] == ["h2", "h3", "h4"]
    assert rows[0][5] == "completed" and rows[0][9] == "r1,r2"
    assert len(rows[0]) == len(qn.HISTORY_COLUMNS)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"name": "nope"}, "unknown plan 'nope'"),
        ({}, "give name=PLAN"),
        ({"name": "count", "args": "[[\"det1\"]"}, "args is not valid JSON"),
        ({"name": "count", "args": "{}"}, "args must be a JSON list"),
        ({"name": "count", "kwargs": "[1]"}, "kwargs must be a JSON object"),
        ({"name": "count", "pos": "middle"}, "pos must be front, back or an integer"),
        ({"name": "count", "bogus": "1"}, "unknown argument 'bogus'"),
        ({"name": "count", "itemType": "instruction"}, "itemType must be 'plan'"),
    ],
)
def test_item_add_rejects_bad_input(args, match):
    with raises_code(BadRequestError, ErrorCode.BAD_ARGUMENT) as e:
        model.parse_item_add(args, ["count", "scan"])
    assert match in str(e.value)  # names what was wrong


def test_item_add_accepts_good_input():
    new = model.parse_item_add(
        {"name": "count", "args": '[["det1"]]', "kwargs": '{"num": 3}', "pos": "front"},
        ["count"],
    )
    assert new.item == {"item_type": "plan", "name": "count", "args": [["det1"]],
                        "kwargs": {"num": 3}}
    assert new.pos == "front"
    # plans not known yet: the manager decides
    assert model.parse_item_add({"name": "anything"}, None).item["name"] == "anything"


def test_item_remove_and_pause_arguments():
    assert model.parse_item_remove({"uid": "abc"}) == {"uid": "abc"}
    assert model.parse_item_remove({"pos": "2"}) == {"pos": 2}
    with raises_code(BadRequestError, ErrorCode.BAD_ARGUMENT):
        model.parse_item_remove({})
    with raises_code(BadRequestError, ErrorCode.BAD_ARGUMENT):
        model.parse_item_remove({"uid": "a", "pos": "1"})
    assert model.parse_pause({}) == "deferred"
    with raises_code(BadRequestError, ErrorCode.BAD_ARGUMENT):
        model.parse_pause({"option": "now"})


def _held(device, lt, owner="x@h"):
    return HeldBy(device, lt, owner)


def test_blockers_follow_the_coordination_rules():
    locks = {
        "m1": _held("m1", LockType.MANUAL_OPERATOR, "anna@h"),
        "m2": _held("m2", LockType.MAINTENANCE, "max@h"),
        "m3": _held("m3", LockType.QUEUE_EXECUTING, "queue@h"),
        "m4": _held("m4", LockType.QUEUE_EXECUTING, "other@h"),
    }
    b = model.blockers(["m1", "m2", "m3", "m4"], locks, "queue")
    assert [h.device for h in b] == ["m2", "m4"]  # manual is preempted, own lock never blocks
    assert model.blockers(["m1"], locks, "queue", LockType.QUEUE_QUEUED)[0].device == "m1"
    bl = {"beamline": _held("beamline", LockType.MAINTENANCE, "max@h")}
    assert model.blockers(["m1"], bl, "queue")[0].device == "beamline"
    assert (b[0].holder, b[0].lock_type) == ("max@h", LockType.MAINTENANCE)
    assert b[0].describe().startswith("m2 is held by max@h (MAINTENANCE")


def test_plan_locks():
    plan = model.plan_locks(
        "u1", ["m1", "det1"], ["shutter"], [("u2", ("m1", "m2")), ("u3", ("m2", "m9"))],
        ["m1", "m2", "det1", "shutter"],
    )
    assert plan.executing == {"m1", "det1", "shutter"}
    assert plan.queued == {"m2"}  # m1 executes; m9 is not coordinated
    assert plan.first_user == {"m2": "u2"}
    idle = model.plan_locks("", ["m1"], [], [("u2", ("m1",))], ["m1"])
    assert idle.executing == frozenset() and idle.queued == {"m1"}
    assert model.plan_locks("u1", ["m1"], [], [], None).executing == frozenset()


def test_docs_queue_pv_list_is_current():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs/queue.md").read_text()
    start = text.index("<!-- generated: pvdb.queue.pv_table() -->\n") + len(
        "<!-- generated: pvdb.queue.pv_table() -->\n")
    end = text.index("\n<!-- end generated -->")
    assert text[start:end] == qn.pv_table(), (
        "docs/queue.md PV list is stale: regenerate it from pvdb.queue.pv_table()")
