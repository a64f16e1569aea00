"""Retried requests are answered, never applied twice (issue 12, decision 0160), on real stores.

A request with a ``requestId`` that the lock table answered before gets the first answer again
(the same key for an acquire) and changes nothing, in the same process and after a restart on
the same store. The over-the-wire form (the real IOC, its restart) is in
``tests/test_request_ids_system.py``.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from iocs.coordination import locktable
from iocs.coordination.locktable import Identity, LockError, LockTable
from pvcoord.procs import start_redis
from pvcoord.store import open_store
from pvdb.lockmodel import ErrorCode, new_request_id, request_id_problem
from pvdb.models import LockType
from pvdb.policy import parse_policy

from .codes import raises_code

POLICY = parse_policy(
    """
[access]
force_release = ["root"]

[lock_types.MAINTENANCE]
allow = ["root"]
default_lease = 600
max_lease = 3600

[lock_types.MANUAL_OPERATOR]
allow = ["*"]
default_lease = 300
max_lease = 3600
"""
)
ALICE = Identity("alice", "10.0.0.1")
BOB = Identity("bob", "10.0.0.2")
ROOT = Identity("root", "10.0.0.9")
DEVICES = ["m1", "m2", "m3"]
T0 = 1_800_000_000.0
MO = LockType.MANUAL_OPERATOR


class Clock:
    """One fake clock for the wall and the leases (tests move it)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'locks.sqlite'}"


def table(url: str, clock: Clock, ns: str = "default") -> LockTable:
    return LockTable(POLICY, open_store(url, namespace=ns), devices=DEVICES, clock=clock)


def state(t: LockTable) -> list[tuple]:
    """What a retry must not change: every lock (with its key digests and lease)."""
    return [(lk.device, lk.owner, lk.lock_type.value, lk.expires, lk.key_hashes)
            for lk in t.locks()]


def n_events(t: LockTable) -> int:
    return len(t.store.recent_events(10_000))


def test_request_id_format():
    rid = new_request_id()
    assert request_id_problem(rid) is None and len(rid) == 22
    assert new_request_id() != rid
    for bad in ("", "short", "x" * 65, "a" * 20 + "\n", "a" * 20 + " b", "a" * 20 + "=",
                "é" * 20, "a" * 20 + "\x00"):
        assert request_id_problem(bad) is not None, repr(bad)


def _every_rpc_once(t: LockTable, rids: dict[str, str]) -> dict[str, object]:
    """One request of each kind with its own id; the answers."""
    out: dict[str, object] = {}
    out["acquire"] = t.acquire(ALICE, ["m1"], MO, 60, "align", request_id=rids["acquire"])
    out["renew"] = t.renew(ALICE, ["m1"], timeout=120, request_id=rids["renew"])
    out["release"] = t.release(ALICE, ["m1"], request_id=rids["release"])
    t.acquire(BOB, ["m2"], MO, 60)
    out["force"] = t.force_release(ROOT, ["m2"], "stuck", request_id=rids["force"])
    return out


def _retry_every_rpc(t: LockTable, rids: dict[str, str]) -> dict[str, object]:
    return {
        "acquire": t.acquire(ALICE, ["m1"], MO, 60, "align", request_id=rids["acquire"]),
        "renew": t.renew(ALICE, ["m1"], timeout=120, request_id=rids["renew"]),
        "release": t.release(ALICE, ["m1"], request_id=rids["release"]),
        "force": t.force_release(ROOT, ["m2"], "stuck", request_id=rids["force"]),
    }


def _retried_same_answer_nothing_applied(url_: str, clock: Clock, ns: str = "default") -> None:
    t = table(url_, clock, ns)
    rids = {k: new_request_id() for k in ("acquire", "renew", "release", "force")}
    first = _every_rpc_once(t, rids)
    clock.now += 5
    before, events = state(t), n_events(t)
    assert before == []  # m1 released, m2 force-released
    assert _retry_every_rpc(t, rids) == first  # the key of the grant included
    assert state(t) == before and n_events(t) == events
    t.store.close()  # a restart: memory is gone, the store stays
    t2 = table(url_, clock, ns)
    events = n_events(t2)
    # a retried ForceRelease is not 'not-locked', a retried Release is not 'released'
    assert _retry_every_rpc(t2, rids) == first
    assert state(t2) == [] and n_events(t2) == events
    t2.store.close()


def test_retried_requests_are_answered_the_same_and_applied_once(url, clock):
    _retried_same_answer_nothing_applied(url, clock)


@pytest.mark.system
def test_retried_requests_are_answered_the_same_and_applied_once_redis(tmp_path, clock):
    proc, port = start_redis(data_dir=tmp_path / "r")
    try:
        _retried_same_answer_nothing_applied(f"redis://127.0.0.1:{port}/0", clock, ns="Q:")
    finally:
        proc.stop()


def test_retried_release_by_device_spares_the_lock_taken_again(url, clock):
    """The retry of 'Release device=m1' arrives after the same account took m1 again."""
    t = table(url, clock)
    rid = new_request_id()
    t.acquire(ALICE, ["m1"], MO, 60)
    assert t.release(ALICE, ["m1"], request_id=rid) == ("m1",)
    t.store.close()
    t2 = table(url, clock)
    g = t2.acquire(ALICE, ["m1"], MO, 60)  # on the restarted IOC
    held = state(t2)
    assert t2.release(ALICE, ["m1"], request_id=rid) == ("m1",)  # the first answer ...
    assert state(t2) == held  # ... and the new lock is still there
    assert t2.renew(ALICE, key=g.key, timeout=60)[0] == ("m1",)


def test_retried_acquire_keeps_its_key_and_lease(url, clock):
    t = table(url, clock)
    rid = new_request_id()
    g = t.acquire(ALICE, ["m1", "m2"], MO, 60, request_id=rid)
    clock.now += 30
    t.store.close()
    t2 = table(url, clock)
    held = state(t2)
    again = t2.acquire(ALICE, ["m1", "m2"], MO, 60, request_id=rid)
    assert again == g and state(t2) == held  # no renewal, no second key
    assert t2.release(ALICE, key=again.key) == ("m1", "m2")


def test_the_key_is_not_in_the_store_in_clear(tmp_path, url, clock):
    t = table(url, clock)
    g = t.acquire(ALICE, ["m1"], MO, 60, request_id=new_request_id())
    t.store.close()
    for f in tmp_path.iterdir():
        assert g.key.encode() not in f.read_bytes(), f


def test_bad_or_reused_request_id_is_refused_and_changes_nothing(url, clock):
    t = table(url, clock)
    rid = new_request_id()
    g = t.acquire(ALICE, ["m1"], MO, 60, request_id=rid)
    before, events = state(t), n_events(t)
    for bad in ("", "short", "x" * 65, "a" * 21 + "\n", "a" * 21 + "*"):
        with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
            t.acquire(ALICE, ["m2"], MO, 60, request_id=bad)
        with raises_code(LockError, ErrorCode.BAD_ARGUMENT):
            t.release(ALICE, ["m1"], request_id=bad)
    # the same id with other arguments, or for another RPC: a reused id, nothing applied
    with raises_code(LockError, ErrorCode.REQUEST_ID_REUSED):
        t.acquire(ALICE, ["m2"], MO, 60, request_id=rid)
    with raises_code(LockError, ErrorCode.REQUEST_ID_REUSED):
        t.acquire(ALICE, ["m1"], MO, 61, request_id=rid)
    with raises_code(LockError, ErrorCode.REQUEST_ID_REUSED):
        t.release(ALICE, key=g.key, request_id=rid)
    assert state(t) == before
    assert n_events(t) == events + 5 * 2 + 3  # only the refusals are recorded
    # another caller's request with the same id is another request, with its own answer
    other = t.acquire(BOB, ["m2"], MO, 60, request_id=rid)
    assert other.key != g.key and other.devices == ("m2",)


def test_a_refused_request_is_not_remembered(url, clock):
    """Nothing was applied, so its retry is decided afresh (and applied once, if granted)."""
    t = table(url, clock)
    rid = new_request_id()
    k = t.acquire(BOB, ["m1"], MO, 60).key
    with raises_code(LockError, ErrorCode.HOLDER_CONFLICT, BOB.holder):
        t.acquire(ALICE, ["m1"], MO, 60, request_id=rid)
    t.release(BOB, key=k)
    g = t.acquire(ALICE, ["m1"], MO, 60, request_id=rid)
    assert t.acquire(ALICE, ["m1"], MO, 60, request_id=rid) == g


def test_outcomes_are_bounded_in_count_and_time_in_memory_and_store(url, clock, monkeypatch):
    monkeypatch.setattr(locktable, "REQUESTS_KEPT", 3)
    t = table(url, clock)
    rids = [new_request_id() for _ in range(5)]
    grants = []
    for rid in rids:
        grants.append(t.acquire(ALICE, ["m1"], MO, 60, request_id=rid))
        clock.now += 1
    assert len(t.store.load_requests()) == 3  # the oldest two evicted, in the same commits
    assert t.acquire(ALICE, ["m1"], MO, 60, request_id=rids[-1]) == grants[-1]
    again = t.acquire(ALICE, ["m1"], MO, 60, request_id=rids[0])  # forgotten: a new request
    assert again.key != grants[0].key
    # older than the window: a new request too, and dropped from the store at a restart
    clock.now += locktable.REQUEST_WINDOW + 1
    late = t.acquire(ALICE, ["m1"], MO, 60, request_id=rids[-1])
    assert late.key != grants[-1].key
    assert len(t.store.load_requests()) == 1  # every older one was out of the window
    t.store.close()
    clock.now += locktable.REQUEST_WINDOW + 1
    t2 = table(url, clock)
    assert t2.store.load_requests() == []


def test_stored_outcomes_are_untrusted(tmp_path, url, clock):
    t = table(url, clock)
    rid = new_request_id()
    g = t.acquire(ALICE, ["m1"], MO, 60, request_id=rid)
    good = dict(t.store.load_requests())
    t.store.close()
    (record,) = good
    data = json.loads(good[record])
    with sqlite3.connect(tmp_path / "locks.sqlite") as db:  # rows another account wrote
        db.executemany("INSERT INTO requests(id, data) VALUES (?, ?)", [
            ("nonsense", good[record]),
            ("0" * 64, "]]garbage"),
            ("1" * 64, json.dumps({**data, "rpc": "delete-everything"})),
            ("2" * 64, json.dumps({**data, "time": "NaN"})),
            ("3" * 64, json.dumps({**data, "extra": 1})),
        ])
        # and the real one with its sealed key damaged
        data["key"] = "00" + data["key"][2:]
        db.execute("UPDATE requests SET data=? WHERE id=?", (json.dumps(data), record))
    t2 = table(url, clock)
    assert set(dict(t2.store.load_requests())) == {record}  # bad rows deleted
    held = state(t2)
    with raises_code(LockError, ErrorCode.STORE_UNAVAILABLE):
        t2.acquire(ALICE, ["m1"], MO, 60, request_id=rid)
    assert state(t2) == held
    assert t2.release(ALICE, key=g.key) == ("m1",)


def test_sealed_keys_keep_their_stored_form():
    """A key sealed by an earlier version (stored in a request row) still opens: the keystream
    (HMAC-SHA256 of the record id and block number under the request id) and the XOR are
    unchanged by decision 0170's faster code (a 50-character key spans two 32-byte blocks)."""
    key, rid, record = "Zx9-Q" * 10, "rid-AAAAAAAAAAAAAAAAAAAA", "ab" * 32
    stored = ("1e226c6b254e221796227a19cccd0982c35404d787e8dbaddf29bbdc0e24f9826cee4fc25527e720"
              "360f3e5c76cf1bbc2e5a")
    assert locktable.seal_key(key, rid, record) == stored
    assert locktable.open_key(stored, rid, record) == key
