"""The coordination IOC takes its device list from the real registry IOC over PVA."""

from __future__ import annotations

import pytest
from p4p.client.thread import Context, RemoteError

from pvcoord.demo.devices import write_registry
from pvcoord.procs import (
    ManagedProcess,
    client_conf,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo
from pvdb import names as pvn

from .coordhelpers import CLIENT_TIMEOUT, PREFIX, REPO, rpc, start_coordination

pytestmark = pytest.mark.system


def test_device_list_follows_the_registry(tmp_path):
    env = loopback_env()
    registry_file = write_registry(PREFIX, tmp_path / "registry.yaml")
    # the coordination IOC first: it must refuse every lock until the registry answers
    coord = start_coordination(env, tmp_path, devices=None, extra=("--registry-prefix", PREFIX))
    registry = None
    try:
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            err = rpc(c, pvn.COORD_ACQUIRE, device="m1", type="MANUAL_OPERATOR", timeout="60")
            assert isinstance(err, RemoteError) and "device list is not known yet" in str(err)
            # Coord:Health is set by the IOC's tick ("starting" until the first one)
            wait_until(lambda: "not connected" in c.get(pvn.COORD_HEALTH.name(PREFIX),
                                                        timeout=CLIENT_TIMEOUT), 10,
                       "Coord:Health naming the registry not connected")
            registry = ManagedProcess(
                "registry",
                python_module("iocs.registry", "--prefix", PREFIX, "--registry",
                              str(registry_file)),
                server_env(env), cwd=REPO, log_dir=tmp_path)
            wait_for_pv(pvn.REGISTRY_DEVICES.name(PREFIX), env, procs=[registry, coord])
            names = sorted(d.name for d in demo.DEVICES)
            wait_until(
                lambda: sorted(c.get(pvn.COORD_DEVICES.name(PREFIX), timeout=CLIENT_TIMEOUT))
                == sorted([*names, "beamline"]), 10, "Coord:Devices from the registry")
            wait_until(lambda: c.get(pvn.COORD_HEALTH.name(PREFIX), timeout=CLIENT_TIMEOUT)
                       == "OK", 10, "Coord:Health OK")
            ok = rpc(c, pvn.COORD_ACQUIRE, device="det2", type="MANUAL_OPERATOR", timeout="60")
            assert ok.granted
            # the per-device PVs of registered devices exist
            assert c.get(pvn.COORD_DEVICE_STATE.name(PREFIX, "shutter"),
                         timeout=CLIENT_TIMEOUT).choice == "Free"
            err = rpc(c, pvn.COORD_ACQUIRE, device="m9", type="MANUAL_OPERATOR")
            assert isinstance(err, RemoteError) and "unknown device 'm9'" in str(err)
            # the registry going away keeps the known device list and shows in Health
            registry.stop()
            wait_until(lambda: "not connected" in c.get(pvn.COORD_HEALTH.name(PREFIX),
                                                        timeout=CLIENT_TIMEOUT), 10, "Health")
            assert rpc(c, pvn.COORD_RELEASE, device="det2").devices == ["det2"]
    finally:
        if registry is not None:
            registry.stop()
        coord.stop()
