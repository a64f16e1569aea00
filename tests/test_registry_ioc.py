"""Registry IOC: pure logic, in-process (isolated p4p servers), and the real process."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading

import pytest
from p4p import Type, Value
from p4p.client.thread import Context, RemoteError
from p4p.nt import NTURI, NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from iocs.registry.ioc import RegistryIOC, serve
from iocs.registry.model import RegistryError, RegistryState, lookup_pv_arg
from pvcoord.demo.devices import registry_devices, write_database, write_registry
from pvcoord.procs import (
    PYTHON,
    ManagedProcess,
    client_conf,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo
from pvdb import names as pvn
from pvdb.lockmodel import ErrorCode
from pvdb.models import Device, DeviceSignal

from .codes import raises_code
from .conftest import TIMEOUT

P = "TREG:"
DEVICE_COLUMNS = [c for c, _ in pvn.DEVICES_COLUMNS]


# --- pure logic -------------------------------------------------------------------------------

def _state() -> RegistryState:
    return RegistryState([
        Device(name="m2", pvs=["X:m2:A", "X:m2:B"], pv_prefix="X:m2:", ioc="ioc1"),
        Device(name="m1", **{"class": "Motor"}, capabilities=["readable", "movable"],
               pvs=["X:m1:A"], description="first"),
        Device(name="p", pv_prefix="X:p:"),
    ])


def test_rows_are_sorted_and_follow_the_contract_columns():
    st = _state()
    assert st.names() == ["m1", "m2", "p"]
    rows = st.device_rows()
    assert len(rows[0]) == len(pvn.DEVICES_COLUMNS)
    assert rows[0] == ("m1", "Motor", "readable,movable", "", "", "first", False)
    assert st.pv_rows() == [("X:m1:A", "m1"), ("X:m2:A", "m2"), ("X:m2:B", "m2")]
    assert st.all_probe_names() == ["X:m1:A", "X:m2:A", "X:m2:B"]


def test_connectivity_changes_only_when_a_flag_changes():
    st = _state()
    assert st.apply_check({"X:m1:A": True, "X:m2:A": True, "X:m2:B": False}) == {"m1"}
    assert st.connected == {"m1": True, "m2": False, "p": False}
    assert st.apply_check({"X:m1:A": True, "X:m2:A": True, "X:m2:B": False}) == set()
    assert st.apply_check({"X:m1:A": True, "X:m2:A": True, "X:m2:B": True}) == {"m2"}
    assert st.connected_count() == 2
    # a PV missing from the answers counts as not answering; prefix-only devices never connect
    assert st.apply_check({}) == {"m1", "m2"}
    assert st.connected["p"] is False


def test_lookup_answers_and_errors():
    st = _state()
    ans = st.lookup("X:m1:A.VAL")
    assert ans["device"] == "m1" and ans["match"] == "field" and ans["pvs"] == ["X:m1:A"]
    assert st.lookup("X:m2:Other")["match"] == "prefix"
    with raises_code(RegistryError, ErrorCode.UNKNOWN_DEVICE) as e:
        st.lookup("Y:z")
    assert "'Y:z' (checked 3 PV" in str(e.value)  # says what was searched


def test_devices_without_pvs_leave_the_guards_map_intact():
    # the guard builds its map from the Registry:DevicePVs rows and the pvPrefix column
    from bridges.guard.decision import DeviceMap

    st = RegistryState([
        Device(name="m1", pvs=["X:m1:A"], pv_prefix="X:m1:",
               signals=[DeviceSignal(name="m1.a", access="rw", read_pv="X:m1:A",
                                     write_pv="X:m1:A")]),
        Device(name="soft", signals=[DeviceSignal(name="soft", access="rw")]),
        Device(name="alias", signals=[DeviceSignal(name="alias", access="r", read_pv="X:m1:A")]),
        Device(name="flyer"),
    ])
    assert st.pv_rows() == [("X:m1:A", "m1")]
    prefixes = [(r[0], r[3]) for r in st.device_rows()]
    dmap = DeviceMap(st.pv_rows(), prefixes, known=True)
    assert dmap.device_of("X:m1:A") == "m1" and dmap.device_of("X:m1:Other") == "m1"
    assert dmap.device_of("soft") is None and dmap.device_of("Y:anything") is None
    assert st.signal_rows("alias") == [("alias", "", "r", "X:m1:A", "")]
    assert st.signal_rows("flyer") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "missing argument pv"),
        ({"pv": "  "}, "missing argument pv"),
        ({"pv": "A", "device": "m1"}, "unknown argument"),
        ({"pv": "A" * 5000}, "5000 characters"),
    ],
)
def test_lookup_argument_errors(args, message):
    with raises_code(RegistryError, ErrorCode.BAD_ARGUMENT) as e:
        lookup_pv_arg(args)
    assert message in str(e.value)  # names what was wrong


def test_lookup_argument_ok():
    assert lookup_pv_arg({"pv": " A:b "}) == "A:b"


# --- in-process: serve() on isolated servers ---------------------------------------------------

@contextlib.contextmanager
def serving(devices: list[Device], device_conf: dict[str, str], check_period: float = 0.2):
    """Run ``serve()`` in a thread; yield the registry server's client conf."""
    ready = threading.Event()
    box: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    async def main() -> None:
        box["stop"] = asyncio.Event()

        def on_ready(ioc: RegistryIOC) -> None:
            box["conf"] = ioc.server_conf
            ready.set()

        await serve(P, devices, box["stop"], check_period=check_period, client_conf=device_conf,
                    isolate=True, ready=on_ready)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # reported by the test
            box["error"] = e
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert ready.wait(TIMEOUT), "serve() did not become ready"
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        yield box["conf"]
    finally:
        if "stop" in box:
            loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[union-attr]
        t.join(TIMEOUT)
        loop.close()
        assert not t.is_alive()


def lookup(ctxt: Context, pv: str, **extra: str):
    name = pvn.REGISTRY_LOOKUP.name(P)
    kws = {"pv": pv, **extra}
    uri = NTURI([(k, "s") for k in kws]).wrap(name, kws=kws)
    return ctxt.rpc(name, uri, timeout=TIMEOUT)


def table_rows(value) -> list[dict]:
    cols = value.value
    names = list(cols.keys())
    return [dict(zip(names, row, strict=True))
            for row in zip(*(cols[n] for n in names), strict=True)]


def test_in_process_tables_lookup_and_connectivity():
    dev_pvs = {pv: SharedPV(nt=NTScalar("d"), initial=0.0) for pv in ["Y:a:One", "Y:a:Two"]}
    signals = [
        DeviceSignal(name="a.two", kind="config", access="rw", read_pv="Y:a:Two",
                     write_pv="Y:a:Two"),
        DeviceSignal(name="a.one", kind="hinted", access="r", read_pv="Y:a:One"),
        DeviceSignal(name="a.sub.soft", access="rw"),
    ]
    devices = [
        Device(name="a", pvs=list(dev_pvs), pv_prefix="Y:a:", signals=signals),
        Device(name="b", pvs=["Y:b:Missing"]),
        Device(name="soft", signals=[DeviceSignal(name="soft", kind="hinted", access="rw")]),
    ]
    with Server(providers=[dev_pvs], isolate=True) as device_server, \
            serving(devices, device_server.conf()) as conf, \
            Context("pva", conf=conf, useenv=False) as ctxt:
        wait = wait_value(ctxt)
        wait(pvn.REGISTRY_CONNECTED.name(P), lambda v: v == 1)
        rows = table_rows(ctxt.get(pvn.REGISTRY_DEVICES.name(P), timeout=TIMEOUT))
        assert [(r["name"], bool(r["connected"])) for r in rows] == [
            ("a", True), ("b", False), ("soft", False)]
        assert list(ctxt.get(pvn.REGISTRY_DEVICES.name(P), timeout=TIMEOUT).labels) \
            == DEVICE_COLUMNS
        assert list(ctxt.get(pvn.REGISTRY_NAMES.name(P), timeout=TIMEOUT)) == ["a", "b", "soft"]
        # the signals of each device, sorted by name; none for b; soft has no PVs
        sig = ctxt.get(pvn.REGISTRY_DEVICE_SIGNALS.name(P, device="a"), timeout=TIMEOUT)
        assert list(sig.labels) == [c for c, _ in pvn.SIGNALS_COLUMNS]
        assert [tuple(r.values()) for r in table_rows(sig)] == [
            ("a.one", "hinted", "r", "Y:a:One", ""),
            ("a.sub.soft", "", "rw", "", ""),
            ("a.two", "config", "rw", "Y:a:Two", "Y:a:Two")]
        assert table_rows(ctxt.get(pvn.REGISTRY_DEVICE_SIGNALS.name(P, device="b"),
                                   timeout=TIMEOUT)) == []
        assert [tuple(r.values()) for r in table_rows(ctxt.get(
            pvn.REGISTRY_DEVICE_SIGNALS.name(P, device="soft"), timeout=TIMEOUT))] == [
            ("soft", "hinted", "rw", "", "")]
        pv_rows = table_rows(ctxt.get(pvn.REGISTRY_DEVICE_PVS.name(P), timeout=TIMEOUT))
        assert [(r["pv"], r["device"]) for r in pv_rows] == [
            ("Y:a:One", "a"), ("Y:a:Two", "a"), ("Y:b:Missing", "b")]  # soft: no rows
        ans = lookup(ctxt, "Y:a:Two.VAL")
        assert (ans.device, ans.match, ans.connected) == ("a", "field", True)
        assert lookup(ctxt, "Y:a:Internal").match == "prefix"
        with raises_code(RemoteError, ErrorCode.UNKNOWN_DEVICE):
            lookup(ctxt, "Q:q")
        with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT):
            lookup(ctxt, "Y:a:One", extra="1")
        # a plain structure (not NTURI) is accepted too
        plain = Value(Type([("pv", "s")]), {"pv": "Y:a:One"})
        assert ctxt.rpc(pvn.REGISTRY_LOOKUP.name(P), plain, timeout=TIMEOUT).device == "a"
        with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT):
            ctxt.put(pvn.REGISTRY_LOOKUP.name(P), "x", timeout=TIMEOUT)
        beat = int(ctxt.get(pvn.REGISTRY_HEARTBEAT.name(P), timeout=TIMEOUT))
        wait(pvn.REGISTRY_HEARTBEAT.name(P), lambda v: v > beat)
        # the device server goes away: a disconnects
        device_server.stop()
        wait(pvn.REGISTRY_CONNECTED.name(P), lambda v: v == 0)
        rows = table_rows(ctxt.get(pvn.REGISTRY_DEVICES.name(P), timeout=TIMEOUT))
        assert not any(r["connected"] for r in rows)
        with pytest.raises(TimeoutError):  # an unknown device has no Signals PV
            ctxt.get(pvn.REGISTRY_DEVICE_SIGNALS.name(P, device="nope"), timeout=0.5)


def wait_value(ctxt: Context):
    """``wait(name, condition)``: poll a PV with a deadline until ``condition(value)``."""
    def wait(name, condition, timeout=TIMEOUT):
        return wait_until(lambda: condition(ctxt.get(name, timeout=TIMEOUT)), timeout,
                          f"{name} condition")
    return wait


# --- the real process -------------------------------------------------------------------------

@pytest.mark.system
def test_help_lists_every_registry_pv():
    out = subprocess.run([PYTHON, "-m", "iocs.registry", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for spec in pvn.REGISTRY_PVS:
        suffix = spec.suffix.replace("{device}", "<dev>")
        assert suffix in out.stdout, suffix
    assert "--check-period" in out.stdout


@pytest.mark.system
def test_bad_registry_file_is_refused_at_start(tmp_path, env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n  - name: m1\n    pvs: [A:b]\n    capabilities: [moveable]\n")
    out = subprocess.run(
        python_module("iocs.registry", "--prefix", P, "--registry", str(bad)),
        env=server_env(env), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "line 4" in out.stderr and "'m1'" in out.stderr and "moveable" in out.stderr


@pytest.mark.system
def test_bad_prefix_is_refused(tmp_path, env):
    reg = write_registry(P, tmp_path / "r.yaml")
    out = subprocess.run(
        python_module("iocs.registry", "--prefix", "NOCOLON", "--registry", str(reg)),
        env=server_env(env), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "prefix" in out.stderr


@pytest.mark.system
def test_registry_process_with_real_softioc(tmp_path, env):
    db = write_database(P, tmp_path / "demo.db")
    reg = write_registry(P, tmp_path / "registry.yaml")
    n_devices = len(demo.DEVICES)
    connected = pvn.REGISTRY_CONNECTED.name(P)

    def softioc(name: str) -> ManagedProcess:
        return ManagedProcess(name, python_module("pvxslibs.ioc", "-d", str(db)),
                              server_env(env), log_dir=tmp_path)

    procs: list[ManagedProcess] = []
    try:
        ioc = softioc("softioc")
        procs.append(ioc)
        registry = ManagedProcess(
            "registry",
            python_module("iocs.registry", "--prefix", P, "--registry", str(reg),
                          "--check-period", "0.3"),
            server_env(env), log_dir=tmp_path)
        procs.append(registry)
        wait_for_pv(connected, env, timeout=30, procs=procs, condition=lambda v: v == n_devices)

        with Context("pva", conf=client_conf(env), useenv=False) as ctxt:
            table = ctxt.get(pvn.REGISTRY_DEVICES.name(P), timeout=TIMEOUT)
            assert list(table.labels) == DEVICE_COLUMNS
            rows = table_rows(table)
            expected = sorted(registry_devices(P), key=lambda d: d.name)
            assert [r["name"] for r in rows] == [d.name for d in expected]
            for r, d in zip(rows, expected, strict=True):
                assert r["deviceClass"] == d.device_class
                assert r["capabilities"] == ",".join(c.value for c in d.capabilities)
                assert r["pvPrefix"] == d.pv_prefix and r["ioc"] == d.ioc
                assert r["description"] == d.description and r["connected"]

            m1 = demo.MOTORS[0]
            ans = lookup(ctxt, demo.motor_setpoint(P, m1))
            assert (ans.device, ans.deviceClass, ans.match) == (m1, "SimMotor", "pv")
            assert list(ans.pvs) == demo.device_pvs(P, m1)
            ans = lookup(ctxt, demo.motor_readback(P, m1) + ".VAL")
            assert (ans.device, ans.match) == (m1, "field")
            sim = demo.MOTOR_SIM_STOP.name(P, device=m1)
            assert lookup(ctxt, sim).match == "prefix"
            with raises_code(RemoteError, ErrorCode.UNKNOWN_DEVICE):
                lookup(ctxt, P + "NoSuchDevice:Setpoint")
            # every device's signals, as the registry file has them
            for d in expected:
                rows = table_rows(ctxt.get(pvn.REGISTRY_DEVICE_SIGNALS.name(P, device=d.name),
                                           timeout=TIMEOUT))
                assert rows == [{"signal": s.name, "kind": s.kind, "access": s.access,
                                 "readPv": s.read_pv, "writePv": s.write_pv}
                                for s in d.signals], d.name
            m1_rows = table_rows(ctxt.get(pvn.REGISTRY_DEVICE_SIGNALS.name(P, device=m1),
                                          timeout=TIMEOUT))
            rbv = next(r for r in m1_rows if r["signal"] == f"{m1}.readback")
            assert (rbv["kind"], rbv["access"], rbv["readPv"]) == (
                "hinted", "r", demo.motor_readback(P, m1))

        ioc.stop()
        wait_for_pv(connected, env, timeout=30, procs=[registry], condition=lambda v: v == 0)
        ioc = softioc("softioc-restarted")
        procs.append(ioc)
        wait_for_pv(connected, env, timeout=30, procs=procs[1:],
                    condition=lambda v: v == n_devices)
        with Context("pva", conf=client_conf(env), useenv=False) as ctxt:
            rows = table_rows(ctxt.get(pvn.REGISTRY_DEVICES.name(P), timeout=TIMEOUT))
            assert all(r["connected"] for r in rows)
    finally:
        for p in reversed(procs):
            p.stop()
