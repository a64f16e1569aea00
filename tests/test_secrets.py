"""Finding 5 of issue 11: no password or key in any PV, event, log line, error or store file."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from iocs.coordination.locktable import Identity, LockError, LockTable
from pvcoord.procs import free_port
from pvcoord.store import SQLiteStore, StoreError, open_store
from pvdb.models import EventAction, LockType
from pvdb.policy import parse_policy
from pvdb.redact import RedactingFilter, looks_like_key, redact, redact_url, register_secret

PASSWORD = "s3cr3t-Pw0rd"
ALICE = Identity("alice", "10.0.0.1")
POLICY = parse_policy("")


def test_redact_helper():
    assert redact_url(f"redis://:{PASSWORD}@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    text = f"cannot connect to redis://app:{PASSWORD}@h:1/0 (and rediss://{PASSWORD}@h2)"
    out = redact(text)
    assert PASSWORD not in out and "redis://app:***@h:1/0" in out and "rediss://***@h2" in out
    assert PASSWORD not in redact(f"redis-server --requirepass {PASSWORD}")
    assert PASSWORD not in redact(f"password={PASSWORD}") + redact(f"requirepass {PASSWORD}")
    for plain in ("puts pass the guard", "a bypass", "m1 passed"):
        assert redact(plain) == plain  # ordinary words are left alone
    register_secret("Other-Secret-Value")
    assert redact("got Other-Secret-Value back") == "got *** back"
    assert looks_like_key("A" * 32) and not looks_like_key("m1") and not looks_like_key("A" * 31)


def test_log_filter_redacts_message_args_and_traceback():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    h = Keep()
    h.addFilter(RedactingFilter())
    lg = logging.getLogger("test.secrets.filter")
    lg.addHandler(h)
    lg.propagate = False
    try:
        lg.warning("store %s failed", f"redis://:{PASSWORD}@127.0.0.1:1/0")
        try:
            raise RuntimeError(f"redis://u:{PASSWORD}@h:2/0 refused")
        except RuntimeError:
            lg.exception("boom")
    finally:
        lg.removeHandler(h)
    assert len(records) == 2
    assert all(PASSWORD not in r for r in records), records


def test_redis_store_errors_have_no_password():
    """The hole: StoreError (shown in Coord:Health, RPC errors and logs) carried the URL."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(StoreError) as e:
        open_store(url)
    assert PASSWORD not in str(e.value) and "***" in str(e.value)


def test_sqlite_store_is_private(tmp_path):
    os.umask(0o022)
    path = tmp_path / "new" / "locks.sqlite"
    s = SQLiteStore(path)
    s.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # a store file left world-readable is narrowed when the IOC opens it
    path.chmod(0o644)
    open_store(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the queue service account's group may read it when the URL says so (the demo)
    g = tmp_path / "g.sqlite"
    s = open_store(f"sqlite:///{g}?mode=0640")
    s.commit([], [], [])
    for f in tmp_path.glob("g.sqlite*"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o007 == 0, f
    s.close()
    with pytest.raises(StoreError):
        open_store(f"sqlite:///{g}?mode=0644")


@pytest.fixture
def table(tmp_path) -> LockTable:
    return LockTable(POLICY, open_store(f"sqlite:///{tmp_path}/locks.sqlite"),
                     devices=["m1", "m2"])


@pytest.mark.parametrize("verb", ["release", "renew"])
def test_key_where_a_device_belongs_is_refused_and_not_recorded(table, tmp_path, verb):
    """The hole: ``pvcoord release <KEY>`` published the key as a device name in Coord:Events."""
    r = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    seen: list = []
    table.listener = lambda devs, evs: seen.extend(evs)
    with pytest.raises(LockError) as e:
        getattr(table, verb)(ALICE, [r.key])
    assert r.key not in str(e.value)
    refusals = [ev for ev in seen if ev.action is EventAction.REFUSED]
    assert refusals, "the refusal is audited"
    for ev in refusals:
        assert r.key not in ev.line() and ev.device == "***"
    files = "\n".join(f.read_bytes().decode("latin-1") for f in tmp_path.glob("locks.sqlite*"))
    assert r.key not in files
    assert [lk.device for lk in table.locks()] == ["m1"]  # nothing changed


def test_key_only_for_its_own_locks_and_dead_after_release(table):
    a = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    b = table.acquire(ALICE, ["m2"], LockType.MANUAL_OPERATOR, 60)
    with pytest.raises(LockError):
        table.renew(ALICE, ["m2"], key=a.key)  # a's key does not hold m2
    assert table.renew(ALICE, key=a.key, timeout=30)[0] == ("m1",)
    assert table.release(ALICE, key=a.key) == ("m1",)
    for verb in (table.renew, table.release):
        with pytest.raises(LockError):
            verb(ALICE, key=a.key)
    again = table.acquire(ALICE, ["m1"], LockType.MANUAL_OPERATOR, 60)
    with pytest.raises(LockError):
        table.renew(ALICE, key=a.key)  # the released key does not come back with a new grant
    assert table.release(ALICE, key=b.key) == ("m2",) and again.key


@pytest.mark.system
def test_redis_password_never_shown_by_the_coordination_ioc(env, tmp_path):
    """The hole: the Redis store password showed in Coord:Health, RPC errors and the log."""
    from p4p.client.thread import Context

    from pvcoord.procs import (
        ManagedProcess,
        python_module,
        server_env,
        start_redis,
        wait_for_pv,
        wait_until,
    )
    from pvdb import names as pvn

    from .coordhelpers import CLIENT_TIMEOUT, PREFIX, REPO, rpc
    from .test_demo_beamline import cmdlines

    redis, port = start_redis(data_dir=tmp_path / "redis", password=PASSWORD)
    proc = None
    try:
        # the password only in the environment ($PVCOORD_STORE), never on the command line
        ioc_env = {**server_env(env), "PVCOORD_STORE": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"}
        proc = ManagedProcess(
            "coordination",
            python_module("iocs.coordination", "--prefix", PREFIX, "--devices", "m1,m2"),
            ioc_env, cwd=REPO, log_dir=tmp_path,
        )
        wait_for_pv(pvn.COORD_LOCKS.name(PREFIX), env, procs=[proc])
        conf = {k: v for k, v in env.items() if k.startswith("EPICS_PVA")}
        with Context("pva", conf=conf, useenv=False) as ctxt:
            ok = rpc(ctxt, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60")
            assert not isinstance(ok, Exception), ok
            texts = [" ".join(cmdlines().values())]
            redis.stop()  # the store fails: every text that describes the failure is checked
            err = rpc(ctxt, pvn.COORD_ACQUIRE, device="m2", type="MANUAL_OPERATOR", timeout="60")
            assert isinstance(err, Exception)
            texts.append(str(err))
            def health_now() -> str:
                return str(ctxt.get(pvn.COORD_HEALTH.name(PREFIX), timeout=CLIENT_TIMEOUT))

            wait_until(lambda: "store failing" in health_now(), CLIENT_TIMEOUT, "store failing")
            health = health_now()
            assert "store failing" in health and "***" in health, health
            texts += [health, str(ctxt.get(pvn.COORD_EVENTS.name(PREFIX), timeout=CLIENT_TIMEOUT)),
                      str(ctxt.get(pvn.COORD_LAST_EVENT.name(PREFIX), timeout=CLIENT_TIMEOUT))]
        proc.stop()
        texts.append(proc.output())
        blob = "\n".join(texts)
        assert "127.0.0.1" in blob and "Redis store" in blob
        assert PASSWORD not in blob
    finally:
        if proc is not None:
            proc.stop()
        redis.stop()
