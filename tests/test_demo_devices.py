"""The demo beamline's simulated devices, on a real softIoc (``python -m pvxslibs.ioc``)."""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time

import pytest
from p4p.client.thread import Context

from pvcoord.demo.devices import DETECTOR_AXES, database, write_database
from pvcoord.procs import (
    PYTHON,
    ManagedProcess,
    client_conf,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo

from .conftest import TIMEOUT

P = "TDEV:"
BASE_RECORD_TYPES = {"ao", "ai", "bo", "bi", "calc", "calcout", "fanout"}


def test_database_serves_every_pvdb_name_once():
    text = database(P)
    records = re.findall(r'^record\((\w+), "([^"]+)"\)', text, flags=re.M)
    names = [n for _, n in records]
    assert len(names) == len(set(names))
    expected = set()
    for dev in demo.DEVICES:
        expected |= set(dev.pv_names(P)) | set(dev.sim_pv_names(P))
    assert set(names) == expected
    assert {t for t, _ in records} <= BASE_RECORD_TYPES
    # every link target is one of our records (no typo can hide in a link)
    for target in re.findall(r'field\((?:INP[A-L]|OUT|FLNK|LNK[1-9A]), "([^"]+)"\)', text):
        name = target.split(" ")[0].split(".")[0]
        if re.match(r"^-?[0-9.]+$", name):
            continue  # a constant input
        assert name in expected, target


def test_database_rejects_bad_prefix():
    with pytest.raises(ValueError, match="prefix"):
        database("NOCOLON")


@pytest.fixture(scope="module")
def softioc(tmp_path_factory):
    """A real softIoc serving the demo devices under P (module-scoped: started once)."""
    tmp = tmp_path_factory.mktemp("softioc")
    env = loopback_env()
    db = write_database(P, tmp / "demo.db")
    proc = ManagedProcess("softioc", python_module("pvxslibs.ioc", "-d", str(db)),
                          server_env(env), log_dir=tmp)
    try:
        wait_for_pv(demo.shutter_status(P), env, timeout=30, procs=[proc])
        yield env, proc
    finally:
        proc.stop()


@pytest.fixture
def ctxt(softioc):
    env, _ = softioc
    with Context("pva", conf=client_conf(env), useenv=False) as c:
        yield c


class Recorder:
    """Collect monitor updates of some PVs (value, arrival time)."""

    def __init__(self, ctxt: Context, names: list[str]) -> None:
        self.updates: dict[str, list[tuple[float, object]]] = {n: [] for n in names}
        self.lock = threading.Lock()
        self.subs = [ctxt.monitor(n, self._cb(n)) for n in names]

    def _cb(self, name):
        def cb(value):
            v = float(value)  # ntfloat, or ntenum (the index)
            with self.lock:
                self.updates[name].append((time.monotonic(), v))
        return cb

    def values(self, name: str) -> list:
        with self.lock:
            return [v for _, v in self.updates[name]]

    def close(self) -> None:
        for s in self.subs:
            s.close()


def enum_index(ctxt: Context, name: str) -> int:
    return int(ctxt.get(name, timeout=TIMEOUT))


@pytest.mark.system
def test_motor_moves_at_velocity_and_reports_moving(ctxt):
    m = demo.MOTORS[3]
    sp, rb, mv = (demo.motor_setpoint(P, m), demo.motor_readback(P, m), demo.motor_moving(P, m))
    start = float(ctxt.get(rb, timeout=TIMEOUT))
    target = start + 1.0
    rec = Recorder(ctxt, [rb, mv])
    try:
        wait_until(lambda: rec.values(rb) and rec.values(mv), TIMEOUT, "first monitor updates")
        t0 = time.monotonic()
        ctxt.put(sp, target, timeout=TIMEOUT)
        wait_until(lambda: rec.values(mv)[-1] == 1 or rec.values(rb)[-1] == target,
                   TIMEOUT, "Moving went to 1")
        wait_until(lambda: rec.values(rb)[-1] == target and rec.values(mv)[-1] == 0,
                   TIMEOUT, f"readback reached {target} and Moving went back to 0")
        elapsed = time.monotonic() - t0
    finally:
        rec.close()
    rbs = rec.values(rb)
    # moved in steps of velocity * step period, monotonically, and landed exactly
    # (a monitor may repeat a value: an update of the alarm or time stamp only)
    steps = [b - a for a, b in zip(rbs, rbs[1:], strict=False) if b != a]
    step = demo.MOTOR_VELOCITY * demo.MOTOR_STEP_PERIOD
    assert all(0 < s <= step + 1e-9 for s in steps), steps
    assert len(steps) >= math.floor(1.0 / step) - 1
    assert rbs[-1] == target
    assert rec.values(mv) == [0, 1, 0]
    # 1 unit at 2 units/s takes about 0.5 s (generous bound: the machine is noisy)
    assert elapsed >= 1.0 / demo.MOTOR_VELOCITY * 0.6


FAST = 10.0
"""Velocity (units/s) of the completion tests: short motions."""


@pytest.mark.system
def test_put_with_completion_waits_for_the_motion(ctxt):
    m = demo.MOTORS[0]
    sp, rb, mv = (demo.motor_setpoint(P, m), demo.motor_readback(P, m), demo.motor_moving(P, m))
    ctxt.put(demo.motor_velocity(P, m), FAST, timeout=TIMEOUT)
    start = float(ctxt.get(rb, timeout=TIMEOUT))
    for distance in (1.5, -0.7):
        target = round(start + distance, 6)
        t0 = time.monotonic()
        ctxt.put(sp, target, wait=True, timeout=TIMEOUT)
        took = time.monotonic() - t0
        # at completion the readback is there and the motion has ended
        assert float(ctxt.get(rb, timeout=TIMEOUT)) == target
        assert enum_index(ctxt, mv) == 0
        assert took >= abs(distance) / FAST, (distance, took)
        start = target
    # a zero-length move completes at once (no tick)
    t0 = time.monotonic()
    ctxt.put(sp, start, wait=True, timeout=TIMEOUT)
    assert time.monotonic() - t0 < 1.0
    # a put without completion returns at once, while the motor moves
    t0 = time.monotonic()
    ctxt.put(sp, start + 2.0, timeout=TIMEOUT)
    assert time.monotonic() - t0 < 2.0 / FAST
    wait_until(lambda: float(ctxt.get(rb, timeout=TIMEOUT)) == start + 2.0, TIMEOUT,
               "readback after a put without completion")


@pytest.mark.system
def test_stop_ends_a_put_with_completion_early(ctxt):
    m = demo.MOTORS[0]
    sp, rb = demo.motor_setpoint(P, m), demo.motor_readback(P, m)
    ctxt.put(demo.motor_velocity(P, m), FAST, timeout=TIMEOUT)
    start = float(ctxt.get(rb, timeout=TIMEOUT))
    target = start + 50.0  # 5 s at FAST
    done: list[float] = []

    def move() -> None:
        t0 = time.monotonic()
        ctxt.put(sp, target, wait=True, timeout=TIMEOUT)
        done.append(time.monotonic() - t0)

    mover = threading.Thread(target=move)
    mover.start()
    try:
        wait_until(lambda: float(ctxt.get(rb, timeout=TIMEOUT)) > start + 1.0, TIMEOUT,
                   f"{m} moving")
        ctxt.put(demo.motor_stop(P, m), 1, timeout=TIMEOUT)
    finally:
        mover.join(TIMEOUT)
    assert done and done[0] < 50.0 / FAST, done
    stopped = float(ctxt.get(rb, timeout=TIMEOUT))
    assert start + 1.0 < stopped < target
    assert float(ctxt.get(sp, timeout=TIMEOUT)) == stopped


@pytest.mark.system
def test_motor_stop_sets_setpoint_to_readback(ctxt):
    m = demo.MOTORS[2]
    sp, rb, mv = (demo.motor_setpoint(P, m), demo.motor_readback(P, m), demo.motor_moving(P, m))
    ctxt.put(demo.motor_velocity(P, m), 1.0, timeout=TIMEOUT)
    ctxt.put(sp, 50.0, timeout=TIMEOUT)
    wait_until(lambda: float(ctxt.get(rb, timeout=TIMEOUT)) > 0.15, TIMEOUT, "m3 started moving")
    ctxt.put(demo.motor_stop(P, m), 1, timeout=TIMEOUT)
    wait_until(lambda: enum_index(ctxt, mv) == 0, TIMEOUT, "m3 stopped")
    stopped = float(ctxt.get(rb, timeout=TIMEOUT))
    assert 0.15 < stopped < 50.0
    assert float(ctxt.get(sp, timeout=TIMEOUT)) == stopped
    wait_until(lambda: enum_index(ctxt, demo.motor_stop(P, m)) == 0, TIMEOUT, "Stop back to 0")


@pytest.mark.system
def test_setpoint_outside_limits_is_clamped(ctxt):
    m = demo.MOTORS[1]
    ctxt.put(demo.motor_setpoint(P, m), demo.MOTOR_LIMIT * 10, timeout=TIMEOUT)
    assert float(ctxt.get(demo.motor_setpoint(P, m), timeout=TIMEOUT)) == demo.MOTOR_LIMIT
    ctxt.put(demo.motor_stop(P, m), 1, timeout=TIMEOUT)
    wait_until(lambda: enum_index(ctxt, demo.motor_moving(P, m)) == 0, TIMEOUT, "m2 stopped")


@pytest.mark.system
def test_detector_exposure_completes_put_and_peaks_at_center(ctxt):
    det = demo.DETECTORS[0]
    (motor,) = DETECTOR_AXES[det]
    acq, val = demo.det_acquire(P, det), demo.det_value(P, det)
    exposure = 0.3
    ctxt.put(demo.det_acquire_time(P, det), exposure, timeout=TIMEOUT)

    def expose() -> tuple[float, float]:
        t0 = time.monotonic()
        ctxt.put(acq, 1, wait=True, timeout=TIMEOUT)  # completes when the exposure ends
        took = time.monotonic() - t0
        assert enum_index(ctxt, acq) == 0
        return took, float(ctxt.get(val, timeout=TIMEOUT))

    for position in (demo.DET1_CENTER, demo.DET1_CENTER + 2 * demo.DET_WIDTH):
        ctxt.put(demo.motor_velocity(P, motor), 50.0, timeout=TIMEOUT)
        ctxt.put(demo.motor_setpoint(P, motor), position, timeout=TIMEOUT)
        wait_until(lambda p=position: float(ctxt.get(demo.motor_readback(P, motor),
                                                     timeout=TIMEOUT)) == p,
                   TIMEOUT, f"{motor} at {position}")
        took, counts = expose()
        assert took >= exposure * 0.9
        expected = demo.DET_RATE * exposure * math.exp(
            -((position - demo.DET1_CENTER) ** 2) / (2 * demo.DET_WIDTH**2))
        assert counts == pytest.approx(expected, rel=1e-6)


@pytest.mark.system
def test_detector_acquire_reads_1_while_exposing(ctxt):
    det = demo.DETECTORS[1]
    acq = demo.det_acquire(P, det)
    ctxt.put(demo.det_acquire_time(P, det), 0.2, timeout=TIMEOUT)
    rec = Recorder(ctxt, [acq])
    try:
        wait_until(lambda: rec.values(acq), TIMEOUT, "first Acquire update")
        ctxt.put(acq, 1, timeout=TIMEOUT)  # no wait: returns at once
        wait_until(lambda: rec.values(acq)[-2:] == [1, 0], TIMEOUT, "Acquire 1 then 0")
    finally:
        rec.close()


@pytest.mark.system
def test_shutter_status_follows_command(ctxt):
    cmd, status = demo.shutter_command(P), demo.shutter_status(P)
    for want in (1, 0):
        ctxt.put(cmd, want, timeout=TIMEOUT)
        wait_until(lambda w=want: enum_index(ctxt, status) == w, TIMEOUT, f"shutter status {want}")
    labels = list(ctxt.get(status, timeout=TIMEOUT).raw.value.choices)
    assert labels == list(demo.SHUTTER_STATUS_CHOICES)


@pytest.mark.system
def test_devices_are_reachable_over_channel_access(softioc):
    """ophyd (pyepics) and ophyd-async ``ca://`` clients use CA: the softIoc serves it too."""
    env, _ = softioc
    out = subprocess.run(
        [PYTHON, "-m", "caproto.commandline.get", "--no-repeater", "--timeout", "5",
         demo.motor_velocity(P, demo.MOTORS[0])],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert demo.motor_velocity(P, demo.MOTORS[0]) in out.stdout
