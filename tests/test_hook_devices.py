"""The worker hook matches devices by registry name and by PV (issue 11, finding 6).

Pure tier: the PVs an ophyd / ophyd-async object writes (:func:`pvcoord.devicewalk.written_pvs`),
grouping PVs by device (:meth:`pvdb.devicemap.DeviceMap.group`), the ``fields.unregistered``
rule (:meth:`pvdb.policy.Policy.unregistered_refusal`).

Resolution tier: the real registry IOC (in-process, isolated server) and the queue IOC's real
hook server (in-process, no RE Manager: ``--no-locks``) on a real redis; the hook's
:class:`~pvcoord.worker_hook.PlanCheck` with a real SQLite store. The whole path with the real
RE Manager, worker RunEngine and softIoc is ``test_worker_hook.py``'s system test.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from bluesky.utils import Msg
from ophyd import Component as Cpt
from ophyd import Device, EpicsMotor, EpicsSignal, EpicsSignalRO
from ophyd.sim import SynAxis
from ophyd_async.core import StandardReadable
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from iocs.queue.ioc import QueueIOC
from iocs.registry.ioc import serve as serve_registry
from pvcoord.demo.devices import registry_devices
from pvcoord.demo.queue_part import QUEUE_LOCK_OWNER
from pvcoord.devicewalk import written_pvs
from pvcoord.procs import start_redis
from pvcoord.store import SQLiteStore
from pvcoord.worker_hook import EXEMPT, DeviceLockedError, LockGuard, PlanCheck
from pvdb import demo
from pvdb import queue as qn
from pvdb.devicemap import DeviceMap
from pvdb.lockmodel import ErrorCode
from pvdb.models import LockType
from pvdb.policy import Policy

from .codes import raises_code
from .coordhelpers import put_lock

P = "TR:"
"""Prefix of the registry and of the hook channel of this module."""
NOREG = "TN:"
"""A hook channel whose queue IOC looks for a registry that does not exist."""
TIMEOUT = 10.0


def _m1(pv: str) -> str:
    return demo.motor_setpoint(P, "m1") if pv == "setpoint" else demo.motor_readback(P, "m1")


class AsyncAxis(StandardReadable):
    """An ophyd-async axis over the demo m1's records, under any name."""

    def __init__(self, device: str, name: str = "") -> None:
        self.setpoint = epics_signal_rw(float, "pva://" + demo.motor_setpoint(P, device))
        self.readback = epics_signal_r(float, "pva://" + demo.motor_readback(P, device))
        super().__init__(name=name)


def _suffix(pv: str) -> str:
    """The record suffix of a demo motor PV (``P m1:Setpoint`` -> ``Setpoint``)."""
    return pv[len(f"{P}m1:"):]


class Axis(Device):
    """An ophyd device over the demo records of one motor (PV suffixes from pvdb)."""

    setpoint = Cpt(EpicsSignal, _suffix(demo.motor_setpoint(P, "m1")))
    readback = Cpt(EpicsSignalRO, _suffix(demo.motor_readback(P, "m1")))


# --- pure tier --------------------------------------------------------------------------------


def test_written_pvs_of_ophyd_and_ophyd_async_objects():
    motor = EpicsMotor(f"{P}m1", name="sample_x")  # a motor record; nothing connects
    pvs, has = written_pvs(motor)
    assert has and f"{P}m1.VAL" in pvs and f"{P}m1.STOP" in pvs
    assert f"{P}m1.RBV" not in pvs  # read-only components write nothing
    assert written_pvs(motor.user_setpoint) == ([f"{P}m1.VAL"], True)
    assert written_pvs(EpicsSignalRO(_m1("readback"), name="ro")) == ([], True)
    rw = EpicsSignal(_m1("readback"), write_pv=_m1("setpoint"), name="rw")
    assert written_pvs(rw) == ([_m1("setpoint")], True)
    axis = Axis(f"{P}m1:", name="sample_x")
    assert written_pvs(axis) == ([_m1("setpoint")], True)
    assert written_pvs(AsyncAxis("m1", name="sample_x")) == ([_m1("setpoint")], True)
    assert written_pvs(SynAxis(name="m1")) == ([], False)  # simulated: matched by name


def test_group_and_the_unregistered_rule():
    dmap = DeviceMap([(_m1("setpoint"), "m1")], [("m2", f"{P}m2:")])
    got = dmap.group([_m1("setpoint"), f"{P}m2:Setpoint", "X:other", _m1("setpoint") + ".VAL"])
    assert got == ({"m1": [_m1("setpoint"), _m1("setpoint") + ".VAL"],
                    "m2": [f"{P}m2:Setpoint"]}, ["X:other"])
    policy = Policy()
    assert policy.unregistered_refusal("root", ()) == ""  # staff by default
    assert "only staff" in policy.unregistered_refusal(QUEUE_LOCK_OWNER, ())
    anyone = Policy.model_validate({"fields": {"unregistered": "everyone"}})
    assert anyone.unregistered_refusal(QUEUE_LOCK_OWNER, ()) == ""
    strict = Policy.model_validate({"access": {"unlocked_writable": False},
                                    "fields": {"unregistered": "everyone"}})
    assert "nobody" in strict.unregistered_refusal("root", ())


# --- resolution tier: the real registry IOC and queue IOC hook server ---------------------------


def _registry():
    """The demo devices under ``P``, m1 also answering as an EPICS motor record ``P m1``."""
    devices = registry_devices(P)
    return [d.model_copy(update={"pvs": [*d.pvs, f"{P}m1"]}) if d.name == "m1" else d
            for d in devices]


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    """redis + the registry IOC + two queue-IOC hook servers (``P`` and ``NOREG``)."""
    redis_proc, port = start_redis(log_dir=tmp_path_factory.mktemp("hook-devices-redis"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stop = asyncio.Event()
    url = f"redis://127.0.0.1:{port}/0"
    started: list[asyncio.Future] = []
    iocs: dict[str, QueueIOC] = {}

    async def start():
        ready = asyncio.get_running_loop().create_future()
        started.append(asyncio.ensure_future(serve_registry(
            P, _registry(), stop, check_period=30.0, isolate=True,
            ready=lambda ioc: ready.set_result(ioc.server_conf))))
        conf = await asyncio.wait_for(ready, TIMEOUT)
        for prefix in (P, NOREG):  # the queue's writer is the service account (not staff)
            ioc = QueueIOC(prefix, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", Policy(),
                           locks=False, redis_url=url, client_conf=conf,
                           lock_owner=QUEUE_LOCK_OWNER)
            iocs[prefix] = ioc
            started.append(asyncio.ensure_future(ioc.serve_hook_requests(stop)))

    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
        yield url, iocs
    finally:
        loop.call_soon_threadsafe(stop.set)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(asyncio.gather(*started, return_exceptions=True), TIMEOUT),
                loop).result(TIMEOUT + 5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
        redis_proc.stop()


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "locks.sqlite")
    try:
        yield s
    finally:
        s.close()


@pytest.mark.system
def test_the_registry_map_resolves_objects_whatever_their_ophyd_name(channel):
    url, iocs = channel
    guard = LockGuard(P, url, timeout=5.0)
    motor_pvs, _ = written_pvs(EpicsMotor(f"{P}m1", name="sample_x"))
    assert guard.resolve(motor_pvs) == {"m1": motor_pvs}  # by record name (motor fields)
    assert guard.resolve([_m1("setpoint")]) == {"m1": [_m1("setpoint")]}  # explicit PV
    shutter = demo.shutter_command(P)
    assert guard.resolve([_m1("setpoint"), shutter]) == {"m1": [_m1("setpoint")],
                                                         "shutter": [shutter]}
    many = [f"{P}m1:Extra{i}" for i in range(qn.HOOK_MAX_PVS + 20)]  # sent in two parts
    assert guard.resolve(many) == {"m1": many}  # by the longest prefix
    # a PV of no device: fields.unregistered = staff (default), the queue's account is not staff
    with raises_code(DeviceLockedError, ErrorCode.NOT_ALLOWED) as e:
        guard.resolve([_m1("setpoint"), "TR:nobody:Setpoint"], "stray")
    assert "TR:nobody:Setpoint" in str(e.value) and QUEUE_LOCK_OWNER in str(e.value)
    assert iocs[P].resolve_health == ""


@pytest.mark.system
def test_a_registry_that_does_not_answer_fails_closed(channel):
    url, iocs = channel
    with raises_code(DeviceLockedError, ErrorCode.NOT_READY) as e:
        LockGuard(NOREG, url, timeout=8.0).resolve([_m1("setpoint")])
    assert "Registry:DevicePVs" in str(e.value)
    assert f"{NOREG}Registry:DevicePVs" in iocs[NOREG].resolve_health  # LockHealth says so


@pytest.mark.system
def test_a_renamed_object_of_a_held_device_is_refused(channel, store):
    """``EpicsMotor('P m1', name='sample_x')`` while m1 is held: refused, the holder named."""
    put_lock(store, "m1", LockType.MAINTENANCE)
    check = PlanCheck(LockGuard(P, channel[0], timeout=5.0, store=store))
    renamed = [EpicsMotor(f"{P}m1", name="sample_x"), Axis(f"{P}m1:", name="sample_x"),
               AsyncAxis("m1", name="sample_x")]
    for obj in renamed:
        target = obj.user_setpoint if isinstance(obj, EpicsMotor) else obj.setpoint
        for msg in (Msg("set", target, 1.0), Msg("stage", obj)):
            with raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT, "max@h") as e:
                check(msg)
            assert "on m1 (ophyd object 'sample_x')" in str(e.value)
        # cleanup of the held device the plan never acted on does not reach it
        for cmd in EXEMPT:
            assert check(Msg(cmd, obj)).command == "null"
    # each object was resolved once for this plan (the cache), to the registry device
    assert sorted(devs for _obj, devs in check.resolved.values()) == [("m1",)] * 6
    # a simulated device (no PVs) named like the registry device is still matched by name
    with raises_code(DeviceLockedError, ErrorCode.HOLDER_CONFLICT, "max@h"):
        check(Msg("set", SynAxis(name="m1"), 1.0))
    # a read-only object of m1 writes nothing: its acting messages touch no device
    ro = EpicsSignalRO(_m1("readback"), name="sample_x_rbv")
    m = Msg("trigger", ro)
    assert check(m) is m
