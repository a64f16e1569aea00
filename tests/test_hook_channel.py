"""Issue 11, finding 6: the queue IOC's worker-hook channel survives malformed and forged
messages, answers a bad one that it can answer, logs it, and says in LockHealth when the channel
does not work. A real redis; the queue IOC's hook server in-process (no RE Manager needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid

import pytest
import redis

from iocs.queue.ioc import QueueIOC
from pvcoord import worker_hook
from pvcoord.procs import start_redis, wait_until
from pvcoord.worker_hook import LockGuard
from pvdb import queue as qn
from pvdb.policy import Policy
from tests.fakeclock import FakeTime

PREFIX = "HC:"
TIMEOUT = 10.0


def test_parse_hook_request_codes():
    rid = uuid.uuid4().hex
    good = qn.parse_hook_request(json.dumps({"id": rid, "device": "m1", "time": 1.0, "pid": 3}))
    assert (good.id, good.device, good.pid, good.pvs) == (rid, "m1", 3, ())
    many = [f"DEMO:m{i}:Setpoint" for i in range(qn.HOOK_MAX_PVS)]
    res = qn.parse_hook_request(json.dumps({"id": rid, "pvs": many, "time": 2.0}))
    assert (res.device, res.pvs) == ("", tuple(many))
    cases = [
        (b"\xff\xfe", "not_json", None), (b"[1, 2]", "not_object", None),
        (b'{"device": "m1"}', "bad_id", None), (b"x" * (qn.HOOK_MAX_BYTES + 1), "too_large", None),
        (json.dumps({"id": rid, "device": 5, "time": 1}), "bad_device", rid),
        (json.dumps({"id": rid, "device": "m 1", "time": 1}), "bad_device", rid),
        (json.dumps({"id": rid, "device": "m1\x1b[2J", "time": 1}), "bad_device", rid),
        (json.dumps({"id": rid, "device": "m1", "time": "soon"}), "bad_time", rid),
        (json.dumps({"id": rid, "device": "m1", "time": None}), "bad_time", rid),
        (json.dumps({"id": rid, "device": "m1", "time": 1, "pid": "x"}), "bad_pid", rid),
        (json.dumps({"id": rid, "device": "m1", "time": 1, "refusing": 7}), "bad_refusing", rid),
        (json.dumps({"id": rid, "device": "m1", "time": 1, "x": 1}), "unknown_field", rid),
        # resolve requests: a list of PV names, never with a device or a refusal
        (json.dumps({"id": rid, "pvs": [], "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": "DEMO:m1:Setpoint", "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": ["DEMO:m1 Setpoint"], "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": ["A:" + "x" * qn.HOOK_MAX_PV], "time": 1}), "bad_pvs",
         rid),
        (json.dumps({"id": rid, "pvs": [f"A:{i}" for i in range(qn.HOOK_MAX_PVS + 1)],
                     "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": ["A:1"], "device": "m1", "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": ["A:1"], "refusing": "x", "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": ["A:1\x1b[2J"], "time": 1}), "bad_pvs", rid),
        (json.dumps({"id": rid, "pvs": ["A:1"], "time": "x"}), "bad_time", rid),
    ]
    for raw, code, answered_id in cases:
        with pytest.raises(qn.HookRequestError) as e:
            qn.parse_hook_request(raw)
        assert (e.value.code, e.value.request_id) == (code, answered_id), raw


def _malformed(i: int, rid: str) -> bytes | str:
    """A thousand kinds of junk: the shapes that stopped the old server come first."""
    shapes = [
        json.dumps({"id": rid, "device": "m1", "time": "not-a-number"}),  # killed the old loop
        json.dumps({"id": rid, "device": "m1", "time": None}),
        json.dumps({"id": rid, "device": "m1", "time": [1]}),
        json.dumps({"id": rid, "device": {"a": 1}, "time": 1e300}),
        "{not json", b"\x00\xff\x10", "[]", "null", "42", '"text"',
        json.dumps({"id": ["x"], "device": "m1"}), json.dumps({"id": "../../etc"}),
        json.dumps({"id": rid, "device": "m1", "time": 1, "refusing": {"x": 1}}),
        "x" * (qn.HOOK_MAX_BYTES + 1),
    ]
    return shapes[i % len(shapes)]


@pytest.fixture
def redis_url(tmp_path):
    proc, port = start_redis(data_dir=tmp_path / "redis")
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.stop()


@contextlib.contextmanager
def hook_server(url: str):
    """The queue IOC's hook server (without locks) in-process on its own loop.

    Yields ``(ioc, task)``: the :class:`QueueIOC` and the future of its hook server.
    """
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    stop = asyncio.Event()
    holder: dict = {}

    async def start():
        ioc = QueueIOC(PREFIX, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", Policy(), locks=False,
                       redis_url=url)
        holder["ioc"] = ioc
        return asyncio.ensure_future(ioc.serve_hook_requests(stop))

    task = None
    try:
        task = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
        yield holder["ioc"], task
    finally:
        loop.call_soon_threadsafe(stop.set)
        if task is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(
                    asyncio.wait_for(asyncio.wrap_future(task), 10), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        t.join(TIMEOUT)
        loop.close()


def test_hook_server_survives_1000_malformed_messages(redis_url, caplog):
    url, proc = redis_url
    r = redis.Redis.from_url(url)
    try:
        caplog.set_level(logging.WARNING, logger="iocs.queue.ioc")
        with hook_server(url) as (ioc, task):
            ids = [uuid.uuid4().hex for _ in range(1000)]
            r.lpush(qn.hook_request_key(PREFIX),
                    *[_malformed(i, rid) for i, rid in enumerate(ids)])
            # every malformed message is consumed; the ones with a valid id are answered
            wait_until(lambda: ioc.bad_hook_requests == 1000, 60.0,
                       "1000 malformed requests handled")
            assert not task.done(), "the hook server stopped"
            reply = json.loads(r.blpop([qn.hook_reply_key(PREFIX, ids[0])], timeout=5)[1])
            assert reply["granted"] is False and reply["error"] == "bad_time"
            # logged, but not 1000 lines
            lines = [rec for rec in caplog.records
                     if "malformed worker-hook request" in rec.message]
            assert 1 <= len(lines) < 100
            # a well-formed request is still answered (this IOC runs without locks)
            answer = LockGuard(PREFIX, url, timeout=5.0).request("m1")
            assert answer["granted"] is False and "--no-locks" in answer["message"], answer
            assert ioc.hook_health == ""
            # LockHealth is true to what works: redis gone -> the channel says so
            proc.stop()
            wait_until(lambda: ioc.hook_health.startswith("worker-hook channel"), 20.0,
                       "hook channel down noticed")
            assert not task.done()
    finally:
        r.close()


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_a_workers_wall_clock_far_from_the_iocs_does_not_matter(redis_url, monkeypatch, step):
    """The hole: the IOC dropped a request whose ``time`` (the worker's wall clock) was more than
    10 s behind its own, so a worker on a host whose clock is behind had every plan refused
    ("the queue IOC did not answer"). Now staleness is the pending key's time to live."""
    url, _ = redis_url
    clock = FakeTime()
    clock.step(step)
    monkeypatch.setattr(worker_hook, "time", clock)
    with hook_server(url):
        answer = LockGuard(PREFIX, url, timeout=5.0).request("m1")
    assert answer["granted"] is False and "--no-locks" in answer["message"], answer
    r = redis.Redis.from_url(url)
    try:
        assert r.keys(qn.hook_pending_key(PREFIX, "*")) == [], "the IOC deletes the key it answers"
    finally:
        r.close()


def test_a_request_whose_hook_gave_up_is_dropped(redis_url):
    url, _ = redis_url
    r = redis.Redis.from_url(url)
    gone, live = uuid.uuid4().hex, uuid.uuid4().hex

    def req(rid: str) -> str:
        return json.dumps({"id": rid, "device": "m1", "time": 1.0, "pending": True})

    try:
        r.set(qn.hook_pending_key(PREFIX, live), b"1", px=60_000)  # no key for "gone"
        r.lpush(qn.hook_request_key(PREFIX), req(gone), req(live))  # answered in push order
        with hook_server(url):
            got = r.blpop([qn.hook_reply_key(PREFIX, live)], timeout=TIMEOUT)
            assert got is not None and json.loads(got[1])["granted"] is False
            assert r.exists(qn.hook_reply_key(PREFIX, gone)) == 0
            with pytest.raises(qn.HookRequestError) as e:
                qn.parse_hook_request(json.dumps({"id": gone, "device": "m1", "time": 1.0,
                                                  "pending": "yes"}))
            assert e.value.code == "bad_pending"
    finally:
        r.close()


def test_a_new_hook_still_works_with_a_queue_ioc_that_predates_pending(redis_url, monkeypatch):
    """A queue IOC older than the ``pending`` field (its parser refuses unknown fields: the real
    parser without that field) answers ``unknown_field``; the hook asks again without it and
    gets the IOC's real answer, not a refusal of every plan."""
    url, _ = redis_url
    monkeypatch.setattr(qn, "_HOOK_FIELDS", qn._HOOK_FIELDS - {"pending"})
    with hook_server(url) as (ioc, _task):
        answer = LockGuard(PREFIX, url, timeout=5.0).request("m1")
        assert ioc.bad_hook_requests == 1  # the first try, with "pending"
    assert answer["granted"] is False and "--no-locks" in answer["message"], answer


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e9"])
def test_a_hook_timeout_out_of_range_is_a_configuration_error(value):
    from pvcoord.worker_hook import HookConfigError, lock_guard

    with pytest.raises(HookConfigError, match="PVCOORD_HOOK_TIMEOUT"):
        lock_guard(environ={"PVCOORD_PREFIX": PREFIX, "PVCOORD_REDIS_URL": "redis://127.0.0.1:1/0",
                            "PVCOORD_HOOK_TIMEOUT": value})
