"""The real coordination IOC: a request sent twice with one ``requestId`` is applied once, and
the second answer equals the first, on the same IOC and after a ``kill -9`` and restart
(decision 0160). The lock-table rules behind it are in ``tests/test_request_ids.py``.
"""

from __future__ import annotations

import getpass
import threading

import pytest
from p4p.client.thread import Context, RemoteError
from p4p.server import Server

from iocs.coordination.ioc import CoordinationIOC
from iocs.coordination.locktable import Identity, LockTable
from pvcoord.client import Client
from pvcoord.procs import client_conf, loopback_env, server_env, wait_until
from pvcoord.store import open_store
from pvdb import names as pvn
from pvdb.lockmodel import ErrorCode, new_request_id
from pvdb.models import LockType
from pvdb.policy import parse_policy

from .codes import code_of
from .coordhelpers import (
    CLIENT_TIMEOUT,
    DEVICES,
    PREFIX,
    TEST_POLICY,
    locks,
    rpc,
    start_coordination,
)

pytestmark = pytest.mark.system


def answer(r) -> object:
    """An RPC answer as something comparable: the reply's fields, or the error text."""
    if isinstance(r, Exception):
        return f"error: {r}"
    return r.todict()


def _last_row_line(v) -> str:
    """The ``Coord:LastEvent`` text of the newest row of a ``Coord:Events`` value ('' if none)."""
    t = v.value
    if not len(t.action):
        return ""
    lt = t.lockType[-1] or "-"
    return (f"{t.action[-1]} {t.device[-1]} {lt} actor={t.actor[-1] or '-'} "
            f"holder={t.holder[-1] or '-'}: {t.message[-1]}")


def counts(c: Context) -> dict[str, int]:
    """Audit events per action in ``Coord:Events`` (what a second application would add).

    ``Coord:Events`` is posted at the IOC's next tick (coalesced), ``Coord:LastEvent`` before
    the reply: read once the table's newest row is the last event.
    """
    events, last = pvn.COORD_EVENTS.name(PREFIX), pvn.COORD_LAST_EVENT.name(PREFIX)
    box = {}

    def caught_up() -> bool:
        box["v"] = c.get(events, timeout=CLIENT_TIMEOUT)
        text = c.get(last, timeout=CLIENT_TIMEOUT)  # unwrapped or not, by the context
        return _last_row_line(box["v"]) == str(getattr(text, "value", text))

    wait_until(caught_up, 10, "Coord:Events showing Coord:LastEvent")
    v = box["v"]
    out: dict[str, int] = {}
    for a in v.value.action:
        out[a] = out.get(a, 0) + 1
    return out


def test_same_request_id_twice_and_across_a_restart_is_applied_once(tmp_path):
    env = loopback_env()
    proc = start_coordination(env, tmp_path)
    rid = {k: new_request_id() for k in ("acquire", "renew", "release", "force", "m3")}
    calls = [  # (name, spec, arguments): every mutating RPC, as pvcall sends it
        ("acquire", pvn.COORD_ACQUIRE, {"device": "m1,m2", "type": "MANUAL_OPERATOR",
                                        "timeout": "60", "reason": "align"}),
        ("renew", pvn.COORD_RENEW, {"device": "m1", "timeout": "120"}),
        ("release", pvn.COORD_RELEASE, {"device": "m1"}),
        ("force", pvn.COORD_FORCE_RELEASE, {"device": "m2", "reason": "stuck"}),
    ]
    try:
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            first = {n: answer(rpc(c, spec, **a, requestId=rid[n])) for n, spec, a in calls}
            assert not any(isinstance(v, str) for v in first.values()), first
            assert first["acquire"]["key"] and first["release"]["devices"] == ["m1"]
            assert locks(c) == []  # m1 released, m2 force-released
            seen = counts(c)
            again = {n: answer(rpc(c, spec, **a, requestId=rid[n])) for n, spec, a in calls}
            assert again == first  # the grant's key included
            assert counts(c) == seen and locks(c) == []  # nothing applied twice
            # the same id with another argument is refused, naming the reuse
            r = rpc(c, pvn.COORD_RELEASE, device="m2", requestId=rid["release"])
            assert isinstance(r, RemoteError) and code_of(str(r)) == ErrorCode.REQUEST_ID_REUSED
            r = rpc(c, pvn.COORD_RELEASE, device="m2", requestId="not valid!")
            assert isinstance(r, RemoteError) and code_of(str(r)) == ErrorCode.BAD_ARGUMENT
            # the lock the same account takes after the release, on the restarted IOC below
            r = rpc(c, pvn.COORD_ACQUIRE, device="m3", type="MANUAL_OPERATOR",
                    requestId=rid["m3"])
            assert r.granted
        proc.kill9()
        proc.stop()
        proc = start_coordination(env, tmp_path)
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            took = rpc(c, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR")  # m1 again
            assert took.granted
            held, seen = locks(c), counts(c)
            after = {n: answer(rpc(c, spec, **a, requestId=rid[n])) for n, spec, a in calls}
            # not 'not-locked' for ForceRelease, not 'released' for Release, and the new lock
            # on m1 of the same account is not released by the retried 'Release device=m1'
            assert after == first
            assert locks(c) == held and counts(c) == seen
            assert [row[0] for row in held] == ["m1", "m3"]
    finally:
        proc.stop()


def test_client_library_sends_request_ids_and_retries_with_one(tmp_path):
    """Every call of the client carries a fresh id; a caller's retry with the same id is
    answered (after a restart too), never applied twice."""
    env = loopback_env()
    proc = start_coordination(env, tmp_path)
    rid = new_request_id()
    try:
        with Client(PREFIX, conf=client_conf(env), timeout=CLIENT_TIMEOUT) as cl:
            g = cl.acquire("m4", "MANUAL_OPERATOR", 60, request_id=rid)
            assert cl.acquire("m4", "MANUAL_OPERATOR", 60, request_id=rid) == g
            g2 = cl.acquire("m4", "MANUAL_OPERATOR", 60)  # a new id: the holder's repeat renews
            assert g2.key != g.key
            # Coord:Events is posted at the next tick (coalesced), not before the reply
            wait_until(lambda: len([e for e in cl.events() if e.device == "m4"]) == 2, 10,
                       "m4's acquired and renewed events in Coord:Events")
            n = len([e for e in cl.events() if e.device == "m4"])
        proc.kill9()
        proc.stop()
        proc = start_coordination(env, tmp_path)
        with Client(PREFIX, conf=client_conf(env), timeout=CLIENT_TIMEOUT) as cl:
            assert cl.acquire("m4", "MANUAL_OPERATOR", 60, request_id=rid) == g
            # the restarted IOC posts Coord:Events at its ticks: a sentinel change on another
            # device, once its event is shown, says every earlier event is shown too
            cl.release(key=cl.acquire("m3", "MANUAL_OPERATOR", 60).key)
            wait_until(lambda: len([e for e in cl.events() if e.device == "m3"]) >= 2, 10,
                       "the sentinel's events in Coord:Events")
            assert len([e for e in cl.events() if e.device == "m4"]) == n
            assert cl.release(key=g.key).devices == ("m4",)
    finally:
        proc.stop()


class HeldReply:
    """A real SQLite store whose flush before the reply waits while ``hold`` is set: the IOC
    has committed a change and not answered yet (the moment a crash loses the reply)."""

    def __init__(self, url: str) -> None:
        self.inner = open_store(url)
        self.hold, self.reached, self.go = threading.Event(), threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def durable(self, token: int) -> None:
        if self.hold.is_set():
            self.reached.set()
            self.go.wait(CLIENT_TIMEOUT)
        self.inner.durable(token)


@pytest.mark.parametrize("with_id", [True, False], ids=["requestId", "no-requestId"])
def test_pvxs_resend_of_a_lost_reply_is_answered_not_applied(tmp_path, with_id):
    """The real PVA client re-sends an RPC whose connection dropped before the reply.

    The first IOC commits ``Release device=m1`` and its server stops before replying; the same
    account takes m1 again on the second IOC (same store); then the client's re-send arrives.
    With a requestId it gets the first answer and the new lock stays; without one (an old
    caller) the re-send releases the new lock: the re-send really happens.
    """
    env = loopback_env()
    sconf = {k: v for k, v in server_env(env).items() if k.startswith("EPICS_PVA")}
    url = f"sqlite:///{tmp_path / 'locks.sqlite'}"
    policy = parse_policy(TEST_POLICY)
    me = Identity(getpass.getuser(), "127.0.0.1")
    store1 = HeldReply(url)
    t1 = LockTable(policy, store1, devices=DEVICES)
    server1 = Server(providers=[CoordinationIOC(PREFIX, t1).provider], conf=sconf, useenv=False)
    server2 = None
    got: list[object] = []
    try:
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            assert rpc(c, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR").granted
            extra = {"requestId": new_request_id()} if with_id else {}
            store1.hold.set()
            th = threading.Thread(target=lambda: got.append(
                rpc(c, pvn.COORD_RELEASE, device="m1", **extra)))
            th.start()
            assert store1.reached.wait(CLIENT_TIMEOUT)  # committed, reply not sent
            server1.stop()  # the connection drops with the reply
            t2 = LockTable(policy, open_store(url), devices=DEVICES)  # the restarted IOC
            assert t2.locks() == []  # the release is durable
            t2.acquire(me, ["m1"], LockType.MANUAL_OPERATOR, 60)  # the same account again
            server2 = Server(providers=[CoordinationIOC(PREFIX, t2).provider], conf=sconf,
                             useenv=False)
            th.join(CLIENT_TIMEOUT + 5)
            (reply,) = got
            assert not isinstance(reply, Exception), reply
            assert list(reply.devices) == ["m1"]
            if with_id:
                assert [lk.device for lk in t2.locks()] == ["m1"]  # the new lock stays
            else:
                assert t2.locks() == []  # applied twice: what request ids prevent
            t2.store.close()
    finally:
        store1.go.set()
        server1.stop()
        if server2 is not None:
            server2.stop()
        store1.inner.close()
