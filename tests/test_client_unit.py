"""Unit tests of the client's pure conversions (no network): arguments out, typed rows in.

The behaviour against the real coordination IOC is in test_client_system.py.
"""

from __future__ import annotations

import math

import pytest
from p4p import Value
from p4p.nt import NTTable

from pvcoord import client as cl
from pvdb.models import EventAction, LockType
from pvdb.names import (
    ACQUIRE_ARGS,
    COORD_ACQUIRE,
    DEVICES_COLUMNS,
    EVENTS_COLUMNS,
    LOCKS_COLUMNS,
    RELEASE_ARGS,
    RENEW_ARGS,
)

from .codes import raises_code


def test_acquire_args_are_pvcall_strings():
    args = cl.acquire_args(" m1, m2 ", "manual-operator", 60, "align", "uid-1", "bob", "ws1")
    assert args == {
        "device": "m1,m2", "type": "MANUAL_OPERATOR", "timeout": "60.0", "reason": "align",
        "planUid": "uid-1", "onBehalfOf": "bob", "clientHost": "ws1",
    }
    assert set(args) <= set(ACQUIRE_ARGS)
    assert all(isinstance(v, str) for v in args.values())
    # no lease: the server's default for the type applies
    assert "timeout" not in cl.acquire_args(["m1"], LockType.MAINTENANCE)


@pytest.mark.parametrize(
    ("devices", "lock_type", "timeout", "match"),
    [
        ("", "MANUAL_OPERATOR", 1, "at least one device"),
        (" , ", "MANUAL_OPERATOR", 1, "at least one device"),
        ("m1", "ROOT", 1, "unknown lock type 'ROOT': use one of MAINTENANCE"),
        ("m1", "MANUAL_OPERATOR", -1, "positive number"),
        ("m1", "MANUAL_OPERATOR", math.nan, "positive number"),
        ("m1", "MANUAL_OPERATOR", math.inf, "positive number"),
        ("m1", "MANUAL_OPERATOR", "soon", "number of seconds"),
    ],
)
def test_bad_requests_raise_before_sending(devices, lock_type, timeout, match):
    with raises_code(cl.BadRequestError, cl.ErrorCode.BAD_ARGUMENT) as e:
        cl.acquire_args(devices, lock_type, timeout)
    assert match in str(e.value)  # names what was wrong


def test_every_mutating_call_gets_a_fresh_valid_request_id():
    from pvcoord.rpc import with_request_id
    from pvdb.lockmodel import request_id_problem
    from pvdb.names import FORCE_RELEASE_ARGS, REQUEST_ID_ARG

    for base, spec_args in ((cl.acquire_args("m1", "MANUAL_OPERATOR"), ACQUIRE_ARGS),
                            (cl.release_args("m1"), RELEASE_ARGS),
                            (cl.renew_args(key="k"), RENEW_ARGS),
                            (cl.force_release_args("m1"), FORCE_RELEASE_ARGS)):
        a, b = with_request_id(base), with_request_id(base)
        assert set(a) <= set(spec_args) and REQUEST_ID_ARG in a
        assert request_id_problem(a[REQUEST_ID_ARG]) is None
        assert a[REQUEST_ID_ARG] != b[REQUEST_ID_ARG]
    given = "A" * 22
    assert with_request_id({"device": "m1"}, given) == {"device": "m1", REQUEST_ID_ARG: given}
    for bad in ("", "x", "A" * 21 + "!", 12345):
        with raises_code(cl.BadRequestError, cl.ErrorCode.BAD_ARGUMENT):
            with_request_id({"device": "m1"}, bad)  # type: ignore[arg-type]


def test_release_and_renew_args():
    assert cl.release_args("m1") == {"device": "m1"}
    assert cl.release_args(key="k") == {"key": "k"}
    assert set(cl.release_args("m1", "k", "bob", "h")) <= set(RELEASE_ARGS)
    assert cl.renew_args(key="k", timeout=30) == {"key": "k", "timeout": "30.0"}
    assert set(cl.renew_args("m1", "k", 5, "bob", "h")) <= set(RENEW_ARGS)
    with raises_code(cl.BadRequestError, cl.ErrorCode.BAD_ARGUMENT):
        cl.release_args()
    with raises_code(cl.BadRequestError, cl.ErrorCode.BAD_ARGUMENT):
        cl.renew_args(timeout=3)


def test_nturi_is_what_p4p_cli_sends():
    pv = COORD_ACQUIRE.name("T:")
    v = cl.nturi(pv, {"device": "m1", "type": "MAINTENANCE"})
    assert v.getID() == "epics:nt/NTURI:1.0"
    assert v["path"] == pv
    assert v["query"].todict() == {"device": "m1", "type": "MAINTENANCE"}


def _reply(**fields) -> Value:
    from p4p import Type

    t = Type([("granted", "?"), ("key", "s"), ("devices", "as"), ("preempted", "as"),
              ("expires", "d"), ("message", "s")])
    return Value(t, fields)


def test_parse_grant_and_key_not_in_repr():
    g = cl.parse_grant("P:Coord:Acquire", _reply(
        granted=True, key="secret-key", devices=["m1", "m2"], preempted=["m2"], expires=12.5,
        message="ok",
    ))
    assert g.devices == ("m1", "m2") and g.preempted == ("m2",) and g.expires == 12.5
    assert g.key == "secret-key"
    assert "secret-key" not in repr(g)
    with pytest.raises(cl.RefusedError) as e:
        cl.parse_grant("P:Coord:Acquire", _reply(granted=False, message="held by x"))
    assert e.value.message == "held by x" and e.value.code is None  # a server without codes


def _table(columns, rows) -> Value:
    return NTTable(list(columns)).wrap(rows)


def test_parse_locks_from_an_nttable():
    v = _table(LOCKS_COLUMNS, [
        {"device": "m1", "lockType": "MANUAL_OPERATOR", "priority": 2, "owner": "root@127.0.0.1",
         "acquired": 100.0, "expires": 160.0, "reason": "align", "planUid": ""},
    ])
    (row,) = cl.parse_locks(v)
    assert row.device == "m1" and row.lock_type is LockType.MANUAL_OPERATOR
    assert row.owner == "root@127.0.0.1" and row.remaining(now=130.0) == 30.0
    assert cl.parse_locks(_table(LOCKS_COLUMNS, [])) == []


def test_parse_events_and_registry():
    ev = _table(EVENTS_COLUMNS, [
        {"time": 1.0, "action": "acquired", "device": "m1", "lockType": "MAINTENANCE",
         "actor": "root", "holder": "root@h", "message": "until x"},
        {"time": 2.0, "action": "expired", "device": "m2", "lockType": "", "actor": "pvcoord",
         "holder": "", "message": ""},
        {"time": 3.0, "action": "from-a-newer-ioc", "device": "m2", "lockType": "",
         "actor": "pvcoord", "holder": "", "message": ""},  # skipped, not an error
    ])
    e1, e2 = cl.parse_events(ev)
    assert e1.action is EventAction.ACQUIRED and e1.lock_type is LockType.MAINTENANCE
    assert e2.lock_type is None
    reg = _table(DEVICES_COLUMNS, [
        {"name": "m1", "deviceClass": "SimMotor", "capabilities": "readable,movable",
         "pvPrefix": "DEMO:m1:", "ioc": "demo-softioc", "description": "d", "connected": True},
    ])
    (d,) = cl.parse_registry(reg)
    assert d.capabilities == ("readable", "movable") and d.connected


def test_malformed_rows_are_a_clear_error():
    v = _table(LOCKS_COLUMNS, [
        {"device": "m1", "lockType": "NOPE", "priority": 2, "owner": "o", "acquired": 1.0,
         "expires": 2.0, "reason": "", "planUid": ""},
    ])
    with pytest.raises(cl.CoordError, match="malformed Coord:Locks row"):
        cl.parse_locks(v)


def test_a_ragged_table_is_an_error_naming_its_columns_never_truncated():
    """Columns of different lengths (a server bug, or a table put by hand): CoordError naming
    the columns and their lengths, not the rows of the shortest column."""
    v = _table(DEVICES_COLUMNS, [
        {"name": n, "deviceClass": "SimMotor", "capabilities": "", "pvPrefix": f"D:{n}:",
         "ioc": "i", "description": "", "connected": True} for n in ("m1", "m2")])
    v["value.pvPrefix"] = ["D:m1:"]  # one row short
    with pytest.raises(cl.CoordError) as info:
        cl.table_rows(v)
    assert "pvPrefix 1" in str(info.value) and "name 2" in str(info.value)
    with pytest.raises(cl.CoordError):
        cl.parse_registry(v)


def test_a_column_never_set_is_missing_from_the_rows():
    """A column never set (an empty array while the others have rows) is absent from the rows,
    so its default applies; the other columns' rows are all there (before, such a table read
    as empty)."""
    v = NTTable([("name", "s"), ("pvPrefix", "s"), ("description", "s")]).type()
    v["labels"] = ["name", "pvPrefix", "description"]
    v["value.name"] = ["m1", "m2"]
    v["value.pvPrefix"] = ["D:m1:", "D:m2:"]
    rows = cl.table_rows(v)
    assert [r["name"] for r in rows] == ["m1", "m2"]
    assert all("description" not in r for r in rows)
    assert [d.description for d in cl.parse_registry(v)] == ["", ""]  # its default
    assert cl.table_rows(_table(DEVICES_COLUMNS, [])) == []  # an empty table: no rows


def test_client_rejects_bad_prefix_and_timeout():
    with pytest.raises(ValueError, match="end it with ':'"):
        cl.Client("NOCOLON")
    with pytest.raises(cl.BadRequestError, match="call timeout"):
        cl.Client("P:", timeout=0)


def test_refused_error_carries_the_code_and_holder_of_the_server_text():
    e = cl.RefusedError("P:Coord:Acquire", "[holder-conflict holder=bob@h] m2 is held by bob@h")
    assert (e.code, e.holder, e.message) == (cl.ErrorCode.HOLDER_CONFLICT, "bob@h",
                                             "m2 is held by bob@h")
    assert str(e) == e.message and e.text.startswith("[holder-conflict")
    plain = cl.RefusedError("P:m1", "Put permission denied by gateway")
    assert (plain.code, plain.holder, plain.message) == (None, "", plain.text)


class _ReleasedTwice:
    """A coordination caller whose release is answered as a retried one after a restart (the
    IOC side of this is tests/test_durability_system.py's kill -9 run)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def pv(self, spec):
        return spec.name("UT:")

    async def acquire(self, *args, **kws):
        from pvcoord.rpc import Grant

        return Grant(granted=True, key="k" * 32, devices=("m1",), preempted=(), expires=9e9,
                     message="granted")

    async def renew(self, *args, **kws):
        raise AssertionError("not renewed in this test")

    async def release(self, *args, **kws):
        from pvcoord.rpc import RefusedError

        raise RefusedError("UT:Coord:Release", f"[{self.code} holder=u@h] m1: as told")


@pytest.mark.parametrize(("code", "lost"), [("released", False), ("preempted", True)])
def test_leaving_a_lock_block_whose_release_was_retried_is_not_a_loss(code, lost):
    import asyncio

    from pvcoord.client import AsyncHeldLock, LockLostError
    from pvdb.lockmodel import LockType

    async def main() -> None:
        held = AsyncHeldLock(_ReleasedTwice(code), ["m1"], LockType.MANUAL_OPERATOR,  # type: ignore[arg-type]
                             60.0, "", "", None, None, 30.0, None, False)
        async with held:
            pass

    if lost:
        with pytest.raises(LockLostError) as e:
            asyncio.run(main())
        assert e.value.code.value == code
    else:
        asyncio.run(main())


class _SilentAfterGrant:
    """A coordination caller that grants, then never answers a renew (the IOC unreachable);
    ``expires`` in its replies is the IOC's wall clock (``ioc_wall``), as in the real replies."""

    def __init__(self, ioc_wall) -> None:
        self.ioc_wall = ioc_wall
        self.renews = 0

    def pv(self, spec):
        return spec.name("UT:")

    async def acquire(self, devices, lock_type, timeout, *args, **kws):
        from pvcoord.rpc import Grant

        return Grant(granted=True, key="k" * 32, devices=tuple(devices), preempted=(),
                     expires=self.ioc_wall() + timeout, message="granted")

    async def renew(self, *args, **kws):
        from pvcoord.rpc import NoAnswerError

        self.renews += 1
        raise NoAnswerError("UT:Coord:Renew", 1.0)

    async def release(self, *args, **kws):
        from pvcoord.rpc import Reply

        return Reply(devices=("m1",), message="released")


def test_a_forward_wall_clock_step_does_not_end_a_held_lock_whose_renew_fails(monkeypatch):
    """The held lock decided 'the lease ran out' by ``time.time() >= expires``: a forward step
    of the client's wall clock cancelled the owner's task while the IOC still held the lock."""
    import asyncio

    from pvcoord.client import AsyncHeldLock, LockLostError
    from pvdb.lockmodel import ErrorCode, LockType

    from .fakeclock import FakeTime

    clock = FakeTime()
    monkeypatch.setattr(cl, "time", clock)  # the client's wall and monotonic clock
    ioc_wall = FakeTime()  # the IOC's wall clock does not step
    caller = _SilentAfterGrant(ioc_wall.time)
    stage = ["held"]
    lost_at: list[str] = []

    async def main() -> None:
        held = AsyncHeldLock(caller, ["m1"], LockType.MANUAL_OPERATOR,  # type: ignore[arg-type]
                             60.0, "", "", None, lambda e: lost_at.append(stage[0]), 0.2, None,
                             True)
        async with held:
            clock.step(3600.0)
            stage[0] = "wall clock stepped +3600 s"
            while caller.renews < 3:  # not a readiness wait: renews fail every 0.2 s
                await asyncio.sleep(0.05)
            clock.advance(61.0)  # the lease runs out (monotonically) without a renew
            stage[0] = "lease ran out"
            await asyncio.sleep(1.0)  # cancelled here (cancel_on_loss)
            raise AssertionError("not cancelled after the lease ran out")

    with pytest.raises(LockLostError) as e:
        asyncio.run(main())
    assert lost_at == ["lease ran out"]
    assert e.value.code is ErrorCode.EXPIRED


def test_a_held_lock_times_at_most_the_lease_it_asked_for():
    """The time left is ``expires - now`` when the reply arrives, at most the lease asked for
    (an IOC whose clock is ahead of the client's does not lengthen it)."""
    import asyncio

    from pvcoord.client import AsyncHeldLock
    from pvdb.lockmodel import LockType

    from .fakeclock import FakeTime

    clock = FakeTime()
    caller = _SilentAfterGrant(lambda: clock.wall + 100.0)  # the IOC's clock: 100 s ahead

    async def main() -> None:
        held = AsyncHeldLock(caller, ["m1"], LockType.MANUAL_OPERATOR,  # type: ignore[arg-type]
                             60.0, "", "", None, None, 30.0, None, False)
        held.clock, held.monotonic = clock.time, clock.monotonic
        async with held:
            assert held.expires == clock.wall + 160.0  # as the IOC said (shown to users)
            assert held._deadline == clock.mono + 60.0  # not 160 s from now

    asyncio.run(main())
