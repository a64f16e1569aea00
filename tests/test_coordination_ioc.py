"""The real coordination IOC process: every rule of docs/locks.md, over the wire.

Clients: p4p in this process (account root), ``python -m p4p.client.cli`` under OS account
``nobody`` (a second identity), and pvapy (another PVA implementation).
"""

from __future__ import annotations

import statistics
import subprocess
import textwrap
import time

import pytest
from p4p import Type, Value
from p4p.client.thread import Context, RemoteError

from pvcoord.procs import PYTHON, client_conf, loopback_env, python_module, start_redis, wait_until
from pvcoord.rpc import current_locks
from pvdb import names as pvn
from pvdb.lockmodel import ErrorCode

from .codes import code_of, holder_of, raises_code
from .conftest import other_user_available
from .coordhelpers import (
    CLIENT_TIMEOUT,
    PREFIX,
    REPO,
    locks,
    pvcall_as,
    rpc,
    start_coordination,
)

pytestmark = pytest.mark.system

NOUSER = other_user_available()


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    """One coordination IOC (SQLite store) for the module, and its environment."""
    tmp = tmp_path_factory.mktemp("coord")
    env = loopback_env()
    proc = start_coordination(env, tmp)
    try:
        yield proc, env, tmp
    finally:
        proc.stop()


@pytest.fixture
def ctxt(ioc):
    proc, env, _ = ioc
    with Context("pva", conf=client_conf(env), useenv=False) as c:
        # start every test from an empty lock table
        for row in locks(c):
            rpc(c, pvn.COORD_FORCE_RELEASE, device=row[0], reason="test cleanup")
        assert locks(c) == []
        yield c
    assert proc.alive(), proc.output()


def test_help_lists_every_pv():
    out = subprocess.run(
        python_module("iocs.coordination", "--help"), capture_output=True, text=True,
        cwd=REPO, timeout=60,
    )
    assert out.returncode == 0
    for spec in pvn.COORDINATION_PVS:
        assert spec.suffix.replace("{device}", "<dev>") in out.stdout, spec.suffix


def test_acquire_grants_and_publishes(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60",
            reason="align")
    assert not isinstance(r, Exception), r
    assert r.granted and list(r.devices) == ["m1"] and len(r.key) >= 24
    assert locks(ctxt) == [("m1", "MANUAL_OPERATOR", 2, "root@127.0.0.1", "align")]
    assert state(ctxt, "m1") == "ManualOperator"
    assert ctxt.get(pvn.COORD_DEVICE_OWNER.name(PREFIX, "m1"),
                    timeout=CLIENT_TIMEOUT) == "root@127.0.0.1"
    rem = ctxt.get(pvn.COORD_DEVICE_REMAINING.name(PREFIX, "m1"), timeout=CLIENT_TIMEOUT)
    assert 50 < rem <= 60
    ts = ctxt.get(pvn.COORD_LOCKS.name(PREFIX), timeout=CLIENT_TIMEOUT).timeStamp.secondsPastEpoch
    assert abs(ts - time.time()) < 60  # posted with a real timestamp, not 1970


def test_remaining_counts_down_once_a_second(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR", timeout="60")
    assert not isinstance(r, Exception), r
    seen: list[tuple[float, float]] = []
    # the IOC's own time stamps of the posts (a loaded client must not make it flaky): about
    # once a second, and the value falls by the time between two posts (0.1 s resolution)
    sub = ctxt.monitor(pvn.COORD_DEVICE_REMAINING.name(PREFIX, "m2"),
                       lambda v: seen.append((float(v.timestamp), float(v))))
    try:
        wait_until(lambda: len(seen) >= 4, 10, "four Remaining updates")
    finally:
        sub.close()
    steps = [(t2 - t1, v1 - v2) for (t1, v1), (t2, v2) in zip(seen[1:], seen[2:], strict=False)]
    assert all(0.5 < dt < 2.0 and abs(dv - dt) < 0.3 for dt, dv in steps), seen
    assert 0.8 < statistics.median(dt for dt, _ in steps) < 1.2, seen
    assert 50 < seen[-1][1] < 60


def test_each_change_is_posted_as_its_rows_before_the_reply_and_the_table_coalesced(ctxt):
    """Coord:LockChanges has the change when the reply arrives; Coord:Locks follows, coalesced.

    A burst of changes is posted as that many LockChanges values with consecutive seq (each
    only the changed row) and at most 1 + elapsed / 50 ms tables (decision 0165).
    """
    changes_pv, table_pv = pvn.COORD_LOCK_CHANGES.name(PREFIX), pvn.COORD_LOCKS.name(PREFIX)
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60")
    assert not isinstance(r, Exception), r
    ch = ctxt.get(changes_pv, timeout=CLIENT_TIMEOUT)  # right after the reply: no waiting
    assert list(ch.value.device) == ["m1"] and list(ch.value.held) == [True]
    assert list(ch.value.owner) == ["root@127.0.0.1"]
    table = current_locks(ctxt, PREFIX, CLIENT_TIMEOUT)
    assert table["epoch"] == ch["epoch"] and table["seq"] >= ch["seq"]
    assert list(table.value.device) == ["m1"]
    seen_changes: list = []
    seen_tables: list = []
    s1 = ctxt.monitor(changes_pv, seen_changes.append, request="record[queueSize=1000]")
    s2 = ctxt.monitor(table_pv, seen_tables.append)
    try:
        wait_until(lambda: seen_changes and seen_tables, 10, "first monitor updates")
        first = seen_changes[-1]["seq"]
        n = 20
        t0 = time.monotonic()
        for i in range(n):
            rpc(ctxt, pvn.COORD_RELEASE if i % 2 == 0 else pvn.COORD_ACQUIRE, device="m1",
                **({} if i % 2 == 0 else {"type": "MANUAL_OPERATOR", "timeout": "60"}))
        elapsed = time.monotonic() - t0
        wait_until(lambda: seen_changes[-1]["seq"] == first + n, 10, "every change")
        wait_until(lambda: seen_tables[-1]["seq"] == first + n, 10, "the table to catch up")
        tables_after = len(seen_tables) - 1
    finally:
        s1.close()
        s2.close()
    seqs = [v["seq"] for v in seen_changes]
    assert seqs[-n:] == list(range(first + 1, first + n + 1))
    assert all(list(v.value.device) == ["m1"] for v in seen_changes[-n:])
    assert [bool(v.value.held[0]) for v in seen_changes[-n:]] == [i % 2 == 1 for i in range(n)]
    assert tables_after <= 1 + (elapsed + 0.1) / 0.05, (tables_after, elapsed)
    assert list(seen_tables[-1].value.device) == ["m1"]  # the last change acquired it


@pytest.mark.identity
@pytest.mark.skipif(NOUSER is not None, reason=str(NOUSER))
def test_second_identity_refused_then_preempted(ioc, ctxt):
    _, env, _ = ioc
    out = pvcall_as("nobody", env, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR",
                    timeout="60", reason="nobody's scan")
    assert out.returncode == 0, out.stderr + out.stdout
    assert locks(ctxt) == [("m2", "MANUAL_OPERATOR", 2, "nobody@127.0.0.1", "nobody's scan")]
    # root at equal priority is refused with the holder named
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR", timeout="60")
    assert isinstance(r, RemoteError)
    assert (code_of(str(r)), holder_of(str(r))) == (ErrorCode.HOLDER_CONFLICT, "nobody@127.0.0.1")
    assert "MANUAL_OPERATOR" in str(r) and "nobody's scan" in str(r)
    # MAINTENANCE preempts it
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MAINTENANCE", timeout="60",
            reason="vacuum")
    assert r.granted and "nobody@127.0.0.1" in r.preempted[0]
    assert locks(ctxt)[0][:4] == ("m2", "MAINTENANCE", 0, "root@127.0.0.1")
    # the preempted holder learns it on its next release
    out = pvcall_as("nobody", env, pvn.COORD_RELEASE, device="m2")
    assert out.returncode != 0
    assert "[preempted holder=root@127.0.0.1]" in out.stdout, out.stdout
    # nobody may not take MAINTENANCE, nor release root's lock, nor force-release
    out = pvcall_as("nobody", env, pvn.COORD_ACQUIRE, device="m3", type="MAINTENANCE")
    assert "[not-allowed]" in out.stdout, out.stdout
    out = pvcall_as("nobody", env, pvn.COORD_FORCE_RELEASE, device="m2")
    assert "[not-allowed]" in out.stdout, out.stdout
    out = pvcall_as("nobody", env, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR",
                    onBehalfOf="root")
    assert "[not-allowed]" in out.stdout, out.stdout
    assert [r[:4] for r in locks(ctxt)] == [("m2", "MAINTENANCE", 0, "root@127.0.0.1")]


def test_on_behalf_of_by_trusted_service(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR", timeout="60",
            onBehalfOf="alice", clientHost="webclient1")
    assert r.granted
    assert locks(ctxt)[0][3] == "alice@webclient1"
    # root itself is another holder now
    r2 = rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR", timeout="60")
    assert "held by alice@webclient1" in str(r2)
    # issue 11, finding 1: the holder is alice *at webclient1*; alice claimed from another host
    # is not that holder
    other = rpc(ctxt, pvn.COORD_RELEASE, device="m3", onBehalfOf="alice")
    assert isinstance(other, Exception) and "held by alice@webclient1" in str(other)
    assert rpc(ctxt, pvn.COORD_RELEASE, device="m3", onBehalfOf="alice",
               clientHost="webclient1").devices == ["m3"]
    # onBehalfOf may not name a privileged account (root, a service or emergency account)
    for user in ("root",):
        bad = rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR", timeout="60",
                  onBehalfOf=user)
        assert isinstance(bad, Exception) and "may not act on behalf of" in str(bad), user


def test_expiry_enforced_and_published_within_1s(ioc, ctxt):
    updates = []  # raw Values: (index, server timestamp)
    raw = Context("pva", conf=client_conf(ioc[1]), useenv=False, nt=False)
    sub = raw.monitor(
        pvn.COORD_DEVICE_STATE.name(PREFIX, "m4"),
        lambda v: updates.append((v["value.index"], v["timeStamp.secondsPastEpoch"]
                                  + v["timeStamp.nanoseconds"] * 1e-9)),
    )
    try:
        # the monitor's first update (Free) before the lock: else it may be the held state
        wait_until(lambda: updates, 10, "m4's first State update")
        r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m4", type="MANUAL_OPERATOR", timeout="1")
        wait_until(lambda: len(updates) >= 3 and updates[-1][0] == 0, 10, "m4 back to Free")
    finally:
        sub.close()
        raw.close()
    assert [u[0] for u in updates] == [0, 3, 0]  # Free, ManualOperator, Free
    freed = updates[-1][1]
    assert freed - r.expires < 1.0, (freed, r.expires)  # server-side post time
    assert locks(ctxt) == []
    # Coord:Events follows on the IOC's next tick, after the fsync of the expiry (State before)
    def expired_event() -> bool:
        ev = ctxt.get(pvn.COORD_EVENTS.name(PREFIX), timeout=CLIENT_TIMEOUT).value
        return ("expired", "m4") in list(zip(ev.action, ev.device, strict=True))

    wait_until(expired_event, 10, "the expired event of m4 in Coord:Events")
    err = rpc(ctxt, pvn.COORD_RENEW, key=r.key)
    assert isinstance(err, RemoteError) and "expired at" in str(err)


def test_renew_extends_lease(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="5")
    rn = rpc(ctxt, pvn.COORD_RENEW, key=r.key, timeout="120")
    assert list(rn.devices) == ["m1"] and rn.expires > r.expires + 100


def test_atomic_multi_device(ioc, ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR", timeout="60",
            onBehalfOf="bob")
    assert r.granted
    err = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1,m2,m3", type="MANUAL_OPERATOR", timeout="60")
    assert isinstance(err, RemoteError) and "m2 is held by bob" in str(err)
    assert [x[0] for x in locks(ctxt)] == ["m2"]
    ok = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1,m3", type="MANUAL_OPERATOR", timeout="60")
    assert sorted(ok.devices) == ["m1", "m3"]
    assert [x[0] for x in locks(ctxt)] == ["m1", "m2", "m3"]


def test_beamline_lock_covers_every_device(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="beamline", type="MANUAL_OPERATOR", timeout="60",
            onBehalfOf="bob")
    assert r.granted
    for d in ("m1", "det1", "shutter"):
        assert state(ctxt, d) == "ManualOperator"
        assert ctxt.get(pvn.COORD_DEVICE_OWNER.name(PREFIX, d), timeout=CLIENT_TIMEOUT) == (
            "bob@127.0.0.1")
    err = rpc(ctxt, pvn.COORD_ACQUIRE, device="det1", type="MANUAL_OPERATOR", timeout="60")
    assert "beamline is held by bob" in str(err)
    rpc(ctxt, pvn.COORD_RELEASE, key=r.key)
    assert state(ctxt, "det1") == "Free"


def test_key_never_published_or_logged(ioc, ctxt):
    proc, _, tmp = ioc
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60",
            reason="secret test")
    rpc(ctxt, pvn.COORD_RENEW, key=r.key)
    rpc(ctxt, pvn.COORD_RELEASE, key="wrong-" + r.key)
    r2 = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR", timeout="60")
    wait_until(lambda: "m2" in list(ctxt.get(pvn.COORD_EVENTS.name(PREFIX),
                                              timeout=CLIENT_TIMEOUT).value.device),
               CLIENT_TIMEOUT, "the acquire of m2 in Coord:Events")
    texts = []
    for spec in pvn.COORDINATION_PVS:
        if spec.kind == pvn.PVKind.RPC:
            continue
        names = [spec.name(PREFIX, d) for d in ("m1", "m2")] if spec.per_device else [
            spec.name(PREFIX)]
        for n in names:
            texts.append(str(ctxt.get(n, timeout=CLIENT_TIMEOUT)))
    texts.append(proc.output())
    for f in tmp.glob("locks.sqlite*"):
        texts.append(f.read_bytes().decode("latin-1"))
    blob = "\n".join(texts)
    assert "secret test" in blob  # we did look at the right things
    for key in (r.key, r2.key):
        assert key not in blob


def state(ctxt, device: str) -> str:
    """Label of ``Coord:<device>:State``."""
    return ctxt.get(pvn.COORD_DEVICE_STATE.name(PREFIX, device), timeout=CLIENT_TIMEOUT).choice


def _bad_request(ctxt, name: str) -> Value:
    t = Type([("query", ("S", None, [("device", "as")]))])
    return ctxt.rpc(name, t({"query": {"device": ["m1"]}}), timeout=CLIENT_TIMEOUT, throw=False)


BAD = [
    ({"device": "nosuch", "type": "MANUAL_OPERATOR"}, "unknown device 'nosuch'"),
    ({"device": "m1", "type": "BOSS"}, "unknown lock type 'BOSS'"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "timeout": "-5"}, "positive"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "timeout": "nan"}, "positive"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "timeout": "1e300"}, "maximum of 3600"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "timeout": "soon"}, "not a number"),
    ({"type": "MANUAL_OPERATOR"}, "no device given"),
    ({"device": "m1"}, "missing argument type"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "color": "red"}, "unknown argument(s) 'color'"),
    ({"device": "m1,,m2", "type": "MANUAL_OPERATOR"}, "empty entry"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "reason": "x" * 10_000}, "limit is 4096"),
    ({"device": "m" * 10_000, "type": "MANUAL_OPERATOR"}, "limit is 4096"),
    ({"device": "m1", "type": "MANUAL_OPERATOR", "reason": "x" * 1000}, "limit is 256"),
    ({"device": "beamline,m1", "type": "MANUAL_OPERATOR"}, "request it alone"),
]


@pytest.mark.parametrize(("kws", "expect"), BAD, ids=[b[1][:20] for b in BAD])
def test_bad_acquire_changes_nothing(ctxt, kws, expect):
    rpc(ctxt, pvn.COORD_ACQUIRE, device="m4", type="MANUAL_OPERATOR", timeout="60",
        onBehalfOf="bob")
    before = locks(ctxt)
    err = rpc(ctxt, pvn.COORD_ACQUIRE, **kws)
    assert isinstance(err, RemoteError), err
    code = ErrorCode.UNKNOWN_DEVICE if kws.get("device") == "nosuch" else ErrorCode.BAD_ARGUMENT
    assert code_of(str(err)) is code, err
    assert expect in str(err)  # names what was wrong
    assert locks(ctxt) == before


def test_bad_release_renew_and_malformed_request_change_nothing(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60",
            onBehalfOf="bob")
    before = locks(ctxt)
    bad, bob = ErrorCode.BAD_ARGUMENT, "bob@127.0.0.1"
    cases = [
        (pvn.COORD_RELEASE, {"key": "not-a-key"}, {ErrorCode.UNKNOWN_KEY}, ""),
        # bob holds m1; root's own lock on m1 may have been force-released by an earlier test's
        # cleanup, and then root is told that first
        (pvn.COORD_RELEASE, {"device": "m1"}, {ErrorCode.NOT_HOLDER, ErrorCode.FORCE_RELEASED},
         bob),
        (pvn.COORD_RELEASE, {}, {bad}, ""),
        (pvn.COORD_RELEASE, {"device": "m1", "key": r.key, "type": "x"}, {bad}, ""),
        (pvn.COORD_RENEW, {"key": r.key, "timeout": "-1"}, {bad}, ""),
        (pvn.COORD_RENEW, {"device": "shutter"}, {ErrorCode.NOT_LOCKED}, ""),
        (pvn.COORD_FORCE_RELEASE, {"device": "m3"}, {ErrorCode.NOT_LOCKED}, ""),
    ]
    for spec, kws, codes, holder in cases:
        err = rpc(ctxt, spec, **kws)
        assert isinstance(err, RemoteError), (spec.suffix, kws, err)
        assert code_of(str(err)) in codes, (spec.suffix, kws, err)
        assert holder_of(str(err)) == holder, (spec.suffix, kws, err)
    err = _bad_request(ctxt, pvn.COORD_ACQUIRE.name(PREFIX))
    assert isinstance(err, RemoteError) and code_of(str(err)) is bad, err
    with raises_code(RemoteError, bad):
        ctxt.put(pvn.COORD_ACQUIRE.name(PREFIX), "x", timeout=CLIENT_TIMEOUT)
    with pytest.raises(RemoteError):
        ctxt.put(pvn.COORD_LOCKS.name(PREFIX), {"value.device": ["m9"]}, timeout=CLIENT_TIMEOUT)
    assert locks(ctxt) == before


def test_pvapy_client_calls_the_same_rpcs(ioc, ctxt):
    """pvapy (EPICS base pvAccessCPP), another PVA implementation, as a subprocess."""
    _, env, _ = ioc
    code = textwrap.dedent(f"""
        import pvaccess as pva
        req = pva.PvObject({{'query': {{'device': pva.STRING, 'type': pva.STRING,
                                         'timeout': pva.STRING, 'reason': pva.STRING}}}})
        req['query.device'] = 'det1'
        req['query.type'] = 'MANUAL_OPERATOR'
        req['query.timeout'] = '60'
        req['query.reason'] = 'pvapy'
        res = pva.RpcClient({pvn.COORD_ACQUIRE.name(PREFIX)!r}).invoke(req)
        print('GRANTED', res['granted'], list(res['devices']))
        locks = pva.Channel({pvn.COORD_LOCKS.name(PREFIX)!r}).get()
        print('LOCKS', list(locks['value.device']), list(locks['value.reason']))
        try:
            pva.RpcClient({pvn.COORD_ACQUIRE.name(PREFIX)!r}).invoke(req)
        except Exception as e:
            print('REFUSED', e)
        rel = pva.PvObject({{'query': {{'device': pva.STRING}}}})
        rel['query.device'] = 'det1'
        released = pva.RpcClient({pvn.COORD_RELEASE.name(PREFIX)!r}).invoke(rel)
        print('RELEASED', list(released['devices']))
    """)
    out = subprocess.run([PYTHON, "-c", code], env=dict(env), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "GRANTED True ['det1']" in out.stdout
    assert "LOCKS ['det1'] ['pvapy']" in out.stdout
    assert "RELEASED ['det1']" in out.stdout
    assert locks(ctxt) == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_persistence_across_kill9(tmp_path, kind):
    env = loopback_env()
    redis = None
    if kind == "redis":
        redis, port = start_redis(data_dir=tmp_path / "redis")
        store = f"redis://127.0.0.1:{port}/0"
    else:
        store = f"sqlite:///{tmp_path}/locks.sqlite"
    try:
        proc = start_coordination(env, tmp_path, store=store)
        try:
            with Context("pva", conf=client_conf(env), useenv=False) as c:
                keep = rpc(c, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR",
                           timeout="600", reason="keep")
                short = rpc(c, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR",
                            timeout="1", reason="short")
                assert keep.granted and short.granted
            proc.kill9()
        finally:
            proc.stop()
        wait_until(lambda: time.time() > short.expires + 0.2, 10, "short lease over")
        proc2 = start_coordination(env, tmp_path, store=store, name="coordination2")
        try:
            with Context("pva", conf=client_conf(env), useenv=False) as c:
                assert [(x[0], x[4]) for x in locks(c)] == [("m1", "keep")]

                def dropped() -> list[str]:  # Coord:Events: posted by the first tick
                    ev = c.get(pvn.COORD_EVENTS.name(PREFIX), timeout=CLIENT_TIMEOUT).value
                    return [m for a, d, m in zip(ev.action, ev.device, ev.message, strict=True)
                            if a == "expired" and d == "m2"]

                assert "while the IOC was down" in wait_until(
                    dropped, 10, "m2's expiry while down in Coord:Events")[-1]
                # the key given before the crash still releases the lock
                assert list(rpc(c, pvn.COORD_RELEASE, key=keep.key).devices) == ["m1"]
        finally:
            proc2.stop()
    finally:
        if redis is not None:
            redis.stop()


def test_holder_rerequest_is_idempotent_and_lower_priority_refused(ctxt):
    r1 = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="30")
    v1 = current_locks(ctxt, PREFIX, CLIENT_TIMEOUT).value
    r2 = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="300")
    v2 = current_locks(ctxt, PREFIX, CLIENT_TIMEOUT).value
    assert r2.granted and r2.key != r1.key and r2.expires > r1.expires + 200
    assert list(v2.device) == ["m1"] and list(v2.acquired) == list(v1.acquired)
    # a weaker type (QUEUE_QUEUED) against another holder is refused, naming the holder
    assert rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR",
               onBehalfOf="bob").granted
    err = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="QUEUE_QUEUED")
    assert isinstance(err, RemoteError) and "m2 is held by bob@127.0.0.1" in str(err)
    assert "a QUEUE_QUEUED request cannot preempt it" in str(err)
    # both keys stay valid
    assert list(rpc(ctxt, pvn.COORD_RENEW, key=r1.key, timeout="60").devices) == ["m1"]
    assert list(rpc(ctxt, pvn.COORD_RELEASE, key=r2.key).devices) == ["m1"]


def test_force_release_by_policy_account_and_every_action_audited(ctxt):
    r = rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR", timeout="60",
            onBehalfOf="bob")
    assert rpc(ctxt, pvn.COORD_RENEW, key=r.key, timeout="60").devices == ["m3"]
    rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR")  # refused
    rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR", colour="red")  # bad arg
    rpc(ctxt, pvn.COORD_ACQUIRE, device="m3", type="MAINTENANCE", timeout="60")  # preempts bob
    fr = rpc(ctxt, pvn.COORD_FORCE_RELEASE, device="m3", reason="end of shift")
    assert list(fr.devices) == ["m3"] and locks(ctxt) == []
    rpc(ctxt, pvn.COORD_ACQUIRE, device="m4", type="MANUAL_OPERATOR", timeout="1")
    rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60")
    rpc(ctxt, pvn.COORD_RELEASE, device="m1")

    def audited():
        ev = ctxt.get(pvn.COORD_EVENTS.name(PREFIX), timeout=CLIENT_TIMEOUT).value
        rows = list(zip(ev.action, ev.device, ev.message, strict=True))[-12:]
        return rows if {a for a, _, _ in rows} >= {
            "acquired", "renewed", "refused", "preempted", "force-released", "expired",
            "released"} else None

    rows = wait_until(audited, 10, "every action in Coord:Events")
    assert any(a == "refused" and "unknown argument(s) 'colour'" in m for a, _, m in rows)
    assert any(a == "force-released" and "end of shift" in m for a, _, m in rows)
    assert any(a == "preempted" and d == "m3" for a, d, _ in rows)


def test_redis_store_down_refuses_changes_and_health_says_so(tmp_path):
    env = loopback_env()
    redis, port = start_redis(data_dir=tmp_path / "redis")
    proc = None
    try:
        proc = start_coordination(env, tmp_path, store=f"redis://127.0.0.1:{port}/0")
        # Health gets its own context: p4p may hand a context that has seen an NTTable later
        # scalar updates as raw Values (a p4p 4.3.0 quirk)
        with Context("pva", conf=client_conf(env), useenv=False) as c, \
                Context("pva", conf=client_conf(env), useenv=False) as h:
            health = pvn.COORD_HEALTH.name(PREFIX)
            wait_until(lambda: h.get(health, timeout=CLIENT_TIMEOUT) == "OK", 10, "health OK")
            assert rpc(c, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR").granted
            redis.stop()
            err = rpc(c, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR")
            assert isinstance(err, RemoteError)
            # a stopped Redis cannot say whether the transaction reached it (decision 0121)
            assert code_of(str(err)) in (ErrorCode.STORE_UNAVAILABLE, ErrorCode.OUTCOME_UNKNOWN)
            assert [x[0] for x in locks(c)] == ["m1"]  # not granted while this IOC runs
            wait_until(lambda: "store failing" in h.get(health, timeout=CLIENT_TIMEOUT), 10,
                       "health shows the store failure")
            redis, _ = start_redis(port=port, data_dir=tmp_path / "redis")
            wait_until(lambda: h.get(health, timeout=CLIENT_TIMEOUT) == "OK", 15,
                       "health OK again after redis returns")
            assert rpc(c, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR").granted
    finally:
        if proc is not None:
            proc.stop()
        redis.stop()
