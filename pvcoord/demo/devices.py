"""The demo beamline's simulated devices: EPICS database for the softIoc, and their registry file.

Both are generated from :mod:`pvdb.demo` (no PV name is typed here). The database uses only the
record types of EPICS base that ``python -m pvxslibs.ioc`` loads (ao, bo, bi, calc, calcout,
fanout):

- motor: ``Setpoint`` is an ao with the ``Async Soft Channel`` device support: its OUT is a CA
  link to ``Sim:Goal`` written with put-callback, so the setpoint record stays active until the
  processing started by the goal has ended, and a put with completion on ``Setpoint`` (CA
  put-callback, PVA ``block=true``) returns when the readback has arrived. ``Sim:Goal`` (ao)
  starts, through ``Sim:Start`` (fanout), ``Sim:MovingCalc`` and the first motion tick:
  ``Sim:Tick1`` and ``Sim:Tick2`` (calcout, output delay ODLY = one step period) alternate,
  each processing ``Readback`` (calc: one step of ``Velocity * 0.1`` toward the goal, landing on
  it exactly) and then ``Sim:Next1`` / ``Sim:Next2``, which start the other tick while the
  readback is not at the goal. Records reached by links join the put's completion (EPICS
  ``dbNotify``), so it ends with the last tick, ``n`` steps and at least ``n * 0.1`` s after the
  put. ``Sim:MovingCalc`` writes ``Goal != Readback`` to ``Moving`` (bi). ``Stop`` (bo, back to
  0 after 0.1 s) makes ``Sim:StopCalc`` set the goal to the readback (the motion ends at the
  next tick) and ``Sim:StopSetpoint`` write the readback into the setpoint's value. A put to
  ``Setpoint`` while it moves is applied when that move ends (EPICS re-processes an active
  record once it completes), except through ``Stop``.
- detector: ``Acquire`` (bo) processes ``Sim:Expose``, a calcout whose output delay (ODLY, set from
  ``AcquireTime``) keeps it active for the exposure, so a put with completion on ``Acquire``
  returns when the exposure ends; its output processes ``Value`` (calc: ``Sim:Rate`` times the
  exposure), whose forward link ``Sim:Done`` writes ``Acquire`` back to 0.
- shutter: ``Command`` (bo); ``Sim:Delay`` (calc, SCAN .1 second) counts ticks while ``Status``
  differs from ``Command``; after ``SHUTTER_DELAY`` ``Sim:Move`` copies ``Command`` to ``Status``.

Usage::

    write_database("DEMO:", "/tmp/demo.db")   # then: python -m pvxslibs.ioc -d /tmp/demo.db
    write_registry("DEMO:", "/tmp/registry.yaml")
"""

from __future__ import annotations

from pathlib import Path

from pvdb import demo
from pvdb.models import Device, DeviceSignal
from pvdb.names import PVSpec, check_prefix
from pvdb.registry_file import dump_registry

DETECTOR_AXES: dict[str, tuple[str, ...]] = {
    demo.DETECTORS[0]: (demo.MOTORS[0],),
    demo.DETECTORS[1]: (demo.MOTORS[1], demo.MOTORS[2]),
}
"""Motors each detector's peak depends on (det1: m1; det2: m2 and m3)."""

DETECTOR_CENTERS: dict[str, tuple[float, ...]] = {
    demo.DETECTORS[0]: (demo.DET1_CENTER,),
    demo.DETECTORS[1]: (demo.DET2_CENTER, 0.0),
}
"""Peak position of each detector, one coordinate per entry of :data:`DETECTOR_AXES`."""

_DESC_MAX = 40  # EPICS DESC field length


def _field(name: str, value: object) -> str:
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"field {name} value {text!r} cannot be quoted in a .db file")
    return f'    field({name}, "{text}")\n'


def _record(rtype: str, name: str, desc: str, **fields: object) -> str:
    out = f'record({rtype}, "{name}") {{\n'
    out += _field("DESC", desc[:_DESC_MAX])
    for key, value in fields.items():
        out += _field(key, value)
    return out + "}\n"


def _number(x: float) -> str:
    return repr(float(x))


def _motor(prefix: str, m: str) -> str:
    def n(spec: PVSpec) -> str:
        return spec.name(prefix, device=m)

    step = demo.MOTOR_STEP_PERIOD
    at_goal = {"INPA": f"{n(demo.MOTOR_SIM_GOAL)} NPP", "INPB": f"{n(demo.MOTOR_READBACK)} NPP"}

    def tick(spec: PVSpec, then: PVSpec) -> str:
        # one step period later, one readback step; then the other tick's starter
        return _record(
            "calcout", n(spec), f"{m} motion tick",
            **at_goal, CALC="A#B", OOPT="When Non-zero", ODLY=_number(step),
            OUT=f"{n(demo.MOTOR_READBACK)}.PROC PP", FLNK=n(then),
        )

    def next_tick(spec: PVSpec, tick: PVSpec) -> str:
        return _record(
            "calcout", n(spec), f"{m} next tick while not at goal",
            **at_goal, CALC="A#B", OOPT="When Non-zero", OUT=f"{n(tick)}.PROC PP",
        )

    def on_stop(spec: PVSpec, out: str, desc: str, **more: object) -> str:
        return _record(
            "calcout", n(spec), desc,
            INPA=f"{n(demo.MOTOR_STOP)} NPP", INPB=f"{n(demo.MOTOR_READBACK)} NPP",
            CALC="A", OOPT="When Non-zero", DOPT="Use OCAL", OCAL="B", OUT=out, **more,
        )

    return "".join([
        _record(
            # asynchronous: the CA link's put-callback to the goal ends when the motion does,
            # so a put with completion on the setpoint waits for the readback
            "ao", n(demo.MOTOR_SETPOINT), f"{m} setpoint",
            DTYP="Async Soft Channel", OUT=f"{n(demo.MOTOR_SIM_GOAL)} CA",
            VAL=0, PINI="RUNNING", EGU=demo.MOTOR_SETPOINT.units, PREC=3,
            DRVH=_number(demo.MOTOR_LIMIT), DRVL=_number(-demo.MOTOR_LIMIT),
        ),
        _record(
            "ao", n(demo.MOTOR_VELOCITY_PV), f"{m} velocity",
            VAL=_number(demo.MOTOR_VELOCITY), PINI="YES", EGU=demo.MOTOR_VELOCITY_PV.units,
            PREC=3, DRVL="0.001", DRVH="1000.0",
        ),
        _record(
            "ao", n(demo.MOTOR_SIM_GOAL), f"{m} goal of the motion",
            VAL=0, PINI="YES", EGU=demo.MOTOR_SIM_GOAL.units, PREC=3,
            FLNK=n(demo.MOTOR_SIM_START),
        ),
        _record(
            "fanout", n(demo.MOTOR_SIM_START), f"{m} new goal: moving, first tick",
            LNK1=n(demo.MOTOR_SIM_MOVING), LNK2=n(demo.MOTOR_SIM_TICK1),
        ),
        _record(
            "calc", n(demo.MOTOR_READBACK), f"{m} readback",
            INPA=f"{n(demo.MOTOR_SIM_GOAL)} NPP", INPB=f"{n(demo.MOTOR_VELOCITY_PV)} NPP",
            INPC=_number(step),
            # one step toward the goal; land exactly on it once it is within one step
            CALC="ABS(A-VAL)<=B*C?A:(A>VAL?VAL+B*C:VAL-B*C)", PINI="YES",
            EGU=demo.MOTOR_READBACK.units, PREC=3, FLNK=n(demo.MOTOR_SIM_MOVING),
        ),
        tick(demo.MOTOR_SIM_TICK1, demo.MOTOR_SIM_NEXT1),
        next_tick(demo.MOTOR_SIM_NEXT1, demo.MOTOR_SIM_TICK2),
        tick(demo.MOTOR_SIM_TICK2, demo.MOTOR_SIM_NEXT2),
        next_tick(demo.MOTOR_SIM_NEXT2, demo.MOTOR_SIM_TICK1),
        _record(
            "calcout", n(demo.MOTOR_SIM_MOVING), f"{m} moving = goal != readback",
            **at_goal, CALC="A#B", OOPT="Every Time", OUT=f"{n(demo.MOTOR_MOVING)} PP",
        ),
        _record(
            "bi", n(demo.MOTOR_MOVING), f"{m} moving",
            VAL=0, PINI="YES",
            ZNAM=demo.MOVING_CHOICES[0], ONAM=demo.MOVING_CHOICES[1],
        ),
        _record(
            "bo", n(demo.MOTOR_STOP), f"{m} stop",
            ZNAM=demo.STOP_CHOICES[0], ONAM=demo.STOP_CHOICES[1],
            HIGH=_number(step), FLNK=n(demo.MOTOR_SIM_STOP),
        ),
        on_stop(demo.MOTOR_SIM_STOP, f"{n(demo.MOTOR_SIM_GOAL)} PP", f"{m} stop: goal = readback",
                FLNK=n(demo.MOTOR_SIM_STOP_SETPOINT)),
        # the setpoint may be active (a move under way): its value is written, not processed;
        # it posts the value when the move completes
        on_stop(demo.MOTOR_SIM_STOP_SETPOINT, f"{n(demo.MOTOR_SETPOINT)}.VAL NPP",
                f"{m} stop: setpoint = readback"),
    ])


def _detector(prefix: str, d: str) -> str:
    def n(spec: PVSpec) -> str:
        return spec.name(prefix, device=d)

    axes = DETECTOR_AXES[d]
    centers = DETECTOR_CENTERS[d]
    letters = "ABCDEF"
    inputs: dict[str, str] = {}
    terms = []
    for i, (motor, center) in enumerate(zip(axes, centers, strict=True)):
        a, c = letters[2 * i], letters[2 * i + 1]
        inputs[f"INP{a}"] = f"{demo.motor_readback(prefix, motor)} NPP"
        inputs[f"INP{c}"] = _number(center)
        terms.append(f"({a}-{c})*({a}-{c})")
    inputs["INPK"] = _number(demo.DET_RATE)
    inputs["INPL"] = _number(2 * demo.DET_WIDTH**2)
    return "".join([
        _record(
            "ao", n(demo.DET_ACQUIRE_TIME_PV), f"{d} exposure time",
            VAL=_number(demo.DET_ACQUIRE_TIME), PINI="YES", EGU=demo.DET_ACQUIRE_TIME_PV.units,
            PREC=3, DRVL="0.001", DRVH="60.0", OUT=f"{n(demo.DET_SIM_EXPOSE)}.ODLY NPP",
        ),
        _record(
            "bo", n(demo.DET_ACQUIRE), f"{d} acquire",
            VAL=0, PINI="YES", ZNAM=demo.ACQUIRE_CHOICES[0], ONAM=demo.ACQUIRE_CHOICES[1],
            FLNK=n(demo.DET_SIM_EXPOSE),
        ),
        _record(
            "calcout", n(demo.DET_SIM_EXPOSE), f"{d} exposure timer",
            INPA=f"{n(demo.DET_ACQUIRE)} NPP", CALC="A", OOPT="When Non-zero",
            ODLY=_number(demo.DET_ACQUIRE_TIME), OUT=f"{n(demo.DET_VALUE)}.PROC PP",
        ),
        _record(
            "calc", n(demo.DET_SIM_RATE), f"{d} count rate",
            **inputs, CALC=f"K*EXP(-({'+'.join(terms)})/L)", EGU=demo.DET_SIM_RATE.units, PREC=1,
        ),
        _record(
            "calc", n(demo.DET_VALUE), f"{d} counts",
            INPA=f"{n(demo.DET_SIM_RATE)} PP", INPB=f"{n(demo.DET_ACQUIRE_TIME_PV)} NPP",
            CALC="A*B", EGU=demo.DET_VALUE.units, PREC=1, FLNK=n(demo.DET_SIM_DONE),
        ),
        _record(
            "calcout", n(demo.DET_SIM_DONE), f"{d} end of exposure",
            CALC="0", OOPT="Every Time", OUT=f"{n(demo.DET_ACQUIRE)} PP",
        ),
    ])


def _shutter(prefix: str, s: str) -> str:
    def n(spec: PVSpec) -> str:
        return spec.name(prefix, device=s)

    ticks = max(1, round(demo.SHUTTER_DELAY / 0.1))
    return "".join([
        _record(
            "bo", n(demo.SHUTTER_COMMAND), f"{s} command",
            VAL=0, PINI="YES",
            ZNAM=demo.SHUTTER_COMMAND_CHOICES[0], ONAM=demo.SHUTTER_COMMAND_CHOICES[1],
        ),
        _record(
            "bi", n(demo.SHUTTER_STATUS), f"{s} status",
            VAL=0, PINI="YES",
            ZNAM=demo.SHUTTER_STATUS_CHOICES[0], ONAM=demo.SHUTTER_STATUS_CHOICES[1],
        ),
        _record(
            "calc", n(demo.SHUTTER_SIM_DELAY), f"{s} ticks since command",
            SCAN=".1 second",
            INPA=f"{n(demo.SHUTTER_COMMAND)} NPP", INPB=f"{n(demo.SHUTTER_STATUS)} NPP",
            CALC="A#B?VAL+1:0", FLNK=n(demo.SHUTTER_SIM_MOVE),
        ),
        _record(
            "calcout", n(demo.SHUTTER_SIM_MOVE), f"{s} status = command",
            INPA=f"{n(demo.SHUTTER_SIM_DELAY)} NPP", INPB=f"{n(demo.SHUTTER_COMMAND)} NPP",
            INPC=str(ticks), CALC="A>=C", OOPT="When Non-zero", DOPT="Use OCAL", OCAL="B",
            OUT=f"{n(demo.SHUTTER_STATUS)} PP",
        ),
    ])


def database(prefix: str = demo.DEMO_PREFIX) -> str:
    """The EPICS database (``.db`` text) of every demo device under endstation ``prefix``.

    Raises:
        ValueError: if ``prefix`` is not a valid endstation prefix (must end in ``:``).
    """
    check_prefix(prefix)
    parts = [f"# pvcoord demo beamline devices, generated by {__name__}; do not edit\n"]
    for dev in demo.DEVICES:
        if dev.name in demo.MOTORS:
            parts.append(_motor(prefix, dev.name))
        elif dev.name in demo.DETECTORS:
            parts.append(_detector(prefix, dev.name))
        else:
            parts.append(_shutter(prefix, dev.name))
    return "\n".join(parts)


def write_database(prefix: str, path: str | Path) -> Path:
    """Write :func:`database` to ``path`` (for ``python -m pvxslibs.ioc -d PATH``); return it."""
    path = Path(path)
    path.write_text(database(prefix))
    return path


DEMO_SIGNALS: dict[PVSpec, tuple[str, str, str]] = {
    demo.MOTOR_READBACK: ("readback", "hinted", "r"),
    demo.MOTOR_SETPOINT: ("setpoint", "omitted", "rw"),
    demo.MOTOR_MOVING: ("moving", "omitted", "r"),
    demo.MOTOR_VELOCITY_PV: ("velocity", "config", "rw"),
    demo.MOTOR_STOP: ("stop_cmd", "omitted", "rw"),
    demo.DET_VALUE: ("value", "hinted", "r"),
    demo.DET_ACQUIRE_TIME_PV: ("acquire_time", "config", "rw"),
    demo.DET_ACQUIRE: ("acquire", "omitted", "rw"),
    demo.SHUTTER_STATUS: ("status", "hinted", "r"),
    demo.SHUTTER_COMMAND: ("command", "omitted", "rw"),
}
"""Public PV -> (component, kind, access) of the demo devices' signals: the component names and
kinds of the demo profile collection's ophyd-async devices (``pvcoord/demo/startup``; a test
compares them with its import), plus ``moving``, which those devices do not have."""


def device_signals(prefix: str, dev: demo.DemoDevice) -> list[DeviceSignal]:
    """The registry signals of demo device ``dev`` (sorted by name)."""
    out = []
    for spec in dev.pvs:
        component, kind, access = DEMO_SIGNALS[spec]
        pv = spec.name(prefix, device=dev.name)
        out.append(DeviceSignal(name=f"{dev.name}.{component}", kind=kind, access=access,
                                read_pv=pv, write_pv=pv if access == "rw" else ""))
    return sorted(out, key=lambda s: s.name)


def registry_devices(prefix: str = demo.DEMO_PREFIX, ioc: str = demo.SERVER) -> list[Device]:
    """Registry entries of the demo devices: public PVs, the ``P<device>:`` prefix, signals.

    The signals are :data:`DEMO_SIGNALS`. ``ioc`` is the name recorded as the owning IOC of
    every device.
    """
    check_prefix(prefix)
    return [
        Device.model_validate({  # by its alias: a type checker knows no "device_class" keyword
            "name": dev.name,
            "class": dev.device_class,
            "capabilities": list(dev.capabilities),
            "pv_prefix": dev.pv_prefix(prefix),
            "pvs": dev.pv_names(prefix),
            "ioc": ioc,
            "description": dev.description,
            "signals": device_signals(prefix, dev),
        })
        for dev in demo.DEVICES
    ]


def write_registry(prefix: str, path: str | Path, ioc: str = demo.SERVER) -> Path:
    """Write the registry file (YAML, see ``docs/registry.md``) of the demo devices; return it."""
    path = Path(path)
    path.write_text(dump_registry(registry_devices(prefix, ioc)))
    return path
