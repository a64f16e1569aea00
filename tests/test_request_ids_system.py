"""The real coordination IOC: a request sent twice with one ``requestId`` is applied once, and
the second answer equals the first, on the same IOC and after a ``kill -9`` and restart
(decision 0160). The lock-table rules behind it are in ``tests/test_request_ids.py``.
"""

from __future__ import annotations

import pytest
from p4p.client.thread import Context, RemoteError

from pvcoord.client import Client
from pvcoord.procs import client_conf, loopback_env
from pvdb import names as pvn
from pvdb.lockmodel import ErrorCode, new_request_id

from .codes import code_of
from .coordhelpers import CLIENT_TIMEOUT, PREFIX, locks, rpc, start_coordination

pytestmark = pytest.mark.system


def answer(r) -> object:
    """An RPC answer as something comparable: the reply's fields, or the error text."""
    if isinstance(r, Exception):
        return f"error: {r}"
    return r.todict()


def counts(c: Context) -> dict[str, int]:
    """Audit events per action in ``Coord:Events`` (what a second application would add)."""
    v = c.get(pvn.COORD_EVENTS.name(PREFIX), timeout=CLIENT_TIMEOUT)
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
            n = len([e for e in cl.events() if e.device == "m4"])
        proc.kill9()
        proc.stop()
        proc = start_coordination(env, tmp_path)
        with Client(PREFIX, conf=client_conf(env), timeout=CLIENT_TIMEOUT) as cl:
            assert cl.acquire("m4", "MANUAL_OPERATOR", 60, request_id=rid) == g
            assert len([e for e in cl.events() if e.device == "m4"]) == n
            assert cl.release(key=g.key).devices == ("m4",)
    finally:
        proc.stop()
