"""Startup at scale: the registry IOC with N devices x 10 PVs and the coordination IOC following it.

Usage: ``.venv/bin/python benchmarks/bench_scale.py [--sizes 10,1000] [--pvs-per-device 10]``

For each size, in the same run, prints the seconds from starting both processes to:
- ``Registry:Devices`` answering with every device;
- ``Coord:Devices`` listing every device (the coordination IOC has the registry's list);
- the last device's ``Coord:<dev>:State`` answering (every per-device PV is served).

The registry's connectivity check runs once an hour here (the PVs do not exist): the figure is
serving, not connecting. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from pvcoord.procs import (  # noqa: E402
    ManagedProcess,
    exit_on_sigterm,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
)
from pvdb import names as pvn  # noqa: E402

PREFIX = "SCALE:"


def registry_file(path: Path, n: int, per: int) -> None:
    """Write a registry of ``n`` devices with ``per`` explicit PVs each."""
    devices = [{"name": f"d{i}", "class": "SimMotor", "capabilities": ["readable", "movable"],
                "pvs": [f"SCALEDEV:d{i}:pv{j}" for j in range(per)], "ioc": "none"}
               for i in range(n)]
    path.write_text(yaml.safe_dump({"version": 1, "devices": devices}))


def run(n: int, per: int, tmp: Path) -> tuple[float, float, float]:
    """Seconds to Registry:Devices complete, Coord:Devices complete, last State PV."""
    env = loopback_env()
    reg = tmp / f"registry-{n}.yaml"
    registry_file(reg, n, per)
    (tmp / "policy.toml").write_text('[lock_types.MANUAL_OPERATOR]\nallow = ["*"]\n')
    t0 = time.monotonic()
    procs = [
        ManagedProcess(f"registry-{n}", python_module(
            "iocs.registry", "--prefix", PREFIX, "--registry", str(reg), "--check-period", "3600",
            "--log-level", "WARNING"), server_env(env), cwd=REPO, log_dir=tmp),
        ManagedProcess(f"coordination-{n}", python_module(
            "iocs.coordination", "--prefix", PREFIX, "--policy", str(tmp / "policy.toml"),
            "--store", f"sqlite:///{tmp}/locks-{n}.sqlite", "--registry-prefix", PREFIX,
            "--log-level", "WARNING"), server_env(env), cwd=REPO, log_dir=tmp),
    ]
    try:
        wait_for_pv(pvn.REGISTRY_DEVICES.name(PREFIX), env, timeout=120, procs=procs,
                    condition=lambda v: len(v.value.name) == n)
        t_reg = time.monotonic() - t0
        wait_for_pv(pvn.COORD_DEVICES.name(PREFIX), env, timeout=120, procs=procs,
                    condition=lambda v: len(v) == n + 1)
        t_coord = time.monotonic() - t0
        wait_for_pv(pvn.COORD_DEVICE_STATE.name(PREFIX, f"d{n - 1}"), env, timeout=120,
                    procs=procs)
        t_last = time.monotonic() - t0
    finally:
        for p in reversed(procs):
            p.stop()
    return t_reg, t_coord, t_last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,1000")
    ap.add_argument("--pvs-per-device", type=int, default=10)
    a = ap.parse_args()
    exit_on_sigterm()  # a killed run still stops what it started
    tmp = Path(tempfile.mkdtemp(prefix="pvcoord-scale-"))
    print(f"# pvcoord startup at scale ({time.strftime('%Y-%m-%d %H:%M')})")
    for n in (int(x) for x in a.sizes.split(",")):
        t_reg, t_coord, t_last = run(n, a.pvs_per_device, tmp)
        print(f"{n:5d} devices / {n * a.pvs_per_device:6d} PVs: Registry:Devices complete "
              f"{t_reg:.2f} s, Coord:Devices complete {t_coord:.2f} s, last Coord:<dev>:State "
              f"{t_last:.2f} s   (target < 3 s at 1000 / 10000)")
    shutil.rmtree(tmp, ignore_errors=True)  # kept (with the logs) only when the run failed


if __name__ == "__main__":
    main()
