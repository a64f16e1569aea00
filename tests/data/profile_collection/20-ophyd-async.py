# ruff: noqa: F821 - startup files share one namespace (P, demo, _suffix come from 00-base.py)
# ophyd-async devices: a detector (CA and PVA signals, trigger) created in init_devices(), a
# motor with separate read and write PVs created outside it, and a device with numbered channels,
# a soft signal and an executable signal.
import asyncio

from bluesky.protocols import Movable
from ophyd_async.core import (
    AsyncStatus,
    DeviceVector,
    StandardReadable,
    init_devices,
    soft_signal_rw,
)
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw, epics_signal_x


class DemoDetector(StandardReadable):
    def __init__(self, prefix: str, device: str, name: str = "") -> None:
        with self.add_children_as_readables():
            self.value = epics_signal_r(float, "pva://" + demo.det_value(prefix, device))
        self.acquire_time = epics_signal_rw(float, demo.det_acquire_time(prefix, device))
        self.acquire = epics_signal_rw(int, "ca://" + demo.det_acquire(prefix, device))
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        await self.acquire.set(1, wait=True)


class DemoAsyncMotor(StandardReadable, Movable):
    def __init__(self, prefix: str, device: str, name: str = "") -> None:
        with self.add_children_as_readables():
            self.user_readback = epics_signal_r(float, demo.motor_readback(prefix, device))
        self.user_setpoint = epics_signal_rw(
            float, read_pv=demo.motor_readback(prefix, device),
            write_pv=demo.motor_setpoint(prefix, device),
        )
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        await self.user_setpoint.set(value)
        await asyncio.sleep(0)


with init_devices(timeout=2):
    det1 = DemoDetector(P, "det1")

m2 = DemoAsyncMotor(P, "m2", name="m2")


class DemoChannels(StandardReadable):
    """Numbered channels (a DeviceVector), a soft signal and an executable (write-only) one."""

    def __init__(self, prefix: str, device: str, name: str = "") -> None:
        with self.add_children_as_readables():
            self.channels = DeviceVector({
                1: epics_signal_r(float, demo.det_value(prefix, device)),
                2: epics_signal_r(float, demo.det_acquire_time(prefix, device)),
            })
        self.gain = soft_signal_rw(float, 1.0)
        self.reset = epics_signal_x(demo.det_acquire(prefix, device))
        super().__init__(name=name)


with init_devices(timeout=2):
    det2 = DemoChannels(P, "det2")
