"""In-process tier: the queue IOC's p4p boundary on an isolated server (no RE Manager).

Posting only changes, empty tables, enum indices, the common INVALID alarm (Heartbeat and the RPCs
excepted), and RPC handlers that always finish: results, BadRequest and internal errors; the
caller an RPC handler gets (the PVA account, or the onBehalfOf user of a trusted service under the
coordination IOC's rule, refused with its codes).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from p4p.client.thread import Context, RemoteError
from p4p.nt import NTURI
from p4p.server import Server, StaticProvider

from iocs.queue.ioc import this_account
from iocs.queue.model import BadRequestError
from iocs.queue.pvs import INVALID, ControlError, QueuePVs, add_rpcs
from pvcoord.procs import wait_until
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode
from pvdb.names import PVKind
from pvdb.policy import Policy, parse_policy

from .codes import code_of, raises_code
from .conftest import TIMEOUT

P = "TIP:"
UNTRUSTED = "TIU:"
"""The same RPCs under a policy that names no trusted service."""
ME = this_account()
DELEGATING = parse_policy(f"""
[access]
trusted_services = ["{ME}@127.0.0.1"]
[access.on_behalf_of]
"{ME}" = ["alice"]
""")


@pytest.fixture
def served():
    """QueuePVs and three RPCs on an isolated server, driven by an asyncio loop in a thread."""
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    provider = StaticProvider("test-queue")
    pending: list[asyncio.Task] = []

    async def ok(caller, args):
        return (f"hello {caller.account} actor={caller.actor} host={caller.host} "
                f"args={sorted(args)} {args.get('name', '')}"), "uid-1"

    async def bad(caller, args):
        raise BadRequestError("ItemAdd: unknown plan 'x'")

    async def boom(caller, args):
        raise KeyError("oops")

    async def forever(caller, args):
        pending.append(asyncio.current_task())
        await asyncio.Event().wait()
        return "never", ""

    async def build():
        pvs = QueuePVs(P, provider)
        add_rpcs(P, provider, {qn.ITEM_ADD: ok, qn.ITEM_REMOVE: bad, qn.QUEUE_START: boom,
                               qn.QUEUE_STOP: forever}, DELEGATING)
        add_rpcs(UNTRUSTED, provider, {qn.ITEM_ADD: ok}, Policy())
        return pvs

    pvs = asyncio.run_coroutine_threadsafe(build(), loop).result(TIMEOUT)
    try:
        with Server(providers=[provider], isolate=True) as server, \
                Context("pva", conf=server.conf(), useenv=False, nt=False) as ctxt:
            yield pvs, ctxt, loop, pending
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(TIMEOUT)
        loop.close()


def on_loop(loop, fn, *args):
    async def run():
        return fn(*args)
    return asyncio.run_coroutine_threadsafe(run(), loop).result(TIMEOUT)


def test_initial_values_are_invalid_until_the_manager_is_heard(served):
    pvs, ctxt, loop, _pending = served
    for spec in qn.QUEUE_PVS:
        if spec.kind is PVKind.RPC:
            continue
        v = ctxt.get(spec.name(P), timeout=TIMEOUT)
        want = 0 if spec in qn.NEVER_INVALID else INVALID
        assert v["alarm.severity"] == want, spec.suffix
    st = ctxt.get(qn.MANAGER_STATE.name(P), timeout=TIMEOUT)
    assert list(st["value.choices"]) == list(qn.MANAGER_STATES) and st["value.index"] == 0


def test_set_posts_changes_and_set_alarm_reposts(served):
    pvs, ctxt, loop, _pending = served
    on_loop(loop, pvs.set_alarm, 0, "")
    assert on_loop(loop, pvs.set, qn.ITEMS_IN_QUEUE, 3) is True
    assert on_loop(loop, pvs.set, qn.ITEMS_IN_QUEUE, 3) is False  # unchanged: not posted
    on_loop(loop, pvs.set, qn.MANAGER_STATE, qn.MANAGER_STATES.index("starting_queue"))
    on_loop(loop, pvs.set, qn.ITEMS, [(0, "u1", "plan", "count", "[det1]", "anna", "primary",
                                       "det1")])
    v = ctxt.get(qn.ITEMS.name(P), timeout=TIMEOUT)
    assert list(v["value.itemUid"]) == ["u1"] and v["alarm.severity"] == 0
    on_loop(loop, pvs.set, qn.ITEMS, [])  # an empty table empties every column
    v = ctxt.get(qn.ITEMS.name(P), timeout=TIMEOUT)
    assert list(v["value.itemUid"]) == [] and list(v["value.position"]) == []
    st = ctxt.get(qn.MANAGER_STATE.name(P), timeout=TIMEOUT)
    assert st["value.choices"][st["value.index"]] == "starting_queue"
    on_loop(loop, pvs.set_alarm, INVALID, "RE Manager not reachable")
    n = ctxt.get(qn.ITEMS_IN_QUEUE.name(P), timeout=TIMEOUT)
    assert (n["value"], n["alarm.severity"], n["alarm.message"]) == (
        3, INVALID, "RE Manager not reachable")
    assert ctxt.get(qn.HEARTBEAT.name(P), timeout=TIMEOUT)["alarm.severity"] == 0


def _rpc(ctxt, spec, prefix=P, **kws):
    name = spec.name(prefix)
    return ctxt.rpc(name, NTURI([(k, "s") for k in kws]).wrap(name, kws=kws), timeout=TIMEOUT)


def test_rpc_handlers_always_finish(served):
    pvs, ctxt, loop, _pending = served
    r = _rpc(ctxt, qn.ITEM_ADD, name="count")
    assert r["message"].startswith("hello ") and r["message"].endswith(" count")
    assert r["itemUid"] == "uid-1"
    with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT):
        _rpc(ctxt, qn.ITEM_REMOVE, uid="u")
    with raises_code(RemoteError, ErrorCode.INTERNAL) as e:
        _rpc(ctxt, qn.QUEUE_START)
    assert "KeyError" in str(e.value)
    with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT):
        ctxt.put(qn.ITEM_ADD.name(P), "x", timeout=TIMEOUT)
    assert issubclass(ControlError, RuntimeError)


def test_an_rpc_cancelled_at_shutdown_is_answered(served):
    """A handler still waiting for the RE Manager when the IOC shuts down (task cancelled)."""
    pvs, ctxt, loop, pending = served
    out: list[BaseException] = []

    def client():
        try:
            _rpc(ctxt, qn.QUEUE_STOP)
        except BaseException as e:  # collected for the assertion
            out.append(e)

    t = threading.Thread(target=client)
    t.start()
    wait_until(lambda: pending, TIMEOUT, "handler running")
    loop.call_soon_threadsafe(pending[0].cancel)
    t.join(TIMEOUT)
    assert len(out) == 1 and isinstance(out[0], RemoteError), out
    assert code_of(str(out[0])) is ErrorCode.SHUTTING_DOWN, out[0]
    assert "Queue:QueueStop not done" in str(out[0])


def test_on_behalf_of_resolves_the_caller_with_the_coordination_rule(served):
    """The handler gets the user a trusted service names (the service as actor, the clientHost
    as host), without the onBehalfOf/clientHost arguments; otherwise the PVA account."""
    _pvs, ctxt, _loop, _pending = served
    r = _rpc(ctxt, qn.ITEM_ADD, name="count")
    assert r["message"] == f"hello {ME} actor=None host=127.0.0.1 args=['name'] count"
    r = _rpc(ctxt, qn.ITEM_ADD, name="count", onBehalfOf="alice", clientHost="10.1.2.3")
    assert r["message"] == f"hello alice actor={ME} host=10.1.2.3 args=['name'] count"
    r = _rpc(ctxt, qn.ITEM_ADD, name="count", onBehalfOf="alice")
    assert r["message"] == f"hello alice actor={ME} host=127.0.0.1 args=['name'] count"


@pytest.mark.parametrize(("prefix", "kws", "code"), [
    (UNTRUSTED, {"onBehalfOf": "alice"}, ErrorCode.NOT_ALLOWED),  # no trusted service at all
    (P, {"onBehalfOf": "bob"}, ErrorCode.NOT_ALLOWED),  # a user it may not act for
    (P, {"onBehalfOf": "root"}, ErrorCode.NOT_ALLOWED),  # privileged: only when named
    (P, {"onBehalfOf": "al ice"}, ErrorCode.BAD_ARGUMENT),
    (P, {"clientHost": "10.1.2.3"}, ErrorCode.BAD_ARGUMENT),  # clientHost without onBehalfOf
])
def test_on_behalf_of_refusals_carry_the_coordination_codes(served, prefix, kws, code):
    _pvs, ctxt, _loop, _pending = served
    with raises_code(RemoteError, code):
        _rpc(ctxt, qn.ITEM_ADD, prefix, name="count", **kws)
