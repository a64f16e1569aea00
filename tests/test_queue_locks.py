"""The queue IOC's lock keeper (``iocs.queue.locks.LockKeeper``) against the real coordination IOC.

While the RE Manager is unreachable the running item's QUEUE_EXECUTING lock is neither renewed
nor re-acquired, so it runs out with its lease; it comes back once the manager is reachable.
"""

from __future__ import annotations

import asyncio

import pytest

from iocs.queue.locks import Inputs, LockKeeper
from pvcoord.client import Client
from pvcoord.procs import client_conf
from pvdb.models import LockType

from .conftest import TIMEOUT
from .coordhelpers import PREFIX, start_coordination
from .fakeclock import FakeTime

LEASE = 3.0
"""QUEUE_EXECUTING lease of the keeper under test (s): renewed every lease/3, so a stall of the
test's event loop or of an fsync must pass lease*2/3 before the lease runs out."""

pytestmark = pytest.mark.system


def test_executing_lock_runs_out_while_the_manager_is_unreachable(env, tmp_path):
    proc = start_coordination(env, tmp_path)
    try:
        with Client(PREFIX, conf=client_conf(env), timeout=TIMEOUT) as coord:
            asyncio.run(_scenario(env, coord))
    except BaseException:
        print(proc.output()[-3000:])
        raise
    finally:
        proc.stop()


async def _scenario(env, coord: Client) -> None:
    async def conflict(uid: str, message: str) -> None:
        raise AssertionError(f"unexpected refusal for {uid}: {message}")

    def executing() -> list[tuple[str, str]]:
        return [(lk.device, lk.plan_uid) for lk in coord.locks()
                if lk.lock_type is LockType.QUEUE_EXECUTING]

    async def until(pred, timeout: float, what: str):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            got = await asyncio.to_thread(pred)
            if got:
                return got
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{what}: not true after {timeout} s")

    keeper = LockKeeper(PREFIX, "root", client_conf(env), conflict, exec_lease=LEASE)
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    try:
        keeper.update(Inputs(running_uid="item-1", running_name="count",
                             running_devices=("m1",)))
        await until(lambda: executing() == [("m1", "item-1")], TIMEOUT, "m1 QUEUE_EXECUTING")
        await asyncio.sleep(LEASE * 1.5)  # not a readiness wait: outlive one lease
        assert await asyncio.to_thread(executing) == [("m1", "item-1")], "renewed while reachable"
        keeper.set_manager_reachable(False)
        await until(lambda: not executing(), LEASE + 5.0, "the lease ran out")
        await asyncio.sleep(LEASE)  # not a readiness wait: it must not come back on its own
        assert await asyncio.to_thread(executing) == [], "re-acquired while unreachable"
        assert keeper.executing() == []
        keeper.set_manager_reachable(True)
        await until(lambda: executing() == [("m1", "item-1")], TIMEOUT, "held again")
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


# --- the keeper's own timing (a fake coordination caller, fake clocks) ----------------------


class _Caller:
    """Records the keeper's requests and grants them all (stands in for ``AsyncCaller``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    async def acquire(self, devices, *args, **kws):
        self.calls.append(("acquire", list(devices)))

    async def renew(self, devices, *args, **kws):
        self.calls.append(("renew", list(devices)))

    async def release(self, devices, *args, **kws):
        self.calls.append(("release", list(devices)))


def _keeper(monkeypatch, lease: float = 60.0) -> tuple[LockKeeper, _Caller, FakeTime]:
    from iocs.queue import locks

    clock = FakeTime()
    monkeypatch.setattr(locks, "time", clock)  # what the keeper reads as time.time/monotonic

    async def conflict(uid: str, message: str) -> None:
        raise AssertionError(f"unexpected refusal for {uid}: {message}")

    keeper = LockKeeper(PREFIX, "root", None, conflict, exec_lease=lease,
                        monotonic=clock.monotonic)
    caller = _Caller()
    keeper._client = caller  # type: ignore[assignment]
    keeper._locks_seen, keeper.coordinated = True, frozenset({"m1"})
    keeper.update(Inputs(running_uid="item-1", running_name="count", running_devices=("m1",)))
    return keeper, caller, clock


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_a_wall_clock_step_neither_stops_nor_hurries_the_renewals(monkeypatch, step):
    """A backward step stopped renewing (wall-clock intervals): QUEUE_EXECUTING ran out on the
    coordination IOC, which times leases monotonically. A forward one renewed at every tick."""
    keeper, caller, clock = _keeper(monkeypatch, lease=60.0)
    asyncio.run(keeper.reconcile())
    assert caller.calls == [("acquire", ["m1"])]
    clock.step(step)
    clock.advance(10.0)  # less than lease/3: no renew yet
    asyncio.run(keeper.reconcile())
    assert caller.calls == [("acquire", ["m1"])]
    clock.advance(11.0)  # 21 s since the grant: renewed
    asyncio.run(keeper.reconcile())
    assert caller.calls == [("acquire", ["m1"]), ("renew", ["m1"])]
    assert keeper.executing() == ["m1"]


def test_a_wall_clock_step_does_not_change_when_a_grant_is_checked_against_the_monitor(
        monkeypatch):
    """A fresh grant is not yet in ``Coord:Locks`` (kept 1 s); a lost one is dropped after it."""
    keeper, _caller, clock = _keeper(monkeypatch)
    asyncio.run(keeper.reconcile())
    keeper.locks = {}  # the monitor does not show the grant (yet; or: it was lost)
    clock.step(3600.0)
    clock.advance(0.1)
    keeper._forget_lost()
    assert keeper.executing() == ["m1"], "a fresh grant was taken for lost (forward step)"
    clock.step(-7200.0)
    clock.advance(5.0)
    keeper._forget_lost()
    assert keeper.executing() == [], "a lost lock was kept as held (backward step)"
