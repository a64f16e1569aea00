"""``pvcoord status`` against the running demo beamline (started with its endstation file): every
process up, then one killed: its row says DOWN and the exit code is 1."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pvcoord.demo import beamline
from pvcoord.procs import PYTHON
from tests.test_demo_beamline import free_block

pytestmark = pytest.mark.system

PREFIX = "TSTAT:"


@pytest.fixture(scope="module")
def demo():
    run_dir = Path(tempfile.mkdtemp(prefix="pvcoord-test-status-"))
    run_dir.chmod(0o755)  # the queue part runs the RE Manager as another account
    ctx = None
    try:
        ctx = beamline.start_beamline(PREFIX, free_block(), run_dir, out=io.StringIO())
        yield ctx
    finally:
        if ctx is not None:
            ctx.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


def status(ctx, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in ctx.env.items() if not k.startswith("EPICS_")}  # all from the file
    return subprocess.run(
        [PYTHON, "-m", "pvcoord.cli", "status", "--config",
         str(ctx.files["endstation"]), *extra],
        capture_output=True, text=True, timeout=60, env=env)


def test_status_of_the_whole_demo_then_with_one_process_killed(demo):
    expected = ["registry", "coordination"] + [n for n in ("queue", "guard") if n in demo.procs]
    p = status(demo, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == expected
    for r in rows:
        assert r["up"] is True, r
        assert r["heartbeat_age"] < 3 and r["version"] != "?" and r["uptime"] is not None, r
    by = {r["name"]: r for r in rows}
    assert by["coordination"]["health"] == "OK"

    demo.procs["registry"].kill9()
    p = status(demo)
    assert p.returncode == 1, p.stdout + p.stderr
    table = {line.split()[0]: line.split()[1] for line in p.stdout.splitlines()[1:]
             if line and not line.startswith("down:")}
    assert table["registry"] == "DOWN"
    assert all(table[n] == "up" for n in expected if n != "registry"), p.stdout
    assert "down: registry" in p.stdout and "no answer from TSTAT:Registry:Heartbeat" in p.stdout
