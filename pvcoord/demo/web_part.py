"""The PVWS bridge's part of the demo beamline, and its walkthrough step.

- :data:`COMPONENTS`: ``pvcoord demo`` starts ``python -m bridges.pvws`` (writes on, password
  login) on 127.0.0.1. Two demo users, ``alice`` and ``bob``, get passwords generated for this run
  by ``python -m bridges.pvws passwd`` (argon2 hashes in ``RUN/web-passwd``; the plain passwords,
  for the person running the demo, in ``RUN/web-users.txt``, mode 0600). Nothing is fixed in the
  code. The bridge decides every write per web user and then puts **through the guard** (the
  client network, like every other client), as the service account
  :data:`~pvcoord.demo.beamline.WEB_ACCOUNT` (``runuser``). The demo policy names that account
  in ``access.delegates`` for alice and bob only, so the guard lets the bridge's put through to a
  device one of them holds, and refuses it for a device held by anyone else (root, the queue),
  even if the bridge's own decision were wrong (decision 0140). Without that account (the demo
  not run as root, or ``scripts/setup.sh`` not run), the bridge runs as the demo's account and
  writes on the device network (``ctx.device_env``, where the guard part moved the softIoc), as
  before; the banner says so.
- :func:`run_web_walkthrough`: two web users over the bridge's own protocol (websocket + login,
  what the browser uses): A takes ``m1``; B's ``m1`` setpoint turns read-only (the time is said:
  issue 10's 1 s) and B's write is refused naming A; A moves ``m1`` (and, when the bridge writes
  through the guard, the guard's audit shows that put allowed for the bridge's account as A's
  delegate); A releases and B may write.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

from pvcoord.procs import LOOPBACK, client_conf, python_module, wait_until
from pvdb import demo
from pvdb.guard import GUARD_AUDIT

USERS = ("alice", "bob")
"""The demo's web users (their passwords are generated at each start)."""
HTTP_TIMEOUT = 10.0
READONLY_WITHIN = 1.0
"""Seconds within which B's setpoint should turn read-only after A's lock (the issue's 1 s): the
walkthrough says whether this run met it; ``benchmarks/bench_pvws.py`` measures it (p99)."""
STATE_WITHIN = 60.0
"""Seconds the bridge may need to have fresh lock state at the start of the walkthrough."""
AUDIT_WITHIN = 10.0
"""Seconds within which the guard's audit shows a put it let through (its audit is a log tail)."""
REPO = Path(__file__).resolve().parent.parent.parent


def write_users(run_dir: Path) -> tuple[Path, dict[str, str]]:
    """Generate the demo users' passwords: return (password file, user -> password).

    Raises:
        RuntimeError: the ``passwd`` tool failed (its error in the message).
    """
    pw = run_dir / "web-passwd"
    passwords: dict[str, str] = {}
    for user in USERS:
        r = subprocess.run(python_module("bridges.pvws", "passwd", str(pw), user, "--generate"),
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"python -m bridges.pvws passwd failed: {r.stderr.strip()}")
        passwords[user] = r.stdout.strip()
    plain = run_dir / "web-users.txt"
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# demo web users of this run (generated; log in at the bridge URL)\n")
        for user, password in passwords.items():
            f.write(f"{user} {password}\n")
    return pw, passwords


def read_users(path: Path) -> dict[str, str]:
    """User -> password from ``web-users.txt``."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            user, _, password = line.partition(" ")
            out[user] = password
    return out


def _wait_http(url: str, proc: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except OSError:
            if not proc.alive():
                raise RuntimeError(f"the bridge exited:\n{proc.output()}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout} s:\n{proc.output()}") \
                    from None
            time.sleep(0.05)


def web_url(ctx: Any) -> str:
    """The bridge's URL in the demo run ``ctx`` (``http://127.0.0.1:PORT/``)."""
    return f"http://{LOOPBACK}:{ctx.port('web')}/"


def bridge_argv(ctx: Any, port: int, password_file: Path, policy: Path,
                device_network: bool) -> list[str]:
    """Argv of the demo's bridge on ``port`` (writes on, password login, ``alice`` an admin).

    ``device_network``: put on the device network (``--device-conf`` = ``ctx.device_env``) instead
    of through the guard.
    """
    argv = python_module(
        "bridges.pvws", "--prefix", ctx.prefix, "--host", LOOPBACK, "--port", str(port),
        "--writes", "--auth", "password", "--password-file", str(password_file),
        "--policy", str(policy), "--admin", USERS[0],
    )
    dev = ctx.device_env or ctx.env
    if device_network and dev.get("EPICS_PVA_BROADCAST_PORT") != ctx.env.get(
            "EPICS_PVA_BROADCAST_PORT"):
        for key in ("EPICS_PVA_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST",
                    "EPICS_PVA_BROADCAST_PORT"):
            argv += ["--device-conf", f"{key}={dev[key]}"]
    return argv


def start_bridge(ctx: Any, name: str, password_file: Path, policy: Path) -> Any:
    """Start a demo bridge called ``name`` (its port: ``ctx.port(name)``) and wait for its HTTP.

    As :data:`~pvcoord.demo.beamline.WEB_ACCOUNT` writing through the guard when that account can
    be used (``password_file`` is then given to it, mode 0600), else as the demo's account
    writing on the device network (the reason is added to ``ctx.notes``).

    Raises:
        DemoError: the bridge did not answer within the start timeout.
    """
    from pvcoord.demo.beamline import (
        START_TIMEOUT,
        WEB_ACCOUNT,
        DemoError,
        service_account_problem,
    )

    problem = service_account_problem(WEB_ACCOUNT, ctx.run_dir, "bridges.pvws")
    user = None if problem else WEB_ACCOUNT
    if user is not None:
        shutil.chown(password_file, user=user)  # the hashes: readable by the bridge only
    else:
        ctx.notes.append(f"note: {name} runs as {os.environ.get('USER', 'this account')}: "
                         f"{problem}; it writes on the device network, not through the guard")
    argv = bridge_argv(ctx, ctx.port(name), password_file, policy, device_network=user is None)
    # its status PVs' own PVA port; the client network: reads (and writes) through the guard
    proc = ctx.start(name, argv, ctx.server_env(f"{name}-pva"), user=user)
    url = f"http://{LOOPBACK}:{ctx.port(name)}/"
    try:
        _wait_http(url + "pvws/info", proc, START_TIMEOUT)
    except (TimeoutError, RuntimeError) as e:
        raise DemoError(f"{name} did not start: {e}") from None
    return proc


def _start(ctx: Any) -> None:
    from pvcoord.demo.beamline import WEB_ACCOUNT, DemoError

    try:
        pw, _ = write_users(ctx.run_dir)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise DemoError(str(e)) from None
    ctx.files["web-passwd"] = pw
    ctx.files["web-users"] = ctx.run_dir / "web-users.txt"
    start_bridge(ctx, "web", pw, ctx.files["policy"])
    url = web_url(ctx)
    ctx.notes.append(
        f"web: {url} (PVWS websocket {url.replace('http', 'ws')}pvws/pv); log in as "
        f"{' or '.join(USERS)}, passwords generated for this run in {ctx.files['web-users']}"
    )
    if ctx.account_of("web") == WEB_ACCOUNT:
        ctx.notes.append(
            f"web: the bridge runs as {WEB_ACCOUNT} and writes through the guard, which lets "
            f"its puts through as the delegate of {' and '.join(USERS)} only (policy "
            "access.delegates)")


def wait_guard_holder(ctx: Any, pv: str, holder: str, timeout: float = AUDIT_WITHIN) -> str:
    """Wait until the guard's view of ``pv`` (``Guard:WhatIf``) names a holder ``holder...``.

    ``holder`` is a prefix (``alice@``); the holder seen is returned. A put sent before that may
    meet the guard's older view of the locks.

    Raises:
        TimeoutError: not within ``timeout`` seconds (the last holder seen in the message).
    """
    from pvcoord.client import call_rpc
    from pvdb.guard import GUARD_WHAT_IF

    def seen() -> str:
        try:
            return str(call_rpc(GUARD_WHAT_IF.name(ctx.prefix), {"pv": pv}, timeout=HTTP_TIMEOUT,
                                conf=client_conf(ctx.env)).get("holder", ""))
        except Exception as e:  # no answer yet: ask again until the deadline
            return f"({type(e).__name__}: {e})"

    return wait_until(lambda: (h := seen()).startswith(holder) and h, timeout,
                      f"the guard seeing {holder}... hold {pv}", 0.05)


def wait_guard_audit(ctx: Any, pred: Any, timeout: float = AUDIT_WITHIN) -> dict[str, Any]:
    """The first row of the guard's ``Guard:Audit`` for which ``pred(row)`` is true.

    Rows are dicts of :data:`pvdb.guard.AUDIT_COLUMNS` (``action``, ``account``, ``pv``,
    ``holder``, ``message``...); the table is read until such a row appears.

    Raises:
        TimeoutError: no such row within ``timeout`` seconds (the last rows in the message).
    """
    from p4p.client.thread import Context

    from pvdb.guard import AUDIT_COLUMNS

    names = [n for n, _t in AUDIT_COLUMNS]
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with Context("pva", conf=client_conf(ctx.env), useenv=False, nt=False) as c:
        while True:
            try:
                v = cast(Any, c.get(GUARD_AUDIT.name(ctx.prefix), timeout=HTTP_TIMEOUT)).value
                cols = [list(v[n] if v[n] is not None else ()) for n in names]  # empty: None
                rows = [dict(zip(names, r, strict=True)) for r in zip(*cols, strict=True)]
            except (TimeoutError, KeyError) as e:
                rows = [{"error": str(e)}]
            for row in reversed(rows):  # newest first
                if "error" not in row and pred(row):
                    return row
            if time.monotonic() > deadline:
                raise TimeoutError(f"no such row in {GUARD_AUDIT.name(ctx.prefix)} within "
                                   f"{timeout} s; last rows: {rows[-3:]}")
            time.sleep(0.1)


def _components() -> list[Any]:
    from pvcoord.demo.beamline import Component

    return [Component("web", _start)]


def __getattr__(name: str) -> Any:
    if name == "COMPONENTS":  # built lazily: beamline imports this module to find it
        return _components()
    raise AttributeError(name)


# --- walkthrough --------------------------------------------------------------------------------


def _through_the_guard(ctx: Any, pv: str, user: str) -> bool:
    """Say whether the bridge's put to ``pv`` for ``user`` went through the guard as a delegate.

    Only checked when the bridge runs as the delegate account and the guard is part of the run
    (otherwise the bridge writes on the device network, and the demo said so at start).
    """
    from pvcoord.demo.beamline import WEB_ACCOUNT

    if ctx.account_of("web") != WEB_ACCOUNT or "guard" not in ctx.procs:
        ctx.say("[web] (the bridge writes on the device network in this run: no guard check)")
        return True
    try:
        row = wait_guard_audit(ctx, lambda r: r["action"] == "allowed" and r["pv"] == pv
                               and r["account"] == WEB_ACCOUNT
                               and str(r["holder"]).startswith(f"{user}@"))
    except TimeoutError as e:
        ctx.say(f"[web] FAILED: the guard's audit shows no delegate put: {e}")
        return False
    ctx.say(f"[web] through the guard: allowed put {pv} = {row['value']} by "
            f"{row['account']}@{row['host']} holder={row['holder']}: {row['message']}")
    return "delegate" in str(row["message"])


class WebUser:
    """A web user of the bridge at ``base``: logged in, with a websocket (close it with close()).

    Raises:
        RuntimeError: the login was refused.
    """

    def __init__(self, base: str, user: str, password: str) -> None:
        from websockets.sync.client import connect

        self.base, self.user = base, user
        status, body, cookie = _post(base, "/login", {"user": user, "password": password})
        if status != 200:
            raise RuntimeError(f"login of {user} failed: {body}")
        self.cookie = cookie
        ws_url = base.replace("http://", "ws://") + "pvws/pv"
        self._cm = connect(ws_url, additional_headers={"Cookie": cookie},
                           open_timeout=HTTP_TIMEOUT, max_size=None)
        self.ws = self._cm.__enter__()

    def send(self, msg: dict[str, Any]) -> None:
        """Send one PVWS message (a JSON object)."""
        self.ws.send(json.dumps(msg))

    def wait(self, pred: Any, timeout: float) -> dict[str, Any]:
        """The first message received for which ``pred`` is true.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                break
            if pred(m):
                return m
        raise TimeoutError(f"{self.user}: expected message not received in {timeout} s")

    def lock(self, action: str, device: str) -> tuple[int, dict[str, Any]]:
        """``POST /api/lock`` (``action`` take or release): ``(HTTP status, JSON body)``."""
        status, body, _ = _post(self.base, "/api/lock", {"action": action, "device": device},
                                self.cookie)
        return status, body

    def close(self) -> None:
        """Close the websocket."""
        self._cm.__exit__(None, None, None)


def _post(base: str, path: str, body: Any, cookie: str = "") -> tuple[int, Any, str]:
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    req = urllib.request.Request(base.rstrip("/") + path, data=json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
            got = ""
            for v in r.headers.get_all("Set-Cookie") or []:
                got = v.split(";", 1)[0]
            return r.status, json.loads(r.read()), got
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), ""


def run_web_walkthrough(ctx: Any, stop: Any = None) -> bool:
    """Two web users on the started demo's bridge; return whether every step behaved."""
    if "web" not in ctx.procs:
        ctx.say("[web] the bridge is not part of this demo run")
        return False
    base = web_url(ctx)
    users = read_users(ctx.files["web-users"])
    m1 = demo.MOTORS[0]
    sp = f"pva://{demo.motor_setpoint(ctx.prefix, m1)}"
    a_name, b_name = USERS
    a = b = None
    try:
        a, b = WebUser(base, a_name, users[a_name]), WebUser(base, b_name, users[b_name])
        for w in (a, b):
            w.send({"type": "subscribe", "pvs": [sp]})
            # m1 is free: writable for both once the bridge has fresh lock state (after the
            # coordination IOC's restart in an earlier step, PVA may take seconds to reconnect)
            w.wait(lambda m: m.get("pv") == sp and m.get("readonly") is False, STATE_WITHIN)
        ctx.say(f"[web] {a_name} takes {m1} (POST /api/lock)")
        t0 = time.monotonic()
        status, body = a.lock("take", m1)
        if status != 200:
            ctx.say(f"[web] FAILED: {a_name} could not take {m1}: {body}")
            return False
        # the wait is generous (a loaded machine); the figure is said, not judged: a timing
        # target is a benchmark's job, never a pass/fail of the walkthrough
        flip = b.wait(lambda m: m.get("pv") == sp and m.get("readonly") is True, HTTP_TIMEOUT)
        dt = time.monotonic() - t0
        within = "within" if dt <= READONLY_WITHIN else "NOT within (a loaded machine?)"
        ctx.say(f"[web] {b_name}'s {m1} setpoint read-only {dt * 1000:.0f} ms after the take, "
                f"{within} the {READONLY_WITHIN:g} s of the web issue: "
                f"{flip.get('readonly_reason', '')}")
        ok = True
        b.send({"type": "write", "pv": sp, "value": 3.0})
        err = b.wait(lambda m: m.get("type") == "error", HTTP_TIMEOUT)
        ctx.say(f"[web] {b_name}'s write refused: [{err.get('code')}] {err.get('message')}")
        ok = ok and err.get("code") == "holder-conflict" and \
            str(err.get("holder", "")).startswith(f"{a_name}@")
        if "guard" in ctx.procs:  # the put goes through the guard: it must see the lock first
            wait_guard_holder(ctx, demo.motor_setpoint(ctx.prefix, m1), f"{a_name}@")
        a.send({"type": "write", "pv": sp, "value": 2.5})
        a.wait(lambda m: m.get("pv") == sp and m.get("value") == 2.5, HTTP_TIMEOUT)
        ctx.say(f"[web] {a_name} moved {m1} to 2.5")
        ok = _through_the_guard(ctx, demo.motor_setpoint(ctx.prefix, m1), a_name) and ok
        status, body = a.lock("release", m1)
        ok = ok and status == 200
        b.wait(lambda m: m.get("pv") == sp and m.get("readonly") is False, HTTP_TIMEOUT)
        b.send({"type": "write", "pv": sp, "value": 0.0})
        b.wait(lambda m: m.get("pv") == sp and m.get("value") == 0.0, HTTP_TIMEOUT)
        ctx.say(f"[web] {a_name} released {m1}; {b_name} may write: moved it to 0.0")
        return ok
    except (TimeoutError, RuntimeError, OSError) as e:
        ctx.say(f"[web] FAILED: {e}")
        return False
    finally:
        for w in (a, b):
            if w is not None:
                w.close()
