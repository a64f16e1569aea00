# ruff: noqa: F821 - startup files share one namespace (P, demo, _suffix come from 00-base.py)
# A classic ophyd device (PVPositioner on a demo motor) and a top-level signal that aliases one of
# its PVs, plus a soft signal without any PV.
from ophyd import Component as Cpt
from ophyd import EpicsSignal, EpicsSignalRO, PVPositioner, Signal


class DemoMotor(PVPositioner):
    setpoint = Cpt(EpicsSignal, _suffix(demo.MOTOR_SETPOINT))
    readback = Cpt(EpicsSignalRO, _suffix(demo.MOTOR_READBACK))
    done = Cpt(EpicsSignalRO, _suffix(demo.MOTOR_MOVING))
    done_value = 0
    stop_signal = Cpt(EpicsSignal, _suffix(demo.MOTOR_STOP))
    velocity = Cpt(EpicsSignal, _suffix(demo.MOTOR_VELOCITY_PV), lazy=True)


m1 = DemoMotor(P + "m1", name="m1")
m1_readback = EpicsSignalRO(demo.motor_readback(P, "m1"), name="m1_readback")
soft = Signal(name="soft", value=1)
