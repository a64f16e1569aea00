"""Issue 11, finding 2: field rules like EPICS access security levels. A locked device cannot be
moved through another record's link fields; PVs of no device are staff only behind the guard."""

from __future__ import annotations

import pytest

from bridges.guard.decision import DeviceMap, HeldLock, LockState, Verdict, decide
from pvdb import demo
from pvdb.policy import PolicyError, is_link_field, parse_policy

P = "DEMO:"
M1_SP = demo.motor_setpoint(P, "m1")
STOP_CALC = f"{P}m2:Sim:StopCalc"  # the demo's calc record of m2 whose OUT link can reach m1
POLICY = parse_policy("""
[access]
force_release = ["root"]

[fields]
staff = ["root", "role/staff"]

[fields.classes]
motor = ["VAL", "STOP"]
""")


def devmap() -> DeviceMap:
    return DeviceMap([(M1_SP, "m1"), (f"{P}m2:Stop", "m2")],
                     [("m1", f"{P}m1:"), ("m2", f"{P}m2:"), ("det1", f"{P}det1:")], known=True,
                     classes={"m1": "motor", "m2": "motor", "det1": "detector"})


ALICE_M1 = LockState({"m1": HeldLock("m1", "alice", "10.0.0.1", "MANUAL_OPERATOR", 1e10)}, True)


def test_link_fields_of_an_unlocked_record_are_staff_only():
    """The hole: bob could point m2's calc OUT link at m1's setpoint while alice held m1, then
    process it: m1 moved without a put to any m1 PV."""
    for field in ("OCAL", "OUT", "INPA", "FLNK", "DOL", "SDIS"):
        d = decide(POLICY, ALICE_M1, devmap(), f"{STOP_CALC}.{field}", "bob", [], "10.0.0.2")
        assert not d.allowed and d.verdict is Verdict.FIELD_RULE, field
        assert decide(POLICY, ALICE_M1, devmap(), f"{STOP_CALC}.{field}", "carol", ["staff"],
                      "10.0.0.3").allowed
    # operators still write the value fields of their class; m2 is free
    assert decide(POLICY, ALICE_M1, devmap(), f"{P}m2:Stop", "bob", [], "10.0.0.2").allowed
    assert decide(POLICY, ALICE_M1, devmap(), f"{P}m2:Stop.STOP", "bob", [], "h").allowed
    assert not decide(POLICY, ALICE_M1, devmap(), f"{P}m2:Stop.DESC", "bob", [], "h").allowed
    # the class decides: a detector has only VAL by default
    assert not decide(POLICY, ALICE_M1, devmap(), f"{P}det1:Acquire.STOP", "bob", [], "h").allowed
    # the lock still comes first: alice's m1 is not bob's, whatever the field
    d = decide(POLICY, ALICE_M1, devmap(), M1_SP, "bob", [], "10.0.0.2")
    assert not d.allowed and d.verdict is Verdict.HELD_BY_OTHER


def test_pvs_of_no_device_are_staff_only_by_default():
    """The hole: record aliases and group PVs the registry does not list were writable by all."""
    alias = f"{P}m1:SetpointAlias"
    other = "ELSEWHERE:thing"
    for pv in (other, f"{other}.OUT"):
        d = decide(POLICY, ALICE_M1, devmap(), pv, "bob", [], "10.0.0.2")
        assert not d.allowed and d.verdict is Verdict.NOT_A_DEVICE
        assert decide(POLICY, ALICE_M1, devmap(), pv, "root", [], "10.0.0.2").allowed
    # an alias under m1's prefix is m1's: alice's lock refuses bob
    assert not decide(POLICY, ALICE_M1, devmap(), alias, "bob", [], "10.0.0.2").allowed
    everyone = parse_policy('[fields]\nunregistered = "everyone"\n')
    assert decide(everyone, ALICE_M1, devmap(), other, "bob", [], "h").allowed


def test_field_rule_settings_are_checked():
    assert is_link_field("OUT") and is_link_field("INPC") and is_link_field("LNK3")
    assert not is_link_field("VAL") and not is_link_field("DESC")
    with pytest.raises(PolicyError, match="link field"):
        parse_policy('[fields]\noperator_fields = ["VAL", "OUT"]\n')
    with pytest.raises(PolicyError, match="fields.unregistered"):
        parse_policy('[fields]\nunregistered = "all"\n')
    with pytest.raises(PolicyError, match="not a record field name"):
        parse_policy('[fields.classes]\nmotor = ["val"]\n')
