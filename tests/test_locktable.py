"""The lock model (docs/locks.md) on the pure lock table, with a real SQLite store."""

from __future__ import annotations

import pytest

from iocs.coordination.locktable import Identity, LockError, LockTable, hash_key
from pvcoord.store import open_store
from pvdb.lockmodel import ErrorCode, new_request_id
from pvdb.models import BEAMLINE, EventAction, LockType
from pvdb.policy import parse_policy

from .codes import raises_code

POLICY = parse_policy(
    """
[access]
trusted_services = ["websvc"]
force_release = ["root"]

[lock_types.MAINTENANCE]
allow = ["root", "role/staff"]
default_lease = 600
max_lease = 3600

[lock_types.MANUAL_OPERATOR]
allow = ["*"]
default_lease = 300
max_lease = 3600

[lock_types.QUEUE_EXECUTING]
allow = ["qserver", "root"]

[lock_types.QUEUE_QUEUED]
allow = ["qserver", "root"]
"""
)
ALICE = Identity("alice", "10.0.0.1")
BOB = Identity("bob", "10.0.0.2")
STAFF = Identity("carol", "10.0.0.3", frozenset({"staff"}))
QS = Identity("qserver", "10.0.0.4")
DEVICES = ["m1", "m2", "m3", "det1"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/locks.sqlite"


@pytest.fixture
def table(store_url, clock) -> LockTable:
    return LockTable(POLICY, open_store(store_url), devices=DEVICES, clock=clock)


def held(table: LockTable) -> dict[str, tuple[str, str]]:
    return {lk.device: (lk.lock_type.value, lk.owner) for lk in table.locks()}


def test_grant_and_table(table):
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60, "align")
    assert r.granted and r.devices == ("m1",) and r.key
    assert held(table) == {"m1": ("MANUAL_OPERATOR", "alice")}
    assert table.locks()[0].holder == "alice@10.0.0.1"


def test_equal_priority_refused_naming_holder(table):
    table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60, "align")
    with pytest.raises(LockError) as e:
        table.acquire(BOB, ["m1"], LockType.MANUAL_OPERATOR, 60)
    msg = str(e.value)
    assert "alice@10.0.0.1" in msg and "MANUAL_OPERATOR" in msg and "'align'" in msg
    assert "expires" in msg
    assert held(table) == {"m1": ("MANUAL_OPERATOR", "alice")}


def test_lower_priority_refused(table):
    table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.HOLDER_CONFLICT, "alice@10.0.0.1"):
        table.acquire(QS, ["m1"], LockType.QUEUE_QUEUED, 60)


def test_strictly_higher_preempts_and_holder_is_told(table):
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    r2 = table.acquire(STAFF, ["m1"], LockType.MAINTENANCE, 60, "vacuum")
    assert r2.preempted and "alice" in r2.preempted[0]
    assert held(table) == {"m1": ("MAINTENANCE", "carol")}
    with raises_code(LockError, ErrorCode.PREEMPTED, "carol@10.0.0.3"):
        table.release(ALICE, key=r.key)
    with raises_code(LockError, ErrorCode.PREEMPTED, "carol@10.0.0.3"):
        table.renew(ALICE, devices=["m1"])


def test_idempotent_rerequest_renews(table, clock):
    r1 = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    clock.t += 30
    r2 = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    assert r2.expires == clock.t + 60
    assert len(table.locks()) == 1
    # both keys still work
    table.renew(ALICE, key=r1.key, timeout=10)
    table.release(BOB, key=r2.key)  # a key works whoever presents it
    assert table.locks() == []


def test_policy_decides_who_takes_which_type(table):
    with raises_code(LockError, ErrorCode.NOT_ALLOWED):
        table.acquire(ALICE, ["m1"], LockType.MAINTENANCE, 60)
    table.acquire(STAFF, ["m1"], LockType.MAINTENANCE, 60)  # via role/staff


def test_lease_default_max_and_expiry(table, clock):
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR)
    assert r.expires == clock.t + 300
    with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
        table.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 3601)
    for bad in (0, -1, float("nan"), float("inf")):
        with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
            table.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, bad)
    clock.t += 299
    assert table.expire() == []
    clock.t += 1
    events = table.expire()
    assert [e.action for e in events] == [EventAction.EXPIRED]
    assert table.locks() == []
    with raises_code(LockError, ErrorCode.EXPIRED):
        table.release(ALICE, key=r.key)


def test_atomic_multi_device_all_or_none(table):
    table.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.HOLDER_CONFLICT, "bob@10.0.0.2"):
        table.acquire(ALICE, ["m1", "m2", "m3"], LockType.MANUAL_OPERATOR, 60)
    assert held(table) == {"m2": ("MANUAL_OPERATOR", "bob")}
    r = table.acquire(ALICE, ["m1", "m3"], LockType.MANUAL_OPERATOR, 60)
    assert r.devices == ("m1", "m3")
    assert table.release(ALICE, key=r.key) == ("m1", "m3")


def test_beamline_locks_everything(table):
    table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.HOLDER_CONFLICT, "alice@10.0.0.1"):
        table.acquire(BOB, [BEAMLINE], LockType.MANUAL_OPERATOR, 60)
    r = table.acquire(STAFF, [BEAMLINE], LockType.MAINTENANCE, 60)
    assert "m1" in r.preempted[0]
    assert table.effective("m2").owner == "carol"
    with raises_code(LockError, ErrorCode.HOLDER_CONFLICT, "carol@10.0.0.3"):
        table.acquire(ALICE, ["m3"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
        table.acquire(STAFF, [BEAMLINE, "m1"], LockType.MAINTENANCE, 60)


def test_release_rules(table):
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.NOT_HOLDER, "alice@10.0.0.1"):
        table.release(BOB, devices=["m1"])
    with raises_code(LockError, ErrorCode.UNKNOWN_KEY):
        table.release(BOB, key="not-the-key")
    with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
        table.release(ALICE)
    assert held(table) == {"m1": ("MANUAL_OPERATOR", "alice")}
    assert table.release(ALICE, devices=["m1"]) == ("m1",)  # own account, no key
    with raises_code(LockError, ErrorCode.RELEASED, "alice@10.0.0.1"):
        table.release(ALICE, key=r.key)


def test_force_release_only_for_policy_accounts(table):
    table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.NOT_ALLOWED):
        table.force_release(BOB, ["m1"])
    table.force_release(Identity("root", "h"), ["m1"], "stuck")
    assert table.locks() == []
    with raises_code(LockError, ErrorCode.FORCE_RELEASED, "root@h"):
        table.renew(ALICE, devices=["m1"])


def test_unknown_device_and_unknown_registry(store_url, clock):
    t = LockTable(POLICY, open_store(store_url), devices=None, clock=clock)
    with raises_code(LockError, ErrorCode.NOT_READY):
        t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    t.set_devices(["m1"])
    with raises_code(LockError, ErrorCode.UNKNOWN_DEVICE):
        t.acquire(ALICE, ["zz"], LockType.MANUAL_OPERATOR, 60)


def test_long_strings_refused(table):
    with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
        table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60, "x" * 10_000)
    assert table.locks() == []


def test_audit_records_every_action_without_keys(table, store_url, clock):
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with pytest.raises(LockError):
        table.acquire(BOB, ["m1"], LockType.MANUAL_OPERATOR, 60)
    table.renew(ALICE, key=r.key)
    table.acquire(STAFF, ["m1"], LockType.MAINTENANCE, 60)
    table.release(STAFF, devices=["m1"])
    r3 = table.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 1)
    clock.t += 2
    table.expire()
    table.acquire(ALICE, ["m3"], LockType.MANUAL_OPERATOR, 60)
    table.force_release(Identity("root", "h"), ["m3"])
    table.acquire(ALICE, ["m3"], LockType.MANUAL_OPERATOR, 60)
    mono = table.monotonic()
    table.monotonic = lambda: mono  # the wall clock steps against the monotonic one
    clock.t += 3600
    table.expire()
    actions = [e.action for e in table.store.recent_events(100)]
    for a in EventAction:
        assert a in actions, a
    text = repr(table.store.recent_events(100)) + repr(table.locks())
    assert r.key not in text and r3.key not in text
    assert hash_key(r.key) not in repr(table.store.recent_events(100))


def test_persistence_and_expired_dropped_on_reload(store_url, clock):
    t1 = LockTable(POLICY, open_store(store_url), devices=DEVICES, clock=clock)
    r = t1.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 600)
    t1.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 5)
    clock.t += 10
    t2 = LockTable(POLICY, open_store(store_url), devices=DEVICES, clock=clock)
    assert held(t2) == {"m1": ("MANUAL_OPERATOR", "alice")}
    assert [(e.action, e.device) for e in t2.startup_events] == [(EventAction.EXPIRED, "m2")]
    assert "while the IOC was down" in t2.startup_events[0].message
    t2.release(BOB, key=r.key)  # the key survives the restart (as a digest)


def test_store_failure_changes_nothing_and_is_reported(table, tmp_path):
    table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    assert table.store_error is None
    table.store.close()  # every later write fails
    with raises_code(LockError, ErrorCode.STORE_UNAVAILABLE):
        table.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 60)
    with raises_code(LockError, ErrorCode.STORE_UNAVAILABLE):
        table.release(ALICE, devices=["m1"])
    assert held(table) == {"m1": ("MANUAL_OPERATOR", "alice")}
    assert "closed" in table.store_error
    table.check_store()
    assert table.store_error is not None  # still failing


def test_expired_lease_is_not_honoured_before_the_tick(table, clock):
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 1)
    clock.t += 5  # no expire() tick ran
    with raises_code(LockError, ErrorCode.EXPIRED):
        table.renew(ALICE, key=r.key)
    table.acquire(BOB, ["m1"], LockType.MANUAL_OPERATOR, 60)


def test_device_request_of_higher_priority_preempts_a_whole_beamline_lock(table):
    """A beamline lock is one exclusive lock: losing one device to MAINTENANCE ends all of it."""
    table.acquire(ALICE, [BEAMLINE], LockType.MANUAL_OPERATOR, 60)
    r = table.acquire(STAFF, ["m1"], LockType.MAINTENANCE, 60)
    assert r.preempted == ("beamline (MANUAL_OPERATOR of alice@10.0.0.1)",)
    assert held(table) == {"m1": ("MAINTENANCE", "carol")}
    assert table.effective("m2") is None


def test_release_notice_names_the_verb_of_the_request(table):
    table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    table.release(ALICE, devices=["m1"])
    with raises_code(LockError, ErrorCode.RELEASED, "alice@10.0.0.1"):
        table.renew(ALICE, devices=["m1"])


class FlakyStore:
    """A real SQLite store whose next commit is applied but then reported as failed
    (a Redis MULTI/EXEC whose reply was lost)."""

    def __init__(self, url: str) -> None:
        self.inner = open_store(url)
        self.url = url
        self.lose_next_reply = False

    def load_locks(self):
        return self.inner.load_locks()

    def load_rows(self):
        return self.inner.load_rows()

    def durable(self, token):
        self.inner.durable(token)

    def recent_events(self, n):
        return self.inner.recent_events(n)

    def load_notices(self):
        return self.inner.load_notices()

    def load_requests(self):
        return self.inner.load_requests()

    def commit(self, upsert, delete, events, notices=None, requests=None):
        token = self.inner.commit(upsert, delete, events, notices, requests)
        if self.lose_next_reply:
            self.lose_next_reply = False
            from pvcoord.store import StoreError
            raise StoreError("connection lost before the reply")
        return token


def test_commit_applied_but_reported_failed_is_undone_in_the_store(store_url, clock):
    store = FlakyStore(store_url)
    t = LockTable(POLICY, store, devices=DEVICES, clock=clock)
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    store.lose_next_reply = True
    with raises_code(LockError, ErrorCode.STORE_UNAVAILABLE):
        t.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 60)
    assert held(t) == {"m1": ("MANUAL_OPERATOR", "alice")}
    assert {lk.device for lk in store.load_locks()} == {"m1", "m2"}  # applied after all
    t.check_store()  # the 1 Hz probe: memory (what clients were told) wins
    assert t.store_error is None
    assert {lk.device for lk in store.load_locks()} == {"m1"}


def test_outcome_of_a_commit_reported_failed_is_undone_and_its_retry_applied(store_url, clock):
    """The client was told nothing changed: the stored outcome goes with the change."""
    store = FlakyStore(store_url)
    t = LockTable(POLICY, store, devices=DEVICES, clock=clock)
    rid = new_request_id()
    store.lose_next_reply = True
    with raises_code(LockError, ErrorCode.STORE_UNAVAILABLE):
        t.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 60, request_id=rid)
    assert len(store.load_requests()) == 1  # applied after all
    t.check_store()
    assert store.load_requests() == [] and store.load_locks() == []
    g = t.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 60, request_id=rid)  # applied, once
    assert t.acquire(BOB, ["m2"], LockType.MANUAL_OPERATOR, 60, request_id=rid) == g
    assert len(store.load_requests()) == 1
