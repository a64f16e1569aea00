"""Issue 11, finding 4: queue control only for the accounts and roles the policy names."""

from __future__ import annotations

from pvcoord.demo.beamline import POLICY_FILE
from pvdb.policy import Policy, load_policy


def test_default_and_demo_policy_do_not_let_everyone_control_the_queue():
    """The hole: queue_control defaulted to ["*"], so anyone could start a queue item whose
    QUEUE_EXECUTING locks preempt an operator's manual lock."""
    for pol in (Policy(), load_policy(POLICY_FILE)):
        assert not pol.may_control_queue("nobody", ["nogroup"])
        assert not pol.may_control_queue("alice", [])
        assert pol.may_control_queue("carol", ["staff"])
        assert pol.may_control_queue("dave", ["users"])
        assert pol.may_control_queue("root", [])
