"""The guard gateway as a real process, in front of a real softIoc, with the real coordination and
registry IOCs, and clients under two OS accounts (root and nobody).

Layout (two loopback networks, as a facility separates them):

    clients (root, nobody) --env "clients"--> guard --env "devices"--> softIoc
                           \\-> coordination IOC, registry IOC (env "clients")

The default guard has a site pvlist with an ALIAS for m1's setpoint. A second guard (strict
policy, a site ACF that grants WRITE only to root) serves its own client network "clients2" in
front of the same softIoc. The shutter is served by the softIoc but left out of the registry: it
is "a PV the registry does not know". ``m3`` is registered by explicit PV names only (no
``pvPrefix``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from p4p import Value
from p4p.client.thread import Context, RemoteError
from p4p.nt import NTURI

from pvcoord.demo import devices
from pvcoord.demo.guard_part import PutAgent, start_guard, walkthrough
from pvcoord.launch import coordination_argv
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
from pvcoord.rpc import current_locks
from pvdb import demo
from pvdb.guard import GUARD_AUDIT, GUARD_HEALTH, GUARD_REFUSED, GUARD_WHAT_IF
from pvdb.lockmodel import ErrorCode
from pvdb.models import BEAMLINE
from pvdb.names import (
    COORD_ACQUIRE,
    COORD_FORCE_RELEASE,
    COORD_LOCKS,
    COORD_RELEASE,
    REGISTRY_DEVICE_PVS,
)
from pvdb.registry_file import save_registry
from tests.codes import raises_code
from tests.conftest import REPO, TIMEOUT, other_user_available

pytestmark = [
    pytest.mark.system,
    pytest.mark.identity,
    pytest.mark.skipif(other_user_available() is not None, reason=str(other_user_available())),
]

P = "TST:"
M1, M2, M3, M4 = demo.MOTORS
SHUTTER = demo.SHUTTERS[0]
DENIED = "Put permission denied by gateway"

POLICY = """
[access]
unlocked_writable = true
trusted_services = ["root"]
force_release = ["root"]
emergency = ["root"]
delegates = ["root@127.0.0.1"]     # root's puts count for the users it may act for
on_behalf_of = { root = ["alice"] }

[lock_types.MAINTENANCE]
allow = ["root"]

[lock_types.MANUAL_OPERATOR]
allow = ["*"]
"""
STRICT_POLICY = POLICY.replace("unlocked_writable = true", "unlocked_writable = false")
ALIAS = f"{P}site:{M1}"
"""A site's own name for m1's setpoint (a pvlist ALIAS of the default guard)."""
SITE_PVLIST = f"""
.* ALLOW
{ALIAS} ALIAS {demo.motor_setpoint(P, M1)}
"""
SITE_ACF = """
UAG(ops) { root }
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE) { UAG(ops) }
}
"""


def sp(motor: str) -> str:
    return demo.motor_setpoint(P, motor)


@dataclass
class Beamline:
    tmp: Path
    clients: dict[str, str]
    clients2: dict[str, str]
    devices_env: dict[str, str]
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    agents: dict[str, PutAgent] = field(default_factory=dict)
    ctxt: Context | None = None

    def start_coordination(self) -> None:
        proc = ManagedProcess(
            "coordination",
            coordination_argv(P, f"sqlite:///{self.tmp}/locks.sqlite", self.tmp / "p.toml",
                              registry_prefix=P),
            server_env(self.clients), cwd=REPO, log_dir=self.tmp,
        )
        self.procs["coordination"] = proc
        wait_for_pv(COORD_LOCKS.name(P), self.clients, procs=[proc])

    def outputs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.output()[-3000:]}" for n, p in self.procs.items())

    # client helpers (root, in-process)

    def rpc(self, spec, **args: str):
        name = spec.name(P)
        uri = NTURI([(k, "s") for k in args]).wrap(name, kws=args)
        return self.ctxt.rpc(name, uri, timeout=TIMEOUT)

    def what_if(self, pv: str, account: str, strict: bool = False) -> dict:
        ctxt = self.agents["root2"] if strict else None
        if ctxt is not None:
            r = ctxt.rpc(GUARD_WHAT_IF.name(P), pv=pv, account=account)
            assert r["ok"], r
            return r["value"]
        v = self.rpc(GUARD_WHAT_IF, pv=pv, account=account)
        return {k: v[k] for k in v.keys()}

    def settle(self, pv: str, account: str, allowed: bool, strict: bool = False) -> dict:
        """Wait until the guard's decision for ``account`` on ``pv`` is ``allowed``."""
        return wait_until(
            lambda: (w := self.what_if(pv, account, strict))["allowed"] == allowed and w,
            10.0, f"guard decision for {account} on {pv} == {allowed}",
        )


def scalar(v):
    """An NTScalar's value: p4p may hand a raw Value after an NTTable on the same context."""
    return v.value if isinstance(v, Value) else v


def put_ok(agent: PutAgent, pv: str, value: float) -> bool:
    r = agent.put(pv, value)
    assert r["ok"] or DENIED in r["error"], r
    return r["ok"]


@pytest.fixture(scope="module")
def bl(tmp_path_factory) -> Iterator[Beamline]:
    tmp = tmp_path_factory.mktemp("guard")
    b = Beamline(tmp, loopback_env(), loopback_env(), loopback_env())
    (tmp / "p.toml").write_text(POLICY)
    (tmp / "strict.toml").write_text(STRICT_POLICY)
    (tmp / "site.acf").write_text(SITE_ACF)
    devices.write_database(P, tmp / "demo.db")
    # m3 is registered by its explicit PVs only (no pvPrefix), as a site listing records would
    save_registry([d.model_copy(update={"pv_prefix": ""}) if d.name == M3 else d
                   for d in devices.registry_devices(P) if d.name != SHUTTER],
                  tmp / "registry.yaml")
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
        wait_for_pv(REGISTRY_DEVICE_PVS.name(P), b.clients, procs=[b.procs["registry"]])
        b.start_coordination()
        (tmp / "site.pvlist").write_text(SITE_PVLIST)
        b.procs["guard"] = start_guard(P, b.clients, b.devices_env, tmp / "p.toml", tmp / "g1",
                                       pvlist=tmp / "site.pvlist")
        b.procs["strict"] = start_guard(
            P, b.clients2, b.devices_env, tmp / "strict.toml", tmp / "g2",
            access=tmp / "site.acf", coordination_env=b.clients,
        )
        for env in (b.clients, b.clients2):
            wait_for_pv(GUARD_HEALTH.name(P), env, procs=list(b.procs.values()),
                        condition=lambda v: v == "OK")
        b.agents["root"] = PutAgent(b.clients)
        b.agents["nobody"] = PutAgent(b.clients, user="nobody")
        b.agents["root2"] = PutAgent(b.clients2)
        b.agents["nobody2"] = PutAgent(b.clients2, user="nobody")
        b.ctxt = Context("pva", conf=client_conf(b.clients), useenv=False)
        yield b
    except BaseException:
        print(b.outputs())
        raise
    finally:
        if b.ctxt is not None:
            b.ctxt.close()
        for a in b.agents.values():
            a.close()
        for p in reversed(list(b.procs.values())):
            p.stop()


@pytest.fixture(autouse=True)
def no_locks_left(bl: Beamline) -> Iterator[None]:
    """Every test ends with no locks (force-released by root, who may)."""
    yield
    v = current_locks(bl.ctxt, P, TIMEOUT)
    for device in list(v.value.device):
        bl.rpc(COORD_FORCE_RELEASE, device=device, reason="test cleanup")


def test_holder_writes_others_are_refused_and_reads_always_work(bl: Beamline):
    root, nobody = bl.agents["root"], bl.agents["nobody"]
    refused_before = scalar(bl.ctxt.get(GUARD_REFUSED.name(P), timeout=TIMEOUT))
    bl.rpc(COORD_ACQUIRE, device=M1, type="MANUAL_OPERATOR", timeout="60", reason="alignment")
    answer = bl.settle(sp(M1), "nobody", allowed=False)
    assert answer["holder"].startswith("root@") and answer["device"] == M1
    assert "alignment" in answer["reason"] and "root" in answer["reason"]

    r = nobody.put(sp(M1), 3.0)
    assert not r["ok"] and DENIED in r["error"]
    assert put_ok(root, sp(M1), 4.0)
    got = nobody.get(sp(M1))  # reads always pass
    assert got["ok"] and got["value"] == 4.0

    def audited():
        rows = bl.ctxt.get(GUARD_AUDIT.name(P), timeout=TIMEOUT).value
        return [
            (rows.action[i], rows.account[i], rows.device[i], rows.holder[i])
            for i in range(len(rows.action)) if rows.pv[i] == sp(M1)
        ]

    rows = wait_until(lambda: len(audited()) >= 2 and audited(), 5.0, "audit rows")
    assert ("refused", "nobody", M1, answer["holder"]) in rows
    assert ("allowed", "root", M1, answer["holder"]) in rows
    assert scalar(bl.ctxt.get(GUARD_REFUSED.name(P), timeout=TIMEOUT)) >= refused_before + 1


def test_pvlist_alias_is_decided_on_the_ioc_name_and_audited_with_the_clients(bl: Beamline):
    root, nobody = bl.agents["root"], bl.agents["nobody"]
    bl.rpc(COORD_ACQUIRE, device=M1, type="MANUAL_OPERATOR", timeout="60", reason="alias")
    answer = bl.settle(ALIAS, "nobody", allowed=False)
    assert answer["device"] == M1 and answer["holder"].startswith("root@")
    assert sp(M1) in answer["reason"]
    r = nobody.put(ALIAS, 9.0)
    assert not r["ok"] and DENIED in r["error"], r
    assert put_ok(root, ALIAS, 8.0)
    assert scalar(bl.ctxt.get(sp(M1), timeout=TIMEOUT)) == 8.0

    def audited():
        rows = bl.ctxt.get(GUARD_AUDIT.name(P), timeout=TIMEOUT).value
        return [(rows.action[i], rows.account[i], rows.device[i], rows.message[i])
                for i in range(len(rows.action)) if rows.pv[i] == ALIAS]

    rows = wait_until(lambda: len(audited()) >= 2 and audited(), 5.0, "audit rows of the alias")
    assert {(a, acc, dev) for a, acc, dev, _m in rows} >= {("refused", "nobody", M1),
                                                           ("allowed", "root", M1)}
    # classified with the channel's own history, not "decided with the current state"
    assert not any("closed" in m for *_r, m in rows), rows


def test_walkthrough_other_account_writes_again_on_the_same_channel_after_release(bl: Beamline):
    lines: list[str] = []
    results = walkthrough(P, bl.clients, bl.agents["root"], bl.agents["nobody"], M1, lines.append)
    assert all(ok for _step, ok in results), "\n".join(lines)
    assert len(results) == 5


def test_a_policy_named_delegate_writes_for_the_users_it_may_act_for(bl: Beamline):
    """As the web bridge behind the guard: root took m2 on behalf of alice (onBehalfOf)."""
    root, nobody = bl.agents["root"], bl.agents["nobody"]
    v = bl.rpc(COORD_ACQUIRE, device=M2, type="MANUAL_OPERATOR", timeout="60",
               onBehalfOf="alice")
    assert list(v.devices) == [M2]
    w = bl.settle(sp(M2), "nobody", allowed=False)
    assert w["holder"].startswith("alice@")
    assert not put_ok(nobody, sp(M2), 1.25)
    assert bl.settle(sp(M2), "root", allowed=True)["holder"].startswith("alice@")
    assert put_ok(root, sp(M2), 1.5)  # the delegate: alice is a user root may act for
    bl.rpc(COORD_RELEASE, device=M2, onBehalfOf="alice")
    # a holder root may not act for (on_behalf_of names only alice) stays closed to it
    r = nobody.rpc(COORD_ACQUIRE.name(P), device=M2, type="MANUAL_OPERATOR", timeout="60")
    assert r["ok"], r
    assert bl.settle(sp(M2), "root", allowed=False)["holder"].startswith("nobody@")
    assert not put_ok(root, sp(M2), 1.75)


def test_unlocked_device_is_writable_by_all_by_default(bl: Beamline):
    bl.settle(sp(M2), "nobody", allowed=True)
    assert put_ok(bl.agents["nobody"], sp(M2), 1.0)
    assert put_ok(bl.agents["root"], sp(M2), 0.0)


def test_preemption_moves_the_right_to_write(bl: Beamline):
    root, nobody = bl.agents["root"], bl.agents["nobody"]
    r = nobody.rpc(COORD_ACQUIRE.name(P), device=M2, type="MANUAL_OPERATOR", timeout="60")
    assert r["ok"], r
    bl.settle(sp(M2), "root", allowed=False)
    assert put_ok(nobody, sp(M2), 1.5)
    assert not put_ok(root, sp(M2), 2.5)
    v = bl.rpc(COORD_ACQUIRE, device=M2, type="MAINTENANCE", timeout="60", reason="repair")
    assert [p.split()[0] for p in v.preempted] == [M2]
    bl.settle(sp(M2), "nobody", allowed=False)
    assert put_ok(root, sp(M2), 2.5)
    assert not put_ok(nobody, sp(M2), 3.5)


def test_decorated_names_of_a_locked_record_are_refused(bl: Beamline):
    """QSRV2 accepts ``rec.VAL[0]``, ``rec.VAL{...}`` (JSON filters) and ``rec$`` for a record;
    they must map to its device even when the registry lists only exact PV names (no
    ``pvPrefix`` to fall back on), or a non-holder writes the locked device (fail open)."""
    nobody = bl.agents["nobody"]
    bl.rpc(COORD_ACQUIRE, device=M3, type="MANUAL_OPERATOR", timeout="60", reason="decorated")
    bl.settle(sp(M3), "nobody", allowed=False)
    before = scalar(bl.ctxt.get(sp(M3), timeout=TIMEOUT))
    for name in (sp(M3) + ".VAL[0]", sp(M3) + '.VAL{"ts":{}}'):
        r = nobody.put(name, before + 7.0)
        assert not r["ok"] and DENIED in r["error"], (name, r)
        assert not bl.what_if(name, "nobody")["allowed"], name
    assert scalar(bl.ctxt.get(sp(M3), timeout=TIMEOUT)) == before


def test_expiry_returns_the_right_to_write(bl: Beamline):
    nobody = bl.agents["nobody"]
    bl.rpc(COORD_ACQUIRE, device=M3, type="MANUAL_OPERATOR", timeout="4")
    bl.settle(sp(M3), "nobody", allowed=False)
    # the coordination IOC drops the lease within 1 s of expiry; the guard follows
    wait_until(lambda: put_ok(nobody, sp(M3), 1.0), 15.0, "nobody may write after expiry")


def test_beamline_lock_holds_every_device_but_not_unregistered_pvs(bl: Beamline):
    nobody = bl.agents["nobody"]
    bl.rpc(COORD_ACQUIRE, device=BEAMLINE, type="MANUAL_OPERATOR", timeout="60")
    bl.settle(sp(M4), "nobody", allowed=False)
    assert not put_ok(nobody, sp(M4), 1.0)
    assert put_ok(bl.agents["root"], sp(M4), 1.0)
    # the shutter is not in the registry: policy default (issue 11: staff only, fields
    # .unregistered), locks or not; root is staff
    assert not put_ok(nobody, demo.shutter_command(P), 1)
    assert put_ok(bl.agents["root"], demo.shutter_command(P), 1)
    answer = bl.what_if(demo.shutter_command(P), "nobody")
    assert not answer["allowed"] and answer["device"] == ""
    assert "no registered device" in answer["reason"] and "only staff" in answer["reason"]


def test_strict_policy_and_the_site_acf_apply_on_top(bl: Beamline):
    root2, nobody2 = bl.agents["root2"], bl.agents["nobody2"]
    # the strict guard's first channels to the device network (see the m3 note below)
    for agent, pv in ((root2, sp(M4)), (nobody2, sp(M4)), (root2, demo.shutter_command(P))):
        wait_until(lambda a=agent, n=pv: a.get(n)["ok"], 30.0, f"{pv} through the strict guard")
    # strict: an unlocked device is writable by nobody, not even root
    bl.settle(sp(M4), "root", allowed=False, strict=True)
    assert not put_ok(root2, sp(M4), 1.0)
    assert not put_ok(root2, demo.shutter_command(P), 1)  # unregistered PV: strict default
    # root holds m4: root may write through the strict guard
    bl.rpc(COORD_ACQUIRE, device=M4, type="MANUAL_OPERATOR", timeout="60")
    bl.settle(sp(M4), "root", allowed=True, strict=True)
    assert put_ok(root2, sp(M4), 2.0)
    assert not put_ok(nobody2, sp(M4), 2.0)
    # nobody holds m3, but the site ACF grants WRITE to root only: the ACF still applies
    # (locks are taken on the coordination IOC's network, "clients")
    r = bl.agents["nobody"].rpc(COORD_ACQUIRE.name(P), device=M3, type="MANUAL_OPERATOR",
                                timeout="60")
    assert r["ok"], r
    answer = wait_until(
        lambda: (w := bl.what_if(sp(M3), "nobody", strict=True))["holder"].startswith("nobody@")
        and w, 10.0, "strict guard sees nobody's lock on m3",
    )
    assert not answer["allowed"] and "ACF" in answer["reason"]
    # the strict guard has not proxied m3 before: its first connection to the device network (a
    # gateway answers a client's search once its upstream channel connects; the client searches
    # again after its back-off) can take longer than one put's timeout on a loaded machine
    wait_until(lambda: nobody2.get(sp(M3))["ok"], 30.0, "nobody2 connected to m3")
    assert not put_ok(nobody2, sp(M3), 2.0)
    assert not bl.what_if(sp(M3), "root", strict=True)["allowed"]
    r = bl.agents["nobody"].rpc(COORD_RELEASE.name(P), device=M3)
    assert r["ok"], r
    wait_until(lambda: not bl.what_if(sp(M3), "nobody", strict=True)["holder"], 10.0,
               "strict guard sees the release")


PLAN = r"""
import sys
import bluesky.plan_stubs as bps
from bluesky import RunEngine
from ophyd_async.core import AsyncStatus, StandardReadable, init_devices
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

setpoint, readback, target = sys.argv[1], sys.argv[2], float(sys.argv[3])


class SimMotor(StandardReadable):
    def __init__(self, name=""):
        with self.add_children_as_readables():
            self.readback = epics_signal_r(float, "pva://" + readback)
        self.setpoint = epics_signal_rw(float, "pva://" + setpoint)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value):
        await self.setpoint.set(value)


RE = RunEngine({})
with init_devices():
    motor = SimMotor()
try:
    RE(bps.mv(motor, target))
except Exception as e:
    while e is not None:
        print("ERROR", type(e).__name__, e)
        e = e.__cause__ or e.__context__
    sys.exit(3)
print("MOVED")
"""


def test_bluesky_plan_through_the_guard_without_the_lock_fails_with_the_refusal(bl: Beamline):
    bl.rpc(COORD_ACQUIRE, device=M1, type="MANUAL_OPERATOR", timeout="60")
    bl.settle(sp(M1), "nobody", allowed=False)
    before = scalar(bl.ctxt.get(sp(M1), timeout=TIMEOUT))
    env = {**bl.clients, "HOME": "/tmp"}
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", PYTHON, "-c", PLAN, sp(M1),
         demo.motor_readback(P, M1), str(before + 5.0)],
        env=env, cwd="/", capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert DENIED in r.stdout, r.stdout + r.stderr
    assert scalar(bl.ctxt.get(sp(M1), timeout=TIMEOUT)) == before


def test_what_if_rejects_bad_requests(bl: Beamline):
    for kws in ({"account": "nobody"}, {"pv": sp(M1), "colour": "red"},
                {"pv": sp(M1), "host": "no-such-host.invalid"}):
        with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT):
            bl.rpc(GUARD_WHAT_IF, **kws)


def test_coordination_down_refuses_writes_within_2_s_and_they_return(bl: Beamline):
    """Last in the module: it kills and restarts the shared coordination IOC."""
    root, nobody = bl.agents["root"], bl.agents["nobody"]
    assert put_ok(nobody, sp(M2), 1.0)
    bl.procs["coordination"].kill9()
    wait_until(lambda: not put_ok(nobody, sp(M2), 2.0), 2.0, "nobody refused after the kill")
    bl.procs["coordination"].stop()  # reaped already; closes its log
    assert nobody.get(sp(M2))["ok"]  # reads still pass
    assert put_ok(root, sp(M2), 2.0)  # root is an emergency account in the policy
    assert put_ok(root, demo.shutter_command(P), 0)  # not a device: policy default (staff)
    assert not put_ok(nobody, demo.shutter_command(P), 0)
    health = scalar(bl.ctxt.get(GUARD_HEALTH.name(P), timeout=TIMEOUT))
    assert "lock state unknown" in health
    bl.start_coordination()
    # this test's own client context may take longer than the guard to find the new IOC (p4p's
    # search back-off); the cleanup after the test uses a new one, as a new command would
    assert bl.ctxt is not None
    bl.ctxt.close()
    bl.ctxt = Context("pva", conf=client_conf(bl.clients), useenv=False)
    # the guard's lock view searches again every 1 s and renews its client context after 3 s
    wait_until(lambda: put_ok(nobody, sp(M2), 3.0), 8.0, "nobody may write again")
    # and it follows the restarted IOC's locks (an emergency account's put would pass even while
    # the lock state is unknown, so the holder's lock must be what refuses nobody now)
    with PutAgent(bl.clients) as fresh:  # a new client, as a new command would be
        r = fresh.rpc(COORD_ACQUIRE.name(P), device=M2, type="MANUAL_OPERATOR", timeout="60")
        assert r["ok"], r
        wait_until(lambda: not put_ok(nobody, sp(M2), 3.5), 2.0, "nobody refused by the lock")
        assert bl.what_if(sp(M2), "nobody")["holder"].startswith("root@")
        assert put_ok(root, sp(M2), 4.0)
        r = fresh.rpc(COORD_RELEASE.name(P), device=M2)
        assert r["ok"], r
        wait_until(lambda: put_ok(nobody, sp(M2), 4.5), 2.0, "nobody may write after the release")

