"""The guard gateway's part of the demo beamline, and a put agent for a second identity.

- :func:`guard_config` / :func:`start_guard`: run ``python -m bridges.guard`` in front of the
  device softIoc. The softIoc's environment (``device_env``) is used by nobody but the guard;
  clients, the coordination and registry IOCs and the guard's client side share ``client_env``.
- :class:`PutAgent`: a long-lived client process (optionally under another OS account, via
  ``runuser``) that keeps its channels open and does puts, gets and RPCs on request. The PVA
  account of a request is the OS account of the client process, so this is how the demo and the
  tests act as a second person.
- :func:`walkthrough`: the demo steps of the guard: while an operator holds ``m1``,
  another account's put to ``m1``'s setpoint through the guard is refused and the holder's
  succeeds; after the release the other account's put succeeds on the same channel.
  :func:`run_guard_walkthrough` runs it on a started demo (root and ``nobody``).
- :data:`COMPONENTS`: the guard's part of ``pvcoord demo`` (see ``pvcoord.demo.beamline``). Its
  ``prepare`` moves the softIoc to a device network of its own (PVA and CA ports only the guard
  uses: ``guard-upstream``, ``guard-upstream-tcp``) and starts the guard right away, so that every
  later client (the RE worker's ophyd-async devices included) reaches the devices only through it;
  its ``start`` waits until the guard has the registry and the lock state (``Guard:Health`` OK).

Run ``python -m pvcoord.demo.guard_part agent`` to start an agent by hand (JSON lines on stdin).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from pvcoord.procs import (
    LOOPBACK,
    PYTHON,
    ManagedProcess,
    free_port,
    python_module,
    wait_for_pv,
)
from pvdb import demo
from pvdb.guard import GUARD_AUDIT, GUARD_HEALTH, GUARD_LOCK_STATE_OK, GUARD_WHAT_IF
from pvdb.names import COORD_ACQUIRE, COORD_RELEASE

REPO = Path(__file__).resolve().parent.parent.parent
AGENT_TIMEOUT = 10.0
"""Seconds one agent request may take."""


def guard_config(
    client_env: Mapping[str, str],
    device_env: Mapping[str, str],
    policy: str | Path | None = None,
    server_port: int | None = None,
    access: str | Path | None = None,
    pvlist: str | Path | None = None,
    stale_after: float | None = None,
    coordination_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The guard's config (pvagw JSON + ``guard`` section) for two loopback environments.

    Args:
        client_env: environment of the clients and of pvcoord's IOCs (``loopback_env()``); the
            guard serves on its UDP search port, on a TCP port of its own.
        device_env: environment of the device softIoc (another ``loopback_env()``).
        policy: policy TOML path.
        server_port: TCP port of the guard's server (default: a free one).
        access: site ACF file.
        pvlist: site pvlist file.
        stale_after: seconds without a coordination heartbeat before failing closed.
        coordination_env: where the coordination and registry IOCs are, if not in
            ``client_env``.
    """
    cport = int(client_env["EPICS_PVA_BROADCAST_PORT"])
    coord_port = int((coordination_env or client_env)["EPICS_PVA_BROADCAST_PORT"])
    dport = int(device_env["EPICS_PVA_BROADCAST_PORT"])
    server: dict[str, Any] = {
        "name": "clients",
        "clients": ["devices"],
        "interface": [LOOPBACK],
        "addrlist": LOOPBACK,
        "autoaddrlist": False,
        "bcastport": cport,
        "serverport": server_port or free_port(),
    }
    if access:
        server["access"] = str(access)
    if pvlist:
        server["pvlist"] = str(pvlist)
    guard: dict[str, Any] = {
        "coordination": {"addrlist": LOOPBACK, "autoaddrlist": False, "bcastport": coord_port},
    }
    if policy:
        guard["policy"] = str(policy)
    if stale_after is not None:
        guard["stale_after"] = stale_after
    return {
        "version": 2,
        "clients": [
            {"name": "devices", "provider": "pva", "addrlist": LOOPBACK, "autoaddrlist": False,
             "bcastport": dport}
        ],
        "servers": [server],
        "guard": guard,
    }


def start_guard(
    prefix: str,
    client_env: Mapping[str, str],
    device_env: Mapping[str, str],
    policy: str | Path | None,
    log_dir: str | Path,
    timeout: float = 20.0,
    **config: Any,
) -> ManagedProcess:
    """Write the config into ``log_dir`` and start ``python -m bridges.guard``.

    Returns once ``P Guard:Health`` answers on the client side (deadline ``timeout`` s). Extra
    keyword arguments go to :func:`guard_config`.

    Raises:
        TimeoutError / RuntimeError: the guard did not come up (its output is in the message).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "guard.json"
    path.write_text(json.dumps(guard_config(client_env, device_env, policy, **config), indent=2))
    env = dict(client_env)
    proc = ManagedProcess(
        "guard", python_module("bridges.guard", "--prefix", prefix, "--config", str(path)),
        env, cwd=REPO, log_dir=log_dir,
    )
    try:
        wait_for_pv(GUARD_HEALTH.name(prefix), client_env, timeout=timeout, procs=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc


# --- a client process under some OS account ---------------------------------------------------


class AgentError(RuntimeError):
    """The agent did not answer, or died."""


class PutAgent:
    """A client process (under OS account ``user``, or ours) doing puts/gets/RPCs on request.

    Each request is one JSON line; each reply is ``{"ok": true, "value": ...}`` or
    ``{"ok": false, "error": "<the server's message>"}``. Channels stay open between requests
    (one p4p context), so a put after a lock change goes over the same channel.

    Args:
        env: the client environment (only ``EPICS_PVA_*`` matter).
        user: OS account to run as (needs root and ``runuser``); None = this process's account.
    """

    def __init__(self, env: Mapping[str, str], user: str | None = None) -> None:
        argv = [PYTHON, "-m", "pvcoord.demo.guard_part", "agent"]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        self.user = user
        self.proc = subprocess.Popen(
            argv, env=dict(env), cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        try:
            hello = self._reply(AGENT_TIMEOUT * 2)
        except BaseException:
            self._kill()  # never leave the (runuser) child behind
            raise
        self.account = str(hello.get("value", ""))

    def _kill(self) -> None:
        """Stop the agent process (ours, by its PID) and reap it; close its pipes.

        SIGTERM first: ``runuser`` passes it on to its child (the agent) and waits for it; then
        SIGKILL if it is still there after 3 s.
        """
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                try:
                    f.close()
                except OSError:
                    pass

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AgentError(f"agent ({self.user or 'self'}) gave no answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AgentError(f"agent ({self.user or 'self'}) exited:\n{err}")
        return json.loads(line)

    def request(self, **req: Any) -> dict[str, Any]:
        """Send one request, return the reply dict."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply(AGENT_TIMEOUT + 5)

    def put(self, pv: str, value: Any) -> dict[str, Any]:
        """Put (with completion) ``value`` to ``pv``; the reply says ok or the error text."""
        return self.request(op="put", pv=pv, value=value)

    def get(self, pv: str) -> dict[str, Any]:
        """Get ``pv``'s value."""
        return self.request(op="get", pv=pv)

    def rpc(self, name: str, /, **args: str) -> dict[str, Any]:
        """Call RPC ``name`` with pvcall-style string arguments; the reply value is a dict."""
        return self.request(op="rpc", pv=name, args=args)

    def close(self) -> None:
        """End the agent (closes its stdin; kills it if it does not exit)."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()

    def __enter__(self) -> PutAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(v: Any) -> Any:
    """A p4p value as JSON-friendly Python."""
    if hasattr(v, "todict"):  # p4p Value
        return {k: _plain(x) for k, x in v.todict().items()}
    if hasattr(v, "tolist"):  # numpy array
        return _plain(v.tolist())
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


def run_agent(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The agent's loop: one JSON request per line on ``stdin``, one reply per line."""
    import getpass

    from p4p.client.thread import Context
    from p4p.nt import NTURI

    def say(obj: dict[str, Any]) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    with Context("pva") as ctxt:
        say({"ok": True, "value": getpass.getuser()})
        for line in stdin:
            try:
                req = json.loads(line)
                op = req["op"]
                if op == "put":
                    ctxt.put(req["pv"], req["value"], wait=True, timeout=AGENT_TIMEOUT)
                    say({"ok": True, "value": None})
                elif op == "get":
                    say({"ok": True, "value": _plain(ctxt.get(req["pv"], timeout=AGENT_TIMEOUT))})
                elif op == "rpc":
                    args = {str(k): str(v) for k, v in req.get("args", {}).items()}
                    uri = NTURI([(k, "s") for k in args]).wrap(req["pv"], kws=args)
                    v = ctxt.rpc(req["pv"], uri, timeout=AGENT_TIMEOUT)
                    say({"ok": True, "value": _plain(v)})
                else:
                    say({"ok": False, "error": f"unknown op {op!r}: use put, get or rpc"})
            except Exception as e:  # every failure goes back to the caller
                say({"ok": False, "error": str(e) or type(e).__name__})
    return 0


# --- the walkthrough --------------------------------------------------------------------------


def walkthrough(
    prefix: str,
    client_env: Mapping[str, str],
    operator: PutAgent,
    other: PutAgent,
    motor: str = demo.MOTORS[0],
    say: Callable[[str], None] = print,
) -> list[tuple[str, bool]]:
    """The guard's demo steps; returns ``(step, passed)`` for each.

    1. ``operator`` acquires a MANUAL_OPERATOR lock on ``motor``;
    2. ``other`` puts to the motor's setpoint through the guard: refused;
    3. ``operator`` puts: allowed;
    4. ``operator`` releases; 5. ``other`` puts again on the same channel: allowed.

    ``operator`` and ``other`` must run under different OS accounts. The lock is released even if
    a step fails.
    """
    setpoint = demo.motor_setpoint(prefix, motor)
    acquire, release = COORD_ACQUIRE.name(prefix), COORD_RELEASE.name(prefix)
    results: list[tuple[str, bool]] = []

    def step(text: str, ok: bool, detail: str = "") -> None:
        results.append((text, ok))
        say(f"[guard] {'ok  ' if ok else 'FAIL'} {text}{': ' + detail if detail else ''}")

    if operator.account == other.account:
        raise ValueError(f"both agents run as {operator.account!r}: use two OS accounts")
    # the guard is a client of the coordination IOC: after an IOC restart (the walkthrough's step
    # before) it may need a few seconds to follow the new one, and fails closed meanwhile
    if not _wait_lock_state(operator, prefix):
        say(f"[guard] note: {GUARD_LOCK_STATE_OK.name(prefix)} still 0 after "
            f"{LOCK_STATE_WAIT:.0f} s (the guard fails closed)")
    r = operator.rpc(acquire, device=motor, type="MANUAL_OPERATOR", timeout="120",
                     reason="guard walkthrough")
    step(f"{operator.account} acquires {motor}", r["ok"], r.get("error", ""))
    if not r["ok"]:
        return results
    try:
        _wait_decision(operator, prefix, setpoint, other.account, allowed=False)
        r = other.put(setpoint, 1.0)
        step(f"{other.account} puts {setpoint} while {operator.account} holds {motor}: refused",
             not r["ok"], r.get("error", "was allowed"))
        r = operator.put(setpoint, 2.0)
        step(f"{operator.account} (holder) puts {setpoint}: allowed", r["ok"], r.get("error", ""))
    finally:
        r = operator.rpc(release, device=motor)
        step(f"{operator.account} releases {motor}", r["ok"], r.get("error", ""))
    w = _wait_decision(operator, prefix, setpoint, other.account, allowed=True)
    r = other.put(setpoint, 0.0)
    why = "" if r["ok"] else f"{r.get('error', '')} (Guard:WhatIf: {_what_if_text(w)})"
    step(f"{other.account} puts {setpoint} again on the same channel: allowed", r["ok"], why)
    return results


LOCK_STATE_WAIT = 15.0
"""Seconds the guard's walkthrough waits for ``Guard:LockStateOk`` before its first step."""


def _wait_lock_state(agent: PutAgent, prefix: str, timeout: float = LOCK_STATE_WAIT) -> bool:
    """Wait until the guard has fresh lock state (``Guard:LockStateOk`` 1); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = agent.get(GUARD_LOCK_STATE_OK.name(prefix))
        if r.get("ok") and _scalar(r["value"]) == 1:
            return True
        time.sleep(0.1)
    return False


def _scalar(v: Any) -> Any:
    """The ``value`` of an NTScalar the agent returned as a dict (or the plain value)."""
    return v.get("value") if isinstance(v, dict) else v


def _what_if_text(answer: dict[str, Any]) -> str:
    """A ``Guard:WhatIf`` reply (or the agent's error) as one line, for a failed step."""
    if not answer.get("ok"):
        return f"no answer: {answer.get('error', 'not asked')}"
    v = answer["value"]
    return f"allowed={v.get('allowed')} {v.get('reason', '')}"


def _wait_decision(
    agent: PutAgent, prefix: str, pv: str, account: str, allowed: bool, timeout: float = 5.0
) -> dict[str, Any]:
    """Ask ``Guard:WhatIf`` until the guard's answer for ``account`` on ``pv`` is ``allowed``.

    The guard learns of a lock change from ``Coord:LockChanges`` (posted before the coordination
    IOC's reply); returns the last answer (also when the deadline passes).
    """
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = agent.rpc(GUARD_WHAT_IF.name(prefix), pv=pv, account=account)
        if last.get("ok") and bool(last["value"]["allowed"]) == allowed:
            break
        time.sleep(0.02)
    return last


# --- the demo component -----------------------------------------------------------------------


def _prepare(ctx: Any) -> None:
    """Move the softIoc behind the guard and start the guard (``ctx``: beamline DemoContext)."""
    from pvcoord.procs import loopback_env

    ctx.device_env = loopback_env(
        pva_server_port=ctx.port("guard-upstream-tcp"),
        pva_broadcast_port=ctx.port("guard-upstream"),
        ca_server_port=ctx.port("guard-upstream-ca"),
        ca_repeater_port=ctx.port("guard-upstream-ca-repeater"),
        base=ctx.env,
    )
    path = ctx.run_dir / "guard.json"
    config = guard_config(ctx.env, ctx.device_env, ctx.files.get("policy"), ctx.port("guard"))
    path.write_text(json.dumps(config, indent=2))
    ctx.files["guard-config"] = path
    # started now, before the other parts: they must find the devices through the guard
    ctx.start(
        "guard",
        python_module("bridges.guard", "--prefix", ctx.prefix, "--config", str(path)),
        ctx.server_env("guard"),
        ready_pv=GUARD_HEALTH.name(ctx.prefix),
    )


def _start(ctx: Any) -> None:
    """Wait until the guard enforces (registry and lock state received); add banner notes."""
    try:
        wait_for_pv(GUARD_HEALTH.name(ctx.prefix), ctx.env, 60.0, procs=[ctx.procs["guard"]],
                    condition=lambda v: v == "OK")
    except (TimeoutError, RuntimeError) as e:
        from pvcoord.demo.beamline import DemoError

        raise DemoError(f"the guard did not get the registry and lock state: {e}") from None
    p = ctx.prefix
    m1 = demo.MOTORS[0]
    ctx.notes.append(
        f"guard: the devices are reached only through the guard gateway (PVA TCP "
        f"{ctx.port('guard')}); the softIoc listens on a device network only the guard uses "
        f"(PVA UDP {ctx.port('guard-upstream')}, no Channel Access on the client side)."
    )
    ctx.notes.append(
        f"guard: while someone else holds {m1}, a put to {demo.motor_setpoint(p, m1)} is refused "
        f"(\"Put permission denied by gateway\"); ask why: pvcoord call {GUARD_WHAT_IF.name(p)} "
        f"pv={demo.motor_setpoint(p, m1)} account=nobody; audit: {GUARD_AUDIT.name(p)}"
    )


def _components() -> list[Any]:
    from pvcoord.demo.beamline import Component  # beamline imports us lazily

    return [Component("guard", _start, _prepare)]


def __getattr__(name: str) -> Any:
    if name == "COMPONENTS":  # built lazily: beamline imports this module to find it
        return _components()
    raise AttributeError(name)


def run_guard_walkthrough(ctx: Any, stop: Any = None) -> bool:
    """Run :func:`walkthrough` on a started demo as root (operator) and ``nobody`` (other).

    Returns whether every step behaved. Needs root and ``runuser`` for the second OS account;
    otherwise it says so and returns False (PVA's identity is the client's OS account).
    """
    import shutil

    if os.geteuid() != 0 or shutil.which("runuser") is None:
        ctx.say("[guard] walkthrough needs a second OS account: run the demo as root "
                "(runuser -u nobody); not run")
        return False
    if stop is not None and stop.is_set():
        return False
    with PutAgent(ctx.env) as operator, PutAgent(ctx.env, user="nobody") as other:
        results = walkthrough(ctx.prefix, ctx.env, operator, other, say=ctx.say)
    return bool(results) and all(ok for _step, ok in results)


def main(argv: list[str] | None = None) -> int:
    """``python -m pvcoord.demo.guard_part agent``: run a put agent on stdin/stdout."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["agent"]:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_agent()


if __name__ == "__main__":
    sys.exit(main())
