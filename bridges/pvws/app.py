"""The bridge's aiohttp application: ``make_app(config)``.

Routes (``docs/web.md`` has the table): the PVWS websocket ``/pvws/pv`` and its HTTP endpoints
(``/pvws/info``, ``/pvws/summary``, ``/pvws/socket``, ``/pvws/pool``), login (``/login``,
``/logout``, ``/whoami``), locks for web users (``/api/lock``), the write audit tail
(``/pvws/audit``), extension modules of the web client (``bridges.pvws.names``,
``bridges.pvws.rpc``) and the web client's static files at ``/``.

State lives in the app (typed ``web.AppKey``s); p4p contexts and the lock view are opened in a
``cleanup_ctx`` and closed with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import mimetypes
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from p4p.client.asyncio import Context, RemoteError
from p4p.nt import NTURI

from pvdb.catalog import all_specs
from pvdb.demo import SERVER as DEMO_SERVER
from pvdb.lockmodel import new_request_id, parse_error_text
from pvdb.models import BEAMLINE, LockType
from pvdb.names import COORD_ACQUIRE, COORD_RELEASE, COORD_RENEW, REQUEST_ID_ARG
from pvdb.policy import Policy, load_policy

from ..guard.decision import Decision, Verdict, decide
from ..lockview import LockView, Snapshot
from .auth import COOKIE, USER_RE, PasswordFileError, Sessions, check_password
from .cawrite import CaWriteError, CaWriter, device_ca_env
from .config import BridgeConfig, PVNameError, parse_name
from .pool import LocUpstream, Pool, SimUpstream, Upstream
from .session import Sender, Socket, Sub
from .status import StatusPVs

log = logging.getLogger("bridges.pvws")
audit_log = logging.getLogger("bridges.pvws.audit")

EXTENSIONS = ("bridges.pvws.names", "bridges.pvws.rpc")
"""Modules of the web client whose ``setup(app)`` adds routes, when they exist."""
AUDIT_TAIL = 1000
"""Web writes kept in memory for ``/pvws/audit``."""
RPC_TIMEOUT = 10.0
"""Seconds a coordination RPC (``/api/lock``) may take."""
MAX_BODY = 64 * 1024
"""Largest accepted HTTP request body, bytes."""
LOGIN_SLOTS = 2
"""Password checks (argon2, ~50 ms of CPU each) that may run at the same time."""
LOGIN_PENALTY = 1.0
"""Seconds a refused login waits before its answer (slows password guessing)."""


@dataclass
class AuditRecord:
    """One web write (allowed or refused)."""

    time: float
    user: str
    host: str
    pv: str
    value: Any
    allowed: bool
    verdict: str
    device: str = ""
    holder: str = ""
    message: str = ""


@dataclass
class BridgeState:
    """Everything the bridge knows at run time (one per app)."""

    config: BridgeConfig
    policy: Policy
    service_prefixes: tuple[str, ...]
    sessions: Sessions
    started: float = field(default_factory=time.time)
    sockets: dict[int, Socket] = field(default_factory=dict)
    pool: Pool | None = None
    sender: Sender | None = None
    read_ctx: Context | None = None
    device_ctx: Context | None = None
    view: LockView | None = None
    ca_ctx: Any = None
    ca_writer: CaWriter | None = None
    snapshot: Snapshot | None = None
    decisions: dict[tuple[str, str], Decision] = field(default_factory=dict)
    audit: deque[AuditRecord] = field(default_factory=lambda: deque(maxlen=AUDIT_TAIL))
    lock_changes: int = 0
    login_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LOGIN_SLOTS))

    # --- the may-write decision for one web user --------------------------------------------

    def is_service(self, name: str) -> bool:
        """Whether ``name`` is one of pvcoord's own PVs (never written through the bridge)."""
        return name.startswith(self.service_prefixes)

    def decision(self, user: str, name: str) -> Decision:
        """:func:`bridges.guard.decision.decide` for web user ``user`` on PV ``name``.

        Cached until the lock state or registry changes.
        """
        key = (user, name)
        d = self.decisions.get(key)
        if d is None:
            snap = self.snapshot
            if snap is None:
                d = Decision(False, Verdict.UNKNOWN_STATE,
                             "lock state not received yet: writes are refused (fail closed)")
            else:
                d = decide(self.policy, snap.state, snap.devices, name, user)
            self.decisions[key] = d
        return d

    def readonly(self, user: str | None, up: Upstream) -> tuple[bool, str]:
        """``(readonly, reason)`` of channel ``up`` for web user ``user`` right now."""
        if isinstance(up, SimUpstream):
            return True, "sim:// channels are read-only"
        if not self.config.writes:
            return True, "write support is off on this bridge"
        if user is None:
            return True, "log in to write"
        if isinstance(up, LocUpstream):
            return False, ""
        name = up.pvname.name
        if self.is_service(name):
            return True, f"{name} is a pvcoord service PV: not written through the web bridge"
        d = self.decision(user, name)
        return (False, "") if d.allowed else (True, d.reason)

    def on_snapshot(self, snap: Snapshot) -> None:
        """The lock view changed (event loop thread): re-decide, push ``readonly`` flips."""
        self.snapshot = snap
        self.decisions.clear()
        self.lock_changes += 1
        for sock in list(self.sockets.values()):
            sock.access_changed()

    def record(self, rec: AuditRecord) -> None:
        """Audit one web write (log line + in-memory tail)."""
        self.audit.append(rec)
        audit_log.info("%s", json.dumps(rec.__dict__, default=str))


CONFIG = web.AppKey("config", BridgeConfig)
"""The app's :class:`BridgeConfig`."""
STATE = web.AppKey("state", BridgeState)
"""The app's :class:`BridgeState`."""
PVA = web.AppKey("pva", Context)
"""An asyncio p4p client context for pvcoord's services (RPCs; opened in cleanup_ctx)."""


def writes_enabled(config: BridgeConfig) -> bool:
    """Whether the bridge was started with write support."""
    return config.writes


def _error(status: int, code: str, message: str, holder: str = "") -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "holder": holder}}, status=status
    )


def _peer_host(request: web.Request) -> str:
    return request.remote or ""


async def web_user(request: web.Request) -> str | None:
    """The web user of ``request``, or None.

    From the session cookie (``auth = password``), or the reverse proxy's header when the
    request comes from a trusted proxy (``auth = header``).
    """
    cfg = request.app[CONFIG]
    if cfg.auth == "password":
        return request.app[STATE].sessions.user(request.cookies.get(COOKIE))
    if cfg.auth == "header":
        if _peer_host(request) not in cfg.trusted_proxies:
            return None
        user = request.headers.get(cfg.user_header, "").strip()
        return user if USER_RE.match(user) else None
    return None


def service_prefixes(prefix: str, registry_prefix: str) -> tuple[str, ...]:
    """Name prefixes of pvcoord's own PVs (every pvdb family but the demo devices)."""
    segments = {s.suffix.split(":", 1)[0] + ":" for s in all_specs() if s.server != DEMO_SERVER}
    return tuple(sorted({p + seg for p in {prefix, registry_prefix} for seg in segments}))


# --- HTTP handlers ------------------------------------------------------------------------------


async def _json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ValueError(f"body larger than {MAX_BODY} bytes")
    text = await request.text()
    if len(text) > MAX_BODY:
        raise ValueError(f"body larger than {MAX_BODY} bytes")
    return json.loads(text) if text.strip() else {}


async def login(request: web.Request) -> web.Response:
    """``POST /login``: form or JSON ``user``, ``password`` -> session cookie."""
    cfg, st = request.app[CONFIG], request.app[STATE]
    if cfg.auth != "password":
        return _error(404, "login-disabled", f"this bridge identifies users by {cfg.auth!r}, "
                      "not by password login")
    try:
        if request.content_type == "application/json":
            body = await _json_body(request)
        else:
            body = dict(await request.post())
    except (ValueError, RecursionError) as e:
        return _error(400, "bad-request", f"login body: {e}")
    if not isinstance(body, dict):
        return _error(400, "bad-request", "login body must be an object with user and password")
    user, password = body.get("user"), body.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or len(password) > 1024:
        return _error(400, "bad-request", "give user and password as strings")
    assert cfg.password_file is not None
    try:
        async with st.login_slots:  # argon2 costs CPU: at most LOGIN_SLOTS checks at once
            ok = USER_RE.match(user) is not None and await asyncio.get_running_loop(
                ).run_in_executor(None, check_password, cfg.password_file, user, password)
    except PasswordFileError as e:
        log.error("password file: %s", e)
        return _error(502, "password-file", "the bridge's password file is unusable")
    if not ok:
        log.info("login refused for %r from %s", user[:64], _peer_host(request))
        await asyncio.sleep(LOGIN_PENALTY)  # a penalty for guessing, not a readiness wait
        return _error(401, "bad-login", "unknown user or wrong password")
    token = st.sessions.create(user, _peer_host(request))
    log.info("login %s from %s", user, _peer_host(request))
    resp = web.json_response({"user": user, "writes": cfg.writes})
    resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=cfg.secure_cookies,
                    max_age=int(cfg.session_hours * 3600), path="/")
    return resp


async def logout(request: web.Request) -> web.Response:
    """``POST /logout``: end the session."""
    request.app[STATE].sessions.drop(request.cookies.get(COOKIE))
    resp = web.json_response({"user": None})
    resp.del_cookie(COOKIE, path="/")
    return resp


async def whoami(request: web.Request) -> web.Response:
    """``GET /whoami``."""
    cfg = request.app[CONFIG]
    user = await web_user(request)
    return web.json_response({
        "user": user, "auth": cfg.auth, "writes": bool(cfg.writes and user),
        "prefix": cfg.prefix, "throttle_ms": round(cfg.throttle * 1000),
        "admin": bool(user and user in cfg.admins),
    })


_LOCK_ACTIONS = {"take": COORD_ACQUIRE, "release": COORD_RELEASE, "renew": COORD_RENEW}


def _code_of(message: str) -> tuple[str, str, str]:
    """(code, holder, sentence) of a coordination IOC error (``[code holder=...] sentence``).

    The code is ``refused`` for a text without a head (:func:`pvdb.lockmodel.parse_error_text`).
    """
    parsed = parse_error_text(message)
    return (parsed.code.value if parsed.code else "refused"), parsed.holder, parsed.message


async def lock(request: web.Request) -> web.Response:
    """``POST /api/lock``: take / release / renew a MANUAL_OPERATOR lock for the web user."""
    cfg, st = request.app[CONFIG], request.app[STATE]
    user = await web_user(request)
    if user is None:
        return _error(401, "not-logged-in", "log in to take or release locks")
    if not cfg.writes:
        return _error(403, "writes-disabled", "this bridge runs without write support")
    try:
        body = await _json_body(request)
    except (ValueError, RecursionError) as e:
        return _error(400, "bad-request", str(e))
    if not isinstance(body, dict):
        return _error(400, "bad-request", "body must be a JSON object")
    action, device = body.get("action"), body.get("device")
    if action not in _LOCK_ACTIONS:
        return _error(400, "bad-request", "action must be take, release or renew")
    known = st.snapshot.device_names if st.snapshot else []
    if not isinstance(device, str) or (device not in known and device != BEAMLINE):
        return _error(404, "unknown-device", f"{str(device)[:60]!r} is not a registered device")
    args = {"device": device, "onBehalfOf": user, "clientHost": _peer_host(request) or "web"}
    timeout = body.get("timeout")
    if timeout is not None and action != "release":
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            return _error(400, "bad-request", "timeout must be a positive number of seconds")
        args["timeout"] = str(float(timeout))
    if action == "take":
        args["type"] = LockType.MANUAL_OPERATOR.value
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 200:
            return _error(400, "bad-request", "reason must be a string of at most 200 characters")
        if reason:
            args["reason"] = reason
    spec = _LOCK_ACTIONS[action]
    pv = spec.name(cfg.prefix)
    args[REQUEST_ID_ARG] = new_request_id()  # a PVA re-send after a lost reply: answered
    uri = NTURI([(k, "s") for k in args]).wrap(pv, kws=args)
    try:
        reply = await asyncio.wait_for(request.app[PVA].rpc(pv, uri), RPC_TIMEOUT)
    except RemoteError as e:
        code, holder, msg = _code_of(str(e))
        if not holder and st.snapshot is not None:
            held = st.snapshot.state.locks_on(device)
            holder = held[0].holder if held else ""
        log.info("web user %s: %s %s refused: %s", user, action, device, str(e))
        if code == "refused" and holder:
            code = "holder-conflict"
        return _error(409, code, msg, holder)
    except TimeoutError:
        return _error(502, "coordination-unavailable", f"{pv} did not answer in {RPC_TIMEOUT} s")
    out: dict[str, Any] = {"ok": True, "action": action, "device": device}
    with contextlib.suppress(AttributeError, KeyError, TypeError):
        d = reply.todict()
        out["expires"] = float(d.get("expires", 0.0))
        out["message"] = str(d.get("message", ""))
    log.info("web user %s: %s %s", user, action, device)
    return web.json_response(out)


async def info(request: web.Request) -> web.Response:
    """``GET /pvws/info`` (no environment dump)."""
    st = request.app[STATE]
    return web.json_response({
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.started)),
        "server": "pvcoord PVWS bridge", "python": sys.version.split()[0],
        "throttle_ms": round(st.config.throttle * 1000), "writes": st.config.writes,
        "auth": st.config.auth, "default_type": st.config.default_scheme,
        "lock_state": _lock_state(st),
    })


def _lock_state(st: BridgeState) -> str:
    """'OK' when the bridge has fresh lock state and the registry map, else why not."""
    snap = st.snapshot
    if snap is None:
        return "lock state not received yet"
    if not snap.state.known:
        return snap.state.why_unknown
    if not snap.devices.known:
        return snap.devices.why_unknown
    return "OK"


async def summary(request: web.Request) -> web.Response:
    """``GET /pvws/summary``: one entry per socket."""
    st = request.app[STATE]
    return web.json_response({"sockets": [s.summary() for s in st.sockets.values()],
                              "lock_changes": st.lock_changes})


async def sockets(request: web.Request) -> web.Response:
    """``GET /pvws/socket``: every socket's PV list."""
    st = request.app[STATE]
    return web.json_response([{"id": str(s.id), "pvs": sorted(s.subs)}
                              for s in st.sockets.values()])


def _socket_of(request: web.Request) -> Socket | None:
    try:
        return request.app[STATE].sockets.get(int(request.match_info["id"]))
    except ValueError:
        return None


async def socket_get(request: web.Request) -> web.Response:
    """``GET /pvws/socket/{id}``."""
    s = _socket_of(request)
    if s is None:
        return _error(404, "unknown-socket", "no such socket")
    return web.json_response({"id": str(s.id), "pvs": sorted(s.subs)})


async def socket_delete(request: web.Request) -> web.Response:
    """``DELETE /pvws/socket/{id}``: close a socket (bridge administrators only)."""
    cfg = request.app[CONFIG]
    user = await web_user(request)
    if user is None or user not in cfg.admins:
        return _error(403, "not-admin", "only the bridge's administrators may close sockets")
    s = _socket_of(request)
    if s is None:
        return _error(404, "unknown-socket", "no such socket")
    log.info("administrator %s closes socket %s", user, s.id)
    await s.ws.close()
    return web.json_response({"closed": str(s.id)})


async def pool(request: web.Request) -> web.Response:
    """``GET /pvws/pool``: ``[{refs, pv}]``."""
    st = request.app[STATE]
    chans = st.pool.channels.values() if st.pool else []
    return web.json_response([{"refs": len(up.subs), "pv": up.key} for up in chans])


async def audit(request: web.Request) -> web.Response:
    """``GET /pvws/audit``: the last web writes (allowed and refused), oldest first."""
    st = request.app[STATE]
    return web.json_response([r.__dict__ for r in st.audit])


def _serve_file(root: Path, rel: str) -> web.StreamResponse:
    """A file under ``root`` (no directory listing, nothing outside ``root``)."""
    try:
        path = (root / (rel or "index.html")).resolve()
    except (OSError, ValueError):
        raise web.HTTPNotFound() from None
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound()
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix in (".js", ".mjs"):
        ctype = "text/javascript"
    return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})


# --- the websocket ------------------------------------------------------------------------------


class Protocol:
    """Handles the client messages of one socket (PVWS types plus ``device``)."""

    def __init__(self, st: BridgeState, sock: Socket) -> None:
        self.st = st
        self.sock = sock
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, text: str) -> None:
        """One text frame."""
        sock = self.sock
        sock.last_client_message = time.time()
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError) as e:
            sock.error("bad-json", f"not JSON: {str(e)[:100]}")
            return
        if not isinstance(msg, dict):
            sock.error("bad-message", "a message must be a JSON object with a 'type'")
            return
        kind = msg.get("type")
        if kind in ("subscribe", "monitor"):
            self.subscribe(msg.get("pvs"))
        elif kind == "clear":
            self.clear(msg.get("pvs"))
        elif kind == "list":
            sock.send_control({"type": "list", "pvs": list(sock.subs)})
        elif kind == "write":
            self.write(msg)
        elif kind == "ping":
            with contextlib.suppress(ConnectionError, RuntimeError):
                await sock.ws.ping()
        elif kind == "echo":
            sock.send_text(text)
        elif kind == "device":
            self.devices(msg.get("devices"))
        else:
            sock.error("unknown-type", f"unknown message type {str(kind)[:40]!r}; known: "
                       "subscribe, monitor, clear, list, write, ping, echo, device")

    def _names(self, pvs: Any) -> list[Any] | None:
        if not isinstance(pvs, list):
            self.sock.error("bad-message", "'pvs' must be a list of PV names")
            return None
        return pvs

    def subscribe(self, pvs: Any) -> None:
        """Start each name not yet subscribed on this socket."""
        names = self._names(pvs)
        if names is None:
            return
        sock, st = self.sock, self.st
        assert st.pool is not None
        for text in names:
            if isinstance(text, str) and text in sock.subs:
                continue
            try:
                pvname = parse_name(text, st.config.default_scheme)
            except PVNameError as e:
                sock.error(e.code, str(e), pv=text if isinstance(text, str) else "")
                continue
            if len(sock.subs) >= st.config.max_pvs:
                sock.error("too-many-pvs", f"this socket has {len(sock.subs)} PVs, the most one "
                           f"socket may subscribe is {st.config.max_pvs}", pv=text)
                return
            if (pvname.key not in st.pool.channels
                    and len(st.pool.channels) >= st.config.max_channels):
                sock.error("too-many-channels", f"the bridge holds {len(st.pool.channels)} "
                           "channels, its limit: only PVs already open can be subscribed now",
                           pv=text)
                continue
            sub = Sub(sock, text)
            sock.subs[text] = sub
            up = st.pool.acquire(pvname, sub)
            if up.conv is not None:
                sock.updated(sub)

    def clear(self, pvs: Any) -> None:
        """Stop each name."""
        names = self._names(pvs)
        if names is None:
            return
        assert self.st.pool is not None
        for text in names:
            if not isinstance(text, str):
                continue
            sub = self.sock.drop_sub(text)
            if sub is not None and sub.up is not None:
                self.st.pool.release(sub.up, sub)

    def devices(self, devices: Any) -> None:
        """``{"type": "device", "devices": [...]}``: describe and subscribe each device's PVs."""
        if not isinstance(devices, list):
            self.sock.error("bad-message", "'devices' must be a list of device names")
            return
        snap = self.st.snapshot
        rows = {r.name: r for r in snap.rows} if snap else {}
        for name in devices:
            if not isinstance(name, str) or name not in rows or snap is None:
                self.sock.error("unknown-device",
                                f"{str(name)[:60]!r} is not a registered device"
                                + ("" if snap else " (registry not received yet)"),
                                device=name if isinstance(name, str) else "")
                continue
            row = rows[name]
            pvs = [f"pva://{pv}" for pv in snap.pvs.get(name, ())]
            self.sock.send_control({
                "type": "device", "device": name, "deviceClass": row.device_class,
                "capabilities": row.capabilities, "description": row.description,
                "ioc": row.ioc, "connected": row.connected, "pvs": pvs,
            })
            self.subscribe(pvs)

    def write(self, msg: dict[str, Any]) -> None:
        """``{"type": "write", "pv", "value"}``: decide for this user, then put."""
        sock, st, cfg = self.sock, self.st, self.st.config
        pv, value = msg.get("pv"), msg.get("value")
        if not isinstance(pv, str) or pv not in sock.subs:
            sock.error("not-subscribed", "write only to a PV subscribed on this socket",
                       pv=pv if isinstance(pv, str) else "")
            return
        if not cfg.writes:
            sock.error("writes-disabled", "this bridge runs without write support", pv=pv)
            return
        if sock.user is None:
            sock.error("not-logged-in", "log in to write", pv=pv)
            return
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float | str) or (isinstance(value, str)
                                                          and len(value) > 10000):
            sock.error("bad-value", "value must be a number or a string (at most 10000 chars)",
                       pv=pv)
            return
        up = sock.subs[pv].up
        assert up is not None
        if isinstance(up, SimUpstream):
            sock.error("read-only", f"{pv} is a sim:// channel: read-only", pv=pv)
            return
        if isinstance(up, LocUpstream):
            try:
                up.write(value)
            except ValueError:
                sock.error("bad-value", f"{pv} holds a number; {str(value)[:40]!r} is not one",
                           pv=pv)
            return
        name = up.pvname.name
        rec = AuditRecord(time.time(), sock.user, sock.host, name, value, False, "")
        if st.is_service(name):
            rec.verdict, rec.message = "service-pv", "pvcoord service PV"
            st.record(rec)
            sock.error("not-writable", f"{name} is a pvcoord service PV: use the lock and queue "
                       "calls, not a write", pv=pv)
            return
        d = st.decision(sock.user, name)
        rec.verdict, rec.device, rec.holder, rec.message = d.verdict.value, d.device, d.holder, \
            d.reason
        if not d.allowed:
            st.record(rec)
            code = {Verdict.HELD_BY_OTHER: "holder-conflict",
                    Verdict.UNKNOWN_STATE: "lock-state-unknown",
                    Verdict.STRICT: "not-holder", Verdict.NOT_A_DEVICE: "not-allowed"}.get(
                        d.verdict, "not-allowed")
            sock.error(code, d.reason, pv=pv, holder=d.holder, device=d.device)
            return
        conv = up.conv
        try:
            put_value = _put_value(value, conv.numeric if conv else False,
                                   conv.labels if conv else (), conv.vtype if conv else "")
        except ValueError as e:
            rec.verdict, rec.message = "bad-value", str(e)
            st.record(rec)
            sock.error("bad-value", f"{pv}: {e}", pv=pv)
            return
        task = asyncio.get_running_loop().create_task(
            self._put(pv, name, put_value, rec, ca=up.pvname.scheme == "ca"))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _put(self, pv: str, name: str, value: Any, rec: AuditRecord, ca: bool = False
                   ) -> None:
        """Carry out a decided write on the device network.

        A ``ca://`` name over Channel Access when the bridge has ``device_ca_conf``, everything
        else over PVA.
        """
        st = self.st
        assert st.device_ctx is not None
        try:
            if ca and st.ca_writer is not None:
                await st.ca_writer.put(name, value)
            else:
                await asyncio.wait_for(st.device_ctx.put(name, value, get=False),
                                       st.config.put_timeout)
        except CaWriteError as e:
            rec.message = f"put failed: {e}"
            st.record(rec)
            self.sock.error("put-failed", f"{name}: {e}", pv=pv)
            return
        except (RemoteError, TimeoutError, ValueError, TypeError) as e:
            rec.message = f"put failed: {e or type(e).__name__}"
            st.record(rec)
            self.sock.error("put-failed", f"{name}: {e or type(e).__name__}", pv=pv)
            return
        rec.allowed = True
        st.record(rec)


def _put_value(value: float | int | str, numeric: bool, labels: tuple[str, ...],
               vtype: str) -> Any:
    """Convert a PVWS write value for the channel (text ``"42"`` for a number, label for enum).

    Raises:
        ValueError: a text that is not a number/label, a write to an array or table.
    """
    if vtype.endswith("Array") or vtype == "VTable":
        raise ValueError(f"writes to {vtype} PVs are not supported")
    if labels and isinstance(value, str):
        if value in labels:
            return labels.index(value)
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{value[:40]!r} is none of {', '.join(labels)}") from None
    if numeric and isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not a number") from None
        return int(f) if vtype in ("VLong", "VInt", "VShort", "VByte", "VULong", "VUInt",
                                   "VUShort", "VUByte") and f.is_integer() else f
    if vtype == "VString" and not isinstance(value, str):
        return str(value)
    return value


async def pv_socket(request: web.Request) -> web.StreamResponse:
    """``/pvws/pv``: the PVWS websocket."""
    st = request.app[STATE]
    cfg = st.config
    if len(st.sockets) >= cfg.max_sockets:
        return _error(503, "too-many-sockets",
                      f"the bridge has {len(st.sockets)} websockets open, its limit")
    ws = web.WebSocketResponse(max_msg_size=cfg.max_message)
    await ws.prepare(request)
    user = await web_user(request)
    origin = request.headers.get("Origin", "")
    if user is not None and origin and urlsplit(origin).netloc != request.host:
        # another site's page opened this socket with the user's cookie: reads only
        log.warning("socket from origin %s for %s: not as %s (read-only)", origin[:80],
                    request.host, user)
        user = None
    assert st.sender is not None
    sock = Socket(ws, user, _peer_host(request), cfg.throttle, cfg.queue_size, st.readonly,
                  st.sender)
    if request.transport is not None:
        sock.tcp_socket = request.transport.get_extra_info("socket")
        sock.transport = request.transport
    proto = Protocol(st, sock)
    st.sockets[sock.id] = sock
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    await proto.handle(msg.data)
                except Exception as e:  # the socket must survive any message
                    log.exception("socket %s: message failed", sock.id)
                    sock.error("internal", f"message failed: {type(e).__name__}")
            elif msg.type == WSMsgType.BINARY:
                sock.error("bad-message", "binary frames are not understood: send JSON text")
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        sock.close()
        st.sockets.pop(sock.id, None)
        assert st.pool is not None
        for pv in list(sock.subs):
            sub = sock.drop_sub(pv)
            if sub is not None and sub.up is not None:
                st.pool.release(sub.up, sub)
        for t in list(proto.tasks):
            t.cancel()
    return ws


# --- the app ------------------------------------------------------------------------------------


def _ctx(conf: dict[str, str] | None, nt: bool) -> Context:
    kw: dict[str, Any] = {} if nt else {"nt": False}
    if conf is None:
        return Context("pva", **kw)
    return Context("pva", conf=conf, useenv=False, **kw)


async def _contexts(app: web.Application) -> AsyncIterator[None]:
    st, cfg = app[STATE], app[CONFIG]
    loop = asyncio.get_running_loop()
    st.read_ctx = _ctx(cfg.client_conf, nt=False)
    svc = _ctx(cfg.client_conf, nt=True)
    app[PVA] = svc
    st.device_ctx = _ctx(cfg.device_conf if cfg.device_conf is not None else cfg.client_conf,
                         nt=True)
    if cfg.device_ca_conf is not None:
        st.ca_writer = CaWriter(device_ca_env(cfg.device_ca_conf), cfg.put_timeout)

    def ca_ctx() -> Any:
        if st.ca_ctx is None:
            from caproto.asyncio.client import Context as CaContext

            st.ca_ctx = CaContext()
        return st.ca_ctx

    st.pool = Pool(lambda: st.read_ctx,  # type: ignore[arg-type,return-value]
                   ca_ctx if cfg.ca_via == "ca" else None)
    st.sender = Sender()
    st.sender.start()
    view = LockView(cfg.prefix, cfg.registry_prefix, conf=cfg.client_conf)

    def on_change(snap: Snapshot) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            loop.call_soon_threadsafe(st.on_snapshot, snap)

    view.listeners.append(on_change)
    view.start()
    st.view = view
    status = StatusPVs(cfg.prefix, cfg.status_conf) if cfg.status_pvs else None
    if status is not None:
        status.start()
    try:
        yield
    finally:
        if status is not None:
            await status.close()
        for sock in list(st.sockets.values()):
            with contextlib.suppress(Exception):
                await sock.ws.close()
        st.pool.close()
        await st.sender.stop()
        if st.ca_ctx is not None:
            from .ca import close_context

            await close_context(st.ca_ctx)
        if st.ca_writer is not None:
            await st.ca_writer.close()
        await loop.run_in_executor(None, view.close)
        for c in (st.read_ctx, svc, st.device_ctx):
            c.close()


def make_app(config: BridgeConfig) -> web.Application:
    """Build the bridge's aiohttp application for ``config``.

    Raises:
        pvdb.policy.PolicyError: the policy file is unusable.
    """
    policy = load_policy(config.policy)
    app = web.Application(client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[STATE] = BridgeState(config, policy,
                             service_prefixes(config.prefix, config.registry_prefix),
                             Sessions(config.session_hours * 3600))
    app.cleanup_ctx.append(_contexts)
    r = app.router
    r.add_get("/pvws/pv", pv_socket)
    r.add_get("/pvws/info", info)
    r.add_get("/pvws/summary", summary)
    r.add_get("/pvws/socket", sockets)
    r.add_get("/pvws/socket/{id}", socket_get)
    r.add_delete("/pvws/socket/{id}", socket_delete)
    r.add_get("/pvws/pool", pool)
    r.add_get("/pvws/audit", audit)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/whoami", whoami)
    r.add_post("/api/lock", lock)
    root = config.static_dir.resolve()

    async def static(request: web.Request) -> web.StreamResponse:
        return _serve_file(root, request.match_info.get("path", ""))

    async def pvws_js(request: web.Request) -> web.StreamResponse:
        return _serve_file(root, request.match_info["name"])

    r.add_get("/pvws/js/{name}", pvws_js)  # DBWR loads pvws.js (and base64.js) from here
    for mod in EXTENSIONS:
        try:
            ext = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        ext.setup(app)
    r.add_get("/{path:.*}", static)
    return app
