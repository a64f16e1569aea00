"""Helpers for tests that run the real coordination IOC process and real clients."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from p4p.client.thread import Context
from p4p.nt import NTURI

from pvcoord.launch import coordination_argv
from pvcoord.procs import PYTHON, ManagedProcess, server_env, wait_for_pv
from pvcoord.rpc import current_locks
from pvdb import names as pvn
from pvdb.models import Lock, LockType

PREFIX = "TST:"
DEVICES = ("m1", "m2", "m3", "m4", "det1", "shutter")
REPO = Path(__file__).resolve().parent.parent
CLIENT_TIMEOUT = 10.0

TEST_POLICY = """
[access]
trusted_services = ["root"]
force_release = ["root"]

[lock_types.MAINTENANCE]
allow = ["root"]
default_lease = 600
max_lease = 3600

[lock_types.MANUAL_OPERATOR]
allow = ["*"]
default_lease = 300
max_lease = 3600

[lock_types.QUEUE_EXECUTING]
allow = ["root"]

[lock_types.QUEUE_QUEUED]
allow = ["root"]
"""


def start_coordination(
    env: Mapping[str, str],
    tmp: Path,
    store: str | None = None,
    name: str = "coordination",
    extra: tuple[str, ...] = (),
    devices: tuple[str, ...] | None = DEVICES,
) -> ManagedProcess:
    """Start ``python -m iocs.coordination`` and wait until it serves ``Coord:Locks``."""
    policy = tmp / "policy.toml"
    if not policy.exists():
        policy.write_text(TEST_POLICY)
    argv = coordination_argv(PREFIX, store or f"sqlite:///{tmp}/locks.sqlite", policy,
                             devices=devices, extra=extra)
    proc = ManagedProcess(name, argv, server_env(env), cwd=REPO, log_dir=tmp)
    try:
        wait_for_pv(pvn.COORD_LOCKS.name(PREFIX), env, procs=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc


def rpc(ctxt: Context, spec: pvn.PVSpec, **kws: str):
    """Call a coordination RPC with pvcall-style string arguments; return value or exception."""
    uri = NTURI([(k, "s") for k in kws]).wrap(spec.name(PREFIX), kws=kws)
    return ctxt.rpc(spec.name(PREFIX), uri, timeout=CLIENT_TIMEOUT, throw=False)


def locks(ctxt: Context) -> list[tuple]:
    """Rows of ``Coord:Locks`` as tuples (device, lockType, priority, owner, reason).

    The table as of every change replied so far (:func:`pvcoord.rpc.current_locks`).
    """
    v = current_locks(ctxt, PREFIX, CLIENT_TIMEOUT)
    col = v.value
    return list(zip(col.device, col.lockType, col.priority, col.owner, col.reason, strict=True))


def pvcall_as(user: str, env: Mapping[str, str], spec: pvn.PVSpec, **kws: str):
    """Run ``python -m p4p.client.cli rpc`` under OS account ``user`` (a second PVA identity).

    Returns the CompletedProcess (stdout has the reply, or ``Error: <server message>``).
    """
    argv = [
        "runuser", "-u", user, "--", PYTHON, "-m", "p4p.client.cli", "-w",
        str(CLIENT_TIMEOUT), "rpc", spec.name(PREFIX), *(f"{k}={v}" for k, v in kws.items()),
    ]
    return subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 20,
        cwd="/",
    )


def put_lock(store, device: str, lock_type: LockType, owner: str = "max", plan_uid: str = "",
             reason: str = "realign", ttl: float = 60.0) -> None:
    """Write a lock row of ``owner``@h straight into ``store`` (as another IOC would have)."""
    now = time.time()
    store.commit([Lock(device=device, lock_type=lock_type, owner=owner, host="h", actor=owner,
                       acquired=now, expires=now + ttl, reason=reason, plan_uid=plan_uid)],
                 [], [])
