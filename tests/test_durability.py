"""Durability, time, one authority and untrusted store rows (issue 12), without a network.

The lock table runs on a real SQLite (or Redis) store; clocks are injected so a wall-clock step
is a plain assignment.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading

import pytest

from iocs.coordination.locktable import Identity, LockError, LockTable, hash_key
from pvcoord.procs import start_redis
from pvcoord.store import (
    WAL_WORKING_PAGES,
    AuthorityError,
    RedisStore,
    SQLiteStore,
    StoreError,
    open_store,
)
from pvdb.lockmodel import ErrorCode, parse_error_text
from pvdb.models import EventAction, Lock, LockType
from pvdb.policy import parse_policy

from .codes import raises_code
from .fakeclock import FakeTime

POLICY = parse_policy(
    """
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
DEVICES = ["m1", "m2", "m3"]
T0 = 1_800_000_000.0


@pytest.fixture
def clocks() -> FakeTime:
    """A wall clock and a monotonic clock that tests move independently."""
    return FakeTime(wall=T0, mono=1000.0)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "locks.sqlite"


def table_on(path, clocks, devices=DEVICES, **kw) -> LockTable:
    return LockTable(POLICY, open_store(f"sqlite:///{path}"), devices=devices, clock=clocks.time,
                     monotonic=clocks.monotonic, **kw)


# --- time ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_wall_clock_step_neither_expires_nor_extends(path, clocks, step):
    t = table_on(path, clocks)
    r = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    clocks.advance(10)
    clocks.wall += step  # NTP step
    assert t.expire() == []  # a forward step does not expire it
    (lk,) = t.locks()
    assert lk.expires == pytest.approx(r.expires + step)  # wall-clock times follow the step
    assert t.remaining(lk) == pytest.approx(50)
    assert t.store.load_locks()[0].expires == pytest.approx(r.expires + step)  # rewritten
    clocks.advance(49)
    assert t.expire() == [] and len(t.locks()) == 1  # a backward step does not extend it
    clocks.advance(1.01)
    (ev,) = t.expire()
    assert ev.action == EventAction.EXPIRED and t.locks() == []
    with pytest.raises(LockError, match="expired at"):
        t.renew(ALICE, key=r.key)


def test_restart_takes_the_stored_wall_clock_expiry(path, clocks):
    """Documented restart behaviour: the stored wall-clock ``expires`` is the reference."""
    t = table_on(path, clocks)
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 20)
    t.store.close()
    clocks.wall += 30  # the IOC was down for 30 s
    clocks.mono = 5.0  # a new process (or a reboot): its monotonic clock tells nothing
    t2 = table_on(path, clocks)
    assert [lk.device for lk in t2.locks()] == ["m1"]
    assert t2.remaining(t2.locks()[0]) == pytest.approx(30)
    assert [(e.action, e.device) for e in t2.startup_events] == [(EventAction.EXPIRED, "m2")]


def test_a_backward_step_while_down_neither_lengthens_nor_drops_a_lease(path, clocks):
    """Decision 0185: the leases are counted from the store's newest event, not the stepped
    clock; the times are shifted into the clock's present."""
    t = table_on(path, clocks)
    old = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 300)
    for _ in range(24):  # an old lock (100 min), renewed: 300 s left
        clocks.advance(250)
        t.renew(ALICE, key=old.key, timeout=300)
    clocks.advance(100)
    young = t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60)  # the newest event
    t.store.close()
    clocks.wall -= 3600  # stepped back while the IOC was down
    clocks.mono = 5.0
    t2 = table_on(path, clocks)
    assert t2.load_problems == []  # the young lock is not "acquired in the future"
    left = {lk.device: t2.remaining(lk) for lk in t2.locks()}
    assert left == {"m1": pytest.approx(200), "m2": pytest.approx(60)}  # as at the last event
    (m1, m2) = t2.locks()
    assert m2.expires == pytest.approx(clocks.wall + 60)  # shifted into the clock's present
    assert {lk.device: lk.expires for lk in t2.store.load_locks()} == {
        "m1": pytest.approx(m1.expires), "m2": pytest.approx(m2.expires)}  # and rewritten
    assert young.expires - m2.expires == pytest.approx(3600)
    clocks.advance(60.5)
    assert [e.device for e in t2.expire()] == ["m2"]  # ends when its lease does, not 3600 s late


def _checkpoint(path, mode: str = "PASSIVE") -> int:
    """Checkpoint the store's WAL from another connection; return the frames it held."""
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[1]
    finally:
        db.close()


def test_a_store_with_the_earlier_locks_schema_keeps_working(path, clocks):
    """Stores made before decision 0170 keep their rowid ``locks`` table (and their events)."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("CREATE TABLE locks (device TEXT PRIMARY KEY, data TEXT NOT NULL);"
                     "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT "
                     "NULL, action TEXT NOT NULL, device TEXT NOT NULL, lock_type TEXT, actor TEXT "
                     "NOT NULL, holder TEXT NOT NULL, message TEXT NOT NULL);")
    db.commit()
    db.close()
    t = table_on(path, clocks)
    k = t.acquire(ALICE, ["m1", "m2"], LockType.MANUAL_OPERATOR, 60).key
    t.release(ALICE, ["m2"], k)
    t.durable()
    t.store.close()
    t2 = table_on(path, clocks)
    assert [lk.device for lk in t2.locks()] == ["m1"]
    t2.release(ALICE, key=k)
    assert t2.locks() == []
    t2.store.close()
    schema = sqlite3.connect(path).execute(
        "SELECT sql FROM sqlite_master WHERE name='locks'").fetchone()[0]
    assert "WITHOUT ROWID" not in schema  # the old table was kept, not rewritten


def test_a_lock_change_writes_one_page_of_the_locks_table(path, clocks):
    """New stores keep locks in one b-tree (no rowid): a renewal of a lock writes the locks
    page and the events page, nothing else (the rowid table also wrote its device index)."""
    t = table_on(path, clocks)
    k = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60).key
    _checkpoint(path, "TRUNCATE")  # an empty WAL
    for _ in range(10):
        t.renew(ALICE, key=k, timeout=60)
    assert _checkpoint(path) == 2 * 10
    t.store.close()


# --- notices across a restart (decision 0120) ----------------------------------------------------

ROOT = Identity("root", "10.0.0.9")


def _lose_locks_every_way(t: LockTable, clocks: FakeTime) -> dict[str, str]:
    """Release m1, let root preempt m2, let m3 expire: the keys each holder was given."""
    k1 = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60).key
    t.release(ALICE, key=k1)  # its reply is what a kill -9 may lose
    k2 = t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60).key
    t.acquire(ROOT, ["m2"], LockType.MAINTENANCE, 60)
    k3 = t.acquire(ALICE, ["m3"], LockType.MANUAL_OPERATOR, 5).key
    clocks.advance(6)
    assert [e.device for e in t.expire()] == ["m3"]
    return {"m1": k1, "m2": k2, "m3": k3}


def _told_the_same(t: LockTable, keys: dict[str, str]) -> None:
    """A retried release/renew with each key, or by device, gets the code of what happened."""
    with raises_code(LockError, ErrorCode.RELEASED, ALICE.holder):  # not unknown-key
        t.release(ALICE, key=keys["m1"])
    with raises_code(LockError, ErrorCode.RELEASED, ALICE.holder):
        t.release(ALICE, ["m1"])
    with raises_code(LockError, ErrorCode.PREEMPTED, ROOT.holder):
        t.renew(ALICE, key=keys["m2"], timeout=60)
    with raises_code(LockError, ErrorCode.PREEMPTED, ROOT.holder):
        t.release(ALICE, ["m2"])
    with raises_code(LockError, ErrorCode.EXPIRED):
        t.release(ALICE, key=keys["m3"])


def test_a_retried_release_after_a_restart_is_told_what_happened(path, clocks):
    """A PVA client re-sends an RPC whose reply the kill took: the answer is not unknown-key."""
    t = table_on(path, clocks)
    keys = _lose_locks_every_way(t, clocks)
    _told_the_same(t, keys)
    t.store.close()  # a restart: memory is gone, the store stays
    t2 = table_on(path, clocks)
    _told_the_same(t2, keys)
    # a new lock of the same holder makes its old news stale, in the store too
    t2.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    ids = {nid for nid, _ in t2.store.load_notices()}
    assert 'holder:["alice", "m1"]' not in ids and 'holder:["alice", "m3"]' in ids
    t2.store.close()
    t3 = table_on(path, clocks)
    assert t3.release(ALICE, ["m1"]) == ("m1",)
    with raises_code(LockError, ErrorCode.EXPIRED):
        t3.release(ALICE, ["m3"])


def test_stored_notices_are_bounded_like_memory_and_untrusted(path, clocks, monkeypatch):
    from iocs.coordination import locktable

    monkeypatch.setattr(locktable, "NOTICES_KEPT", 5)
    t = table_on(path, clocks)
    keys = []
    for _ in range(6):  # each release leaves two notices (its key, its holder and device)
        k = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60).key
        t.release(ALICE, key=k)
        keys.append(k)
        clocks.advance(1)
    stored = {nid for nid, _ in t.store.load_notices()}
    # the newest five: the holder's notice on m1 and the last four keys; the first two evicted
    # from memory and from the store
    assert stored == {'holder:["alice", "m1"]', *(f"key:{hash_key(k)}" for k in keys[2:])}
    t.store.close()
    with sqlite3.connect(path) as db:  # rows another account wrote into the store
        db.executemany("INSERT INTO notices(id, data) VALUES (?, ?)", [
            ("key:" + "0" * 64, json.dumps({"code": "holder-conflict", "message": "x",
                                           "holder": "", "time": T0})),
            ("nonsense", json.dumps({"code": "released", "message": "x", "holder": "",
                                     "time": T0})),
            ("key:" + "1" * 64, "]]garbage"),
        ])
    t2 = table_on(path, clocks)
    assert {nid for nid, _ in t2.store.load_notices()} == stored  # bad rows deleted
    with raises_code(LockError, ErrorCode.RELEASED, ALICE.holder):
        t2.release(ALICE, key=keys[-1])
    with raises_code(LockError, ErrorCode.UNKNOWN_KEY):
        t2.release(ALICE, key=keys[0])


@pytest.mark.system
def test_a_retried_release_after_a_restart_is_told_what_happened_redis(tmp_path, clocks):
    proc, port = start_redis(data_dir=tmp_path / "r")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        t = LockTable(POLICY, open_store(url, namespace="N:"), devices=DEVICES,
                      clock=clocks.time, monotonic=clocks.monotonic)
        keys = _lose_locks_every_way(t, clocks)
        t.store.close()
        t2 = LockTable(POLICY, open_store(url, namespace="N:"), devices=DEVICES,
                       clock=clocks.time, monotonic=clocks.monotonic)
        _told_the_same(t2, keys)
        t2.store.close()
    finally:
        proc.stop()


@pytest.mark.system
def test_redis_commit_whose_reply_is_lost_is_asked_or_unknown(tmp_path, clocks, monkeypatch):
    """A MULTI/EXEC reply lost with the connection: applied, not applied or unknown (no Redis)."""
    import redis

    from pvcoord.store import OutcomeUnknownError

    proc, port = start_redis(data_dir=tmp_path / "r")
    url = f"redis://127.0.0.1:{port}/0"
    real = redis.client.Pipeline.execute
    try:
        store = open_store(url, namespace="L:")
        t = LockTable(POLICY, store, devices=DEVICES, clock=clocks.time,
                      monotonic=clocks.monotonic)
        k = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60).key

        def applied_then_lost(self, *a, **kw):
            real(self, *a, **kw)
            raise redis.ConnectionError("Connection closed by server.")

        monkeypatch.setattr(redis.client.Pipeline, "execute", applied_then_lost)
        assert t.release(ALICE, key=k) == ("m1",)  # asked: it was applied, so it is a release
        assert store.load_locks() == [] and t.locks() == []

        def lost_before(self, *a, **kw):
            raise redis.ConnectionError("Connection closed by server.")

        monkeypatch.setattr(redis.client.Pipeline, "execute", lost_before)
        with raises_code(LockError, ErrorCode.STORE_UNAVAILABLE):  # asked: nothing changed
            t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60)
        monkeypatch.setattr(redis.client.Pipeline, "execute", real)
        t.check_store()
        k2 = t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60).key
        proc.stop()  # the real thing: Redis gone, nobody can say
        with pytest.raises(OutcomeUnknownError):
            store.commit([], [], [])
        with raises_code(LockError, ErrorCode.OUTCOME_UNKNOWN):
            t.release(ALICE, key=k2)
        assert [lk.device for lk in t.locks()] == ["m2"]  # memory unchanged
        store.close()
    finally:
        monkeypatch.setattr(redis.client.Pipeline, "execute", real)
        proc.stop()


# --- untrusted rows -----------------------------------------------------------------------------

def _lock(device="m1", lock_type="MANUAL_OPERATOR", owner="alice", expires=T0 + 60, **kw) -> dict:
    d = {"device": device, "lock_type": lock_type, "owner": owner, "host": "10.0.0.1",
         "actor": owner, "acquired": T0 - 5, "expires": expires, "reason": "",
         "plan_uid": "", "key_hashes": [hash_key("k")]}
    d.update(kw)
    return d


BAD_ROWS = {
    "m1": "{not json",
    "m2": json.dumps(_lock("m2", expires=T0 + 10 * 86400)),  # beyond the 3600 s maximum
    "zz": json.dumps(_lock("zz")),  # not a known device
    "m3": json.dumps(_lock("m3", lock_type="MAINTENANCE")),  # alice may not take MAINTENANCE
    "det1": json.dumps(_lock("m9")),  # row key is not its device
    "x y": json.dumps(_lock("x y")),  # not a device name
}
BAD_FIELDS = [
    {"key_hashes": ["not-a-digest"]}, {"expires": "Infinity"}, {"owner": "a\nb"},
    {"reason": "x" * 300}, {"lock_type": "BOSS"}, {"acquired": T0 + 1e6},
    {"reason": "a\u202eb"}, {"owner": "al\x7fice"}, {"host": "\x85h"},  # as a request's text
]


def _raw_rows(path, rows: dict[str, str]) -> None:
    SQLiteStore(path).close()  # schema
    with sqlite3.connect(path) as db:
        db.executemany("INSERT OR REPLACE INTO locks(device, data) VALUES (?, ?)", rows.items())


def test_bad_rows_are_reported_deleted_and_skipped(path, clocks):
    good = json.dumps(_lock("m1", reason="kept"))
    _raw_rows(path, {**BAD_ROWS, "m1": good})
    t = table_on(path, clocks, devices=[*DEVICES, "det1"])
    assert [(lk.device, lk.reason) for lk in t.locks()] == [("m1", "kept")]
    refused = {e.device: e.message for e in t.startup_events if e.action == EventAction.REFUSED}
    assert set(refused) == set(BAD_ROWS) - {"m1"}
    assert {parse_error_text(m).code for m in refused.values()} == {ErrorCode.BAD_STORED_ROW}
    assert "beyond the MANUAL_OPERATOR maximum" in refused["m2"]
    assert "unknown device" in refused["zz"]
    assert "may not take MAINTENANCE" in refused["m3"]
    assert "is not its device" in refused["det1"]
    assert len(t.load_problems) == len(refused)
    # deleted from the store, the events are in it: a restart reports nothing new
    t.store.close()
    t2 = table_on(path, clocks, devices=[*DEVICES, "det1"])
    assert t2.load_problems == [] and [lk.device for lk in t2.locks()] == ["m1"]
    assert sum(e.action == EventAction.REFUSED for e in t2.store.recent_events(50)) == 5


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=[next(iter(f)) for f in BAD_FIELDS])
def test_each_bad_field_is_rejected(path, clocks, fields):
    _raw_rows(path, {"m1": json.dumps(_lock(**fields)), "m2": json.dumps(_lock("m2"))})
    t = table_on(path, clocks)
    assert [lk.device for lk in t.locks()] == ["m2"]
    assert [e.device for e in t.startup_events] == ["m1"]


DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep: a RecursionError in json


def _count(path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_rows_that_are_not_text_overflow_or_nest_deeply_are_rejected_not_a_crash(path, clocks):
    """Rows another account wrote: bytes that are not UTF-8, a BLOB key, a number past float,
    JSON nested 100,000 deep, events of unknown actions. The start reports and deletes them."""
    kept = json.dumps(_lock("m1", reason="kept"))
    note = {"code": "released", "message": "x", "holder": "", "time": T0}
    SQLiteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO locks VALUES ('m1', ?)", (kept,))
        db.execute("INSERT INTO locks VALUES (CAST(X'6DFF' AS TEXT), ?)", (kept,))  # key not UTF-8
        db.execute("INSERT INTO locks VALUES (?, ?)", (b"m2", json.dumps(_lock("m2"))))  # BLOB key
        db.execute("INSERT INTO locks VALUES ('m3', CAST(X'7BFF7D' AS TEXT))")  # data not UTF-8
        db.executemany("INSERT INTO notices VALUES (?, ?)", [
            ("key:" + "2" * 64, json.dumps(note).replace(str(T0), "1" + "0" * 400)),  # overflow
            ("key:" + "3" * 64, DEEP),
            ('holder:["a", ' + DEEP + "]", json.dumps(note)),
        ])
        db.execute("INSERT INTO notices VALUES (CAST(X'6BFF' AS TEXT), ?)", (json.dumps(note),))
        db.execute("INSERT INTO requests VALUES (CAST(X'72FF' AS TEXT), '{}')")
        db.execute("INSERT INTO requests VALUES (?, ?)", ("4" * 64, DEEP))
        db.executemany("INSERT INTO events(time, action, device, lock_type, actor, holder, "
                       "message) VALUES (?, ?, ?, ?, ?, ?, ?)", [
            (T0, "acquired", "m1", "MANUAL_OPERATOR", "alice", "alice@h", "good"),
            (T0, "exploded", "m1", None, "", "", "unknown action"),
            ("abc", "acquired", "m1", None, "", "", "time is text"),
            (T0, "acquired", "m1", "BOSS", "", "", "unknown lock type"),
        ])
        db.execute("INSERT INTO events(time, action, device, lock_type, actor, holder, message)"
                   " VALUES (?, 'acquired', 'm1', NULL, '', '', CAST(X'FF' AS TEXT))", (T0,))
    t = table_on(path, clocks)
    assert [(lk.device, lk.reason) for lk in t.locks()] == [("m1", "kept")]
    refused = [e for e in t.startup_events if e.action == EventAction.REFUSED]
    assert sorted(e.device for e in refused) == ["?", "?", "m2", "m3", "m\ufffd"]
    assert t.rows_rejected == 3 + 4 + 2
    assert {parse_error_text(e.message).code for e in refused} == {ErrorCode.BAD_STORED_ROW}
    assert sorted(parse_error_text(e.message).message.split(" (")[0] for e in refused
                  if e.device == "?") == [
        "2 stored request outcome rows not valid", "4 stored notice rows not valid"]
    assert any("not UTF-8 text" in p for p in t.load_problems)
    assert [e.message for e in t.store.recent_events(50) if e.device == "m1"][:1] == ["good"]
    t.store.close()
    # every bad row is deleted (by its stored bytes): a restart reports nothing new
    assert (_count(path, "locks"), _count(path, "notices"), _count(path, "requests")) == (1, 0, 0)
    t2 = table_on(path, clocks)
    assert t2.load_problems == [] and t2.rows_rejected == 0
    assert [lk.device for lk in t2.locks()] == ["m1"]


@pytest.mark.system
def test_redis_rows_that_are_not_text_or_nest_deeply_are_rejected_and_deleted(tmp_path, clocks):
    import redis

    proc, port = start_redis(data_dir=tmp_path / "r")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        r.hset("pvcoord:N::locks", mapping={
            "m1": json.dumps(_lock("m1", reason="kept")), b"m\xff": json.dumps(_lock("m2"))})
        r.hset("pvcoord:N::notices", mapping={"key:" + "3" * 64: DEEP, b"k\xff": "{}"})
        r.hset("pvcoord:N::requests", mapping={"5" * 64: DEEP})
        r.rpush("pvcoord:N::events", "{bad", DEEP, "{}", json.dumps(
            [T0, "acquired", "m1", "MANUAL_OPERATOR", "alice", "alice@h", "good"]))
        t = LockTable(POLICY, open_store(url, namespace="N:"), devices=DEVICES,
                      clock=clocks.time, monotonic=clocks.monotonic)
        assert [(lk.device, lk.reason) for lk in t.locks()] == [("m1", "kept")]
        assert t.rows_rejected == 1 + 2 + 1
        assert [e.message for e in t.store.recent_events(50)][:1] == ["good"]
        assert r.hkeys("pvcoord:N::locks") == [b"m1"]  # the undecodable key deleted too
        assert r.hlen("pvcoord:N::notices") == 0 and r.hlen("pvcoord:N::requests") == 0
        assert t.store.prune_events(T0 - 1, 1000) == 3  # malformed heads pruned, not a crash
        t.store.close()
        r.close()
    finally:
        proc.stop()


def test_a_bad_blob_key_row_does_not_take_the_text_row_of_its_device_with_it(path, clocks):
    """TEXT 'm1' and BLOB x'6d31' are two rows: deleting the bad one by its bytes must not match
    the good one."""
    _raw_rows(path, {"m1": json.dumps(_lock("m1", reason="kept"))})
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO locks VALUES (?, 'junk')", (b"m1",))
        db.execute("INSERT INTO notices VALUES (?, 'junk')", (b"key:" + b"5" * 64,))
    t = table_on(path, clocks)
    assert [(lk.device, lk.reason) for lk in t.locks()] == [("m1", "kept")]
    assert t.rows_rejected == 2
    t.store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT typeof(device), count(*) FROM locks").fetchall() == [("text", 1)]
        assert db.execute("SELECT count(*) FROM notices").fetchone()[0] == 0
    assert [lk.reason for lk in table_on(path, clocks).locks()] == ["kept"]


def test_a_step_while_running_then_a_restart_keeps_the_leases(path, clocks):
    """The step while running is an event at the new clock: the restart does not take the
    events before it as a step while down (decision 0185)."""
    t = table_on(path, clocks)
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 600)
    clocks.advance(10)
    clocks.wall -= 3600  # NTP steps back while the IOC runs
    assert t.expire() == []  # followed: shifted, with a clock-step event
    assert [e.action for e in t.store.recent_events(1)] == [EventAction.CLOCK_STEP]
    t.store.close()
    clocks.advance(5)
    clocks.mono = 5.0
    t2 = table_on(path, clocks)
    assert [t2.remaining(lk) for lk in t2.locks()] == [pytest.approx(585)]
    assert t2.startup_events == []


def test_two_restarts_after_a_step_while_down_shift_the_leases_once(path, clocks):
    t = table_on(path, clocks)
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 600)
    t.store.close()
    clocks.wall -= 1800
    clocks.mono = 5.0
    t2 = table_on(path, clocks)
    assert [e.action for e in t2.startup_events] == [EventAction.CLOCK_STEP]
    t2.store.close()
    clocks.advance(2)
    clocks.mono = 50.0
    t3 = table_on(path, clocks)  # nothing else written in between: the step event is the newest
    assert [t3.remaining(lk) for lk in t3.locks()] == [pytest.approx(598)]
    assert t3.startup_events == []


def test_a_lease_ends_in_memory_while_the_store_cannot_be_made_durable(path, clocks,
                                                                        monkeypatch):
    """An expiry waits for nobody: the guard and the bridges follow memory. The store gets the
    deletion and the event when it answers again."""
    t = table_on(path, clocks)
    t.store.claim_authority("test")
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 2)
    t.durable()  # its fsync done before the disk fails (else the fsync thread may meet EIO)
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(LockError):
        t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60)
        t.durable()
    restore = SQLiteStore._restore
    monkeypatch.setattr(SQLiteStore, "_restore", lambda self: (_ for _ in ()).throw(
        StoreError("checkpoint failed")))
    monkeypatch.setattr(os, "fsync", real)
    clocks.advance(10)
    assert [e.device for e in t.expire()] == []  # not stored yet ...
    assert t.effective("m1") is None and "m1" not in {lk.device for lk in t.locks()}  # ... gone
    monkeypatch.setattr(SQLiteStore, "_restore", restore)
    t.check_store()
    assert t.store_error is None
    assert "m1" not in {lk.device for lk in t.store.load_locks()}
    assert [e.device for e in t.store.recent_events(5) if e.action == EventAction.EXPIRED] == [
        "m1"]


def test_a_bad_notice_row_does_not_hide_a_step_while_down(path, clocks):
    t = table_on(path, clocks)
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    t.store.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO notices VALUES ('garbage', '{}')")  # rejected at the next start
    clocks.wall -= 3600
    clocks.mono = 5.0
    t2 = table_on(path, clocks)
    assert [lk.device for lk in t2.locks()] == ["m1"] and t2.rows_rejected == 1


def test_a_utf16_database_is_refused(path):
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA encoding='UTF-16le'")
        db.execute("CREATE TABLE t (a)")
    with pytest.raises(StoreError, match="encoding is UTF-16le, not UTF-8"):
        SQLiteStore(path)


def test_a_lock_granted_under_a_host_bound_policy_survives_a_restart(path, clocks):
    policy = parse_policy('[lock_types.MANUAL_OPERATOR]\nallow = ["alice@10.0.0.1"]\n'
                          "default_lease = 300\nmax_lease = 3600\n")
    t = LockTable(policy, open_store(f"sqlite:///{path}"), devices=DEVICES, clock=clocks.time,
                  monotonic=clocks.monotonic)
    assert t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60).granted
    t.store.close()
    t2 = LockTable(policy, open_store(f"sqlite:///{path}"), devices=DEVICES, clock=clocks.time,
                   monotonic=clocks.monotonic)
    assert [lk.device for lk in t2.locks()] == ["m1"] and t2.load_problems == []


def test_rows_on_unknown_devices_are_rejected_when_the_registry_answers(path, clocks):
    _raw_rows(path, {"m1": json.dumps(_lock("m1")), "gone": json.dumps(_lock("gone"))})
    seen = []
    t = table_on(path, clocks, devices=None, listener=lambda d, e: seen.append((d, e)))
    assert {lk.device for lk in t.locks()} == {"m1", "gone"}  # not judged yet
    t.set_devices(DEVICES)
    assert [lk.device for lk in t.locks()] == ["m1"]
    assert seen[-1][0] == {"gone"} and "unknown device" in seen[-1][1][0].message
    assert t.load_problems and "gone" in t.load_problems[0]


# --- durability: group commit -------------------------------------------------------------------

def test_group_commit_every_commit_durable_with_fewer_fsyncs(path, monkeypatch):
    store = SQLiteStore(path)
    calls = []
    real = os.fsync

    def counting_fsync(fd):  # the real fsync, counted
        calls.append(store._written)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    n_threads, per_thread = 8, 40
    errors = []

    def worker(i):
        try:
            for j in range(per_thread):
                now = T0 + j
                token = store.commit([Lock(device=f"d{i}", lock_type=LockType.MANUAL_OPERATOR,
                                           owner="a", host="h", actor="a", acquired=now,
                                           expires=now + 60)], [], [])
                store.durable(token)
                assert store._synced >= token
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    monkeypatch.undo()
    assert errors == []
    total = n_threads * per_thread
    print(f"{total} commits, {len(calls)} fsyncs")
    assert 0 < len(calls) < total  # requests in flight shared fsyncs
    assert store._synced == store._written == total
    store.close()


def _wal_size(path) -> int:
    return os.path.getsize(f"{path}-wal")


def _held(device: str, now: float) -> Lock:
    return Lock(device=device, lock_type=LockType.MANUAL_OPERATOR, owner="a", host="h",
                actor="a", acquired=now, expires=now + 60)


def test_the_wal_is_written_to_its_working_size_at_open_and_then_overwritten(path):
    """A fsync'ing store writes its WAL to WAL_WORKING_PAGES frames when it opens, so commits
    overwrite the file in place (no growth, no journal commit per fsync) across checkpoints."""
    store = SQLiteStore(path)
    working = 32 + WAL_WORKING_PAGES * (24 + 4096)
    assert _wal_size(path) < working  # not before it is the store's one writer
    store.claim_authority("test")
    size = _wal_size(path)
    assert size >= working
    for i in range(1500):  # more than the 1,000 pages after which SQLite checkpoints
        store.durable(store.commit([_held(f"d{i % 10}", T0 + i)], [], []))
    assert _wal_size(path) == size  # overwritten in place, never grown
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    assert "wal_scratch" not in tables  # the scratch table is gone
    assert len(store.load_locks()) == 10
    store.close()
    again = SQLiteStore(path)  # SQLite removed the WAL at close: written again
    again.claim_authority("test")
    assert _wal_size(path) >= working
    assert len(again.load_locks()) == 10
    again.close()


def test_a_scratch_table_left_by_a_kill_between_its_transactions_goes_at_the_next_claim(path):
    store = SQLiteStore(path)
    store.claim_authority("test")
    with store._db:  # what a kill -9 between the preallocation's two transactions leaves
        store._db.execute("CREATE TABLE wal_scratch (b BLOB)")
    os.close(store._authority_fd)  # the process is gone: its lock with it
    store._authority_fd = None
    again = SQLiteStore(path)  # its WAL has the working size: the preallocation is skipped ...
    again.claim_authority("test")
    tables = {r[0] for r in again._db.execute("SELECT name FROM sqlite_master")}
    assert "wal_scratch" not in tables  # ... and the scratch table is dropped anyway
    again.close()
    store.close()


def test_a_store_named_by_a_symlink_fsyncs_and_locks_the_real_files(tmp_path):
    real = tmp_path / "real.sqlite"
    link = tmp_path / "link.sqlite"
    link.symlink_to(real)
    (tmp_path / "link.sqlite-wal").write_bytes(b"")  # a stale WAL under the link's name
    store = SQLiteStore(link)
    store.claim_authority("first")
    store.durable(store.commit([_held("m1", T0)], [], []))
    assert os.fstat(store._wal_fd).st_ino == os.stat(tmp_path / "real.sqlite-wal").st_ino
    with pytest.raises(AuthorityError, match="first"):  # the real name is the same store
        SQLiteStore(real).claim_authority("second")
    store.close()


def test_a_store_with_two_hard_links_is_refused(tmp_path):
    SQLiteStore(tmp_path / "a.sqlite").close()
    os.link(tmp_path / "a.sqlite", tmp_path / "b.sqlite")
    with pytest.raises(StoreError, match="2 hard links"):
        SQLiteStore(tmp_path / "b.sqlite")
    reader = SQLiteStore(tmp_path / "a.sqlite", readonly=True)  # readers may
    assert reader.load_locks() == []
    reader.close()


def test_a_store_without_fsync_does_not_preallocate_its_wal(path):
    store = open_store(f"sqlite:///{path}?sync=normal")
    store.claim_authority("test")
    assert _wal_size(path) < 32 + WAL_WORKING_PAGES * (24 + 4096)
    store.close()


def test_sync_normal_does_no_fsync(path, monkeypatch):
    store = open_store(f"sqlite:///{path}?sync=normal")
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync with sync=normal"))
    store.durable(store.commit([], [], []))
    monkeypatch.undo()
    store.close()
    assert open_store(f"sqlite:///{path}").sync == "full"  # the default


def test_a_failed_fsync_stays_failed_for_the_commits_it_covered(path, monkeypatch):
    """After a failed fsync Linux may drop the dirty pages: a later good fsync must not make
    the commits the failed one covered count as durable (the fsync thread never retries them)."""
    store = SQLiteStore(path)
    real = os.fsync

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    t1 = store.commit([], [], [])
    with pytest.raises(StoreError, match="cannot flush SQLite store .*Input/output error"):
        store.durable(t1)
    monkeypatch.setattr(os, "fsync", real)
    t2 = store.commit([], [], [])
    store.durable(t2)  # a later commit is flushed by a later fsync
    with pytest.raises(StoreError, match="Input/output error"):
        store.durable(t1)  # still failed
    store.close()


def test_after_a_failed_fsync_later_commits_wait_for_a_checkpoint(path, monkeypatch):
    """A WAL frame's checksum chains over the frames before it: frames lost with a failed fsync
    take every later commit with them at recovery. So a later commit is durable only once a
    checkpoint has copied the WAL into the database file and synced it."""
    store = SQLiteStore(path)
    store.claim_authority("test")
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(StoreError, match="EIO"):
        store.durable(store.commit([_held("m1", T0)], [], []))
    monkeypatch.setattr(os, "fsync", real)
    t2 = store.commit([_held("m2", T0)], [], [])
    restore = SQLiteStore._restore

    def checkpoint_fails(self):
        raise StoreError("checkpoint of the store failed: disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_restore", checkpoint_fails)
    with pytest.raises(StoreError, match="an earlier fsync failed .*not durable until"):
        store.durable(t2)  # a good fsync of the WAL is not enough
    monkeypatch.setattr(SQLiteStore, "_restore", restore)
    store.durable(t2)  # the checkpoint: the database file itself has both locks, synced
    copy = path.with_name("main-only.sqlite")
    copy.write_bytes(path.read_bytes())  # the database file alone, without its WAL
    reader = SQLiteStore(copy, readonly=True)
    assert {lk.device for lk in reader.load_locks()} == {"m1", "m2"}
    reader.close()
    store.durable(store.commit([_held("m3", T0)], [], []))  # and commits are durable again
    assert _wal_size(path) >= 32 + WAL_WORKING_PAGES * (24 + 4096)  # the WAL preallocated again
    store.close()


def test_the_fsync_thread_ends_with_the_store(path):
    def fsync_threads():
        return [th for th in threading.enumerate() if th.name == "pvcoord-store-fsync"]

    before = len(fsync_threads())
    store = SQLiteStore(path)
    store.durable(store.commit([], [], []))
    assert len(fsync_threads()) == before + 1  # started by the first commit
    store.close()
    assert len(fsync_threads()) == before


def test_fsync_failure_is_an_error_naming_the_store(path, clocks, monkeypatch):
    t = table_on(path, clocks)

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with pytest.raises(LockError, match="could not flush the change to disk") as e:
        t.durable()
    assert e.value.audited
    assert "Input/output error" in (t.store_error or "")
    monkeypatch.undo()  # the disk works again
    t.store.claim_authority("test")  # (table_on's store has no fsync fd before its claim)
    t.check_store()  # a new commit made durable (after the store's checkpoint): cleared ...
    assert t.store_error is None
    t.flush()  # ... and the tick's flush does not set it again (it waited on the failed one)
    assert t.store_error is None
    assert t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60).granted
    t.durable()


# --- one authority ------------------------------------------------------------------------------

def test_second_writer_of_a_sqlite_store_is_refused_naming_the_first(path):
    a = SQLiteStore(path)
    a.claim_authority("pid 111 on hostA for BL01: since 2026-01-01T00:00:00Z")
    b = SQLiteStore(path)
    version = a._db.execute("PRAGMA data_version").fetchone()[0]
    with pytest.raises(AuthorityError, match="pid 111 on hostA for BL01:"):
        b.claim_authority("pid 222 on hostB for BL01: since now")
    # the refused writer wrote nothing (no WAL preallocation into the first one's store)
    assert a._db.execute("PRAGMA data_version").fetchone()[0] == version
    a.close()
    b.claim_authority("pid 222 on hostB for BL01: since now")  # free once the first is gone
    b.close()


@pytest.mark.system
def test_redis_durability_checked_and_authority_kept(tmp_path):
    from pvcoord.procs import ManagedProcess, free_port, redis_server_path, wait_until

    port = free_port()
    proc = ManagedProcess("redis-everysec", [
        redis_server_path(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""], os.environ,
        log_dir=tmp_path)
    try:
        import redis

        r = redis.Redis(port=port)
        wait_until(lambda: _ping(r), 10, "redis")
        url = f"redis://127.0.0.1:{port}/0"
        with pytest.raises(StoreError, match="appendfsync is 'everysec', not 'always'"):
            open_store(url, namespace="T:")
        s = open_store(url, namespace="T:", allow_nondurable=True)
        assert "everysec" in (s.durability_warning or "")
        s.close()
        r.config_set("appendfsync", "always")
        s1 = open_store(url, namespace="T:")
        s1.claim_authority(f"pid {os.getpid()} on thishost for T: since now")
        s2 = RedisStore(url, namespace="T:")
        with pytest.raises(AuthorityError, match=f"pid {os.getpid()} on thishost"):
            s2.claim_authority("pid 1 on other for T: since now")
        s1.keep_authority()
        s1.close()  # releases the claim
        s2.claim_authority("pid 1 on other for T: since now")
        # a stale claim of a dead process on this host is taken over at once
        import socket

        r.set("pvcoord:U::authority", f"pid 999999 on {socket.gethostname()} for U: since x")
        s3 = RedisStore(url, namespace="U:")
        s3.claim_authority("pid 2 on here for U: since now")
        # rows that do not parse are reported, not a crash
        r.hset("pvcoord:U::locks", mapping={"m1": b"\xff\xfe", "m2": json.dumps(_lock("m2"))})
        good, bad = s3.load_rows()
        assert [lk.device for lk in good] == ["m2"], bad
        assert [b.key for b in bad] == ["m1"]
        s2.close()
        s3.close()
    finally:
        proc.stop()


def _ping(r) -> bool:
    import redis

    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


def test_start_redis_is_durable(tmp_path):
    """The harness's redis (tests, benchmarks) passes the durability check."""
    proc, port = start_redis(data_dir=tmp_path / "r")
    try:
        s = open_store(f"redis://127.0.0.1:{port}/0")
        assert s.durability_warning is None
        s.close()
    finally:
        proc.stop()


test_start_redis_is_durable = pytest.mark.system(test_start_redis_is_durable)


@pytest.mark.system
def test_disk_full_refuses_changes_and_recovers(tmp_path, clocks):
    """A small tmpfs filled up: each change is refused with nothing changed, then works again."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        t = table_on(small / "locks.sqlite", clocks)
        t.store.claim_authority("test")
        # too little free space to preallocate the WAL (4.5 MB): skipped, the store works
        assert _wal_size(small / "locks.sqlite") < 32 + WAL_WORKING_PAGES * (24 + 4096)
        first = t.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
        t.durable()
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        refused = None
        for i in range(2000):  # audit rows and WAL frames use the last free pages
            before = {lk.device: lk for lk in t.locks()}
            try:
                t.renew(ALICE, key=first.key, timeout=60)
                t.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60, reason="r" * 200)
                t.release(ALICE, ["m2"])
            except LockError as e:
                refused = (i, str(e))
                break
        assert refused is not None, "the disk never filled up"
        print("disk full after", refused[0], "rounds:", refused[1])
        assert "the lock store failed, nothing changed" in refused[1]
        assert "full" in refused[1]
        after = {lk.device: lk for lk in t.locks()}
        assert after == before  # nothing half-applied
        (small / "filler").unlink()
        t.check_store()
        assert t.store_error is None
        assert t.acquire(ALICE, ["m3"], LockType.MANUAL_OPERATOR, 60).granted
        t.store.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# --- incremental Coord:Locks --------------------------------------------------------------------

def test_incremental_lock_table_equals_a_full_rebuild(path, clocks):
    """300 random changes: the row-by-row Coord:Locks always equals a table rebuilt from scratch."""
    import random

    from iocs.coordination.ioc import CoordinationIOC
    from pvdb import names as pvn

    devices = [f"d{i}" for i in range(40)]
    t = table_on(path, clocks, devices=devices)
    ioc = CoordinationIOC("TINC:", t)
    rnd = random.Random(7)
    people = [Identity(n, "h") for n in ("ann", "ben", "cat")]
    keys: list[tuple[Identity, str]] = []
    try:
        for _ in range(300):
            who = rnd.choice(people)
            op = rnd.random()
            try:
                if op < 0.45:
                    devs = rnd.sample(devices, rnd.randrange(1, 6))
                    if rnd.random() < 0.03:
                        devs = ["beamline"]
                    lt = rnd.choice([LockType.MANUAL_OPERATOR, LockType.MANUAL_OPERATOR,
                                     LockType.MAINTENANCE])
                    r = t.acquire(who if lt != LockType.MAINTENANCE else Identity("root", "h"),
                                  devs, lt, rnd.choice([1, 30, 600]))
                    keys.append((who, r.key))
                elif op < 0.75 and keys:
                    ident, key = keys.pop(rnd.randrange(len(keys)))
                    t.release(ident, key=key)
                elif op < 0.9 and keys:
                    ident, key = rnd.choice(keys)
                    t.renew(ident, key=key, timeout=rnd.choice([5, 60]))
                else:
                    clocks.advance(rnd.choice([0.5, 2, 40]))
                    t.expire()
            except LockError:
                pass
            ioc.wait_published()
            cur = ioc.pv_locks.current()
            want = [(lk.device, lk.lock_type.value, lk.priority, lk.holder, lk.acquired,
                     lk.expires, lk.reason, lk.plan_uid) for lk in t.locks()]
            cols = [cur[f"value.{c}"] for c, _ in pvn.LOCKS_COLUMNS]
            got = list(zip(*([] if c is None else list(c) for c in cols), strict=True))
            assert got == want
            assert int(ioc.pv_lock_count.current()) == len(want)
    finally:
        ioc.close()


def test_every_lock_a_request_can_make_survives_validation_on_reload(path, clocks):
    """Validation rejects nothing that acquire accepts (PVA accounts are claimed freely)."""
    t = table_on(path, clocks)
    odd = Identity("Jöhn Smith", "[fe80::1%eth0]")
    t.acquire(odd, ["m1"], LockType.MANUAL_OPERATOR, 3600, reason="x" * 256, plan_uid="p" * 128)
    t.acquire(Identity("root", "h"), ["m2"], LockType.MAINTENANCE, 3600)
    t.store.close()
    t2 = table_on(path, clocks)
    assert t2.load_problems == []
    assert [(lk.device, lk.owner) for lk in t2.locks()] == [("m1", "Jöhn Smith"), ("m2", "root")]


def test_the_default_store_is_in_the_working_directory(tmp_path, monkeypatch):
    from iocs.coordination.__main__ import default_store

    monkeypatch.chdir(tmp_path)
    path = default_store("BL01:ES2:")
    assert path == str(tmp_path / "pvcoord-BL01_ES2.sqlite")  # not /pvcoord-BL01_ES2.sqlite
    store = open_store(path)
    assert store.path == tmp_path / "pvcoord-BL01_ES2.sqlite"
    store.close()


@pytest.mark.parametrize(("schema", "why"), [
    ("CREATE TABLE locks (device TEXT, data TEXT)", "primary key is missing"),
    ("CREATE TABLE x (a); CREATE VIEW locks AS SELECT a AS device, a AS data FROM x",
     "locks is a view"),
    ("CREATE TABLE locks (device TEXT PRIMARY KEY)", "has no column data"),
])
def test_a_database_of_another_shape_is_refused_not_half_used(path, schema, why):
    """``CREATE TABLE IF NOT EXISTS`` kept any table named locks: one without a primary key held
    two rows of m1 (one won at load, silently), a view failed every change."""
    with sqlite3.connect(path) as db:
        db.executescript(schema)
    with pytest.raises(StoreError, match=f"not a pvcoord store of this version: .*{why}"):
        SQLiteStore(path)
