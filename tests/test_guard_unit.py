"""Guard logic without a network: decisions, staleness, registry map, audit lines, config.

The system tests (test_guard_system.py) run the same rules through the real gateway process.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bridges.guard.config import GuardConfigError, parse_config
from bridges.guard.core import GuardCore, parse_audit_line
from bridges.guard.decision import (
    DeviceMap,
    ErrorCode,
    HeldLock,
    LockFeed,
    LockState,
    Verdict,
    decide,
    parse_locks,
    split_owner,
)
from bridges.guard.gateway import service_prefixes
from pvcoord.demo.guard_part import AgentError, PutAgent
from pvcoord.procs import loopback_env, python_module, wait_until
from pvdb import catalog, demo
from pvdb.guard import GUARD_WHAT_IF
from pvdb.models import BEAMLINE, LockType
from pvdb.names import COORD_ACQUIRE, REGISTRY_LOOKUP
from pvdb.policy import parse_policy
from pvdb.queue import QUEUE_START
from tests.conftest import REPO, other_user_available

P = "TST:"
M1, M2 = demo.MOTORS[:2]
SP1 = demo.motor_setpoint(P, M1)
SP2 = demo.motor_setpoint(P, M2)
SHUTTER_CMD = demo.shutter_command(P)

DEFAULT = parse_policy('[access]\nemergency = ["root"]\n')
STRICT = parse_policy('[access]\nunlocked_writable = false\nemergency = ["role/ops"]\n')


def devmap(known: bool = True) -> DeviceMap:
    rows = [(pv, M1) for pv in demo.device_pvs(P, M1)] + [(pv, M2) for pv in demo.device_pvs(P, M2)]
    return DeviceMap(rows, [(M1, f"{P}{M1}:"), (M2, f"{P}{M2}:")], known=known)


def held(device: str, owner: str, lock_type: LockType = LockType.MANUAL_OPERATOR) -> HeldLock:
    account, host = split_owner(owner)
    return HeldLock(device, account, host, lock_type.value, time.time() + 60, "scan")


def state(*locks: HeldLock, known: bool = True) -> LockState:
    return LockState({lk.device: lk for lk in locks}, known, "" if known else "IOC gone")


def test_unlocked_device_follows_the_policy():
    d = decide(DEFAULT, state(), devmap(), SP1, "bob")
    assert d.allowed and d.verdict is Verdict.UNLOCKED and d.device == M1 and not d.locked
    d = decide(STRICT, state(), devmap(), SP1, "bob")
    assert not d.allowed and d.verdict is Verdict.STRICT and d.code is ErrorCode.NOT_ALLOWED


def test_locked_device_only_for_the_holders_account():
    s = state(held(M1, "alice@10.0.0.5"))
    d = decide(DEFAULT, s, devmap(), SP1, "alice")
    assert d.allowed and d.verdict is Verdict.HOLDER and d.locked
    d = decide(DEFAULT, s, devmap(), SP1, "bob")
    assert not d.allowed and d.verdict is Verdict.HELD_BY_OTHER
    assert (d.code, d.holder) == (ErrorCode.HOLDER_CONFLICT, "alice@10.0.0.5")
    assert d.error().startswith("[holder-conflict holder=alice@10.0.0.5] ") and "scan" in d.reason
    # the host does not count: alice from another host is still the holder
    assert decide(STRICT, s, devmap(), SP1, "alice").allowed
    # another device is unaffected
    assert decide(DEFAULT, s, devmap(), SP2, "bob").allowed


def test_beamline_lock_holds_every_device_but_not_unknown_pvs():
    s = state(held(BEAMLINE, "alice@h", LockType.MAINTENANCE))
    assert not decide(DEFAULT, s, devmap(), SP2, "bob").allowed
    assert decide(DEFAULT, s, devmap(), SP2, "alice").allowed
    assert decide(DEFAULT, s, devmap(), SHUTTER_CMD, "bob").verdict is Verdict.NOT_A_DEVICE
    # its own lock and a beamline lock by different holders: each holder is refused
    s2 = state(held(BEAMLINE, "alice@h"), held(M1, "carol@h"))
    assert not decide(DEFAULT, s2, devmap(), SP1, "alice").allowed
    assert not decide(DEFAULT, s2, devmap(), SP1, "carol").allowed


def test_unknown_state_fails_closed_except_emergency():
    s = state(known=False)
    d = decide(DEFAULT, s, devmap(), SP1, "bob")
    assert not d.allowed and d.verdict is Verdict.UNKNOWN_STATE and "IOC gone" in d.reason
    assert d.code is ErrorCode.STATE_UNKNOWN
    assert decide(DEFAULT, s, devmap(), SP1, "root").verdict is Verdict.EMERGENCY
    assert decide(STRICT, s, devmap(), SP1, "bob", roles=["ops"]).allowed
    # a PV of no device keeps the policy default (staff only, issue 11): not the locks
    assert decide(DEFAULT, s, devmap(), SHUTTER_CMD, "root").allowed
    assert not decide(DEFAULT, s, devmap(), SHUTTER_CMD, "bob").allowed
    assert not decide(STRICT, s, devmap(), SHUTTER_CMD, "root").allowed


def test_registry_not_received_fails_closed_even_for_unknown_pvs():
    d = decide(DEFAULT, state(), devmap(known=False), SHUTTER_CMD, "bob")
    assert not d.allowed and d.code is ErrorCode.STATE_UNKNOWN and "registry" in d.reason
    assert decide(DEFAULT, state(), devmap(known=False), SP1, "root").allowed


def test_device_map_exact_record_and_prefix():
    m = devmap()
    assert m.device_of(SP1) == M1
    assert m.device_of(SP1 + ".VAL") == M1  # a field of a registered record
    # every other spelling QSRV2 accepts for the same record (array slice, JSON channel filter,
    # long string) is the same device, also without a pvPrefix to fall back on
    only_pvs = DeviceMap([(SP1, M1)], [], known=True)
    for decorated in (".VAL", ".VAL[0]", "[0]", '.VAL{"ts":{}}', '{"ts":{}}', ".VAL$", "$",
                      ".DESC$", '.VAL{"arr":{"s":0}}[0]'):
        assert only_pvs.device_of(SP1 + decorated) == M1, decorated
        assert m.device_of(SP1 + decorated) == M1, decorated
    assert only_pvs.device_of(SP2) is None
    assert m.device_of(demo.MOTOR_SIM_MOVING.name(P, device=M2)) == M2  # by pvPrefix
    assert m.device_of(SHUTTER_CMD) is None
    # a prefix claimed by two devices is a registry error: the map is not known (fail closed)
    amb = DeviceMap([], [(M1, P), (M2, P)], known=True)
    assert amb.device_of(SP1) is None
    assert not amb.known and "prefix_claimed_twice" in amb.why_unknown


def test_parse_locks_columns():
    locks = parse_locks({
        "device": [M1, BEAMLINE], "lockType": ["MANUAL_OPERATOR", "MAINTENANCE"],
        "priority": [2, 0], "owner": ["a.b@c@10.1.1.1", "root@h"], "acquired": [1.0, 2.0],
        "expires": [10.0, 20.0], "reason": ["", "fix"], "planUid": ["", ""],
    })
    assert locks[M1].account == "a.b@c" and locks[M1].host == "10.1.1.1"
    assert locks[BEAMLINE].holder == "root@h" and locks[BEAMLINE].reason == "fix"
    with pytest.raises(ValueError, match="lacks column"):
        parse_locks({"device": [M1]})
    with pytest.raises(ValueError, match="different lengths"):
        parse_locks({"device": [M1], "lockType": [], "owner": [], "expires": []})


def test_lock_feed_staleness():
    f = LockFeed(stale_after=2.0)
    assert "not received" in f.why_unknown(0.0)
    f.locks_update({}, 1.0)
    assert "Heartbeat" in f.why_unknown(0.0)
    f.beat(1, now=10.0)
    assert f.state(11.9).known
    f.beat(1, now=11.0)  # same value again: not life
    assert not f.state(12.5).known and "not advanced" in f.state(12.5).why_unknown
    f.beat(2, now=12.6)
    assert f.state(12.7).known
    f.beat_lost()
    assert not f.state(12.7).known
    f.beat(0, now=13.0)  # a restarted IOC counts from 0 again: the first value is life
    assert f.state(13.1).known
    f.locks_lost()
    assert not f.state(13.1).known


class RecordingChannel:
    """Stands in for p4p's _gw.Channel: records access() calls (the real one is in system tests)."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.expired = False
        self.calls: list[dict] = []
        self.put = False
        self.audit = False

    def access(self, **kws) -> None:
        self.calls.append(kws)
        if kws.get("put") is not None:
            self.put = kws["put"]
        if kws.get("audit") is not None:
            self.audit = kws["audit"]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def live_core(policy=DEFAULT) -> tuple[GuardCore, Clock]:
    clock = Clock()
    core = GuardCore(policy, 2.0, monotonic=clock)
    core.set_devices(devmap())
    core.locks_update({}, time.time())
    core.beat(1)
    return core, clock


def test_core_applies_acf_and_lock_and_changes_open_channels_live():
    core, clock = live_core()
    chan = RecordingChannel(SP1)
    gc = core.track(chan, SP1, SP1, "bob", "10.0.0.2", "10.0.0.2:5000", [])
    gc.access(put=True, rpc=True, uncached=False, audit=False)  # what the ACF engine does
    assert chan.put and not chan.audit
    core.locks_update({M1: held(M1, "alice@h")}, time.time())
    assert not chan.put and chan.audit
    # auditing was switched on before put was switched off
    i_audit = next(i for i, c in enumerate(chan.calls) if c.get("audit") is True)
    i_off = max(i for i, c in enumerate(chan.calls) if c.get("put") is False)
    assert i_audit < i_off
    core.locks_update({}, time.time())
    assert chan.put and not chan.audit
    # ACF says no: the lock cannot grant
    gc.access(put=False, rpc=False, uncached=False, audit=False)
    assert not chan.put
    # heartbeat stops: stale after 2 s
    gc.access(put=True, rpc=True, uncached=False, audit=False)
    clock.t += 2.5
    assert core.refresh() and not chan.put
    core.beat(2)
    assert chan.put


def test_a_lock_change_re_decides_only_the_channels_of_its_devices():
    core, _ = live_core()
    c1, c2 = RecordingChannel(SP1), RecordingChannel(SP2)
    for chan, pv in ((c1, SP1), (c2, SP2)):
        gc = core.track(chan, pv, pv, "bob", "10.0.0.2", "10.0.0.2:5000", [])
        gc.access(put=True, rpc=True, uncached=False, audit=False)
    n2 = len(c2.calls)
    core.locks_update({M1: held(M1, "alice@h")}, time.time())
    assert not c1.put and c2.put and len(c2.calls) == n2  # m2's channel was not touched
    core.locks_update({M1: held(M1, "alice@h"), M2: held(M2, "bob@10.0.0.2")}, time.time())
    assert not c1.put and c2.put and c2.audit  # bob holds m2: allowed, audited
    # a beamline lock applies to every device: every channel is re-decided
    core.locks_update({"beamline": held("beamline", "carol@h", LockType.MAINTENANCE)},
                      time.time())
    assert not c1.put and not c2.put
    core.locks_update({}, time.time())
    assert c1.put and c2.put
    # a new registry map: the channel's device is looked up again
    core.set_devices(DeviceMap([(SP2, M1)], [], known=True))
    core.locks_update({M1: held(M1, "alice@h")}, time.time())
    assert not c2.put


def test_core_classifies_audit_lines_by_the_permission_at_put_time():
    core, _ = live_core()
    chan = RecordingChannel(SP1)
    gc = core.track(chan, SP1, SP1, "bob", "10.0.0.2", "10.0.0.2:5000", [])
    gc.access(put=True, rpc=True, uncached=False, audit=False)
    before = time.time()
    core.locks_update({M1: held(M1, "alice@h")}, time.time())

    def line(t: float, account: str = "bob") -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e9):09d}"
        return f"{stamp} ca/{account}@10.0.0.2:5000 {SP1} as {SP1} -> double = 1.5\n"

    rec, trap = core.classify(parse_audit_line(line(time.time() + 0.001)))
    assert rec is not None and rec.action == "refused" and rec.holder == "alice@h"
    assert rec.device == M1 and rec.value == "1.5" and rec.host == "10.0.0.2" and not trap
    # a put from before the lock was allowed on an unlocked device: nothing to report
    rec, _ = core.classify(parse_audit_line(line(before - 0.5)))
    assert rec is None


def test_parse_audit_line_formats():
    a = parse_audit_line(f"2026-01-02 03:04:05.123456789 ca/bob@127.0.0.1:4000 {SP1} as {SP1}"
                         " -> double = 2\n")
    assert a is not None and a.account == "bob" and a.peer == "127.0.0.1:4000"
    assert a.value == "2" and abs(a.time % 1 - 0.123456789) < 1e-5
    assert parse_audit_line("2026-01-02 03:04:05.1 ... put audit log overflow") is None
    # names with spaces (JSON channel filters) still give a record
    name = SP1 + '.VAL{"ts": {}, "dbnd": {"d": 1}}'
    a = parse_audit_line(f"2026-01-02 03:04:05.5 ca/bob@127.0.0.1:4000 {name} as {name}"
                         " -> double = 7\n")
    assert a is not None and a.dsname == name and a.usname == name and a.value == "7"
    a = parse_audit_line(f"2026-01-02 03:04:05 ca/bob@127.0.0.1:4000 {name} as {SP1}\n")
    assert a is not None and a.dsname == name and a.usname == SP1 and a.value == ""


def test_service_prefixes_are_never_proxied():
    banned = service_prefixes(P)
    assert COORD_ACQUIRE.name(P).startswith(banned)
    assert REGISTRY_LOOKUP.name(P).startswith(banned)
    assert GUARD_WHAT_IF.name(P).startswith(banned)
    assert QUEUE_START.name(P).startswith(banned)
    assert not SP1.startswith(banned)


SERVICE_FAMILIES = sorted({(s.server, catalog.family(s)) for s in catalog.service_specs()})


@pytest.mark.parametrize(("server", "family"), SERVICE_FAMILIES,
                         ids=[f"{s}-{f}" for s, f in SERVICE_FAMILIES])
def test_every_service_family_is_never_proxied(server, family):
    banned = service_prefixes(P, "R:")
    specs = [s for s in catalog.service_specs()
             if s.server == server and catalog.family(s) == family]
    assert specs
    for s in specs:
        for prefix in (P, "R:"):
            name = s.name(prefix, device="m1") if s.per_device else s.name(prefix)
            assert name.startswith(banned), name


def test_the_four_service_families_are_in_the_catalogue():
    assert {f for _, f in SERVICE_FAMILIES} >= {"Coord:", "Registry:", "Queue:", "Guard:"}


def minimal_config(**guard) -> dict:
    return {
        "version": 2,
        "clients": [{"name": "dev", "addrlist": "127.0.0.1", "autoaddrlist": False}],
        "servers": [{"name": "cli", "clients": ["dev"], "interface": "127.0.0.1"}],
        "guard": guard,
    }


def test_config_accepts_pvagw_files_with_comments(tmp_path):
    text = "/* site gateway */\n" + json.dumps(minimal_config(policy="p.toml", stale_after=1.5))
    conf = parse_config(text, "gw.json", tmp_path)
    assert conf.servers[0].interface == ["127.0.0.1"]
    assert conf.guard.policy == str(tmp_path / "p.toml") and conf.guard.stale_after == 1.5
    assert conf.clients[0].p4p_conf()["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["guard"].update(bogus=1), "guard.bogus: unknown setting"),
        (lambda c: c["servers"][0].update(clients=["nope"]), "unknown client 'nope'"),
        (lambda c: c["guard"].update(stale_after=-1), "stale_after"),
        (lambda c: c["clients"][0].update(colour="red"), "unknown setting 'colour'"),
        (lambda c: c.pop("servers"), "servers"),
    ],
)
def test_config_rejects_bad_files_naming_the_problem(mutate, message):
    c = minimal_config()
    mutate(c)
    with pytest.raises(GuardConfigError, match=message):
        parse_config(json.dumps(c), "gw.json")


def test_config_says_when_lock_state_is_searched_for_on_open_networks():
    """PVA does not authenticate servers: the guard warns (at start) unless the coordination
    and registry IOCs are searched for only at the addresses the config names."""
    assert "not set" in parse_config(json.dumps(minimal_config())).coordination_exposure()
    c = minimal_config(coordination={"addrlist": "10.2.0.5", "autoaddrlist": True})
    assert "autoaddrlist" in parse_config(json.dumps(c)).coordination_exposure()
    c = minimal_config(coordination={"addrlist": "10.2.0.5 10.2.0.6", "autoaddrlist": False})
    conf = parse_config(json.dumps(c))
    assert conf.coordination_exposure() == ""
    assert conf.guard.coordination.p4p_conf()["EPICS_PVA_ADDR_LIST"] == "10.2.0.5 10.2.0.6"


def test_config_syntax_error_has_a_line():
    with pytest.raises(GuardConfigError, match=r"gw.json:2: JSON syntax error"):
        parse_config('{\n "version": 2,,\n}', "gw.json")


def _processes_with(marker: bytes) -> list[int]:
    """PIDs of live processes whose environment contains ``marker``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.mark.system
@pytest.mark.identity
@pytest.mark.skipif(other_user_available() is not None, reason=str(other_user_available()))
def test_put_agent_whose_first_reply_fails_is_stopped_with_its_runuser_child(monkeypatch):
    marker = f"PVCOORD_AGENT_TEST=guard-{os.getpid()}-{time.monotonic_ns()}"

    def first_reply_fails(self, timeout):
        # the agent (under runuser) is running, but its hello does not come
        wait_until(lambda: len(_processes_with(marker.encode())) >= 2, 10.0, "agent running")
        raise AgentError("simulated: no hello")

    monkeypatch.setattr(PutAgent, "_reply", first_reply_fails)
    key, value = marker.split("=")
    with pytest.raises(AgentError, match="no hello"):
        PutAgent({**loopback_env(), key: value}, user="nobody")
    wait_until(lambda: not _processes_with(marker.encode()), 10.0, "runuser and agent stopped")


@pytest.mark.system
def test_guard_cli_help_and_bad_config(tmp_path: Path):
    env = {**os.environ}
    r = subprocess.run(python_module("bridges.guard", "--help"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Guard:WhatIf" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2, "clients": [], "servers": [], "guard": {"polcy": "x"}}')
    r = subprocess.run(python_module("bridges.guard", "--prefix", P, "--config", str(bad)),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "polcy" in r.stderr, r.stderr
