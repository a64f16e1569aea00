"""Issue 11, finding 1: identity that means something. A self-declared EPICS account is bound to
the peer address the server saw; roles come from this host's group database only; onBehalfOf is
limited per service; anonymous clients take no lock."""

from __future__ import annotations

import pytest

from bridges.guard.decision import DeviceMap, HeldLock, LockState, decide
from iocs.coordination.locktable import Identity, LockError, LockTable
from pvcoord.store import open_store
from pvdb.models import LockType
from pvdb.policy import (
    ANONYMOUS,
    HostRolesCache,
    PolicyError,
    host_roles,
    matches,
    parse_policy,
)

POLICY = parse_policy("""
[hosts]
consoles = ["10.2.0.0/24", "192.168.7.5"]

[access]
trusted_services = ["websvc@127.0.0.1", "flat"]
force_release = ["role/staff@hag/consoles"]
emergency = ["root@10.2.0.1"]
queue_control = ["role/staff", "alice@10.2.0.0/24"]

[access.on_behalf_of]
websvc = ["role/users", "bob", "carol"]

[lock_types.MAINTENANCE]
allow = ["role/staff@hag/consoles", "carol"]
""")


def test_principals_are_bound_to_peer_addresses():
    p = ["alice@10.2.0.0/24"]
    assert matches(p, "alice", [], "10.2.0.31")
    assert not matches(p, "alice", [], "10.9.9.9")  # same claimed account, another host
    assert not matches(p, "alice", [])  # no address known: a host-bound principal never matches
    assert not matches(p, "alice@10.2.0.0/24", [], "10.2.0.31")  # not a literal account name
    h = POLICY.hosts
    assert matches(["*@hag/consoles"], "x", [], "192.168.7.5", h)
    assert not matches(["*@hag/consoles"], "x", [], "192.168.7.6", h)
    assert POLICY.may_force_release("dave", ["staff"], "10.2.0.9")
    assert not POLICY.may_force_release("dave", ["staff"], "10.3.0.9")
    assert POLICY.may_control_queue("alice", [], "10.2.0.4")
    assert not POLICY.may_control_queue("alice", [], "10.3.0.4")


def test_bad_host_specs_are_rejected_with_the_line():
    with pytest.raises(PolicyError, match=r":3: access.emergency: .*not an account name"):
        parse_policy('\n[access]\nemergency = ["root@not a host"]\n', "p.toml")
    with pytest.raises(PolicyError, match=r"access.emergency: host 'example.org' is not an IP"):
        parse_policy('[access]\nemergency = ["root@example.org"]\n', "p.toml")


def test_roles_only_from_this_hosts_group_database():
    """The hole: an account unknown here got a role of its own name, so claiming 'staff'
    satisfied role/staff."""
    assert host_roles("staff") == frozenset()  # a group, not an account, on this host
    assert host_roles("no-such-account-xyz") == frozenset()
    assert "root" in host_roles("root")
    assert host_roles("a\x1b[2Jb") == frozenset() and host_roles(ANONYMOUS) == frozenset()


def test_host_roles_cache_reads_an_account_once_per_ttl():
    calls: list[str] = []
    now = [0.0]

    def lookup(account: str) -> frozenset[str]:
        calls.append(account)
        return frozenset({f"g-{account}-{len(calls)}"})

    cache = HostRolesCache(ttl=1.0, size=2, lookup=lookup, clock=lambda: now[0])
    assert cache("a") == {"g-a-1"} and cache("a") == {"g-a-1"} and calls == ["a"]
    now[0] = 1.0  # ttl over: read again (a group change counts within ttl)
    assert cache("a") == {"g-a-2"}
    cache("b")
    cache("c")  # size 2: the oldest account (a) is dropped ...
    assert cache("a") == {"g-a-5"}  # ... and read again
    assert HostRolesCache()("root") == host_roles("root")  # the real group database


def test_on_behalf_of_is_limited_per_service():
    """The hole: onBehalfOf could name anyone, even root or the queue's service account."""
    ok = POLICY.may_act_for
    assert ok("websvc", [], "127.0.0.1", "dave", ["users"]) == ""
    assert ok("websvc", [], "127.0.0.1", "bob", []) == ""
    assert "trusted" in ok("websvc", [], "10.9.9.9", "bob", [])  # the service from another host
    assert "may not act on behalf of root" in ok("websvc", [], "127.0.0.1", "root", [])
    assert "may not act on behalf of eve" in ok("websvc", [], "127.0.0.1", "eve", [])
    # carol may take MAINTENANCE (privileged) but websvc's list names her by account: allowed
    assert ok("websvc", [], "127.0.0.1", "carol", []) == ""
    # a service without an on_behalf_of entry: any non-privileged user, never a privileged one
    assert ok("flat", [], "10.1.1.1", "dave", []) == ""
    for user, roles in (("root", []), ("websvc", []), ("erin", ["staff"]), ("carol", [])):
        assert "may not act on behalf of" in ok("flat", [], "10.1.1.1", user, roles), user
    assert "not a trusted service" in ok("mallory", [], "127.0.0.1", "dave", [])


def test_anonymous_clients_read_but_take_no_lock():
    """The hole: all anonymous clients shared one identity that could take locks."""
    assert not POLICY.may_take(LockType.MANUAL_OPERATOR, ANONYMOUS, [], "10.2.0.3")
    assert POLICY.may_take(LockType.MANUAL_OPERATOR, "dave", [], "10.2.0.3")
    assert not POLICY.may_control_queue(ANONYMOUS, ["staff"])
    opted = parse_policy("[access]\nanonymous_locks = true\n")
    assert opted.may_take(LockType.MANUAL_OPERATOR, ANONYMOUS, [])


@pytest.fixture
def table(tmp_path) -> LockTable:
    return LockTable(POLICY, open_store(f"sqlite:///{tmp_path}/l.sqlite"), devices=["m1", "m2"])


def test_a_client_claiming_the_holders_account_from_another_host_is_not_the_holder(table):
    """The hole: any client claiming 'alice' released, renewed or re-took alice's lock."""
    alice = Identity("alice", "10.2.0.31")
    fake = Identity("alice", "10.9.9.9")
    g = table.acquire(alice, ["m1"], LockType.MANUAL_OPERATOR, 60)
    for verb in (table.release, table.renew):
        with pytest.raises(LockError, match="held by alice@10.2.0.31"):
            verb(fake, ["m1"])
    with pytest.raises(LockError, match="held by alice@10.2.0.31"):
        table.acquire(fake, ["m1"], LockType.MANUAL_OPERATOR, 60)
    assert table.renew(fake, key=g.key)[0] == ("m1",)  # the key is what proves it, from anywhere
    assert table.release(alice, ["m1"]) == ("m1",)


def test_guard_decides_on_account_and_host():
    dm = DeviceMap([("P:m1:Sp", "m1")], [], known=True)
    st = LockState({"m1": HeldLock("m1", "alice", "10.2.0.31", "MANUAL_OPERATOR", 1e10)}, True)
    assert decide(POLICY, st, dm, "P:m1:Sp", "alice", [], "10.2.0.31").allowed
    d = decide(POLICY, st, dm, "P:m1:Sp", "alice", [], "10.9.9.9")
    assert not d.allowed and d.holder == "alice@10.2.0.31"
