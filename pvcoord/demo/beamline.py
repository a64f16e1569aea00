"""The demo beamline: a real softIoc with simulated devices, the registry and coordination IOCs.

``pvcoord demo`` runs :func:`run_demo`: in a run directory it writes the softIoc database and the
registry file (generated from :mod:`pvdb.demo` by :mod:`pvcoord.demo.devices`) and the demo policy
(``policy.toml`` next to this file), then starts each *component* as a real process on 127.0.0.1,
waits (with a deadline) for a PV of each, prints the EPICS settings and example commands, and runs
until Ctrl-C or SIGTERM, when it stops everything it started, newest first, by PID.

Fixed ports (so the printed settings stay valid from one run to the next); ``--ports-from N``
moves the whole block (tests use free ones). With the default ``N`` = :data:`DEFAULT_PORTS_FROM`:

=========  ======================  ===========================================================
port       name                    use
=========  ======================  ===========================================================
N          ``pva-broadcast``       PVA UDP search port: ``EPICS_PVA_BROADCAST_PORT`` of every
                                   client and server of the demo
N+1        ``softioc``             softIoc PVA TCP port (QSRV2)
N+2        ``registry``            registry IOC PVA TCP port
N+3        ``coordination``        coordination IOC PVA TCP port
N+4        ``queue``               queue IOC PVA TCP port (queue part)
N+5        ``guard``               guard gateway PVA TCP port (guard part)
N+6        ``guard-upstream``      PVA UDP port of the device network behind the guard
N+7        ``guard-upstream-tcp``  softIoc PVA TCP port behind the guard
N+10       ``ca-server``           Channel Access server port of the softIoc (RSRV)
N+11       ``ca-repeater``         Channel Access repeater port
N+12       ``redis``               redis for the RE Manager (queue part)
N+13       ``zmq-control``         RE Manager 0MQ control socket (queue part)
N+14       ``zmq-info``            RE Manager 0MQ info socket (queue part)
N+20...    (any other name)        handed out in the order components ask
=========  ======================  ===========================================================

Components: a :class:`Component` is a name, an optional ``prepare(ctx)`` (run for every component
before anything starts, e.g. to move the softIoc behind a gateway by changing
``ctx.device_env``) and a ``start(ctx)`` that starts its processes with :meth:`DemoContext.start`
(which registers them for stopping and waits for a PV). The base components are
:data:`BASE_COMPONENTS`; the optional parts ``pvcoord.demo.queue_part`` (redis, RE Manager, queue
IOC) and ``pvcoord.demo.guard_part`` (guard gateway) are added when their module exists and
defines ``COMPONENTS`` (a list of :class:`Component`). ``ctx.notes`` lines are printed with the
settings.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import importlib
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from pvcoord.procs import (
    LOOPBACK,
    PYTHON,
    ManagedProcess,
    OutputPump,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
)
from pvdb import demo as demo_pvs
from pvdb.endstation import WEB_BRIDGE_ACCOUNT
from pvdb.names import COORD_ACQUIRE, COORD_DEVICES, COORD_LOCKS, REGISTRY_DEVICES, check_prefix

DEFAULT_PORTS_FROM = 5180
"""First port of the demo's block (see the table above); away from EPICS's 5064/5065/5075/5076."""

PORT_OFFSETS: dict[str, int] = {
    "pva-broadcast": 0,
    "softioc": 1,
    "registry": 2,
    "coordination": 3,
    "queue": 4,
    "guard": 5,
    "guard-upstream": 6,
    "guard-upstream-tcp": 7,
    "ca-server": 10,
    "ca-repeater": 11,
    "redis": 12,
    "zmq-control": 13,
    "zmq-info": 14,
}
"""Fixed offsets of named ports from ``--ports-from``; other names get N+20, N+21, ..."""
_FIRST_FREE_OFFSET = 20
_UDP_PORTS = {"pva-broadcast", "guard-upstream", "ca-repeater"}

START_TIMEOUT = 60.0
"""Seconds each process may take to serve its first PV (2 loaded cores: p4p import ~1-2 s)."""

POLICY_FILE = Path(__file__).with_name("policy.toml")
QUEUE_LOCK_OWNER = "pvcoord-queue"
"""The demo's queue service account: the RE Manager and the queue IOC run as this OS account
(created by scripts/setup.sh), so it holds the QUEUE_* locks and the RE worker's puts through the
guard come from the holder. Without the account (or without root), the queue IOC runs as the demo's
account and holds its locks on behalf of this user (``--lock-owner``), and the RE worker talks to
the device network directly."""

WEB_ACCOUNT = WEB_BRIDGE_ACCOUNT
"""The demo web bridge's service account (a deployment's too; scripts/setup.sh creates it): the
bridge runs as this OS account and writes through the guard, which lets its puts through as the
policy's delegate for the web users (``access.delegates``, decision 0140). Without the account (or
without root), the bridge runs as the demo's account and writes on the device network."""

OPTIONAL_PARTS = ("pvcoord.demo.queue_part", "pvcoord.demo.guard_part", "pvcoord.demo.flat_part",
                  "pvcoord.demo.web_part")


class DemoError(RuntimeError):
    """The demo cannot start or a process died; the message says which and why."""


@dataclass
class DemoContext:
    """What the components of one demo run share.

    Attributes:
        prefix: endstation prefix (``DEMO:``).
        run_dir: files and logs of this run.
        ports_from: first port of the block.
        env: loopback EPICS environment of the demo's clients (and the base of every server's).
        device_env: environment the softIoc is started with (``env``, unless a part moved it).
        out: where progress is printed.
        procs: the processes started, by name, in start order.
        files: files written for the run (``database``, ``registry``, ``policy``, ``store``).
        notes: extra lines for the banner (what a part serves, how to use it).
        ca_servers: processes serving Channel Access on the clients' CA ports (the CA settings
            are printed only if there is one).
    """

    prefix: str
    run_dir: Path
    ports_from: int
    env: dict[str, str]
    out: TextIO
    device_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ca_servers: list[str] = field(default_factory=list)
    _extra_ports: dict[str, int] = field(default_factory=dict)
    _argv: dict[
        str,
        tuple[list[str], dict[str, str], str | None, Callable[[object], bool] | None, str | None],
    ] = field(default_factory=dict)

    def port(self, name: str) -> int:
        """The fixed port called ``name`` (table in the module docstring)."""
        if name in PORT_OFFSETS:
            return self.ports_from + PORT_OFFSETS[name]
        if name not in self._extra_ports:
            self._extra_ports[name] = self.ports_from + _FIRST_FREE_OFFSET + len(
                self._extra_ports
            )
        return self._extra_ports[name]

    def last_port(self) -> int:
        """Highest port of the block handed out so far (fixed names included)."""
        return max([self.ports_from + o for o in PORT_OFFSETS.values()]
                   + list(self._extra_ports.values()))

    def server_env(self, name: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default :attr:`env`) with the PVA TCP port named ``name``."""
        return server_env(self.env if base is None else base, self.port(name))

    def say(self, text: str) -> None:
        """Print a progress line."""
        print(text, file=self.out, flush=True)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        ready_pv: str | None = None,
        condition: Callable[[object], bool] | None = None,
        timeout: float = START_TIMEOUT,
        user: str | None = None,
    ) -> ManagedProcess:
        """Start process ``name`` (logged to ``run_dir/NAME.log``), wait for ``ready_pv``.

        ``user``: run it as this OS account (``runuser``; the demo must run as root).

        The process is registered first, so it is stopped at the end even if the wait fails.

        Raises:
            DemoError: if it exits or ``ready_pv`` does not answer (and satisfy ``condition``)
                within ``timeout`` seconds; the message ends with its output.
        """
        if name in self.procs and self.procs[name].alive():
            raise DemoError(f"{name} is already running (pid {self.procs[name].pid})")
        t0 = time.monotonic()
        proc = ManagedProcess(name, argv, env, cwd=self.run_dir, log_dir=self.run_dir, user=user)
        self.procs[name] = proc
        self._argv[name] = (list(argv), dict(env), ready_pv, condition, user)
        if ready_pv is not None:
            try:
                wait_for_pv(ready_pv, self.env, timeout, procs=[proc], condition=condition)
            except (TimeoutError, RuntimeError) as e:
                raise DemoError(f"{name} did not start: {e}") from None
        self.say(f"  {name:<13} pid {proc.pid:<7} ready in {time.monotonic() - t0:4.1f} s"
                 f"   log {proc.log_path}")
        return proc

    def restart(self, name: str, kill: bool = False) -> ManagedProcess:
        """Stop ``name`` (SIGTERM, or SIGKILL with ``kill``) and start it again the same way."""
        argv, env, ready_pv, condition, user = self._argv[name]
        proc = self.procs[name]
        if kill:
            proc.kill9()
        proc.stop()  # stays in self.procs: the new process takes its place in the stop order
        old_log = proc.log_path
        with contextlib.suppress(OSError):
            old_log.rename(old_log.with_suffix(f".{int(time.time())}.log"))
        return self.start(name, argv, env, ready_pv, condition, user=user)

    def account_of(self, name: str) -> str | None:
        """The OS account process ``name`` was started as (``None``: the demo's own)."""
        entry = self._argv.get(name)
        return entry[4] if entry is not None else None

    def stop_all(self) -> list[str]:
        """Stop every process, newest first; return ``name: exit code`` lines."""
        lines = []
        for name in reversed(list(self.procs)):
            code = self.procs[name].stop()
            lines.append(f"{name}: exit {code}")
        return lines

    def dead(self) -> list[ManagedProcess]:
        """Processes that exited by themselves."""
        return [p for p in self.procs.values() if not p.alive()]


@dataclass(frozen=True)
class Component:
    """One part of the demo: ``start(ctx)`` starts its processes; ``prepare(ctx)`` runs first."""

    name: str
    start: Callable[[DemoContext], None]
    prepare: Callable[[DemoContext], None] | None = None


# --- files ------------------------------------------------------------------------------------


def write_policy(path: Path, account: str | None = None) -> Path:
    """Write the demo policy to ``path``, adding ``account`` wherever ``root`` is named.

    The shipped policy names ``root`` (the demo runs as root on these machines); started by another
    account, the demo gives that account the same rights so the walkthrough works unchanged.
    """
    account = account or getpass.getuser()
    text = POLICY_FILE.read_text()
    if account != "root":
        text = re.sub(r'"root"', f'"root", "{account}"', text)
        # the last table is [access.on_behalf_of]: the demo's account acts for the same users
        text += f'"{account}" = ["*", "pvcoord-queue"]\n'
    path.write_text(text)
    return path


def write_files(ctx: DemoContext) -> None:
    """Write the softIoc database, the registry file and the policy into the run directory."""
    from pvcoord.demo import devices  # noqa: PLC0415 - A's generator, needed only here

    ctx.files["database"] = devices.write_database(ctx.prefix, ctx.run_dir / "demo.db")
    ctx.files["registry"] = devices.write_registry(ctx.prefix, ctx.run_dir / "registry.yaml")
    ctx.files["policy"] = write_policy(ctx.run_dir / "policy.toml")
    ctx.files["store"] = _store_dir(ctx.run_dir / "store") / "locks.sqlite"
    from pvcoord.demo.endstation_file import write_endstation

    ctx.files["endstation"] = write_endstation(ctx, ctx.run_dir / "endstation.toml")


def _store_dir(path: Path) -> Path:
    """The lock store's folder: 0700, or 2750 with the queue service account's group.

    The worker hook (under that account) reads the store; nobody else may (the audit names every
    holder, the locks keep key digests).
    """
    path.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        try:
            gid = grp.getgrnam(QUEUE_LOCK_OWNER).gr_gid
        except KeyError:
            return path
        os.chown(path, -1, gid)
        path.chmod(0o2750)  # setgid: the store files get the group
    return path


def service_account_problem(
    account: str, run_dir: Path | None = None, module: str = "pvcoord", python: str = PYTHON
) -> str | None:
    """Why a demo process cannot run as the OS ``account`` (``runuser``), or None if it can.

    Checks: the demo runs as root, ``account`` exists, it can import ``module`` (the checkout
    or venv is readable by other accounts) and reach ``run_dir`` (made 0711: the account reaches
    the files it is given by name and lists nothing).
    """
    import pwd
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return "the demo does not run as root"
    try:
        pwd.getpwnam(account)
    except KeyError:
        return f"no OS account {account} (scripts/setup.sh creates it)"
    if shutil.which("runuser") is None:
        return "runuser not found"
    probe = subprocess.run(
        ["runuser", "-u", account, "--", python, "-c", f"import {module}"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    if probe.returncode != 0:
        return f"{account} cannot import {module} (checkout not readable by other accounts)"
    if run_dir is not None:
        run_dir.chmod(0o711)
        reach = subprocess.run(["runuser", "-u", account, "--", "test", "-x", str(run_dir)],
                               capture_output=True, timeout=30)
        if reach.returncode != 0:
            return f"{account} cannot reach the run directory {run_dir}"
    return None


# --- base components --------------------------------------------------------------------------


def start_softioc(ctx: DemoContext) -> None:
    """The real EPICS softIoc (``python -m pvxslibs.ioc``) serving the simulated devices."""
    env = dict(ctx.device_env or ctx.env)
    if env.get("EPICS_PVA_BROADCAST_PORT") == ctx.env.get("EPICS_PVA_BROADCAST_PORT"):
        env = ctx.server_env("softioc", env)
    ctx.start(
        "softioc",
        python_module("pvxslibs.ioc", "-d", str(ctx.files["database"])),
        env,
        ready_pv=demo_pvs.motor_readback(ctx.prefix, demo_pvs.MOTORS[0]),
    )
    if env.get("EPICS_CAS_SERVER_PORT") == ctx.env.get("EPICS_CA_SERVER_PORT"):
        ctx.ca_servers.append("softioc")  # its RSRV is reachable with the printed CA settings
    ctx.notes.append(
        f"devices: {', '.join(demo_pvs.DEVICE_NAMES)} (e.g. "
        f"{demo_pvs.motor_setpoint(ctx.prefix, demo_pvs.MOTORS[0])}, "
        f"{demo_pvs.motor_readback(ctx.prefix, demo_pvs.MOTORS[0])})"
    )


def start_registry(ctx: DemoContext) -> None:
    """The registry IOC reading the demo registry file."""
    ctx.start(
        "registry",
        python_module("iocs.registry", "--config", str(ctx.files["endstation"])),
        ctx.server_env("registry"),
        ready_pv=REGISTRY_DEVICES.name(ctx.prefix),
    )


def _has_all_devices(value: object) -> bool:
    # unwrapped or a raw p4p Value (untyped)
    names = value if isinstance(value, list) else cast(Any, value)["value"]
    return set(demo_pvs.DEVICE_NAMES) <= {str(n) for n in (names or [])}


def start_coordination(ctx: DemoContext) -> None:
    """The coordination IOC (SQLite store in the run dir), following the registry's devices."""
    ctx.start(
        "coordination",
        python_module("iocs.coordination", "--config", str(ctx.files["endstation"])),
        ctx.server_env("coordination"),
        ready_pv=COORD_DEVICES.name(ctx.prefix),
        condition=_has_all_devices,
    )


BASE_COMPONENTS: tuple[Component, ...] = (
    Component("softioc", start_softioc),
    Component("registry", start_registry),
    Component("coordination", start_coordination),
)


def optional_components(say: Callable[[str], None]) -> list[Component]:
    """Components of the optional parts that exist (see the module docstring)."""
    found: list[Component] = []
    for mod_name in OPTIONAL_PARTS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue  # that part is not there (yet)
            raise DemoError(f"{mod_name} cannot be imported: {e}") from None
        comps = getattr(mod, "COMPONENTS", None)
        if not comps or not all(isinstance(c, Component) for c in comps):
            say(f"note: {mod_name} defines no COMPONENTS list of Component; not started")
            continue
        found.extend(comps)
    return found


# --- ports and settings -----------------------------------------------------------------------


def check_ports(ctx: DemoContext) -> None:
    """Raise :class:`DemoError` if a fixed port of the block is already taken on 127.0.0.1."""
    busy = []
    for name in PORT_OFFSETS:
        port = ctx.port(name)
        kind = socket.SOCK_DGRAM if name in _UDP_PORTS else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:  # as the servers do: TIME_WAIT leftovers are no clash
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                busy.append(f"{port} ({name})")
    if busy:
        raise DemoError(
            f"ports in use on {LOOPBACK}: {', '.join(busy)}. Is another demo running? "
            f"Stop it, or move this one with --ports-from PORT."
        )


def demo_env(ports_from: int) -> dict[str, str]:
    """The demo's loopback EPICS environment for the block starting at ``ports_from``."""
    return loopback_env(
        pva_server_port=ports_from + PORT_OFFSETS["coordination"],
        pva_broadcast_port=ports_from + PORT_OFFSETS["pva-broadcast"],
        ca_server_port=ports_from + PORT_OFFSETS["ca-server"],
        ca_repeater_port=ports_from + PORT_OFFSETS["ca-repeater"],
    )


CLIENT_SETTINGS = (
    "EPICS_PVA_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST", "EPICS_PVA_BROADCAST_PORT",
    "EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT",
    "EPICS_CA_REPEATER_PORT",
)
"""What a client in another shell needs (PVA searches 127.0.0.1 on the demo's UDP port)."""


def settings_lines(ctx: DemoContext) -> list[str]:
    """``export NAME=value`` lines for another shell."""
    names = [k for k in CLIENT_SETTINGS if ctx.ca_servers or not k.startswith("EPICS_CA_")]
    lines = [f"export {k}={ctx.env[k]}" for k in names if k in ctx.env]
    lines.append(f"export PVCOORD_PREFIX={ctx.prefix}")
    return lines


def banner(ctx: DemoContext) -> str:
    """What the demo prints once everything runs."""
    py = PYTHON
    bindir = Path(py).parent
    p = ctx.prefix
    m1 = demo_pvs.MOTORS[0]
    out = [
        "",
        f"pvcoord demo beamline is running: prefix {p}, everything on {LOOPBACK} "
        f"(ports {ctx.ports_from}-{ctx.last_port()}).",
        f"Run directory (database, registry, policy, lock store, logs): {ctx.run_dir}",
        "",
        "In another shell:",
        *(f"  {line}" for line in settings_lines(ctx)),
        "",
        "Then try:",
        f"  {py} -m p4p.client.cli rpc {COORD_ACQUIRE.name(p)} device={m1} "
        "type=MANUAL_OPERATOR timeout=60 reason=align",
        f"  {py} -m p4p.client.cli get {COORD_LOCKS.name(p)}",
        f"  {bindir}/pvcoord locks",
        f"  {bindir}/pvcoord status --config {ctx.files['endstation']}",
        f"  {bindir}/pvcoord watch",
        f"  {bindir}/pvcoord registry show",
        f"  {bindir}/pvcoord put {demo_pvs.motor_setpoint(p, m1)} 5",
        f"  {py} -m p4p.client.cli monitor {demo_pvs.motor_readback(p, m1)}",
        f"  runuser -u nobody -- {bindir}/pvcoord lock {m1} --type MANUAL_OPERATOR "
        "  # a second identity (as root)",
        "",
        *ctx.notes,
        "",
        "Ctrl-C (or SIGTERM) stops everything the demo started.",
    ]
    return "\n".join(out)


# --- running ----------------------------------------------------------------------------------


def start_beamline(
    prefix: str = demo_pvs.DEMO_PREFIX,
    ports_from: int | None = None,
    run_dir: str | Path | None = None,
    out: TextIO | None = None,
    components: Sequence[Component] | None = None,
    stop: threading.Event | None = None,
) -> DemoContext:
    """Write the files and start every component; return the context (stop with ``stop_all``).

    On failure, or when ``stop`` is set between two components (Ctrl-C while starting),
    everything already started is stopped before :class:`DemoError` is raised.
    """
    stream: TextIO = out or sys.stdout  # typeshed's sys.stdout may be None
    check_prefix(prefix)
    ports_from = DEFAULT_PORTS_FROM if ports_from is None else ports_from
    rd = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="pvcoord-demo-"))
    rd.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(prefix=prefix, run_dir=rd.resolve(), ports_from=ports_from,
                      env=demo_env(ports_from), out=stream)
    ctx.device_env = dict(ctx.env)
    check_ports(ctx)
    comps = list(BASE_COMPONENTS) + optional_components(ctx.say) if components is None else list(
        components)
    try:
        write_files(ctx)
        ctx.say(f"starting the demo beamline ({', '.join(c.name for c in comps)}) in {rd}")
        for c in comps:
            if c.prepare is not None:
                c.prepare(ctx)
        for c in comps:
            if stop is not None and stop.is_set():
                raise DemoError(f"interrupted while starting (before {c.name})")
            c.start(ctx)
    except BaseException:
        ctx.stop_all()
        raise
    return ctx


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM/SIGINT set ``stop``; return a function restoring the old handlers."""
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


def run_demo(
    prefix: str = demo_pvs.DEMO_PREFIX,
    ports_from: int | None = None,
    run_dir: str | Path | None = None,
    walkthrough: bool = False,
    out: TextIO | None = None,
) -> int:
    """``pvcoord demo``: start the beamline, wait for Ctrl-C / SIGTERM (or run the walkthrough).

    Returns 0 after a clean stop (walkthrough: 0 only if every step behaved as expected), 1 if a
    process died or a walkthrough step failed, 2 if the demo could not start.
    """
    out = out or sys.stdout
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    ctx: DemoContext | None = None
    code = 0
    try:
        try:
            ctx = start_beamline(prefix, ports_from, run_dir, out, stop=stop)
        except DemoError as e:
            print(f"pvcoord demo: {e}", file=sys.stderr)
            return 0 if stop.is_set() else 2
        if stop.is_set():
            return 0
        if walkthrough:
            from pvcoord.demo.walkthrough import run_walkthrough  # noqa: PLC0415

            ctx.say(banner(ctx).replace("Ctrl-C (or SIGTERM) stops everything the demo started.",
                                        "The walkthrough runs now; the demo stops after it."))
            ok = run_walkthrough(ctx, stop)
            code = 0 if ok else 1
        else:
            ctx.say(banner(ctx))
            pumps = [OutputPump(ctx.procs[n], out, prefix=f"[{n}] ")
                     for n in ("coordination",) if n in ctx.procs]
            for pmp in pumps:
                pmp.start()
            try:
                while not stop.wait(0.5):
                    dead = ctx.dead()
                    if dead:
                        for p in dead:
                            tail = "\n".join(p.output().splitlines()[-20:])
                            print(f"pvcoord demo: {p.name} exited with {p.proc.returncode}:\n"
                                  f"{tail}", file=sys.stderr)
                        code = 1
                        break
            finally:
                for pmp in pumps:
                    pmp.stop()
    finally:
        if ctx is not None:
            ctx.say("stopping the demo beamline")
            for line in ctx.stop_all():
                ctx.say(f"  {line}")
            ctx.say("stopped")
        restore()
    return code


if __name__ == "__main__":
    sys.exit(run_demo(os.environ.get("PVCOORD_PREFIX", demo_pvs.DEMO_PREFIX)))
