"""Issue 11, finding 7: the guard fails closed all the way. Pure GuardCore (no network)."""

from __future__ import annotations

import pytest

from bridges.guard.core import GuardCore
from bridges.guard.decision import DeviceMap, HeldLock
from pvdb.policy import parse_policy

P = "FC:"
SP1, SP2 = f"{P}m1:Setpoint", f"{P}m2:Setpoint"
POLICY = parse_policy('[access]\nemergency = ["root"]\nforce_release = ["role/staff"]\n')


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def full_map() -> DeviceMap:
    return DeviceMap([(SP1, "m1"), (SP2, "m2")], [("m1", f"{P}m1:"), ("m2", f"{P}m2:")],
                     known=True)


def alice_holds_m1(core: GuardCore) -> None:
    core.locks_update({"m1": HeldLock("m1", "alice", "10.0.0.1", "MANUAL_OPERATOR", 1e10)}, 1.0)
    core.beat(1)


@pytest.fixture
def core() -> GuardCore:
    c = GuardCore(POLICY, monotonic=Clock())
    c.set_devices(full_map())
    alice_holds_m1(c)
    return c


def test_emergency_account_does_not_override_a_known_lock_while_the_map_is_unknown(core):
    """The hole: with the registry map unknown, root (emergency) could write alice's m1."""
    core.set_devices(DeviceMap(known=False, why_unknown="Registry:DevicePVs not received"))
    d = core.decide(SP1, "root")
    assert not d.allowed and d.holder == "alice@10.0.0.1"
    assert not core.decide(SP1, "bob").allowed
    # no lock of anyone else known: the emergency account may write (what it is for)
    core.locks_update({}, 2.0)
    assert core.decide(SP1, "root").allowed


def test_emergency_account_does_not_override_the_last_known_lock(core):
    core.locks_lost()  # coordination IOC gone: state unknown, last table had alice on m1
    assert not core.state.known
    d = core.decide(SP1, "root")
    assert not d.allowed and d.holder == "alice@10.0.0.1"
    assert core.decide(SP2, "root").allowed  # m2 was free in the last table


@pytest.mark.parametrize("shrunk", [
    DeviceMap([(SP2, "m2")], [("m2", f"{P}m2:")], known=True),  # m1 left
    DeviceMap([], [], known=True),  # the registry emptied
])
def test_a_shrinking_registry_keeps_locked_devices_refused_until_confirmed(core, shrunk):
    """The hole: m1 left the registry while alice held it -> 'no device' -> writable by all."""
    assert not core.decide(SP1, "bob").allowed
    core.set_devices(shrunk)
    assert core.withheld_devices() == ["m1"]
    for pv in (SP1, f"{SP1}.VAL", f"{P}m1:Other"):
        d = core.decide(pv, "bob")
        assert not d.allowed and d.device == "m1", pv
    with pytest.raises(PermissionError):
        core.confirm_registry("bob", [])
    with pytest.raises(ValueError, match="not withheld: m9"):
        core.confirm_registry("carol", ["staff"], ["m9"])
    assert core.confirm_registry("carol", ["staff"]) == ["m1"]
    assert core.withheld_devices() == []
    d = core.decide(SP1, "bob")  # now really no device: the policy default (staff only)
    assert not d.allowed and d.verdict == "not-a-device" and core.decide(SP1, "root").allowed


def test_shrink_across_an_unknown_registry_and_a_device_coming_back(core):
    core.set_devices(DeviceMap(known=False, why_unknown="Registry:Devices disconnected"))
    core.set_devices(DeviceMap([], [], known=True))
    assert core.withheld_devices() == ["m1"]
    assert not core.decide(SP1, "bob").allowed
    core.set_devices(full_map())  # back in the registry: the normal rules apply again
    assert core.withheld_devices() == []
    assert not core.decide(SP1, "bob").allowed and core.decide(SP1, "alice").allowed


def test_free_devices_that_leave_are_not_withheld(core):
    core.set_devices(DeviceMap([(SP1, "m1")], [("m1", f"{P}m1:")], known=True))
    assert core.withheld_devices() == []
