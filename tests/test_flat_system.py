"""The CA bridge as a real process, with a real softIoc, coordination and registry IOCs, and real
CA clients (libca via pyepics under root and nobody; caproto's client).

Layout (two loopback networks, as a facility separates them):

    CA clients (root, nobody) --CA, own port--> bridge --PVA "devices"--> softIoc
                                                  \\--PVA "clients"--> coordination, registry
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import caproto
import pytest
from caproto import ChannelType
from caproto.threading.client import Context as CaprotoContext
from p4p.client.thread import Context
from p4p.nt import NTURI

from pvcoord.demo import devices
from pvcoord.demo.flat_part import CAAgent, bridge_env, start_flat, walkthrough
from pvcoord.demo.guard_part import PutAgent
from pvcoord.endstation_status import read_status
from pvcoord.procs import (
    ManagedProcess,
    client_conf,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvcoord.rpc import current_locks
from pvdb import demo
from pvdb import flat as fl
from pvdb.names import (
    COORD_ACQUIRE,
    COORD_DEVICE_OWNER,
    COORD_DEVICE_STATE,
    COORD_FORCE_RELEASE,
    COORD_LOCKS,
    COORD_RELEASE,
    PVKind,
)
from pvdb.process import FLAT_START_TIME, FLAT_VERSION, pvcoord_version
from tests.conftest import REPO, TIMEOUT, other_user_available

pytestmark = [
    pytest.mark.system,
    pytest.mark.identity,
    pytest.mark.skipif(other_user_available() is not None, reason=str(other_user_available())),
]

P = "TST:"
M1, M2, M3, M4 = demo.MOTORS
DET = demo.DETECTORS[0]
POLICY = """
[access]
unlocked_writable = true
trusted_services = ["root"]
force_release = ["root"]
emergency = []

[lock_types.MAINTENANCE]
allow = ["root"]

[lock_types.MANUAL_OPERATOR]
allow = ["*"]

# the bridge runs as root and takes locks for its writers, root (privileged) among them
[access.on_behalf_of]
root = ["*", "root"]
"""


STRICT_POLICY = POLICY.replace("unlocked_writable = true", "unlocked_writable = false")


def sp(motor: str) -> str:
    return demo.motor_setpoint(P, motor)


@dataclass
class Beamline:
    tmp: Path
    clients: dict[str, str]
    devices_env: dict[str, str]
    ca_env: dict[str, str] = field(default_factory=dict)
    strict_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    ca: dict[str, CAAgent] = field(default_factory=dict)
    pva: dict[str, PutAgent] = field(default_factory=dict)
    ctxt: Context | None = None

    def start_coordination(self) -> None:
        proc = ManagedProcess(
            "coordination",
            python_module("iocs.coordination", "--prefix", P, "--policy", str(self.tmp / "p.toml"),
                          "--store", f"sqlite:///{self.tmp}/locks.sqlite", "--registry-prefix", P),
            server_env(self.clients), cwd=REPO, log_dir=self.tmp,
        )
        self.procs["coordination"] = proc
        wait_for_pv(COORD_LOCKS.name(P), self.clients, procs=[proc])

    def outputs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.output()[-4000:]}" for n, p in self.procs.items())

    def rpc(self, spec, **args: str):
        name = spec.name(P)
        uri = NTURI([(k, "s") for k in args]).wrap(name, kws=args)
        return self.ctxt.rpc(name, uri, timeout=TIMEOUT)

    def holders(self) -> dict[str, str]:
        t = current_locks(self.ctxt, P, TIMEOUT).value
        return dict(zip(t.device, t.owner, strict=True))

    def text(self, name: str) -> str:
        v = self.ctxt.get(name, timeout=TIMEOUT)
        return str(v.raw.value if hasattr(v, "raw") else v.value)

    def stamp(self, name: str) -> float:
        v = self.ctxt.get(name, timeout=TIMEOUT)
        v = v.raw if hasattr(v, "raw") else v
        return v["timeStamp.secondsPastEpoch"] + 1e-9 * v["timeStamp.nanoseconds"]

    def message(self, device: str) -> str:
        return self.text(fl.FLAT_MESSAGE.name(P, device) if device
                         else fl.FLAT_MESSAGE_ALL.name(P))


@pytest.fixture(scope="module")
def bl(tmp_path_factory) -> Iterator[Beamline]:
    tmp = tmp_path_factory.mktemp("flat")
    b = Beamline(tmp, loopback_env(), loopback_env())
    b.ca_env = bridge_env(b.clients)
    # the in-process CA client (caproto's) of this module talks to the bridge; the environment
    # is put back after the module (later modules must not depend on the order they run in)
    saved = {k: v for k, v in os.environ.items() if k.startswith("EPICS_CA")}
    os.environ.update({k: v for k, v in b.ca_env.items() if k.startswith("EPICS_CA")})
    (tmp / "p.toml").write_text(POLICY)
    (tmp / "strict.toml").write_text(STRICT_POLICY)
    devices.write_database(P, tmp / "demo.db")
    devices.write_registry(P, tmp / "registry.yaml")
    try:
        b.procs["softioc"] = ManagedProcess(
            "softioc", python_module("pvxslibs.ioc", "-d", str(tmp / "demo.db")),
            server_env(b.devices_env), log_dir=tmp,
        )
        wait_for_pv(sp(M1), b.devices_env, procs=[b.procs["softioc"]])
        b.procs["registry"] = ManagedProcess(
            "registry",
            python_module("iocs.registry", "--prefix", P, "--registry", str(tmp / "registry.yaml")),
            server_env(b.clients), cwd=REPO, log_dir=tmp,
        )
        b.start_coordination()
        b.procs["flat"] = start_flat(P, b.ca_env, b.devices_env, tmp / "p.toml", tmp)
        wait_for_pv(fl.FLAT_HEALTH.name(P), b.clients, procs=list(b.procs.values()),
                    condition=lambda v: v == "OK")
        # a second bridge (strict policy) on networks of its own (CA and PVA), following the
        # same coordination and registry IOCs
        b.strict_env = bridge_env(loopback_env())
        b.procs["strict"] = start_flat(
            P, b.strict_env, b.devices_env, tmp / "strict.toml", tmp / "strict",
            extra=tuple(f"--service={k}={v}" for k, v in client_conf(b.clients).items()))
        b.ctxt = Context("pva", conf=client_conf(b.clients), useenv=False)
        b.ca["root"] = CAAgent(b.ca_env)
        b.ca["nobody"] = CAAgent(b.ca_env, user="nobody")
        b.pva["root"] = PutAgent(b.clients)
        yield b
    except BaseException:
        print(b.outputs())
        raise
    finally:
        for k in [k for k in os.environ if k.startswith("EPICS_CA")]:
            del os.environ[k]
        os.environ.update(saved)
        if b.ctxt is not None:
            b.ctxt.close()
        for a in [*b.ca.values(), *b.pva.values()]:
            a.close()
        for p in reversed(list(b.procs.values())):
            p.stop()


@pytest.fixture(autouse=True)
def no_locks_left(bl: Beamline, request) -> Iterator[None]:
    """Every test ends with no locks (force-released by root, who may); output on failure."""
    yield
    if bl.procs["coordination"].alive():
        for device in bl.holders():
            bl.rpc(COORD_FORCE_RELEASE, device=device, reason="test cleanup")
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(bl.outputs())


def ok(reply: dict) -> dict:
    assert reply["ok"], reply
    return reply["value"]


def test_device_pvs_pass_through_with_metadata(bl: Beamline):
    root = bl.ca["root"]
    ok(root.connect(sp(M1)))
    ok(root.put(sp(M1), 1.25))
    assert ok(root.get(sp(M1))) == 1.25
    # units, precision, control limits over CA, from the softIoc's record via PVA
    ctrl = ok(root.ctrl(sp(M2)))
    assert ctrl["units"] == demo.MOTOR_SETPOINT.units
    assert ctrl["precision"] == 3
    assert ctrl["upper_ctrl_limit"] == demo.MOTOR_LIMIT
    assert ctrl["lower_ctrl_limit"] == -demo.MOTOR_LIMIT
    # alarm status and severity pass through: a HIHI limit set through the bridge (record
    # fields are served too), then a setpoint above it
    # (a fast motor: the put waits for the motion)
    ok(root.put(demo.motor_velocity(P, M2), 1000.0))
    for field_name, value in ((".HIHI", 50.0), (".HHSV", 2)):
        ok(root.put(sp(M2) + field_name, value))
    ok(root.put(sp(M2), 60.0))
    alarm = ok(root.ctrl(sp(M2)))
    assert (alarm["severity"], alarm["status"]) == (2, 3), alarm  # MAJOR, HIHI
    assert abs(alarm["timestamp"] - time.time()) < 30
    ok(root.put(sp(M2), 0.0))
    assert ok(root.ctrl(sp(M2)))["severity"] == 0
    ok(root.put(demo.motor_velocity(P, M2), demo.MOTOR_VELOCITY))
    # enum labels
    moving = demo.motor_moving(P, M1)
    assert ok(root.get(moving, as_string=True)) in demo.MOVING_CHOICES
    # a record field the registry does not list is served on first search, gated like the record
    assert ok(root.get(sp(M1) + ".DESC", as_string=True)) == f"{M1} setpoint"
    # lock state screen PV over CA
    assert ok(root.get(COORD_DEVICE_STATE.name(P, M1), as_string=True)) == "Free"


def test_rights_flip_live_for_holder_and_non_holder(bl: Beamline):
    root, nobody = bl.ca["root"], bl.ca["nobody"]
    field_pv = sp(M1) + ".DRVH"
    assert ok(nobody.connect(sp(M1)))["write"]
    # a record field is gated too: the field rules give it to staff (root) only, never to nobody
    assert not ok(nobody.connect(field_pv))["write"]
    assert ok(root.connect(field_pv))["write"]
    ok(root.connect(sp(M1)))
    before = ok(nobody.access(sp(M1)))
    bl.rpc(COORD_ACQUIRE, device=M1, type="MANUAL_OPERATOR", timeout="60", reason="align")
    w = ok(nobody.wait_write(sp(M1), False))
    assert not w["write"] and w["read"]
    assert not ok(nobody.wait_write(field_pv, False))["write"]  # record fields are gated too
    assert ok(root.access(sp(M1)))["write"]
    r = nobody.put(sp(M1), 7.0)
    assert not r["ok"] and "denied" in r["error"].lower(), r
    ok(root.put(sp(M1), 2.0))
    assert ok(nobody.get(sp(M1))) == 2.0  # reads always pass
    # the screen PVs show the holder, over CA and PVA
    assert ok(nobody.get(COORD_DEVICE_STATE.name(P, M1), as_string=True)) == "ManualOperator"
    assert ok(nobody.get(COORD_DEVICE_OWNER.name(P, M1), as_string=True)).startswith("root@")
    bl.rpc(COORD_RELEASE, device=M1)
    w = ok(nobody.wait_write(sp(M1), True))
    assert w["write"]
    # same channel: one connection, the rights changed by ACCESS_RIGHTS messages only
    assert w["connects"] == before["connects"] == 1 and w["changes"] >= before["changes"] + 2
    ok(nobody.put(sp(M1), 3.0))  # unlocked device, policy unlocked_writable = true


def test_preemption_moves_write_access_and_expiry_returns_it(bl: Beamline):
    root, nobody = bl.ca["root"], bl.ca["nobody"]
    ok(nobody.put(fl.FLAT_TAKE.name(P, M2), 1))  # nobody takes m2 through the screen PV
    assert bl.holders()[M2].startswith("nobody@")
    assert not ok(root.wait_write(sp(M2), False))["write"]
    assert ok(nobody.wait_write(sp(M2), True))["write"]
    bl.rpc(COORD_ACQUIRE, device=M2, type="MAINTENANCE", timeout="5", reason="preempt")
    assert ok(root.wait_write(sp(M2), True))["write"]
    assert not ok(nobody.wait_write(sp(M2), False))["write"]
    # the 5 s MAINTENANCE lease runs out: everyone may write the unlocked device again
    assert ok(nobody.wait_write(sp(M2), True, timeout=15))["write"]
    assert M2 not in bl.holders()


def test_strict_policy_unlocked_device_is_not_writable_until_taken(bl: Beamline):
    with CAAgent(bl.strict_env, user="nobody") as nobody:
        assert not ok(nobody.wait_write(sp(M1), False))["write"]  # free, but strict
        r = nobody.put(sp(M1), 4.0)
        assert not r["ok"] and "denied" in r["error"].lower(), r
        ok(nobody.put(fl.FLAT_TAKE.name(P, M1), 1))  # through the strict bridge
        assert ok(nobody.wait_write(sp(M1), True))["write"]
        ok(nobody.put(sp(M1), 4.0))
        ok(nobody.put(fl.FLAT_RELEASE.name(P, M1), 1))
        assert not ok(nobody.wait_write(sp(M1), False))["write"]


def test_put_callback_waits_for_a_moving_motor(bl: Beamline):
    """libca ``ca_array_put_callback`` through the bridge: completion when the readback is there."""
    root, speed = bl.ca["root"], 10.0
    rb = demo.motor_readback(P, M3)
    ok(root.put(demo.motor_velocity(P, M3), speed))
    with Context("pva", conf=client_conf(bl.devices_env), useenv=False) as ioc:
        start = float(ioc.get(rb, timeout=TIMEOUT))
        for distance in (2.0, -3.5):
            target = start + distance
            secs = ok(root.put(sp(M3), target, timeout=10))["seconds"]
            # the softIoc's readback at completion, read past the bridge
            assert float(ioc.get(rb, timeout=TIMEOUT)) == target
            assert secs >= abs(distance) / speed, (distance, secs)
            # and the bridge's mirror follows
            wait_until(lambda t=target: ok(root.get(rb)) == t, TIMEOUT, f"{rb} = {target}")
            start = target
    # a put without callback returns before the motion ends
    secs = ok(root.put(sp(M3), start + 3.0, wait=False))["seconds"]
    assert secs < 3.0 / speed
    wait_until(lambda: ok(root.get(rb)) == start + 3.0, TIMEOUT, f"{rb} after a plain put")
    ok(root.put(demo.motor_velocity(P, M3), demo.MOTOR_VELOCITY))


def test_put_callback_completes_with_the_upstream_put(bl: Beamline):
    root = bl.ca["root"]
    acquire_time = demo.det_acquire_time(P, DET)
    ok(root.put(acquire_time, 0.6))
    secs = ok(root.put(demo.det_acquire(P, DET), 1, timeout=10))["seconds"]
    assert secs >= 0.5, secs  # the exposure (ODLY) ends the upstream put
    ok(root.put(acquire_time, demo.DET_ACQUIRE_TIME))
    # a failed upstream put (value beyond the enum's labels) is a CA put failure
    r = root.put(demo.motor_stop(P, M3), 7)
    assert not r["ok"], r


def test_puts_over_ca_complete_and_a_failed_ca_put_is_a_put_failure(bl: Beamline):
    """Decision 0155: given the device network's CA settings (as the demo does), numeric and
    enum puts go over libca's put-callback; a put the softIoc refuses over CA (the record is
    disabled: DISP=1, ECA_PUTFAIL) reaches the CA client as a put failure. A bridge of its own,
    so that its put counters (logged when it stops) are this test's."""
    env = bridge_env(loopback_env())
    svc = tuple(f"--service={k}={v}" for k, v in client_conf(bl.clients).items())
    proc = start_flat(P, env, bl.devices_env, bl.tmp / "p.toml", bl.tmp / "caput", extra=svc)
    vel = demo.motor_velocity(P, M4)
    try:
        with CAAgent(env) as root, Context("pva", conf=client_conf(bl.devices_env),
                                           useenv=False) as ioc:
            assert ok(root.wait_write(vel, True))["write"]
            for speed in (2.0, 3.0, 4.0, 5.0):
                ok(root.put(vel, speed))
                assert float(ioc.get(vel, timeout=TIMEOUT)) == speed  # completed upstream
            ok(root.put(vel + ".DISP", 1))  # a field: staff (root) may; uchar over CA
            r = root.put(vel, 6.0)
            assert not r["ok"], r
            assert float(ioc.get(vel, timeout=TIMEOUT)) == 5.0
            ok(root.put(vel + ".DISP", 0))
            ok(root.put(vel, demo.MOTOR_VELOCITY))
    finally:
        proc.stop()
    out = proc.output()
    assert "upstream put failed (CA)" in out, out[-3000:]
    counts = [line for line in out.splitlines() if "forwarded puts:" in line]
    assert counts, out[-3000:]
    over_ca = int(counts[-1].split("forwarded puts:")[1].split()[0])
    assert over_ca >= 5, counts  # the first put of a name may go over PVA (channel connecting)


def test_an_update_during_a_long_put_reaches_clients_before_the_put_completes(bl: Beamline):
    """Updates of a PV with a put in flight wait for its reply at most 20 ms (decision 0155):
    during a 2 s exposure started by a put to Acquire, Acquire reads 1 through the bridge long
    before that put completes."""
    root, acquire = bl.ca["root"], demo.det_acquire(P, DET)
    exposure = 2.0
    ok(root.put(demo.det_acquire_time(P, DET), exposure))
    try:
        with CaprotoContext(client_name="root") as ctx:
            (pv,) = ctx.get_pvs(acquire, timeout=TIMEOUT)
            pv.wait_for_connection(timeout=3 * TIMEOUT)
            assert pv.read(timeout=TIMEOUT).data[0] == 0
            t0 = time.monotonic()
            done = []
            pv.write([1], wait=False, callback=lambda response: done.append(time.monotonic()))
            wait_until(lambda: pv.read(timeout=TIMEOUT).data[0] == 1, exposure / 2,
                       "Acquire = 1 while the put is in flight")
            assert not done, "the put completed before the exposure ended"
            wait_until(lambda: done, 2 * exposure + TIMEOUT, "the put's completion")
            assert done[0] - t0 >= exposure * 0.9
    finally:
        ok(root.put(demo.det_acquire_time(P, DET), demo.DET_ACQUIRE_TIME))


def test_a_lock_of_the_same_account_from_another_host_is_not_the_clients(bl: Beamline):
    """The decision is bound to the peer host: nobody's lock taken at another host does not give
    write access to a CA client claiming nobody from 127.0.0.1 (decision 0132)."""
    nobody = bl.ca["nobody"]
    assert ok(nobody.wait_write(sp(M2), True))["write"]
    bl.rpc(COORD_ACQUIRE, device=M2, type="MANUAL_OPERATOR", timeout="60", reason="elsewhere",
           onBehalfOf="nobody", clientHost="10.9.9.9")
    assert bl.holders()[M2] == "nobody@10.9.9.9"
    assert not ok(nobody.wait_write(sp(M2), False))["write"]
    r = nobody.put(sp(M2), 1.0)
    assert not r["ok"] and "denied" in r["error"].lower(), r
    bl.rpc(COORD_RELEASE, device=M2, onBehalfOf="nobody", clientHost="10.9.9.9")
    assert ok(nobody.wait_write(sp(M2), True))["write"]


def test_rename_after_connect_keeps_the_first_identity(bl: Beamline):
    bl.rpc(COORD_ACQUIRE, device=M3, type="MANUAL_OPERATOR", timeout="60", reason="rename")
    ok(bl.ca["nobody"].wait_write(sp(M3), False))  # the bridge's view has the lock
    with CaprotoContext(client_name="someone", host_name="elsewhere") as ctx:
        (pv,) = ctx.get_pvs(sp(M3), timeout=TIMEOUT)
        pv.wait_for_connection(timeout=3 * TIMEOUT)  # CA search on a busy loopback
        assert pv.channel.access_rights == caproto.AccessRights.READ
        pv.circuit_manager.send(caproto.ClientNameRequest("root"))
        pv.circuit_manager.send(caproto.HostNameRequest("localhost"))
        with pytest.raises((caproto.CaprotoTimeoutError, caproto.ErrorResponseReceived)):
            pv.write([42.0], wait=True, timeout=2)
        assert pv.channel.access_rights == caproto.AccessRights.READ
    assert ok(bl.ca["root"].get(sp(M3))) != 42.0


def test_take_and_release_by_pv_for_the_writing_account(bl: Beamline):
    root, nobody = bl.ca["root"], bl.ca["nobody"]
    ok(nobody.put(fl.FLAT_TAKE.name(P, M4), 1))
    assert bl.holders()[M4].startswith("nobody@127.0.0.1")
    assert bl.message(M4).startswith("granted:") and "nobody" in bl.message(M4)
    r = root.put(fl.FLAT_TAKE.name(P, M4), 1)
    assert not r["ok"]
    msg = bl.message(M4)
    assert msg.startswith("held:") and "nobody@" in msg, msg
    # over CA the whole text is NAME.VAL$ (a CHAR array); NAME alone is a 40-byte DBR_STRING
    assert ok(root.get(fl.FLAT_MESSAGE.name(P, M4) + ".VAL$", as_string=True)) == msg
    assert msg.startswith(ok(root.get(fl.FLAT_MESSAGE.name(P, M4), as_string=True)))
    assert bl.holders()[M4].startswith("nobody@")
    r = root.put(fl.FLAT_RELEASE.name(P, M4), 1)  # not root's lock
    assert not r["ok"] and bl.holders()[M4].startswith("nobody@")
    ok(nobody.put(fl.FLAT_RELEASE.name(P, M4), 1))
    assert M4 not in bl.holders() and bl.message(M4).startswith("released:")
    # over PVA the account of the put acts
    r = bl.pva["root"].put(fl.FLAT_TAKE.name(P, M4), 1)
    assert r["ok"], r
    assert bl.holders()[M4].startswith("root@")


def test_bad_input_gives_a_message_and_changes_nothing(bl: Beamline):
    take, msg_pv = fl.FLAT_TAKE.name(P, M1), fl.FLAT_MESSAGE.name(P, M1)
    with CaprotoContext(client_name="nobody") as ctx:
        pvs = dict(zip(
            [take, fl.FLAT_RELEASE.name(P, M1), fl.FLAT_TAKE_DEVICE.name(P), msg_pv,
             COORD_DEVICE_STATE.name(P, M1)],
            ctx.get_pvs(take, fl.FLAT_RELEASE.name(P, M1), fl.FLAT_TAKE_DEVICE.name(P), msg_pv,
                        COORD_DEVICE_STATE.name(P, M1), timeout=TIMEOUT),
            strict=True,
        ))
        for pv in pvs.values():
            pv.wait_for_connection(timeout=3 * TIMEOUT)  # CA search on a busy loopback

        def refused(pv_name: str, data, data_type, code: str, device: str = M1) -> None:
            # caproto's client does not report a put failure (it would time out): watch the
            # message PV, which every command put sets (a repeated text is a new update)
            name = fl.FLAT_MESSAGE.name(P, device) if device else fl.FLAT_MESSAGE_ALL.name(P)
            before = bl.stamp(name)
            pvs[pv_name].write(data, data_type=data_type, wait=False)
            wait_until(lambda: bl.stamp(name) > before, 5,
                       f"message after a bad put to {pv_name}")
            text = bl.message(device)
            assert text.startswith(code + ":"), (pv_name, data_type, text)

        refused(take, [5], ChannelType.LONG, "bad-value")
        refused(take, [1, 1], ChannelType.LONG, "bad-value")
        refused(take, [2.5], ChannelType.DOUBLE, "bad-value")
        refused(take, [b"nope"], ChannelType.STRING, "bad-value")
        refused(take, b"\xff\xfe" * 4, ChannelType.CHAR, "bad-value")
        refused(take, b"x" * 40000, ChannelType.CHAR, "bad-value")
        refused(fl.FLAT_RELEASE.name(P, M1), [b"Take"], ChannelType.STRING, "bad-value")
        refused(fl.FLAT_TAKE_DEVICE.name(P), [b"m9"], ChannelType.STRING, "unknown-device", "")
        refused(fl.FLAT_TAKE_DEVICE.name(P), b"m1,\x01", ChannelType.CHAR, "bad-value", "")
        refused(fl.FLAT_TAKE_DEVICE.name(P), b"y" * 40000, ChannelType.CHAR, "bad-value", "")
        refused(fl.FLAT_TAKE_DEVICE.name(P), [b""], ChannelType.STRING, "bad-value", "")
    # every screen PV is read-only for every client: libca refuses the put (no write access)
    screens = [(s.name(P, M1), s) for s in (*fl.ca_coord_pvs(), fl.FLAT_MESSAGE,
                                            fl.FLAT_CONNECTED, fl.FLAT_DESCRIPTION,
                                            fl.FLAT_DEVICE_CLASS)]
    screens += [(s.name(P), s) for s in fl.FLAT_GLOBAL_PVS if s not in fl.FLAT_COMMAND_PVS]
    for name, spec in screens:
        assert not ok(bl.ca["nobody"].connect(name))["write"], name
        text = spec.kind in (PVKind.STRING, PVKind.STRING_ARRAY)
        r = bl.ca["nobody"].put(name, "x" if text else 1)
        assert not r["ok"] and "denied" in r["error"].lower(), (name, r)
    assert bl.holders() == {}
    # a burst of 1,000 Take puts: one lock, for the writer; the bridge keeps serving
    nobody = bl.ca["nobody"]
    ok(nobody.request(op="burst", pv=take, value=1, count=1000))
    ok(nobody.put(take, 1, timeout=10))
    wait_until(lambda: bl.holders().get(M1, "").startswith("nobody@"), 10, "burst lock")
    assert list(bl.holders()) == [M1]
    assert bl.procs["flat"].alive()
    assert bl.message(M1).startswith("granted:")


def screen_pvs() -> dict[str, set[str]]:
    """protocol -> PV names of the CA-bridge and coordination screens, macros expanded."""
    import xml.etree.ElementTree as ET

    out: dict[str, set[str]] = {"ca": set(), "pva": set()}
    for bob in ("overview.bob", "device.bob", "device_lock.bob", "coordination.bob"):
        names = [e.text or "" for e in ET.parse(REPO / "opi" / bob).iter("pv_name")]
        for n in names:
            proto, _, bare = n.partition("://")
            bare = bare.replace("$(P)", P)
            devs = [d.name for d in demo.DEVICES] if "$(DEV)" in bare else [""]
            for d in devs:
                out[proto].add(bare.replace("$(DEV)", d))
    return out


def test_every_screen_pv_connects(bl: Beamline):
    pvs = screen_pvs()
    assert len(pvs["ca"]) >= 50 and len(pvs["pva"]) >= 20
    assert ok(bl.ca["root"].connect_many(sorted(pvs["ca"]))) == len(pvs["ca"])
    got = bl.ctxt.get(sorted(pvs["pva"]), timeout=TIMEOUT, throw=False)
    bad = [n for n, v in zip(sorted(pvs["pva"]), got, strict=True) if isinstance(v, Exception)]
    assert not bad, bad


def test_version_and_start_time_on_both_protocols_and_in_the_status(bl: Beamline):
    version, start = FLAT_VERSION.name(P), FLAT_START_TIME.name(P)
    want = pvcoord_version()
    assert bl.text(version) == want
    started = float(bl.text(start))
    assert time.time() - 600 < started <= time.time()
    nobody = bl.ca["nobody"]
    assert ok(nobody.get(version, as_string=True)) == want
    assert ok(nobody.get(start)) == pytest.approx(started)
    for name in (version, start):
        assert not ok(nobody.connect(name))["write"], name
    # pvcoord status reads the bridge like every other process
    rows = {r.name: r for r in read_status(P, ["registry", "coordination", "flat"],
                                           client_conf(bl.clients), timeout=TIMEOUT)}
    flat = rows["flat"]
    assert flat.up is True and flat.health == "OK" and flat.version == want, flat
    assert flat.uptime is not None and flat.uptime < 600 and flat.heartbeat_age < 3, flat


def test_walkthrough(bl: Beamline):
    results = walkthrough(P, bl.clients, bl.ca["nobody"], bl.pva["root"].rpc, motor=M4,
                          say=lambda s: None)
    assert results and all(passed for _, passed in results), results


def test_coordination_killed_no_write_access_then_back(bl: Beamline):
    # the bridge's stale window is 2 s (test_flat_lockview.py checks the rule in-process, where
    # nothing else waits); here the wait is generous and the figure printed: a timed assertion
    # would fail on a loaded machine for the test's own two agents, not for the bridge
    root, nobody = bl.ca["root"], bl.ca["nobody"]
    for a in (root, nobody):  # the bridge pushes rights after its view of the last release
        assert ok(a.connect(sp(M4)))
        assert ok(a.wait_write(sp(M4), True))["write"]
    t0 = time.monotonic()
    bl.procs["coordination"].kill9()
    for a in (root, nobody):
        w = ok(a.wait_write(sp(M4), False, timeout=15.0))
        assert not w["write"]
    print(f"write access gone for both {time.monotonic() - t0:.2f} s after kill -9 (stale 2 s)")
    bl.procs["coordination"].stop()
    bl.start_coordination()
    # a fresh client context: the old one's channels reconnect with a search back-off
    bl.ctxt.close()
    bl.ctxt = Context("pva", conf=client_conf(bl.clients), useenv=False)
    for a in (root, nobody):
        assert ok(a.wait_write(sp(M4), True, timeout=10))["write"]
