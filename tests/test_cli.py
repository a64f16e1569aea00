"""The ``pvcoord`` command line against the real coordination IOC process.

Most commands run in-process through :func:`pvcoord.cli.main` (fast); the second identity and the
console script run as real processes (``runuser -u nobody``, ``.venv/bin/pvcoord``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pvcoord import cli
from pvcoord.launch import coordination_argv
from pvcoord.procs import BIN, PYTHON, ManagedProcess, server_env, wait_for_pv
from pvdb.names import COORD_EVENTS, COORD_LOCKS

pytestmark = pytest.mark.system

PREFIX = "TCLI:"
DEVICES = ["m1", "m2", "m3", "m4", "m5"]
REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "pvcoord" / "demo" / "policy.toml"


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    d = tmp_path_factory.mktemp("coord-cli")
    proc = ManagedProcess(
        "coordination",
        coordination_argv(PREFIX, f"sqlite:///{d}/locks.sqlite", POLICY, devices=DEVICES),
        server_env(os.environ), log_dir=d,
    )
    try:
        wait_for_pv(COORD_LOCKS.name(PREFIX), os.environ, 30, procs=[proc])
        yield proc
    finally:
        proc.stop()


def run(*argv: str) -> tuple[int, str]:
    """``pvcoord --prefix PREFIX argv...`` in this process: (exit code, standard output)."""
    out = io.StringIO()
    code = cli.main(["--prefix", PREFIX, *argv], out=out)
    return code, out.getvalue()


def run_process(*argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pvcoord.cli argv...`` as a real process (optionally as another account)."""
    cmd = [PYTHON, "-m", "pvcoord.cli", "--prefix", PREFIX, *argv]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ),
                          cwd="/")


def test_lock_status_release(ioc, capsys):
    code, out = run("lock", "m1,m2", "--type", "MANUAL_OPERATOR", "--timeout", "60",
                    "--reason", "align")
    assert code == 0, capsys.readouterr().err
    assert re.match(r"granted m1,m2 MANUAL_OPERATOR until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out)
    assert "key:" not in out
    code, out = run("locks")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "TYPE", "OWNER", "REMAINING", "EXPIRES", "REASON",
                                "PLAN"]
    m1 = next(line for line in lines if line.startswith("m1 "))
    assert "MANUAL_OPERATOR" in m1 and "root@127.0.0.1" in m1 and "align" in m1
    assert re.search(r"\b(59|60) s\b", m1)
    assert "free: m3, m4, m5" in out
    code, out = run("renew", "m1", "--timeout", "120")
    assert code == 0 and out.startswith("renewed m1 until ")
    code, out = run("release", "m1,m2")
    assert (code, out.strip()) == (0, "released m1,m2")
    code, out = run("locks")
    assert code == 0 and out.startswith(f"no active locks on {PREFIX}")


def test_key_from_stdin_or_environment_never_on_the_command_line(ioc):
    """``--key -`` and ``$PVCOORD_KEY`` keep the key out of the process list."""
    from pvcoord.client import Client

    with Client(PREFIX) as c:
        g1 = c.acquire("m4", "MANUAL_OPERATOR", 60, on_behalf_of="keyholder")
        g2 = c.acquire("m5", "MANUAL_OPERATOR", 60, on_behalf_of="keyholder")
    cmd = [PYTHON, "-m", "pvcoord.cli", "--prefix", PREFIX]
    r = subprocess.run([*cmd, "renew", "--key", "-", "--timeout", "30"], input=g1.key + "\n",
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("renewed m4 until"), r.stderr
    r = subprocess.run([*cmd, "release"], env={**os.environ, "PVCOORD_KEY": g2.key},
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert (r.returncode, r.stdout.strip()) == (0, "released m5"), r.stderr
    r = subprocess.run([*cmd, "release", "--key", "-"], input="", capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 2 and "no key on standard input" in r.stderr
    # the holes of issue 11 (finding 5): a key as an option value or where a device belongs
    for argv in (["release", "--key", g1.key], ["renew", g1.key], ["release", f"m1,{g1.key}"]):
        r = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 2 and g1.key not in r.stdout + r.stderr, (argv, r.stderr)
    keyfile = Path(tempfile.mkdtemp()) / "key"
    keyfile.write_text(g1.key + "\n")
    r = subprocess.run([*cmd, "release", "--key-file", str(keyfile)], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert (r.returncode, r.stdout.strip()) == (0, "released m4"), r.stderr
    events = run("get", COORD_EVENTS.name(PREFIX))[1]
    assert g1.key not in events and g2.key not in events


def test_refusals_and_bad_input_exit_codes(ioc, capsys):
    code, _ = run("release", "m3")
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED
    assert err.startswith(f"pvcoord: refused by {PREFIX}Coord:Release: ") and "m3" in err
    code, _ = run("lock", "nosuch", "--type", "MANUAL_OPERATOR")
    assert code == cli.EXIT_REFUSED and "nosuch" in capsys.readouterr().err
    code, _ = run("lock", "m3", "--type", "BOSS")
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and "unknown lock type 'BOSS'" in err
    code, _ = run("release")
    assert code == cli.EXIT_BAD_INPUT and "name the devices" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: bad numbers never reach the IOC
        run("lock", "m3", "--type", "MANUAL_OPERATOR", "--timeout", "-5")
    assert e.value.code == cli.EXIT_BAD_INPUT
    assert "must be a positive number of seconds" in capsys.readouterr().err
    code, _ = run("--call-timeout", "0.3", "--prefix", "NOIOC:", "locks")
    assert code == cli.EXIT_NO_ANSWER and "no answer from NOIOC:Coord:Locks within 0.3 s" in (
        capsys.readouterr().err)
    code, out = run("locks")
    assert out.startswith("no active locks"), "nothing of the above may have changed the table"


@pytest.mark.identity
def test_second_identity_is_refused_with_the_holder_named(ioc):
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("a second OS identity needs root and runuser")
    code, _ = run("lock", "m4", "--type", "MANUAL_OPERATOR", "--timeout", "60",
                  "--reason", "beam alignment")
    assert code == 0
    try:
        p = run_process("lock", "m4", "--type", "MANUAL_OPERATOR", "--timeout", "60",
                        user="nobody")
        assert p.returncode == cli.EXIT_REFUSED, p.stderr
        assert "Traceback" not in p.stderr
        assert "root@127.0.0.1" in p.stderr and "beam alignment" in p.stderr, p.stderr
        p = run_process("lock", "m5", "--type", "MAINTENANCE", user="nobody")
        assert p.returncode == cli.EXIT_REFUSED and "nobody" in p.stderr, p.stderr
        p = run_process("release", "m4", user="nobody")
        assert p.returncode == cli.EXIT_REFUSED and "root@" in p.stderr, p.stderr
    finally:
        run("release", "m4")


def test_console_script_exit_code_and_no_traceback(ioc):
    exe = BIN / "pvcoord"
    p = subprocess.run([str(exe), "--prefix", PREFIX, "release", "m5"], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ))
    assert p.returncode == cli.EXIT_REFUSED
    assert p.stderr.startswith("pvcoord: refused by") and "Traceback" not in p.stderr
    p = subprocess.run([str(exe), "locks", "--prefix", PREFIX], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ))
    assert p.returncode == 0 and "no active locks" in p.stdout, p.stderr


def test_watch_prints_changes(ioc):
    out = io.StringIO()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(cli.main(
        ["--prefix", PREFIX, "watch", "--duration", "20", "--events", "2"], out=out)))
    t.start()
    try:
        # "watching" is printed once both monitors have their first value: what follows is new
        assert _wait_for(out, "watching"), out.getvalue()
        assert "no answer yet" not in out.getvalue()
        assert "locks: (none)" in out.getvalue() or _wait_for(out, "locks: (none)")
        assert run("lock", "m5", "--type", "MAINTENANCE", "--timeout", "30")[0] == 0
        assert run("release", "m5")[0] == 0
    finally:
        t.join(25)
    assert result == [0]
    text = out.getvalue()
    assert re.search(r"acquired m5 MAINTENANCE actor=root holder=root@127.0.0.1", text), text
    assert re.search(r"released m5 MAINTENANCE", text), text
    assert "locks: m5=MAINTENANCE(root@127.0.0.1)" in text


def _wait_for(out: io.StringIO, text: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in out.getvalue():
            return True
        time.sleep(0.02)
    return False


def test_registry_import_writes_a_loadable_registry_file(tmp_path, capsys):
    from pvdb.registry_file import load_registry

    target = tmp_path / "registry.yaml"
    out = io.StringIO()
    code = cli.main(["registry", "import", "--startup-dir",
                     str(REPO / "tests" / "data" / "profile_collection"), "-o", str(target)],
                    out=out)
    assert code == 0, capsys.readouterr().err
    devices = load_registry(target)
    assert out.getvalue().strip() == f"wrote {len(devices)} devices to {target}"
    assert {"m1", "det1"} <= {d.name for d in devices}
    m1 = next(d for d in devices if d.name == "m1")
    assert any(pv.endswith(":Setpoint") for pv in m1.pvs)


def test_registry_import_failures_are_one_clear_line(tmp_path, capsys):
    code = cli.main(["registry", "import", "--startup-dir", str(tmp_path / "missing")])
    assert code == cli.EXIT_BAD_INPUT
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "00-broken.py").write_text("raise RuntimeError('motor controller offline')\n")
    code = cli.main(["registry", "import", "--startup-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED
    assert err.startswith("pvcoord: registry import failed:") and "offline" in err


def test_put_get_and_call_like_pvput_pvget_pvcall(ioc):
    """``pvcoord put/get/call`` against the real coordination IOC (p4p's own ``cli put`` and its
    JSON-decoding ``rpc`` cannot do this)."""
    code, out = run("call", f"{PREFIX}Coord:Acquire", "device=m3", "type=MANUAL_OPERATOR",
                    "timeout=60", "reason=[json-looking] {text}")
    assert code == 0 and "granted: True" in out
    assert "key: " in out  # the requester's own reply carries its key
    code, out = run("get", f"{PREFIX}Coord:m3:State")
    assert (code, out.strip()) == (0, f"{PREFIX}Coord:m3:State ManualOperator")
    code, out = run("get", f"{PREFIX}Coord:m3:Reason")
    assert out.strip() == f"{PREFIX}Coord:m3:Reason [json-looking] {{text}}"
    code, _ = run("put", f"{PREFIX}Coord:m3:Reason", "x")  # a read-only PV refuses the put
    assert code == 1
    code, _ = run("call", f"{PREFIX}Coord:Release", "device")
    assert code == 2
    assert run("release", "m3")[0] == 0
