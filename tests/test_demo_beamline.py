"""``pvcoord demo``: real beamline processes, the printed settings, the walkthrough, clean stop."""

from __future__ import annotations

import io
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from p4p.client.thread import Context

from pvcoord.demo import beamline
from pvcoord.procs import PYTHON
from pvdb import demo as demo_pvs
from pvdb.models import LockType
from pvdb.names import COORD_LOCKS, REGISTRY_DEVICES
from pvdb.policy import load_policy

DEMO_TIMEOUT = 150.0
"""Seconds the whole walkthrough may take (it needs ~10 s on an idle 2-core machine)."""


def run_demo(argv: list[str], cwd: Path | str) -> subprocess.CompletedProcess[str]:
    """Run a demo to its end; past :data:`DEMO_TIMEOUT` stop it with SIGTERM (the demo stops its
    IOCs, redis and RE Manager on it; a SIGKILL would leave them running for the rest of the
    suite), SIGKILL only if it has not ended 30 s later, then fail with its output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=cwd)
    try:
        out, err = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the demo did not end in {DEMO_TIMEOUT:g} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


PORTS_LOW, PORTS_HIGH = 20000, 32000
"""Demo port blocks for tests come from below Linux's ephemeral range (32768-60999), where
``free_port()`` of other tests and every outgoing connection take their ports."""


def free_block() -> int:
    """A ``--ports-from`` whose whole block is free on 127.0.0.1 right now."""
    for _ in range(100):
        base = random.randrange(PORTS_LOW, PORTS_HIGH, 20)
        ctx = beamline.DemoContext("T:", Path("/nonexistent"), base, {}, io.StringIO())
        try:
            beamline.check_ports(ctx)
        except beamline.DemoError:
            continue
        return base
    raise RuntimeError("no free block of demo ports")


def demo_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "pvcoord.cli", "demo", *args]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPICS_", "PVCOORD_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of someone else's is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_policy_is_valid_and_adds_the_demo_account(tmp_path):
    p = beamline.write_policy(tmp_path / "root.toml", account="root")
    assert p.read_text() == beamline.POLICY_FILE.read_text()
    pol = load_policy(p)
    assert pol.is_trusted_service("root", [])
    assert all(pol.may_take(t, "root", []) for t in LockType)
    assert pol.may_take(LockType.MANUAL_OPERATOR, "nobody", [])
    assert not pol.may_take(LockType.MAINTENANCE, "nobody", [])
    # the web bridge's account: a delegate from this host, for the demo's web users only
    web = beamline.WEB_ACCOUNT
    assert pol.may_delegate_write(web, [], "127.0.0.1", "alice") == ""
    assert pol.may_delegate_write(web, [], "127.0.0.1", "bob") == ""
    assert pol.may_delegate_write(web, [], "127.0.0.1", "root")
    assert pol.may_delegate_write(web, [], "127.0.0.1", beamline.QUEUE_LOCK_OWNER)
    assert pol.may_delegate_write(web, [], "127.0.0.1", "nobody")
    assert pol.may_delegate_write(web, [], "10.0.0.9", "alice")
    assert pol.may_delegate_write("root", [], "127.0.0.1", "nobody")  # root is no delegate
    pol = load_policy(beamline.write_policy(tmp_path / "alice.toml", account="alice"))
    assert pol.is_trusted_service("alice", []) and pol.may_force_release("alice", [])
    assert not pol.is_trusted_service("mallory", [])
    assert pol.may_delegate_write(web, [], "127.0.0.1", "bob") == ""


def test_busy_port_is_a_clear_error(tmp_path):
    base = free_block()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", base))
        with pytest.raises(beamline.DemoError, match=rf"{base} \(pva-broadcast\).*--ports-from"):
            beamline.start_beamline(ports_from=base, run_dir=tmp_path, out=io.StringIO())


@pytest.mark.system
@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_walkthrough_passes(shared_run_dir):
    base = free_block()
    p = run_demo(
        demo_argv("--walkthrough", "--ports-from", str(base), "--run-dir", str(shared_run_dir)),
        shared_run_dir)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    m = re.search(r"^walkthrough: (\d+)/(\d+) steps behaved as expected$", out, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 6, out
    assert out.count("ok: as expected") == int(m.group(1)) and "UNEXPECTED" not in out
    assert re.search(r"refused by DEMO:Coord:Acquire: m1 is held by root@127\.0\.0\.1", out)
    assert re.search(r"preempted: m2 \(MANUAL_OPERATOR of (nobody|bob)@", out)
    assert "was preempted by root@127.0.0.1 (MAINTENANCE" in out
    assert re.search(r"expired m3 MANUAL_OPERATOR", out)
    assert "coordination IOC restarted as pid" in out
    assert f"export EPICS_PVA_BROADCAST_PORT={base}" in out
    assert out.rstrip().endswith("stopped")
    if os.geteuid() == 0:  # the RE worker is a guard client like any other (decision 0022)
        assert "note: queue part runs as" not in out
        guard_log = (shared_run_dir / "guard.log").read_text()
        assert re.search(r"allowed put DEMO:m1:Setpoint = \S+ by pvcoord-queue@", guard_log)
        # the web bridge writes through the guard as the web user's delegate (decision 0140)
        assert re.search(r"allowed put DEMO:m1:Setpoint = 2\.5 by pvcoord-web@127\.0\.0\.1 "
                         r"device=m1 holder=alice@\S+: .*delegate of alice", guard_log), guard_log


@pytest.mark.system
@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_demo_serves_with_the_printed_settings_and_stops_on_sigterm(shared_run_dir):
    base = free_block()
    proc = subprocess.Popen(
        demo_argv("--ports-from", str(base), "--run-dir", str(shared_run_dir)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(),
        cwd=shared_run_dir, bufsize=0,
    )
    assert proc.stdout is not None
    # raw reads of the pipe: a buffered reader may hold the banner's last lines where select()
    # cannot see them
    got = b""
    lines: list[str] = []
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT
        while not any(ln.startswith("Ctrl-C (or SIGTERM) stops") for ln in lines):
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, "demo did not come up:\n" + "".join(lines)
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if ready:
                got += os.read(proc.stdout.fileno(), 65536)
                lines = got.decode(errors="replace").splitlines(keepends=True)
        text = "".join(lines)
        pids = [int(m) for m in re.findall(r"^\s+\S+\s+pid (\d+)\s", text, re.M)]
        assert len(pids) >= 3, text
        # a client configured with nothing but the printed export lines
        conf = dict(re.findall(r"^\s+export (EPICS_PVA_\w+)=(\S+)$", text, re.M))
        assert conf["EPICS_PVA_BROADCAST_PORT"] == str(base)
        with Context("pva", conf=conf, useenv=False) as ctxt:
            locks = ctxt.get(COORD_LOCKS.name(demo_pvs.DEMO_PREFIX), timeout=10)
            assert list(locks.value.device) == []
            reg = ctxt.get(REGISTRY_DEVICES.name(demo_pvs.DEMO_PREFIX), timeout=10)
            assert set(reg.value.name) == set(demo_pvs.DEVICE_NAMES)
            rb = ctxt.get(demo_pvs.motor_readback(demo_pvs.DEMO_PREFIX, "m1"), timeout=10)
            assert float(rb) == 0.0
        assert (shared_run_dir / "store" / "locks.sqlite").exists()
        assert (shared_run_dir / "demo.db").exists()
        # the pvcoord commands, in a shell that has only the printed export lines
        shell_env = dict(child_env(), **dict(
            re.findall(r"^\s+export (\w+)=(\S+)$", text, re.M)))
        reg = subprocess.run([PYTHON, "-m", "pvcoord.cli", "registry", "show"],
                             capture_output=True, text=True, timeout=60, env=shell_env)
        assert reg.returncode == 0, reg.stderr
        assert reg.stdout.splitlines()[0].split()[:3] == ["NAME", "CLASS", "CAPABILITIES"]
        assert {ln.split()[0] for ln in reg.stdout.splitlines()[1:]} == set(
            demo_pvs.DEVICE_NAMES)
        using_before = [pid for pid, cmd in cmdlines().items() if str(shared_run_dir) in cmd]
        assert len(set(using_before) & set(pids)) >= 3, "the run-dir check below would be void"
        proc.send_signal(signal.SIGTERM)
        out_rest, _ = proc.communicate(timeout=30)
        rest = out_rest.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
            rest = ""
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopping the demo beamline" in rest and rest.rstrip().endswith("stopped")
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes left running: {left}"
    # nor any other process working on this run's files (children of children included)
    using = [pid for pid, cmd in cmdlines().items() if str(shared_run_dir) in cmd and alive(pid)]
    assert not using, f"processes still using {shared_run_dir}: {using}"


def cmdlines() -> dict[int, str]:
    """Command line of every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return out


@pytest.mark.system
@pytest.mark.identity
@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_walkthrough_as_another_account_uses_on_behalf_of():
    """Started by an account other than root, identity 2 acts through the onBehalfOf path."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("running the demo as another account needs root and runuser")
    run_dir = Path(tempfile.mkdtemp(prefix="pvcoord-demo-nobody-"))
    try:
        shutil.chown(run_dir, user="nobody")
        base = free_block()
        p = run_demo(
            ["runuser", "-u", "nobody", "--",
             *demo_argv("--walkthrough", "--ports-from", str(base), "--run-dir", str(run_dir))],
            "/")
        out = p.stdout
        assert p.returncode == 0, out + p.stderr
        assert "identity 2 is user 'bob' through the trusted onBehalfOf path" in out
        m = re.search(r"^walkthrough: (\d+)/(\d+) steps behaved as expected$", out, re.M)
        assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 6, out
        assert "m1 is held by nobody@127.0.0.1" in out
        assert re.search(r"preempted: m2 \(MANUAL_OPERATOR of bob@", out)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
