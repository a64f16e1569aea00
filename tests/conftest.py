"""Shared fixtures: a loopback-only EPICS environment per test, and process cleanup."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from pvcoord import sourcedigest
from pvcoord.procs import PYTHON, loopback_env

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
"""Seconds any single client call in a test may take."""

# In-process p4p clients and servers in tests read nothing from the site environment.
for _k in list(os.environ):
    if _k.startswith(("EPICS_PVA", "EPICS_CA")):
        del os.environ[_k]
os.environ.update({k: v for k, v in loopback_env().items() if k.startswith("EPICS_")})


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run against a stale installed copy of pvcoord.

    ``scripts/setup.sh`` installs pvcoord as a copy into a venv every account can read (processes
    run as other accounts, or from the demo's run directory, import that copy, not this checkout)
    and records the digest of what it installed. A checkout changed since then would test old code
    in those processes, so stop with what to do instead. Not checked when ``PYTHONPATH`` puts this
    checkout first (every child process then imports it).
    """
    if str(REPO) in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        return
    stamp = Path(os.path.realpath(sys.prefix)) / sourcedigest.STAMP
    if stamp.is_file() and stamp.read_text().strip() != sourcedigest.digest(REPO):
        pytest.exit(f"the pvcoord installed in {stamp.parent} is older than this checkout: "
                    "run 'bash scripts/setup.sh' first", returncode=4)


@pytest.fixture
def env() -> dict[str, str]:
    """A fresh loopback-only environment (own PVA/CA ports) for the processes of one test."""
    return loopback_env()


@pytest.fixture
def python() -> str:
    """The interpreter of the project venv (readable by other accounts, see scripts/setup.sh)."""
    return PYTHON


def other_user_available() -> str | None:
    """Why a second OS identity cannot be used here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to run a client as another account"
    if shutil.which("runuser") is None:
        return "runuser not found"
    return None


@pytest.fixture
def shared_run_dir():
    """A run directory other OS accounts can reach (pytest's own tmp_path is private to root).

    The demo runs the RE Manager and the queue IOC as the service account ``pvcoord-queue``,
    which must read the run directory's policy and lock store.
    """
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="pvcoord-test-run-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
