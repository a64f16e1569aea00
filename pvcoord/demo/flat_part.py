"""The CA bridge's part of the demo beamline, and a libca client agent for a second identity.

- :func:`bridge_env` / :func:`start_flat`: run ``python -m bridges.flat`` with the client
  network's PVA settings, a CA port of its own and the device network as upstream.
- :class:`CAAgent`: a long-lived libca client process (pyepics), optionally under another OS
  account via ``runuser``; it keeps its channels open and reports access rights, access-rights
  events and put completion status. The CA user name is the OS account of the process (libca
  sends it), so this is how the demo and the tests act as a second person over CA.
- :func:`walkthrough`: the demo steps of issue 9 (while root holds ``m1``, another account's
  libca client has no write access on ``m1``'s setpoint and its put fails; after the release,
  write access appears on the same channel and the put goes through; the same account presses
  Take through the screen PV and the lock table shows it as holder).
- :data:`COMPONENTS`: the bridge's part of ``pvcoord demo``.

Run ``python -m pvcoord.demo.flat_part agent`` to start an agent by hand (JSON lines on stdin).
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

from pvcoord.procs import PYTHON, ManagedProcess, client_conf, free_port, python_module, wait_for_pv
from pvcoord.rpc import current_locks
from pvdb import demo
from pvdb.flat import FLAT_HEALTH, FLAT_RELEASE, FLAT_TAKE
from pvdb.names import COORD_ACQUIRE, COORD_RELEASE

REPO = Path(__file__).resolve().parent.parent.parent
AGENT_TIMEOUT = 10.0
"""Seconds one agent request may take."""
UPSTREAM_CA_KEYS = ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT")
"""The device network's CA settings the bridge gets with ``--upstream``."""
CA_KEYS = ("EPICS_CA_SERVER_PORT", "EPICS_CAS_SERVER_PORT", "EPICS_CA_REPEATER_PORT",
           "EPICS_CAS_BEACON_PORT")


def bridge_env(client_env: Mapping[str, str], ca_port: int | None = None,
               repeater_port: int | None = None) -> dict[str, str]:
    """The bridge's environment: the client network's PVA settings, a CA port of its own.

    CA clients of the bridge use the same environment (``EPICS_CA_ADDR_LIST=127.0.0.1``,
    ``EPICS_CA_SERVER_PORT`` = the bridge's port).
    """
    env = dict(client_env)
    port = str(ca_port or free_port())
    rep = str(repeater_port or free_port())
    env.update(EPICS_CA_SERVER_PORT=port, EPICS_CAS_SERVER_PORT=port,
               EPICS_CA_REPEATER_PORT=rep, EPICS_CAS_BEACON_PORT=rep)
    return env


def upstream_args(device_env: Mapping[str, str]) -> list[str]:
    """``--upstream`` arguments that point the bridge at the device network.

    The PVA settings, and the CA ones (the softIoc serves CA too: the bridge forwards puts
    over CA, decision 0155).
    """
    ca = {k: device_env[k] for k in UPSTREAM_CA_KEYS if k in device_env}
    return [f"--upstream={k}={v}" for k, v in {**client_conf(device_env), **ca}.items()]


def start_flat(
    prefix: str,
    env: Mapping[str, str],
    device_env: Mapping[str, str],
    policy: str | Path | None,
    log_dir: str | Path,
    timeout: float = 20.0,
    extra: tuple[str, ...] = (),
    user: str | None = None,
) -> ManagedProcess:
    """Start ``python -m bridges.flat`` (``env`` from :func:`bridge_env`).

    Returns once ``P Flat:Health`` answers over PVA (deadline ``timeout`` s).

    Raises:
        TimeoutError / RuntimeError: the bridge did not come up (its output is in the message).
    """
    argv = python_module("bridges.flat", "--prefix", prefix, *upstream_args(device_env), *extra)
    if policy:
        argv += ["--policy", str(policy)]
    from pvcoord.procs import server_env

    proc = ManagedProcess("flat", argv, server_env(env), cwd=REPO, log_dir=log_dir, user=user)
    try:
        wait_for_pv(FLAT_HEALTH.name(prefix), env, timeout=timeout, procs=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc


# --- a libca client under some OS account -----------------------------------------------------


class AgentError(RuntimeError):
    """The agent did not answer, or died."""


class CAAgent:
    """A libca (pyepics) client process under OS account ``user`` (None: ours).

    Requests and replies are JSON lines, ``{"ok": true, "value": ...}`` or ``{"ok": false,
    "error": "..."}``. Channels stay open between requests.

    Args:
        env: the CA client environment (``EPICS_CA_*``; see :func:`bridge_env`).
        user: OS account to run as (needs root and ``runuser``).
    """

    def __init__(self, env: Mapping[str, str], user: str | None = None) -> None:
        argv = [PYTHON, "-m", "pvcoord.demo.flat_part", "agent"]
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
            self.close()
            raise
        self.account = str(hello.get("value", ""))

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AgentError(f"CA agent ({self.user or 'self'}) gave no answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AgentError(f"CA agent ({self.user or 'self'}) exited:\n{err}")
        return json.loads(line)

    def request(self, timeout: float = AGENT_TIMEOUT, **req: Any) -> dict[str, Any]:
        """Send one request, return the reply dict."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**req, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout + 5)

    def connect(self, pv: str) -> dict[str, Any]:
        """Open (or reuse) a channel; value: ``{read, write, connects, changes}``."""
        return self.request(op="connect", pv=pv)

    def access(self, pv: str) -> dict[str, Any]:
        """Rights of the open channel: ``{read, write, connects, changes}``."""
        return self.request(op="access", pv=pv)

    def wait_write(self, pv: str, write: bool, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the channel's write access is ``write``; value: ``{..., waited}``."""
        return self.request(op="wait_write", pv=pv, write=write, timeout=timeout)

    def get(self, pv: str, as_string: bool = False) -> dict[str, Any]:
        """Read the channel's value."""
        return self.request(op="get", pv=pv, as_string=as_string)

    def put(self, pv: str, value: Any, wait: bool = True,
            timeout: float = AGENT_TIMEOUT) -> dict[str, Any]:
        """Put ``value``; with ``wait``, a put-callback whose CA status decides ``ok``.

        The reply's value is ``{"seconds": put -> completion}``; a refused put's error is
        libca's message (``Write access denied`` locally, or the server's status).
        """
        return self.request(op="put", pv=pv, value=value, wait=wait, timeout=timeout)

    def ctrl(self, pv: str) -> dict[str, Any]:
        """The channel's DBR_CTRL and DBR_TIME values.

        Keys as pyepics names them: units, precision, limits, enum strings, status, severity,
        timestamp.
        """
        return self.request(op="ctrl", pv=pv)

    def connect_many(self, pvs: list[str], timeout: float = AGENT_TIMEOUT) -> dict[str, Any]:
        """Connect to each of ``pvs`` (then close them); error lists those that did not."""
        return self.request(op="connect_many", pvs=pvs, timeout=timeout)

    def close(self) -> None:
        """End the agent (closes its stdin; kills it if it does not exit)."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
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

    def __enter__(self) -> CAAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(v: Any) -> Any:
    """A numpy value or array as plain Python (JSON)."""
    return v.tolist() if hasattr(v, "tolist") else v


def run_agent(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The agent's loop (pyepics): one JSON request per line on ``stdin``, one reply per line."""
    import ctypes
    import getpass

    import epics
    from epics import ca, dbr

    pvs: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    done: dict[int, int] = {}

    def on_put(args: Any) -> None:
        done[int(args.usr)] = int(args.status)

    put_cb = dbr.make_callback(on_put, dbr.event_handler_args)

    def say(obj: dict[str, Any]) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    def rights(name: str) -> dict[str, Any]:
        pv = pvs[name]
        return {"read": bool(pv.read_access), "write": bool(pv.write_access), **counts[name]}

    def channel(name: str, timeout: float) -> Any:
        if name not in pvs:
            c = counts[name] = {"connects": 0, "changes": 0}

            def on_conn(pvname: str | None = None, conn: bool = False, **_: Any) -> None:
                if conn:
                    c["connects"] += 1

            def on_access(read_access: bool, write_access: bool, pv: Any = None) -> None:
                c["changes"] += 1

            pv = epics.PV(name, connection_callback=on_conn, access_callback=on_access,
                          auto_monitor=False)
            pvs[name] = pv
        pv = pvs[name]
        if not pv.wait_for_connection(timeout=timeout):
            raise TimeoutError(f"{name}: not connected in {timeout} s")
        return pv

    def put_with_status(pv: Any, value: Any, timeout: float) -> float:
        chid = pv.chid
        ftype = ca.field_type(chid)
        data = (1 * dbr.Map[ftype])()
        if ftype == dbr.STRING:
            data[0].value = str(value).encode()
        else:
            data[0] = type(data[0])(value) if not isinstance(value, float) else value
        token = len(done) + 1 + int(time.monotonic() * 1e6)
        t0 = time.monotonic()
        lib: Any = ca.libca
        ret = lib.ca_array_put_callback(ftype, 1, chid, data, put_cb, ctypes.py_object(token))
        if ret != dbr.ECA_NORMAL:
            raise RuntimeError(ca.message(ret))
        ca.flush_io()
        deadline = t0 + timeout
        while token not in done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"put to {pv.pvname} not completed in {timeout} s")
            ca.poll(1e-3, 1e-3)
        status = done.pop(token)
        if status != dbr.ECA_NORMAL:
            raise RuntimeError(f"put failed: {ca.message(status)}")
        return time.monotonic() - t0

    say({"ok": True, "value": getpass.getuser()})
    for line in stdin:
        try:
            req = json.loads(line)
            op, name = req["op"], req.get("pv", "")
            timeout = float(req.get("timeout", AGENT_TIMEOUT))
            if op == "connect":
                channel(name, timeout)
                say({"ok": True, "value": rights(name)})
            elif op == "access":
                say({"ok": True, "value": rights(name)})
            elif op == "wait_write":
                pv = channel(name, timeout)
                t0 = time.monotonic()
                while bool(pv.write_access) != bool(req["write"]):
                    if time.monotonic() - t0 > timeout:
                        break
                    ca.poll(1e-3, 1e-3)
                say({"ok": True, "value": {**rights(name), "waited": time.monotonic() - t0}})
            elif op == "get":
                pv = channel(name, timeout)
                v = pv.get(as_string=bool(req.get("as_string")), timeout=timeout,
                           use_monitor=False)
                if hasattr(v, "tolist"):
                    v = v.tolist()
                say({"ok": v is not None, "value": v, "error": "no value"})
            elif op == "put":
                pv = channel(name, timeout)
                if req.get("wait", True):
                    secs = put_with_status(pv, req["value"], timeout)
                else:
                    t0 = time.monotonic()
                    pv.put(req["value"], wait=False)
                    ca.flush_io()
                    secs = time.monotonic() - t0
                say({"ok": True, "value": {"seconds": secs}})
            elif op == "ctrl":
                pv = channel(name, timeout)
                ctrl: dict[str, Any] = {**(pv.get_ctrlvars(timeout=timeout) or {}),
                                        **(pv.get_timevars(timeout=timeout) or {})}
                say({"ok": bool(ctrl), "error": "no control values", "value": {
                    k: _plain(v) for k, v in ctrl.items()
                    if isinstance(v, str | int | float | list | tuple) or hasattr(v, "tolist")}})
            elif op == "connect_many":
                names = [str(n) for n in req["pvs"]]
                chans = [epics.PV(n, auto_monitor=False) for n in names]
                missing = [c.pvname for c in chans if not c.wait_for_connection(timeout)]
                for c in chans:
                    c.disconnect()
                say({"ok": not missing, "value": len(names), "error": f"not connected: {missing}"})
            elif op == "burst":
                pv = channel(name, timeout)
                for _ in range(int(req["count"])):
                    pv.put(req["value"], wait=False)
                ca.flush_io()
                say({"ok": True, "value": int(req["count"])})
            else:
                say({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:
            say({"ok": False, "error": str(e) or type(e).__name__})
    return 0


# --- the walkthrough --------------------------------------------------------------------------


def walkthrough(
    prefix: str,
    pva_env: Mapping[str, str],
    other: CAAgent,
    operator_rpc: Callable[..., dict[str, Any]],
    motor: str = demo.MOTORS[0],
    say: Callable[[str], None] = print,
) -> list[tuple[str, bool]]:
    """The CA bridge's demo steps; returns ``(step, passed)`` for each.

    ``operator_rpc(name, **args)`` calls a coordination RPC as the operator (another account
    than ``other``'s), returning ``{"ok", "value"|"error"}`` (e.g. ``PutAgent.rpc``).

    1. the operator acquires ``motor``; 2. ``other``'s libca client has no write access on the
    setpoint and its put fails; 3. the operator releases; 4. write access appears on the same
    channel and ``other``'s put goes through; 5. ``other`` puts 1 to ``Flat:<motor>:Take`` and
    ``Coord:Locks`` shows it as holder; 6. it releases with ``Flat:<motor>:Release``.
    """
    from p4p.client.thread import Context

    setpoint = demo.motor_setpoint(prefix, motor)
    results: list[tuple[str, bool]] = []

    def step(text: str, ok: bool, detail: str = "") -> None:
        results.append((text, ok))
        say(f"[ca] {'ok  ' if ok else 'FAIL'} {text}{': ' + detail if detail else ''}")

    def holders() -> dict[str, str]:
        with Context("pva", conf=client_conf(pva_env), useenv=False) as c:
            t: Any = current_locks(c, prefix, 5)
            t = t.value
            return dict(zip(t.device, t.owner, strict=True))

    r = other.connect(setpoint)
    step(f"{other.account} connects to {setpoint} over CA", r["ok"], r.get("error", ""))
    if not r["ok"]:
        return results
    r = operator_rpc(COORD_ACQUIRE.name(prefix), device=motor, type="MANUAL_OPERATOR",
                     timeout="120", reason="CA walkthrough")
    step(f"operator acquires {motor}", r["ok"], r.get("error", ""))
    if not r["ok"]:
        return results
    try:
        w = other.wait_write(setpoint, False)
        step(f"{other.account}: no write access on {setpoint} while the operator holds {motor}",
             w["ok"] and not w["value"]["write"], json.dumps(w.get("value", w)))
        r = other.put(setpoint, 1.0)
        step(f"{other.account}'s put to {setpoint} fails", not r["ok"],
             r.get("error", "it went through"))
    finally:
        r = operator_rpc(COORD_RELEASE.name(prefix), device=motor)
        step(f"operator releases {motor}", r["ok"], r.get("error", ""))
    w = other.wait_write(setpoint, True)
    step(f"{other.account}: write access back on the same channel (no reconnect)",
         w["ok"] and w["value"]["write"] and w["value"]["connects"] == 1,
         json.dumps(w.get("value", w)))
    r = other.put(setpoint, 0.0)
    step(f"{other.account}'s put to {setpoint} goes through", r["ok"], r.get("error", ""))
    r = other.put(FLAT_TAKE.name(prefix, motor), 1)
    owner = holders().get(motor, "")
    step(f"{other.account} presses Take ({FLAT_TAKE.name(prefix, motor)}): holder {owner}",
         r["ok"] and owner.startswith(f"{other.account}@"), r.get("error", ""))
    r = other.put(FLAT_RELEASE.name(prefix, motor), 1)
    step(f"{other.account} presses Release", r["ok"] and motor not in holders(),
         r.get("error", ""))
    return results


# --- the demo component -----------------------------------------------------------------------


def _start(ctx: Any) -> None:
    """Start the CA bridge (the softIoc is on the device network if the guard part moved it).

    The bridge serves CA on the clients' CA port (the printed settings) unless the softIoc's
    RSRV is there (no guard part); then on a port of its own (``flat-ca``).
    """
    device_env = getattr(ctx, "device_env", None) or ctx.env
    if "softioc" in ctx.ca_servers:
        env = bridge_env(ctx.env, ctx.port("flat-ca"), ctx.port("flat-ca-repeater"))
    else:
        env = dict(ctx.env)
        ctx.ca_servers.append("flat")
    ctx.files["flat-env"] = env
    argv = python_module("bridges.flat", "--prefix", ctx.prefix, *upstream_args(device_env))
    if ctx.files.get("policy"):
        argv += ["--policy", str(ctx.files["policy"])]
    ctx.start("flat", argv, ctx.server_env("flat", env), ready_pv=FLAT_HEALTH.name(ctx.prefix))
    try:
        wait_for_pv(FLAT_HEALTH.name(ctx.prefix), ctx.env, 60.0, procs=[ctx.procs["flat"]],
                    condition=lambda v: v == "OK")
    except (TimeoutError, RuntimeError) as e:
        from pvcoord.demo.beamline import DemoError

        raise DemoError(f"the CA bridge did not get the registry and lock state: {e}") from None
    p, m1 = ctx.prefix, demo.MOTORS[0]
    ca = " ".join(f"{k}={v}" for k, v in ca_settings(ctx).items())
    ctx.notes.append(f"CA bridge (Channel Access, Phoebus ca://): {ca}")
    ctx.notes.append(
        f"CA: caget {demo.motor_setpoint(p, m1)} {p}Coord:{m1}:State; "
        f"caput -c {demo.motor_setpoint(p, m1)} 1.5; take: caput {FLAT_TAKE.name(p, m1)} 1; "
        f"release: caput {FLAT_RELEASE.name(p, m1)} 1; outcome: caget -S "
        f"{p}Flat:{m1}:Message.VAL$ (pyepics: {PYTHON} -c \"import epics; "
        f"print(epics.caget('{demo.motor_setpoint(p, m1)}'))\")"
    )
    ctx.notes.append(
        f"screens: phoebus -resource '{REPO / 'opi' / 'overview.bob'}?P={p}' with the CA "
        "settings above in Phoebus's preferences (docs/ca.md)"
    )


def ca_settings(ctx: Any) -> dict[str, str]:
    """The ``EPICS_CA_*`` settings a CA client of the demo's bridge needs."""
    env = ctx.files["flat-env"]
    return {"EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_SERVER_PORT": env["EPICS_CA_SERVER_PORT"],
            "EPICS_CA_REPEATER_PORT": env["EPICS_CA_REPEATER_PORT"]}


def _components() -> list[Any]:
    from pvcoord.demo.beamline import Component

    return [Component("flat", _start)]


def __getattr__(name: str) -> Any:
    if name == "COMPONENTS":  # built lazily: beamline imports this module to find it
        return _components()
    raise AttributeError(name)


def run_flat_walkthrough(ctx: Any, stop: Any = None) -> bool:
    """Run :func:`walkthrough` on a started demo: root (PVA agent) and ``nobody`` (libca).

    Needs root and ``runuser`` for the second OS account; otherwise it says so and returns
    False.
    """
    import shutil

    from pvcoord.demo.guard_part import PutAgent

    if os.geteuid() != 0 or shutil.which("runuser") is None:
        ctx.say("[ca] walkthrough needs a second OS account: run the demo as root "
                "(runuser -u nobody); not run")
        return False
    if stop is not None and stop.is_set():
        return False
    env = {**ctx.env, **ca_settings(ctx)}
    with PutAgent(ctx.env) as operator, CAAgent(env, user="nobody") as other:
        results = walkthrough(ctx.prefix, ctx.env, other, operator.rpc, say=ctx.say)
    return bool(results) and all(ok for _step, ok in results)


def main(argv: list[str] | None = None) -> int:
    """``python -m pvcoord.demo.flat_part agent``: run a CA agent on stdin/stdout."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["agent"]:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_agent()


if __name__ == "__main__":
    sys.exit(main())
