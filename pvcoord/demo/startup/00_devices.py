"""Demo profile collection, part 1: the RunEngine and ophyd-async devices over the demo softIoc.

The RE Manager runs every ``*.py`` of this folder in order in its worker. The devices talk PVA to
the softIoc that ``pvcoord demo`` starts (PV names from :mod:`pvdb.demo`); the softIoc has no
motor record, so the small device classes below implement motion and exposure over its simulated
records. The prefix is ``PVCOORD_DEVICE_PREFIX`` (default: ``PVCOORD_PREFIX``, else ``DEMO:``).
"""

import asyncio
import os

from bluesky import RunEngine
from ophyd_async.core import (
    AsyncStatus,
    MovableLogic,
    StandardMovable,
    StandardReadable,
    StrictEnum,
    TimeoutCalculator,
    init_devices,
    observe_value,
)
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from pvdb import demo as demo_pvs

DEVICE_PREFIX = (
    os.environ.get("PVCOORD_DEVICE_PREFIX") or os.environ.get("PVCOORD_PREFIX")
    or demo_pvs.DEMO_PREFIX
)
POSITION_TOLERANCE = 1e-3
"""A move is done when the readback is this close to the setpoint (motor units)."""


def _pv(spec, device):
    return "pva://" + spec.name(DEVICE_PREFIX, device=device)


class StopCommand(StrictEnum):
    """Choices of ``<motor>:Stop``."""

    IDLE = demo_pvs.STOP_CHOICES[0]
    STOP = demo_pvs.STOP_CHOICES[1]


class AcquireState(StrictEnum):
    """Choices of ``<det>:Acquire``."""

    DONE = demo_pvs.ACQUIRE_CHOICES[0]
    ACQUIRE = demo_pvs.ACQUIRE_CHOICES[1]


class ShutterCommand(StrictEnum):
    """Choices of ``<shutter>:Command``."""

    CLOSE = demo_pvs.SHUTTER_COMMAND_CHOICES[0]
    OPEN = demo_pvs.SHUTTER_COMMAND_CHOICES[1]


class ShutterState(StrictEnum):
    """Choices of ``<shutter>:Status``."""

    CLOSED = demo_pvs.SHUTTER_STATUS_CHOICES[0]
    OPEN = demo_pvs.SHUTTER_STATUS_CHOICES[1]


class _MotorLogic(MovableLogic[float]):
    def __init__(self, motor):
        self.setpoint = motor.setpoint
        self.readback = motor.readback
        self._motor = motor

    async def stop(self):
        await self._motor.stop_cmd.set(StopCommand.STOP)

    async def check_move(self, new_position):
        if not abs(new_position) <= demo_pvs.MOTOR_LIMIT:
            raise ValueError(
                f"{self._motor.name}: {new_position} is outside +-{demo_pvs.MOTOR_LIMIT}"
            )

    async def calculate_timeout(self, old_position, new_position):
        velocity = await self._motor.velocity.get_value()
        return abs(new_position - old_position) / max(velocity, 1e-3) + 5.0

    async def move(self, new_position, timeout: TimeoutCalculator):
        # the setpoint's put completes when the readback has arrived (the demo's database)
        await self.setpoint.set(new_position, timeout=timeout())

        async def arrived():
            async for rb in observe_value(self.readback):
                if abs(rb - new_position) <= POSITION_TOLERANCE:
                    return

        await asyncio.wait_for(arrived(), timeout())


class DemoMotor(StandardReadable, StandardMovable[float]):
    """A simulated motor: put ``Setpoint``, ``Readback`` follows at ``Velocity``."""

    def __init__(self, device: str, name: str = ""):
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.readback = epics_signal_r(float, _pv(demo_pvs.MOTOR_READBACK, device))
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.velocity = epics_signal_rw(float, _pv(demo_pvs.MOTOR_VELOCITY_PV, device))
        self.setpoint = epics_signal_rw(float, _pv(demo_pvs.MOTOR_SETPOINT, device))
        self.stop_cmd = epics_signal_rw(StopCommand, _pv(demo_pvs.MOTOR_STOP, device))
        super().__init__(name=name)

    @property
    def movable_logic(self):
        """How this motor moves (setpoint, then wait for the readback)."""
        if "_logic" not in self.__dict__:
            self.__dict__["_logic"] = _MotorLogic(self)
        return self.__dict__["_logic"]


class DemoDetector(StandardReadable):
    """A simulated detector: ``trigger`` exposes for ``AcquireTime``; ``Value`` is read."""

    def __init__(self, device: str, name: str = ""):
        with self.add_children_as_readables(Format.HINTED_UNCACHED_SIGNAL):
            self.value = epics_signal_r(float, _pv(demo_pvs.DET_VALUE, device))
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.acquire_time = epics_signal_rw(float, _pv(demo_pvs.DET_ACQUIRE_TIME_PV, device))
        self.acquire = epics_signal_rw(AcquireState, _pv(demo_pvs.DET_ACQUIRE, device))
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self):
        """Expose once and wait until ``Acquire`` is back to Done."""
        exposure = await self.acquire_time.get_value()
        await self.acquire.set(AcquireState.ACQUIRE, timeout=exposure + 10.0)

        async def done():
            async for state in observe_value(self.acquire):
                if state == AcquireState.DONE:
                    return

        await asyncio.wait_for(done(), exposure + 10.0)


class DemoShutter(StandardReadable):
    """A simulated shutter: ``set("Open")`` / ``set("Close")`` waits for ``Status`` to follow."""

    def __init__(self, device: str, name: str = ""):
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.status = epics_signal_r(ShutterState, _pv(demo_pvs.SHUTTER_STATUS, device))
        self.command = epics_signal_rw(ShutterCommand, _pv(demo_pvs.SHUTTER_COMMAND, device))
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value):
        """Open (``"Open"``, 1) or close (``"Close"``, 0) and wait for the status."""
        text = {0: "Close", 1: "Open"}.get(value, value) if not isinstance(value, str) else value
        command = ShutterCommand(text.capitalize())
        want = ShutterState.OPEN if command is ShutterCommand.OPEN else ShutterState.CLOSED
        await self.command.set(command)

        async def follows():
            async for state in observe_value(self.status):
                if state == want:
                    return

        await asyncio.wait_for(follows(), demo_pvs.SHUTTER_DELAY + 10.0)


RE = RunEngine({})

with init_devices():
    m1 = DemoMotor("m1")
    m2 = DemoMotor("m2")
    m3 = DemoMotor("m3")
    m4 = DemoMotor("m4")
    det1 = DemoDetector("det1")
    det2 = DemoDetector("det2")
    shutter = DemoShutter("shutter")
