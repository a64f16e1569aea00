"""PV names of the demo beamline's simulated devices (served by a real EPICS softIoc).

The demo softIoc (``python -m pvxslibs.ioc``, database written by ``pvcoord.demo.devices``) serves
four motors, two detectors and a shutter. Each device's PVs live under ``P<device>:`` with
PascalCase suffixes; records a client should not touch live one level down, under
``P<device>:Sim:``. Everyone (the demo, RE Manager startup files, tests, the guard) takes the names
from here::

    >>> motor_setpoint("DEMO:", "m1")
    'DEMO:m1:Setpoint'
    >>> MOTOR_READBACK.name("DEMO:", device="m2")
    'DEMO:m2:Readback'
    >>> device_pvs("DEMO:", "shutter")
    ['DEMO:shutter:Command', 'DEMO:shutter:Status']

Motors (``m1`` .. ``m4``): put ``Setpoint``; ``Readback`` moves toward it at ``Velocity`` (units/s,
one step every 0.1 s from the put); a put with completion (CA put-callback, ``caput -c``, p4p
``put(..., wait=True)``) completes when the readback has reached the setpoint, not before
``distance / Velocity`` seconds; ``Moving`` is 1 from the put until the readback arrives;
``Stop`` = 1 ends the motion at the current readback (and sets the setpoint to it).
Detectors (``det1``, ``det2``): put ``Acquire`` = 1; it reads 1 for ``AcquireTime`` seconds,
then ``Value`` is updated and ``Acquire`` returns to 0 (a put with completion, e.g. p4p
``put(..., wait=True)`` or CA put-callback, completes when the exposure ends).
``Value`` is a count rate times the exposure time; the rate is a Gaussian peak in motor positions
(``det1``: m1 centred at :data:`DET1_CENTER`, ``det2``: m2 and m3), so a scan shows a peak.
Shutter: put ``Command`` (0 Close, 1 Open); ``Status`` follows after :data:`SHUTTER_DELAY` s.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import Capability
from .names import PVKind, PVSpec

DEMO_PREFIX = "DEMO:"
"""The endstation prefix the demo uses (pvcoord's own PVs and the devices share it)."""

MOTORS: tuple[str, ...] = ("m1", "m2", "m3", "m4")
DETECTORS: tuple[str, ...] = ("det1", "det2")
SHUTTERS: tuple[str, ...] = ("shutter",)
DEVICE_NAMES: tuple[str, ...] = MOTORS + DETECTORS + SHUTTERS
"""Every simulated device, motors first."""

SERVER = "demo-softioc"
"""Value of :attr:`PVSpec.server` (and of a device's ``ioc`` in the registry) for these PVs."""

MOTOR_LIMIT = 100.0
"""Motor setpoints are limited to [-MOTOR_LIMIT, MOTOR_LIMIT] (ao DRVL/DRVH)."""
MOTOR_VELOCITY = 2.0
"""Default motor velocity in units per second."""
MOTOR_STEP_PERIOD = 0.1
"""Seconds between readback steps while moving (the motion ticks' output delay)."""
DET_ACQUIRE_TIME = 0.1
"""Default exposure in seconds."""
DET_RATE = 1000.0
"""Peak count rate (counts per second) of a detector."""
DET1_CENTER = 1.0
"""Position of ``m1`` where ``det1`` peaks; ``det2`` peaks at m2 = DET2_CENTER, m3 = 0."""
DET2_CENTER = -2.0
DET_WIDTH = 1.0
"""Gaussian sigma of the detector peaks, in motor units."""
SHUTTER_DELAY = 0.2
"""Seconds between a shutter command and its status following."""

MOVING_CHOICES = ("Done", "Moving")
STOP_CHOICES = ("Idle", "Stop")
ACQUIRE_CHOICES = ("Done", "Acquire")
SHUTTER_COMMAND_CHOICES = ("Close", "Open")
SHUTTER_STATUS_CHOICES = ("Closed", "Open")

# --- Motors -----------------------------------------------------------------------------------

MOTOR_SETPOINT = PVSpec(
    SERVER, "{device}:Setpoint", PVKind.DOUBLE,
    "Target position; the readback moves toward it at Velocity. A put with completion "
    "(caput -c, put-callback, PVA block=true) completes when the readback has arrived.",
    units="mm",
)
MOTOR_READBACK = PVSpec(
    SERVER, "{device}:Readback", PVKind.DOUBLE,
    "Current position, updated every 0.1 s while moving.", units="mm",
)
MOTOR_MOVING = PVSpec(
    SERVER, "{device}:Moving", PVKind.NTENUM,
    "1 (Moving) from a setpoint put until the readback equals the setpoint, else 0 (Done).",
    choices=MOVING_CHOICES,
)
MOTOR_VELOCITY_PV = PVSpec(
    SERVER, "{device}:Velocity", PVKind.DOUBLE, "Speed of the simulated motion.", units="mm/s",
)
MOTOR_STOP = PVSpec(
    SERVER, "{device}:Stop", PVKind.NTENUM,
    "Put 1 to stop: the setpoint is set to the current readback.", choices=STOP_CHOICES,
)
MOTOR_SIM_GOAL = PVSpec(
    SERVER, "{device}:Sim:Goal", PVKind.DOUBLE,
    "Internal: the position the motion heads for (written by Setpoint with completion, and by "
    "Stop).", units="mm",
)
MOTOR_SIM_START = PVSpec(
    SERVER, "{device}:Sim:Start", PVKind.INT,
    "Internal: on a new goal, updates Moving and starts the motion ticks.",
)
MOTOR_SIM_TICK1 = PVSpec(
    SERVER, "{device}:Sim:Tick1", PVKind.DOUBLE,
    "Internal: waits one step period (calcout ODLY), then moves the readback one step.",
)
MOTOR_SIM_NEXT1 = PVSpec(
    SERVER, "{device}:Sim:Next1", PVKind.DOUBLE,
    "Internal: after Tick1, starts Tick2 while the readback is not at the goal.",
)
MOTOR_SIM_TICK2 = PVSpec(
    SERVER, "{device}:Sim:Tick2", PVKind.DOUBLE,
    "Internal: as Tick1 (the two alternate, so a tick is never re-entered while active).",
)
MOTOR_SIM_NEXT2 = PVSpec(
    SERVER, "{device}:Sim:Next2", PVKind.DOUBLE,
    "Internal: after Tick2, starts Tick1 while the readback is not at the goal.",
)
MOTOR_SIM_MOVING = PVSpec(
    SERVER, "{device}:Sim:MovingCalc", PVKind.DOUBLE,
    "Internal: computes Moving from goal and readback.",
)
MOTOR_SIM_STOP = PVSpec(
    SERVER, "{device}:Sim:StopCalc", PVKind.DOUBLE,
    "Internal: on Stop, sets the goal to the readback (the motion ends at the next tick).",
)
MOTOR_SIM_STOP_SETPOINT = PVSpec(
    SERVER, "{device}:Sim:StopSetpoint", PVKind.DOUBLE,
    "Internal: on Stop, writes the readback into the setpoint's value (without processing).",
)

# --- Detectors --------------------------------------------------------------------------------

DET_ACQUIRE = PVSpec(
    SERVER, "{device}:Acquire", PVKind.NTENUM,
    "Put 1 to expose; reads 1 while exposing and returns to 0 when Value is updated.",
    choices=ACQUIRE_CHOICES,
)
DET_ACQUIRE_TIME_PV = PVSpec(
    SERVER, "{device}:AcquireTime", PVKind.DOUBLE, "Exposure time.", units="s",
)
DET_VALUE = PVSpec(
    SERVER, "{device}:Value", PVKind.DOUBLE,
    "Counts of the last exposure: a Gaussian peak in motor positions times the exposure time.",
    units="counts",
)
DET_SIM_EXPOSE = PVSpec(
    SERVER, "{device}:Sim:Expose", PVKind.DOUBLE,
    "Internal: waits AcquireTime (calcout ODLY), then ends the exposure.",
)
DET_SIM_DONE = PVSpec(
    SERVER, "{device}:Sim:Done", PVKind.DOUBLE, "Internal: sets Acquire back to 0.",
)
DET_SIM_RATE = PVSpec(
    SERVER, "{device}:Sim:Rate", PVKind.DOUBLE,
    "Internal: count rate at the current motor positions.", units="counts/s",
)

# --- Shutter ----------------------------------------------------------------------------------

SHUTTER_COMMAND = PVSpec(
    SERVER, "{device}:Command", PVKind.NTENUM, "Put 1 to open, 0 to close.",
    choices=SHUTTER_COMMAND_CHOICES,
)
SHUTTER_STATUS = PVSpec(
    SERVER, "{device}:Status", PVKind.NTENUM,
    "Shutter position; follows Command after a short delay.", choices=SHUTTER_STATUS_CHOICES,
)
SHUTTER_SIM_DELAY = PVSpec(
    SERVER, "{device}:Sim:Delay", PVKind.DOUBLE,
    "Internal: 0.1 s ticks since Command and Status differ.",
)
SHUTTER_SIM_MOVE = PVSpec(
    SERVER, "{device}:Sim:Move", PVKind.DOUBLE,
    "Internal: sets Status to Command once the delay has passed.",
)

MOTOR_PVS = (MOTOR_SETPOINT, MOTOR_READBACK, MOTOR_MOVING, MOTOR_VELOCITY_PV, MOTOR_STOP)
DETECTOR_PVS = (DET_ACQUIRE, DET_ACQUIRE_TIME_PV, DET_VALUE)
SHUTTER_PVS = (SHUTTER_COMMAND, SHUTTER_STATUS)
"""Public PVs of each kind of device (what clients use and the registry lists)."""

MOTOR_SIM_PVS = (
    MOTOR_SIM_GOAL, MOTOR_SIM_START, MOTOR_SIM_TICK1, MOTOR_SIM_NEXT1, MOTOR_SIM_TICK2,
    MOTOR_SIM_NEXT2, MOTOR_SIM_MOVING, MOTOR_SIM_STOP, MOTOR_SIM_STOP_SETPOINT,
)
DETECTOR_SIM_PVS = (DET_SIM_EXPOSE, DET_SIM_DONE, DET_SIM_RATE)
SHUTTER_SIM_PVS = (SHUTTER_SIM_DELAY, SHUTTER_SIM_MOVE)
"""Internal records of the simulation (served, but not part of a device's interface)."""


@dataclass(frozen=True)
class DemoDevice:
    """One simulated device: its registry entry fields and its PV specs."""

    name: str
    device_class: str
    capabilities: tuple[Capability, ...]
    description: str
    pvs: tuple[PVSpec, ...]
    sim_pvs: tuple[PVSpec, ...]

    def pv_prefix(self, prefix: str) -> str:
        """``P<device>:``, the prefix every PV of this device starts with."""
        return f"{prefix}{self.name}:"

    def pv_names(self, prefix: str) -> list[str]:
        """Public PV names of this device under endstation ``prefix``."""
        return [spec.name(prefix, device=self.name) for spec in self.pvs]

    def sim_pv_names(self, prefix: str) -> list[str]:
        """Internal simulation record names of this device."""
        return [spec.name(prefix, device=self.name) for spec in self.sim_pvs]


_MOTOR_CAPS = (Capability.READABLE, Capability.MOVABLE)
_DET_CAPS = (Capability.READABLE, Capability.TRIGGERABLE)

DEVICES: tuple[DemoDevice, ...] = (
    *(
        DemoDevice(m, "SimMotor", _MOTOR_CAPS, f"simulated motor {m}", MOTOR_PVS, MOTOR_SIM_PVS)
        for m in MOTORS
    ),
    DemoDevice(
        "det1", "SimDetector", _DET_CAPS, "simulated detector, peak in m1",
        DETECTOR_PVS, DETECTOR_SIM_PVS,
    ),
    DemoDevice(
        "det2", "SimDetector", _DET_CAPS, "simulated detector, peak in m2 and m3",
        DETECTOR_PVS, DETECTOR_SIM_PVS,
    ),
    *(
        DemoDevice(
            s, "SimShutter", _MOTOR_CAPS, "simulated shutter", SHUTTER_PVS, SHUTTER_SIM_PVS
        )
        for s in SHUTTERS
    ),
)
"""Every simulated device, in :data:`DEVICE_NAMES` order."""

_BY_NAME = {d.name: d for d in DEVICES}


def device(name: str) -> DemoDevice:
    """The demo device called ``name``.

    Raises:
        KeyError: naming the known devices, if there is no such device.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no demo device {name!r}; known: {', '.join(DEVICE_NAMES)}") from None


def device_pvs(prefix: str, name: str) -> list[str]:
    """Public PV names of demo device ``name`` under endstation ``prefix``."""
    return device(name).pv_names(prefix)


def motor_setpoint(prefix: str, motor: str) -> str:
    """``P<motor>:Setpoint``."""
    return MOTOR_SETPOINT.name(prefix, device=motor)


def motor_readback(prefix: str, motor: str) -> str:
    """``P<motor>:Readback``."""
    return MOTOR_READBACK.name(prefix, device=motor)


def motor_moving(prefix: str, motor: str) -> str:
    """``P<motor>:Moving`` (0 Done, 1 Moving)."""
    return MOTOR_MOVING.name(prefix, device=motor)


def motor_velocity(prefix: str, motor: str) -> str:
    """``P<motor>:Velocity`` (units/s)."""
    return MOTOR_VELOCITY_PV.name(prefix, device=motor)


def motor_stop(prefix: str, motor: str) -> str:
    """``P<motor>:Stop`` (put 1)."""
    return MOTOR_STOP.name(prefix, device=motor)


def det_acquire(prefix: str, det: str) -> str:
    """``P<det>:Acquire`` (put 1; 1 while exposing)."""
    return DET_ACQUIRE.name(prefix, device=det)


def det_acquire_time(prefix: str, det: str) -> str:
    """``P<det>:AcquireTime`` (s)."""
    return DET_ACQUIRE_TIME_PV.name(prefix, device=det)


def det_value(prefix: str, det: str) -> str:
    """``P<det>:Value`` (counts)."""
    return DET_VALUE.name(prefix, device=det)


def shutter_command(prefix: str, shutter: str = "shutter") -> str:
    """``P<shutter>:Command`` (0 Close, 1 Open)."""
    return SHUTTER_COMMAND.name(prefix, device=shutter)


def shutter_status(prefix: str, shutter: str = "shutter") -> str:
    """``P<shutter>:Status`` (0 Closed, 1 Open)."""
    return SHUTTER_STATUS.name(prefix, device=shutter)
