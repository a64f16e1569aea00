"""Helpers for the PVWS bridge tests: a beamline of real processes and a websocket client."""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from pvcoord.demo import devices
from pvcoord.demo.guard_part import start_guard
from pvcoord.procs import (
    LOOPBACK,
    ManagedProcess,
    free_port,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
)
from pvdb import demo
from pvdb.guard import GUARD_HEALTH
from pvdb.names import COORD_HEALTH, COORD_LOCKS, REGISTRY_DEVICE_PVS

REPO = Path(__file__).resolve().parent.parent
P = "TST:"
TIMEOUT = 10.0
MANY = 1000
BIG = 100_000
"""Elements of the big waveform (800 kB per update) that fills a slow client's TCP buffer."""

POLICY = """
[access]
unlocked_writable = true
trusted_services = ["root"]
force_release = ["root"]
emergency = ["root"]

[lock_types.MAINTENANCE]
allow = ["root"]

[lock_types.MANUAL_OPERATOR]
allow = ["*"]
"""

ARRAYS = {"DOUBLE": "b64dbl", "FLOAT": "b64flt", "SHORT": "b64srt", "LONG": "b64int",
          "CHAR": "b64byt", "UCHAR": "b64byt"}


def types_db() -> str:
    """Records of every kind an update can carry (served on the client network)."""
    out = [
        f'record(ai, "{P}t:ai") {{ field(EGU, "mm") field(PREC, "3") field(DESC, "test ai")'
        ' field(HOPR, "10") field(LOPR, "-10") field(HIHI, "9") field(HIGH, "8")'
        ' field(LOW, "-8") field(LOLO, "-9") field(HHSV, "MAJOR") field(HSV, "MINOR")'
        ' field(LSV, "MINOR") field(LLSV, "MAJOR") }',
        f'record(ai, "{P}t:fast") {{ field(PREC, "1") }}',
        f'record(stringin, "{P}t:str") {{ field(VAL, "hello") }}',
        f'record(mbbo, "{P}t:enum") {{ field(ZRST, "Zero") field(ONST, "One")'
        ' field(TWST, "Two") field(VAL, "1") field(PINI, "YES") }',
        f'record(waveform, "{P}t:big") {{ field(FTVL, "DOUBLE") field(NELM, "{BIG}") }}',
        f'record(waveform, "{P}t:INT64") {{ field(FTVL, "INT64") field(NELM, "8") }}',
    ]
    for ftvl in ARRAYS:
        out.append(f'record(waveform, "{P}t:{ftvl}") {{ field(FTVL, "{ftvl}")'
                   ' field(NELM, "8") }')
    for i in range(MANY):
        out.append(f'record(ao, "{P}many:{i}") {{ field(VAL, "{i}") field(PINI, "YES") }}')
    return "\n".join(out) + "\n"


@dataclass
class Bridge:
    """One bridge process and how to reach it."""

    proc: ManagedProcess
    port: int

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/pvws/pv"

    def get(self, path: str, cookie: str = "", headers: dict[str, str] | None = None) -> Any:
        h = dict(headers or {})
        if cookie:
            h["Cookie"] = cookie
        req = urllib.request.Request(self.http + path, headers=h)
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any, cookie: str = "") -> tuple[int, Any, str]:
        """POST JSON; return (status, JSON reply, Set-Cookie value 'name=token' or '')."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if cookie:
            headers["Cookie"] = cookie
        req = urllib.request.Request(self.http + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return r.status, json.loads(r.read()), _cookie(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), ""

    def login(self, user: str, password: str) -> str:
        status, body, cookie = self.post("/login", {"user": user, "password": password})
        assert status == 200 and body["user"] == user, body
        return cookie


def _cookie(headers: Any) -> str:
    for v in headers.get_all("Set-Cookie") or []:
        first = v.split(";", 1)[0]
        if first.startswith("pvcoord_session=") and first != "pvcoord_session=":
            return first
    return ""


@dataclass
class Beamline:
    """Real processes: device softIoc behind the guard, types softIoc, registry, coordination,
    and two bridges (writes on with password login; writes off)."""

    tmp: Path
    clients: dict[str, str]
    devices_env: dict[str, str]
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)
    bridge: Bridge | None = None
    readonly_bridge: Bridge | None = None
    header_bridge: Bridge | None = None

    def outputs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.output()[-4000:]}" for n, p in self.procs.items())

    def start_types_ioc(self) -> None:
        self.procs["types"] = ManagedProcess(
            "types", python_module("pvxslibs.ioc", "-d", str(self.tmp / "types.db")),
            server_env(self.clients), log_dir=self.tmp)
        wait_for_pv(f"{P}t:ai", self.clients, procs=[self.procs["types"]])

    def start_coordination(self) -> None:
        self.procs["coordination"] = proc = ManagedProcess(
            "coordination", python_module(
                "iocs.coordination", "--prefix", P, "--policy", str(self.tmp / "p.toml"),
                "--store", f"sqlite:///{self.tmp}/locks.sqlite", "--registry-prefix", P),
            server_env(self.clients), cwd=REPO, log_dir=self.tmp)
        wait_for_pv(COORD_LOCKS.name(P), self.clients, procs=[proc])
        wait_for_pv(COORD_HEALTH.name(P), self.clients, procs=[proc],
                    condition=lambda v: v == "OK")

    def start_bridge(self, name: str, *args: str) -> Bridge:
        port = free_port()
        d = self.devices_env
        argv = python_module(
            "bridges.pvws", "--prefix", P, "--port", str(port), "--policy",
            str(self.tmp / "p.toml"), "--admin", "alice",
            "--device-conf", f"EPICS_PVA_ADDR_LIST={d['EPICS_PVA_ADDR_LIST']}",
            "--device-conf", "EPICS_PVA_AUTO_ADDR_LIST=NO",
            "--device-conf", f"EPICS_PVA_BROADCAST_PORT={d['EPICS_PVA_BROADCAST_PORT']}",
            *args)
        proc = ManagedProcess(name, argv, server_env(self.clients), cwd=REPO,  # own PVA port
                              log_dir=self.tmp)
        self.procs[name] = proc
        b = Bridge(proc, port)
        deadline = time.monotonic() + 20
        while True:
            try:
                b.get("/pvws/info")
                return b
            except OSError:
                if not proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"bridge {name} did not start:\n{proc.output()}") from None
                time.sleep(0.05)


@contextmanager
def beamline(tmp: Path) -> Iterator[Beamline]:
    """Start everything (module fixture); stop it all on exit, even on failure."""
    import subprocess

    b = Beamline(tmp, loopback_env(), loopback_env())
    (tmp / "p.toml").write_text(POLICY)
    (tmp / "types.db").write_text(types_db())
    devices.write_database(P, tmp / "demo.db")
    devices.write_registry(P, tmp / "registry.yaml")
    pw = tmp / "web-users"
    for user in ("alice", "bob"):
        r = subprocess.run(python_module("bridges.pvws", "passwd", str(pw), user, "--generate"),
                           capture_output=True, text=True, cwd=REPO, timeout=30, check=True)
        b.passwords[user] = r.stdout.strip()
    try:
        b.procs["softioc"] = ManagedProcess(
            "softioc", python_module("pvxslibs.ioc", "-d", str(tmp / "demo.db")),
            server_env(b.devices_env), log_dir=tmp)
        wait_for_pv(demo.motor_setpoint(P, "m1"), b.devices_env, procs=[b.procs["softioc"]])
        b.start_types_ioc()
        b.procs["registry"] = ManagedProcess(
            "registry", python_module("iocs.registry", "--prefix", P, "--registry",
                                      str(tmp / "registry.yaml")),
            server_env(b.clients), cwd=REPO, log_dir=tmp)
        wait_for_pv(REGISTRY_DEVICE_PVS.name(P), b.clients, procs=[b.procs["registry"]])
        b.start_coordination()
        b.procs["guard"] = start_guard(P, b.clients, b.devices_env, tmp / "p.toml", tmp / "g")
        wait_for_pv(GUARD_HEALTH.name(P), b.clients, procs=[b.procs["guard"]],
                    condition=lambda v: v == "OK")
        b.bridge = b.start_bridge("bridge", "--writes", "--auth", "password",
                                  "--password-file", str(pw))
        # writes off; a proxy header from an address that is not a trusted proxy is ignored
        b.readonly_bridge = b.start_bridge("bridge-ro", "--auth", "header",
                                           "--trusted-proxy", "192.0.2.1")
        b.header_bridge = b.start_bridge("bridge-hdr", "--writes", "--auth", "header",
                                         "--max-channels", "40", "--max-sockets", "6",
                                         "--throttle-ms", "200")
        yield b
    except BaseException:
        print(b.outputs())
        raise
    finally:
        for p in reversed(list(b.procs.values())):
            p.stop()


class WS:
    """A blocking PVWS websocket client that keeps every message it received."""

    def __init__(self, url: str, cookie: str = "", max_queue: int | None = 16,
                 headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if cookie:
            headers["Cookie"] = cookie
        self._cm = connect(url, additional_headers=headers, max_size=None, max_queue=max_queue,
                           open_timeout=TIMEOUT)
        self.conn: ClientConnection = self._cm.__enter__()
        self.msgs: list[dict[str, Any]] = []

    def send(self, obj: Any) -> None:
        self.conn.send(obj if isinstance(obj, str | bytes) else json.dumps(obj))

    def subscribe(self, *pvs: str) -> None:
        self.send({"type": "subscribe", "pvs": list(pvs)})

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT,
             what: str = "message") -> dict[str, Any]:
        """The first message (new or already received and not yet consumed) matching ``pred``."""
        for i, m in enumerate(self.msgs):
            if pred(m):
                del self.msgs[i]
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not received in {timeout} s; got {self.msgs[-5:]}")
            try:
                text = self.conn.recv(timeout=left)
            except TimeoutError:
                continue
            m = json.loads(text)
            if pred(m):
                return m
            self.msgs.append(m)

    def update(self, pv: str, pred: Callable[[dict[str, Any]], bool] = lambda m: True,
               timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.wait(lambda m: m.get("type") == "update" and m.get("pv") == pv and pred(m),
                         timeout, f"update of {pv}")

    def error(self, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.wait(lambda m: m.get("type") == "error" and m.get("code") == code, timeout,
                         f"error {code}")

    def drain(self, seconds: float = 0.2) -> list[dict[str, Any]]:
        """Everything that arrives within ``seconds`` (plus what is buffered)."""
        out, self.msgs = self.msgs, []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(json.loads(self.conn.recv(timeout=left)))
            except TimeoutError:
                break
        return out

    def alive(self) -> bool:
        """Whether the socket still answers (``echo`` round trip)."""
        token = f"alive-{time.monotonic_ns()}"
        self.send({"type": "echo", "token": token})
        self.wait(lambda m: m.get("token") == token, what="echo")
        return True

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> WS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnreadWS:
    """A websocket whose frames the test leaves in the kernel (it reads only the handshake).

    A plain TCP socket driven by the ``websockets`` sans-I/O client protocol, with a receive
    buffer of ``rcvbuf`` bytes, so the bridge can write a large burst to it without waiting for
    the client; :meth:`pending` is how many bytes of frames have arrived so far (``FIONREAD``).
    """

    def __init__(self, url: str, cookie: str = "", rcvbuf: int = 4 << 20) -> None:
        uri = parse_uri(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((uri.host, uri.port))
        self.proto = ClientProtocol(uri, max_size=None)
        request = self.proto.connect()
        if cookie:
            request.headers["Cookie"] = cookie
        self.proto.send_request(request)
        self._flush()
        deadline = time.monotonic() + TIMEOUT
        response = None
        while response is None:
            if time.monotonic() > deadline:
                raise TimeoutError("websocket handshake")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.proto.receive_data(data)
            response = next((e for e in self.proto.events_received()
                             if isinstance(e, Response)), None)
        if self.proto.handshake_exc is not None:
            raise self.proto.handshake_exc

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.sock.sendall(data)

    def send_all(self, *objs: Any) -> None:
        """Send several messages in one ``sendall`` (so they arrive together)."""
        for obj in objs:
            self.proto.send_text(json.dumps(obj).encode())
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def pending(self) -> int:
        """Bytes received and not read (frames the bridge has written to this socket so far)."""
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD,
                                              b"\0\0\0\0"))[0]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UnreadWS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
