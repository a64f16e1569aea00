"""The worker hook (``pvcoord.worker_hook``).

Unit tier: a real in-process RunEngine, a real SQLite store (written with the coordination IOC's
store code) and a real redis; a small thread answers lock requests in place of the queue IOC (the
real queue IOC answers them in the system test at the end).

System tier: the real RE Manager with the demo startup dir (the hook activated by its one line),
the queue IOC, the coordination IOC and the demo softIoc: a MAINTENANCE lock on ``m2`` stops a
plan that reaches ``m2`` through a global before any ``set``; a device reached through a global
shows as QUEUE_EXECUTING while the plan runs.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import redis
from bluesky import RunEngine
from bluesky.plans import scan
from bluesky.utils import Msg
from ophyd.sim import SynAxis, SynGauss

from pvcoord import worker_hook
from pvcoord.client import Client, RefusedError
from pvcoord.demo.queue_part import QUEUE_LOCK_OWNER, start_queue_stack
from pvcoord.procs import client_conf, loopback_env, start_redis, wait_until
from pvcoord.store import SQLiteStore
from pvcoord.worker_hook import (
    ACTING,
    EXEMPT,
    UNCOORDINATED_RECHECK,
    DeviceLockedError,
    HookConfigError,
    LockGuard,
    PlanCheck,
    lock_guard,
    normalize_store_url,
)
from pvdb import demo as demo_pvs
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode
from pvdb.models import EventAction, LockType

from .codes import raises_code
from .conftest import TIMEOUT
from .coordhelpers import put_lock
from .fakeclock import FakeTime

PREFIX = "TH:"


pytestmark = pytest.mark.system  # every test talks to a real redis-server (module fixture)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    proc, port = start_redis(log_dir=tmp_path_factory.mktemp("hook-redis"))
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "locks.sqlite")
    try:
        yield s
    finally:
        s.close()


class Responder(threading.Thread):
    """Answers hook requests on redis the way the queue IOC does (a test stand-in)."""

    def __init__(self, port: int, answer) -> None:
        super().__init__(daemon=True)
        self.r = redis.Redis(port=port)
        self.answer = answer
        self.requests: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            got = self.r.brpop([qn.hook_request_key(PREFIX)], timeout=0.2)
            if not got:
                continue
            req = json.loads(got[1])
            self.requests.append(req)
            key = qn.hook_reply_key(PREFIX, req["id"])
            self.r.lpush(key, json.dumps(self.answer(req)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.r.close()


@contextlib.contextmanager
def responder(port: int, answer):
    r = redis.Redis(port=port)
    r.delete(qn.hook_request_key(PREFIX))
    r.close()
    t = Responder(port, answer)
    t.start()
    try:
        yield t
    finally:
        t.stop()


def grant(req):
    return {"granted": True, "coordinated": True, "planUid": "item-1", "owner": "queue",
            "message": "ok"}


def guard(redis_port, store, timeout=2.0) -> LockGuard:
    return LockGuard(PREFIX, f"redis://127.0.0.1:{redis_port}/0", timeout=timeout, store=store)


class Dev:
    def __init__(self, name, parent=None):
        self.name, self.parent = name, parent


# --- unit tier --------------------------------------------------------------------------------


def test_maintenance_refuses_and_tells_the_queue_ioc(redis_port, store):
    put_lock(store, "m2", LockType.MAINTENANCE, owner="max", reason="realign")
    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, grant) as resp:  # even a grant does not let the message through
        with pytest.raises(DeviceLockedError) as e:
            check(Msg("set", Dev("user_setpoint", Dev("m2")), 1.0))
        # the queue IOC is told (so the refusal is audited and shown in Queue:StopReason)
        assert [(r["device"], "max@h" in r.get("refusing", ""))
                for r in resp.requests] == [("m2", True)]
    assert (e.value.code, e.value.holder) == (ErrorCode.HOLDER_CONFLICT, "max@h")
    assert "'realign'" in str(e.value) and "MAINTENANCE" in str(e.value)
    # non-acting messages pass; cleanup of a held device the plan never acted on does not
    # reach it (stop/unstage used to be exempt anywhere in a plan)
    for cmd in ("read", "describe"):
        m = Msg(cmd, Dev("m2"))
        assert check(m) is m
    for cmd in EXEMPT:
        assert check(Msg(cmd, Dev("m2"))).command == "null"
    assert check.dropped == [f"{cmd} m2" for cmd in EXEMPT]
    assert "set" in ACTING and "unstage" not in ACTING


def test_beamline_maintenance_covers_every_device(redis_port, store):
    put_lock(store, "beamline", LockType.MAINTENANCE)
    with responder(redis_port, grant), \
            raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT, "max@h") as e:
        PlanCheck(guard(redis_port, store))(Msg("trigger", Dev("det1")))
    assert "beamline lock" in str(e.value)


def test_first_use_asks_the_queue_ioc_then_trusts_the_store(redis_port, store):
    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, grant) as resp:
        check(Msg("set", Dev("m1"), 1))
        assert [r["device"] for r in resp.requests] == ["m1"]
        # the queue IOC's lock is now in the store: no further requests
        put_lock(store, "m1", LockType.QUEUE_EXECUTING, owner="queue", plan_uid="item-1")
        for _ in range(5):
            check(Msg("set", Dev("m1"), 2))
        assert len(resp.requests) == 1
        # preempted during the plan: the next acting message is refused
        put_lock(store, "m1", LockType.MAINTENANCE, owner="max")
        with raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT, "max@h"):
            check(Msg("set", Dev("m1"), 3))


def test_a_refusal_of_the_queue_ioc_stops_the_message(redis_port, store):
    def refuse(req):
        return {"granted": False, "message": "m3 held QUEUE_EXECUTING by other@h",
                "code": "holder-conflict", "holder": "other@h"}

    with responder(redis_port, refuse), raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT,
                                                "other@h"):
        PlanCheck(guard(redis_port, store))(Msg("set", Dev("m3"), 1))


def test_no_answer_fails_closed(redis_port, store):
    redis.Redis(port=redis_port).delete(qn.hook_request_key(PREFIX))
    with raises_code(DeviceLockedError, ErrorCode.STATE_UNKNOWN):
        PlanCheck(guard(redis_port, store, timeout=0.3))(Msg("set", Dev("m4"), 1))


def test_uncoordinated_devices_are_asked_once(redis_port, store):
    def unknown(req):
        return {"granted": True, "coordinated": False, "message": "not coordinated"}

    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, unknown) as resp:
        for _ in range(3):
            check(Msg("set", Dev("sim_thing"), 1))
    assert len(resp.requests) == 1


def test_cleanup_is_exempt_only_for_devices_the_plan_acted_on(redis_port, store):
    """Issue 11, finding 6: ``stop`` / ``unstage`` anywhere in a plan bypassed the locks."""
    put_lock(store, "m3", LockType.MANUAL_OPERATOR, owner="alice", reason="aligning")
    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, grant):
        check(Msg("set", Dev("m1"), 1))  # acted on m1: its cleanup passes
    for cmd in EXEMPT:
        m = Msg(cmd, Dev("m1"))
        assert check(m) is m
        assert check(Msg(cmd, Dev("m3"))).command == "null"  # held by alice, never acted on
        free = Msg(cmd, Dev("m4"))
        assert check(free) is free  # free in the store: a cleanup message is harmless


def test_not_coordinated_is_not_sticky(redis_port, store):
    """Issue 11, finding 6: one "not coordinated" answer turned checks off for the plan."""
    def unknown(req):
        return {"granted": True, "coordinated": False, "message": "not coordinated"}

    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, unknown) as resp:
        check(Msg("set", Dev("m5"), 1))
        # a MAINTENANCE lock appears: the store check runs for every acting message
        put_lock(store, "m5", LockType.MAINTENANCE, owner="max")
        with raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT, "max@h"):
            check(Msg("set", Dev("m5"), 2))
        # and the answer is asked again once it is older than UNCOORDINATED_RECHECK
        store.commit([], ["m5"], [])
        check.uncoordinated["m5"] -= UNCOORDINATED_RECHECK
        check(Msg("set", Dev("m5"), 3))
        assert len([r for r in resp.requests if "refusing" not in r]) == 2


def test_malformed_resolve_answers_fail_closed(redis_port, store):
    """A forged or broken answer to a resolve request refuses the message, with a code."""
    from ophyd import EpicsSignal

    sig = EpicsSignal(demo_pvs.motor_setpoint(PREFIX, "m1"), name="sample_x")  # not connected
    for answer in ([1, 2], {"granted": True}, {"granted": True, "devices": {"m1": "x"}}):
        with responder(redis_port, lambda req, a=answer: a), \
                raises_code(DeviceLockedError, ErrorCode.STATE_UNKNOWN):
            PlanCheck(guard(redis_port, store))(Msg("set", sig, 1.0))
    refused = {"granted": False, "code": "not-allowed", "message": "no"}
    with responder(redis_port, lambda req: refused) as resp, \
            raises_code(DeviceLockedError, ErrorCode.NOT_ALLOWED):
        PlanCheck(guard(redis_port, store))(Msg("set", sig, 1.0))
    assert resp.requests[0]["pvs"] == [demo_pvs.motor_setpoint(PREFIX, "m1")]


def test_in_a_real_runengine_the_scan_fails_before_any_set(redis_port, store):
    put_lock(store, "m2", LockType.MAINTENANCE, owner="max")
    m2 = SynAxis(name="m2")
    m1 = SynAxis(name="m1")
    det = SynGauss("det", m1, "m1", center=0, Imax=1)
    sets: list[float] = []
    m2.readback.subscribe(lambda value, **kw: sets.append(value), run=False)
    RE = RunEngine({})  # noqa: N806 - bluesky's name
    RE.preprocessors.append(guard(redis_port, store))
    with responder(redis_port, grant) as resp, raises_code(DeviceLockedError,
                                                       ErrorCode.HOLDER_CONFLICT, "max@h"):
        RE(scan([det], m2, 1, 2, 3))
    assert sets == [] and m2.position == 0
    assert all(r["device"] != "m2" or r.get("refusing") for r in resp.requests)
    assert RE.state == "idle"


def test_a_wall_clock_ahead_of_the_iocs_does_not_hide_a_maintenance_lock(
        redis_port, store, monkeypatch):
    """The store's rows were dropped by ``expires > time.time()`` of the worker: a forward step
    there (or a clock ahead of the coordination IOC's) hid the lock, so the ``set`` was not
    refused at once and cleanup of a device held in MAINTENANCE reached it."""
    put_lock(store, "m2", LockType.MAINTENANCE, owner="max", reason="realign", ttl=60.0)
    clock = FakeTime()
    clock.step(3600.0)
    monkeypatch.setattr(worker_hook, "time", clock)  # the worker's clock, not the system's
    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, grant) as resp:  # a grant does not let the message through
        with raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT, "max@h"):
            check(Msg("set", Dev("m2"), 1.0))
        assert [bool(r.get("refusing")) for r in resp.requests] == [True]
    for cmd in EXEMPT:
        assert check(Msg(cmd, Dev("m2"))).command == "null"


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_the_plans_own_lease_is_timed_on_the_monotonic_clock(redis_port, store, monkeypatch,
                                                             step):
    """The plan's QUEUE_EXECUTING row is trusted until its lease ends as timed by this process,
    then the queue IOC is asked again. By ``expires > time.time()`` a forward step made it ask at
    every message and a backward one trusted a row left in the store (the coordination IOC down)
    for an hour after its lease."""
    clock = FakeTime()
    monkeypatch.setattr(worker_hook, "time", clock)
    check = PlanCheck(guard(redis_port, store))
    with responder(redis_port, grant) as resp:
        check(Msg("set", Dev("m1"), 1))
        put_lock(store, "m1", LockType.QUEUE_EXECUTING, owner="queue", plan_uid="item-1",
                 ttl=5.0)
        check(Msg("set", Dev("m1"), 2))
        clock.step(step)
        check(Msg("set", Dev("m1"), 3))
        assert len(resp.requests) == 1, "asked again with the lease running: it is ours"
        clock.advance(6.0)  # the row stays: the coordination IOC is down
        check(Msg("set", Dev("m1"), 4))
        assert len(resp.requests) == 2, "not asked again after the lease ran out"


def test_configuration_errors_are_clear(redis_port, tmp_path):
    with pytest.raises(HookConfigError, match="set PVCOORD_PREFIX and PVCOORD_REDIS_URL"):
        lock_guard(environ={})
    with pytest.raises(HookConfigError, match="prefix 'X' is not valid"):
        lock_guard("X", "redis://127.0.0.1:1/0", environ={})
    with pytest.raises(HookConfigError, match="cannot open SQLite store"):
        lock_guard(PREFIX, f"redis://127.0.0.1:{redis_port}/0",
                   store_url=f"sqlite://{tmp_path}/missing/none.sqlite", environ={})
    assert normalize_store_url("sqlite:////a/b.sqlite") == "sqlite:///a/b.sqlite"
    g = lock_guard(environ={"PVCOORD_PREFIX": PREFIX,
                            "PVCOORD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                            "PVCOORD_HOOK_TIMEOUT": "1.5"})
    assert g.timeout == 1.5 and g.store is None


# --- system tier ------------------------------------------------------------------------------


def test_hook_with_the_real_re_manager_and_queue_ioc(tmp_path):
    from .test_queue_ioc import WAIT, P, _start_base  # shared set-up

    env = loopback_env()
    procs, store_url, policy = _start_base(tmp_path, env)
    try:
        with start_queue_stack(P, env, tmp_path, store_url=store_url, policy=policy) as st, \
                Client(P, conf=client_conf(env), timeout=TIMEOUT) as coord:
            from p4p.client.thread import Context

            with Context("pva", conf=client_conf(env), useenv=False) as ctxt:
                _maintenance_on_a_global_device(st, coord, ctxt, P, WAIT)
                _a_global_device_shows_as_executing(st, coord, WAIT)
                _a_renamed_ophyd_object_is_matched_by_pv(st, coord, ctxt, P, WAIT)
    except BaseException:
        for p in procs:
            print(f"--- {p.name} ---\n{p.output()[-3000:]}")
        for name in ("re-manager", "queue-ioc"):
            log = tmp_path / f"{name}.log"
            if log.exists():
                print(f"--- {name} ---\n{log.read_text()[-6000:]}")
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def _add(st, name, *args, **kwargs) -> str:
    item = {"item_type": "plan", "name": name, "args": list(args), "kwargs": kwargs}
    return st.call("queue_item_add", item=item, user="test", user_group="primary")["item"][
        "item_uid"]


def _idle(st, wait) -> None:
    wait_until(lambda: st.call("status")["manager_state"] == "idle", wait, "manager idle")


def _maintenance_on_a_global_device(st, coord, ctxt, prefix, wait) -> None:
    setpoint = demo_pvs.motor_setpoint(prefix, "m2")
    before = float(ctxt.get(setpoint, timeout=TIMEOUT))
    coord.acquire(["m2"], LockType.MAINTENANCE, 300, "realign m2", on_behalf_of="max")
    uid = _add(st, "park_m2", before + 5.0)  # names no device: the IOC's analysis sees none
    t0 = time.time()
    st.call("queue_start")
    _idle(st, wait)
    last = st.call("history_get")["items"][-1]
    assert last["item_uid"] == uid and last["result"]["exit_status"] == "failed"
    msg = last["result"]["msg"]
    assert "refused 'set' on m2 before it reached the device" in msg, msg
    assert "held by max@" in msg and "MAINTENANCE" in msg and "realign m2" in msg
    assert float(ctxt.get(setpoint, timeout=TIMEOUT)) == before  # no set reached m2
    # the refusal is audited by the coordination IOC and shown by the queue IOC
    refused = wait_until(lambda: [
        e for e in coord.events() if e.time >= t0 - 1 and e.action is EventAction.REFUSED
        and e.device == "m2" and e.lock_type is LockType.QUEUE_EXECUTING],
        5.0, "the refusal in Coord:Events (posted coalesced)")
    assert "MAINTENANCE" in refused[-1].message, refused
    assert "realign m2" in refused[-1].message
    reason = str(ctxt.get(qn.STOP_REASON.name(prefix), timeout=TIMEOUT))
    assert uid in reason and "m2" in reason and "MAINTENANCE" in reason, reason
    assert "realign m2" in reason
    q = st.call("queue_get")["items"]
    assert [i["name"] for i in q] == ["park_m2"]  # back in the queue, the queue stopped
    st.call("queue_clear")
    coord.force_release(["m2"], reason="test done")


def _a_global_device_shows_as_executing(st, coord, wait) -> None:
    uid = _add(st, "scan_with_shutter", ["det1"], "m1", 0.0, 0.2, 8)
    st.call("queue_start")

    def shutter_executing():
        return [lk for lk in coord.locks()
                if lk.device == "shutter" and lk.lock_type is LockType.QUEUE_EXECUTING]

    lk = wait_until(shutter_executing, wait, "shutter (a global) shows QUEUE_EXECUTING")[0]
    assert lk.plan_uid == uid and lk.owner.startswith(QUEUE_LOCK_OWNER + "@")
    _idle(st, wait)
    assert st.call("history_get")["items"][-1]["result"]["exit_status"] == "completed"
    wait_until(lambda: not [x for x in coord.locks() if x.owner.startswith(QUEUE_LOCK_OWNER)],
               wait, "all queue locks released")
    with contextlib.suppress(RefusedError):
        coord.force_release(["shutter"], reason="cleanup")


RENAMED_SCRIPT = """
import bluesky.plan_stubs as bps
from ophyd import Component, Device, EpicsSignal, EpicsSignalRO


class RenamedAxis(Device):
    setpoint = Component(EpicsSignal, {setpoint!r})
    readback = Component(EpicsSignalRO, {readback!r})


sample_x = RenamedAxis({prefix!r}, name="sample_x")  # ophyd (CA) over m1's records


def move_sample_x(position: float):
    yield from bps.mv(sample_x.setpoint, position)  # a global, under another name than m1
"""


def _a_renamed_ophyd_object_is_matched_by_pv(st, coord, ctxt, prefix, wait) -> None:
    """Issue 11, finding 6: an ophyd object named ``sample_x`` over m1's PVs is device m1."""
    setpoint, readback = demo_pvs.motor_setpoint(prefix, "m1"), demo_pvs.motor_readback(
        prefix, "m1")
    dev_prefix = f"{prefix}m1:"
    assert setpoint.startswith(dev_prefix) and readback.startswith(dev_prefix)
    script = RENAMED_SCRIPT.format(prefix=dev_prefix, setpoint=setpoint[len(dev_prefix):],
                                   readback=readback[len(dev_prefix):])
    task = st.call("script_upload", script=script)
    assert task["success"], task
    wait_until(lambda: st.call("task_result", task_uid=task["task_uid"])["status"] == "completed",
               wait, "script with sample_x uploaded")
    result = st.call("task_result", task_uid=task["task_uid"])["result"]
    assert result["success"], result
    before = float(ctxt.get(setpoint, timeout=TIMEOUT))
    target = before + 3.0
    coord.acquire(["m1"], LockType.MAINTENANCE, 300, "realign m1", on_behalf_of="max")
    t0 = time.time()
    uid = _add(st, "move_sample_x", target)
    st.call("queue_start")
    _idle(st, wait)
    last = st.call("history_get")["items"][-1]
    assert last["item_uid"] == uid and last["result"]["exit_status"] == "failed"
    msg = last["result"]["msg"]
    assert "refused 'set' on m1 (ophyd object 'sample_x') before it reached the device" in msg
    assert "held by max@" in msg, msg  # the holder is named
    assert float(ctxt.get(setpoint, timeout=TIMEOUT)) == before  # the write never happened
    # the coordination IOC audited the refusal on the registry device, not on "sample_x"
    wait_until(lambda: [
        e for e in coord.events() if e.time >= t0 - 1 and e.action is EventAction.REFUSED
        and e.device == "m1" and e.lock_type is LockType.QUEUE_EXECUTING],
        5.0, "the refusal of m1 (named sample_x in the plan) in Coord:Events")
    st.call("queue_clear")
    # released: the same object moves, and its device shows QUEUE_EXECUTING for the item
    coord.force_release(["m1"], reason="test done")
    uid = _add(st, "move_sample_x", target)
    st.call("queue_start")
    _idle(st, wait)
    last = st.call("history_get")["items"][-1]
    assert last["item_uid"] == uid and last["result"]["exit_status"] == "completed", last
    assert float(ctxt.get(setpoint, timeout=TIMEOUT)) == pytest.approx(target)
    executing = [e for e in coord.events() if e.time >= t0 and e.device == "m1"
                 and e.action is EventAction.ACQUIRED and e.lock_type is LockType.QUEUE_EXECUTING]
    assert executing, "m1 was held QUEUE_EXECUTING for the item that moved sample_x"


def test_a_password_protected_redis_between_hook_and_queue_ioc(tmp_path):
    """redis://:PASSWORD@host:port/0 on both sides; a wrong password is refused, never shown."""
    import asyncio

    from iocs.queue.ioc import QueueIOC
    from pvcoord.procs import LOOPBACK, ManagedProcess, free_port, redis_server_path
    from pvdb.policy import Policy

    secret = "s3cret-hook-pw"
    port = free_port()
    srv = ManagedProcess("redis-pw", [redis_server_path(), "--bind", LOOPBACK, "--port", str(port),
                                      "--dir", str(tmp_path), "--save", "", "--requirepass",
                                      secret], {}, log_dir=tmp_path)
    url = f"redis://:{secret}@{LOOPBACK}:{port}/0"
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    stop = asyncio.Event()

    async def start():
        ioc = QueueIOC(PREFIX, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", Policy(), locks=False,
                       redis_url=url)
        return asyncio.ensure_future(ioc.serve_hook_requests(stop))

    try:
        def pong() -> bool:
            client = redis.Redis.from_url(url)
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False
            finally:
                client.close()

        wait_until(pong, 10.0, "redis with a password")
        task = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
        answer = LockGuard(PREFIX, url, timeout=5.0).request("m1")
        assert answer["granted"] is False and answer["code"] == ErrorCode.NOT_READY, answer
        wrong = f"redis://:wrong-pw@{LOOPBACK}:{port}/0"
        with pytest.raises(DeviceLockedError) as e:
            LockGuard(PREFIX, wrong, timeout=1.0).request("m1")
        assert e.value.code is ErrorCode.STATE_UNKNOWN and "wrong-pw" not in str(e.value)
        assert "redis://:***@" in str(e.value)
    finally:
        loop.call_soon_threadsafe(stop.set)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.wrap_future(task), 10),
                                             loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        t.join(TIMEOUT)
        loop.close()
        srv.stop()
