"""The client library against the real coordination IOC process (``python -m iocs.coordination``).

One IOC (static device list, SQLite store, the demo policy) serves the whole module; each test uses
its own devices so the tests do not see each other's locks.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pvcoord import client as cl
from pvcoord.launch import coordination_argv
from pvcoord.procs import ManagedProcess, server_env, wait_for_pv, wait_until
from pvdb.lockmodel import ErrorCode
from pvdb.names import COORD_LOCKS

from .codes import raises_code

pytestmark = pytest.mark.system

TIMEOUT = 10.0
"""Seconds any single client call may take (as ``conftest.TIMEOUT``)."""

PREFIX = "TCL:"
DEVICES = [f"d{i}" for i in range(1, 13)]
POLICY = Path(__file__).resolve().parent.parent / "pvcoord" / "demo" / "policy.toml"


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    """The coordination IOC, in this process's (conftest's) loopback environment."""
    d = tmp_path_factory.mktemp("coord")
    proc = ManagedProcess(
        "coordination",
        coordination_argv(PREFIX, f"sqlite:///{d}/locks.sqlite", POLICY, devices=DEVICES),
        server_env(os.environ), log_dir=d,
    )
    try:
        wait_for_pv(COORD_LOCKS.name(PREFIX), os.environ, 30, procs=[proc])
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(ioc):
    with cl.Client(PREFIX, timeout=TIMEOUT) as c:
        yield c


def held(c: cl.Client, device: str) -> cl.LockInfo | None:
    return next((lk for lk in c.locks() if lk.device == device), None)


def test_acquire_release_and_typed_rows(client, ioc):
    g = client.acquire(["d1", "d2"], "MANUAL_OPERATOR", 60, "align", plan_uid="p-1")
    try:
        assert g.granted and g.devices == ("d1", "d2") and g.preempted == ()
        assert g.key and g.key not in repr(g)
        assert g.expires == pytest.approx(time.time() + 60, abs=5)
        row = held(client, "d1")
        assert row is not None and row.lock_type.value == "MANUAL_OPERATOR"
        assert row.owner.startswith("root@") and row.reason == "align" and row.plan_uid == "p-1"
        r = client.renew(key=g.key, timeout=30)
        assert set(r.devices) == {"d1", "d2"}
        assert r.expires == pytest.approx(time.time() + 30, abs=5)
        wait_until(  # the audit tail is published right after the reply
            lambda: any(e.device == "d1" and e.action.value == "acquired"
                        for e in client.events()), 5, "the acquired event of d1")
        assert set(client.devices()) == set(DEVICES) | {"beamline"}
    finally:
        r = client.release(key=g.key)
    assert set(r.devices) == {"d1", "d2"}
    assert held(client, "d1") is None
    with raises_code(cl.RefusedError, ErrorCode.RELEASED) as e:
        client.release("d1")
    assert "d1" in e.value.message  # the server's text, as written
    assert e.value.pv == f"{PREFIX}Coord:Release"
    assert g.key not in ioc.output()


def test_refusal_carries_the_servers_message(client):
    with client.lock("d3", "MANUAL_OPERATOR", 60, "first", on_behalf_of="alice"):
        with raises_code(cl.RefusedError, ErrorCode.HOLDER_CONFLICT) as e:
            client.acquire("d3", "MANUAL_OPERATOR", 60, "second", on_behalf_of="bob")
        assert e.value.holder.startswith("alice@")
        msg = e.value.message
        assert "alice@" in msg and "MANUAL_OPERATOR" in msg and "first" in msg
    with raises_code(cl.RefusedError, ErrorCode.UNKNOWN_DEVICE):
        client.acquire("nosuchdevice", "MANUAL_OPERATOR", 10)


def test_lock_context_manager_renews_then_releases(client):
    # renewed each 0.25 s against a 2 s lease: a stall must pass 1.75 s to lose it
    lease = 2.0
    with client.lock("d4", "MANUAL_OPERATOR", lease, "scan", renew_every=0.25) as h:
        first = held(client, "d4")
        assert first is not None
        wait_until(lambda: h.renewals >= 14, 10 * lease, "14 renewals (3.5 s)")
        later = held(client, "d4")
        assert later is not None and later.expires > first.expires
        # held well past the first lease: the renewals kept it alive
        assert time.time() - first.acquired > 1.5 * lease
        h.check()
    assert held(client, "d4") is None


def test_lock_released_when_the_block_raises(client):
    with pytest.raises(ZeroDivisionError), client.lock("d5", "MANUAL_OPERATOR", 30, "oops"):
        assert held(client, "d5") is not None
        _ = 1 / 0
    assert held(client, "d5") is None


def test_preempted_holder_is_told(client):
    lost: list[cl.LockLostError] = []
    with raises_code(cl.LockLostError, ErrorCode.PREEMPTED) as e:
        with client.lock("d6", "MANUAL_OPERATOR", 3.0, "bob's", on_behalf_of="bob",
                         on_lost=lost.append, renew_every=0.3) as h:
            g = client.acquire("d6", "MAINTENANCE", 60, "fix the encoder")
            assert len(g.preempted) == 1 and g.preempted[0].startswith("d6")
            wait_until(lambda: h.lost is not None, 5, "the renew thread noticing")
            with pytest.raises(cl.LockLostError):
                h.check()
    assert lost and lost[0] is e.value
    # the maintenance lock was not touched by the preempted holder's exit
    row = held(client, "d6")
    assert row is not None and row.lock_type.value == "MAINTENANCE"
    client.release(key=g.key)


def test_force_release_is_reported_as_lost(client):
    with pytest.raises(cl.LockLostError), client.lock("d7", "MANUAL_OPERATOR", 3.0, "x",
                                                      on_behalf_of="carol",
                                                      renew_every=0.3) as h:
        client.force_release("d7", "test")
        wait_until(lambda: h.lost is not None, 5, "the renew thread noticing")
    assert held(client, "d7") is None


def test_no_answer_within_the_call_timeout(ioc):
    t0 = time.monotonic()
    with cl.Client("NOBODY:", timeout=0.5) as c, pytest.raises(cl.NoAnswerError) as e:
        c.locks()
    assert time.monotonic() - t0 < 3
    assert "NOBODY:Coord:Locks" in str(e.value) and "0.5 s" in str(e.value)


def test_async_client_lock_renew_release(ioc):
    async def scenario():
        with cl.AsyncClient(PREFIX, timeout=TIMEOUT) as c:
            async with c.lock("d8", "MANUAL_OPERATOR", 3.0, "async", renew_every=0.3) as h:
                rows = await c.locks()
                assert any(r.device == "d8" for r in rows)
                while h.renewals < 3:
                    await asyncio.sleep(0.05)
            rows = await c.locks()
            assert not any(r.device == "d8" for r in rows)
            assert set(DEVICES) | {"beamline"} == set(await c.devices())
            assert await c.heartbeat() > 0
            # release on exception
            with pytest.raises(KeyError):
                async with c.lock("d8", "MANUAL_OPERATOR", 30, "async"):
                    raise KeyError("boom")
            assert not any(r.device == "d8" for r in await c.locks())

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_async_cancel_on_loss(ioc):
    async def scenario():
        with cl.AsyncClient(PREFIX, timeout=TIMEOUT) as c:
            with raises_code(cl.LockLostError, ErrorCode.PREEMPTED):
                async with c.lock("d9", "MANUAL_OPERATOR", 3.0, "long task", on_behalf_of="bob",
                                  cancel_on_loss=True, renew_every=0.3):
                    g = await c.acquire("d9", "MAINTENANCE", 60, "urgent")
                    await asyncio.sleep(30)  # cancelled when the renew is refused
            await c.release(key=g.key)
            assert asyncio.current_task().cancelling() == 0

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_lease_runs_out_while_the_ioc_is_gone(tmp_path):
    """Renews that get no answer end in LockLostError once the lease has passed."""
    env = dict(os.environ)
    proc = ManagedProcess(
        "coordination-short",
        coordination_argv("TCL2:", f"sqlite:///{tmp_path}/s.sqlite", POLICY, devices=["x1"]),
        server_env(env), log_dir=tmp_path,
    )
    try:
        wait_for_pv(COORD_LOCKS.name("TCL2:"), env, 30, procs=[proc])
        with cl.Client("TCL2:", timeout=0.3) as c:
            with raises_code(cl.LockLostError, ErrorCode.EXPIRED), \
                    c.lock("x1", "MANUAL_OPERATOR", 1.0, "x") as h:
                proc.kill9()
                wait_until(lambda: h.lost is not None, 10, "the lease running out")
    finally:
        proc.stop()
