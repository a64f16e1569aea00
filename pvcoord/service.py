"""What every pvcoord process does as a service: ``--config FILE`` and systemd notification.

Shared by the IOCs (``iocs/*/__main__.py``) and the bridges (``bridges/guard/app.py``), which may
not import each other (docs/decisions/0091-service-helpers-in-pvcoord.md):

- :func:`config_argv`: expand ``--config ENDSTATION.toml`` into the process's options and EPICS
  environment (the file's section for the process plus the shared part); options given on the
  command line win.
- :func:`shared_python`: the interpreter for a child process, by a path every account can follow;
- :class:`ServiceNotifier`: ``READY=1`` once the process serves, ``WATCHDOG=1`` every half
  ``WatchdogSec`` while its event loop runs, ``STOPPING=1`` at the end, through the ``sdnotify``
  library; a no-op outside systemd (no ``$NOTIFY_SOCKET``).
- :func:`run_as_service`: a process's event loop with signal handling and the notifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import sdnotify

from pvdb.endstation import EndstationError, load_endstation, process_args, process_env

STORE_URL_ENV = "PVCOORD_STORE_URL"
"""A store URL with a password (redis) comes from here (a credential), never from the file."""
REDIS_URL_ENV = "PVCOORD_REDIS_URL"
"""The worker-hook redis URL with its password (the queue IOC's ``--redis`` default)."""
ZMQ_KEY_ENV = "QSERVER_ZMQ_PUBLIC_KEY"
"""bluesky-queueserver-api reads the RE Manager's public key from here."""
WEB_PASSWORD_ENV = "PVCOORD_WEB_PASSWORD_FILE"
"""The web bridge's password file as a systemd credential (``%d/web-users``): wins over the file."""


def shared_python() -> str:
    """This interpreter by a path every OS account can follow (for child processes).

    In a venv, ``sys.executable`` may go through ``.venv``, a symlink in a private checkout (root's
    home, mode 700) to the shared venv ``scripts/setup.sh`` made; ``runuser`` children cannot
    execute that path. The venv's own directory, resolved, they can.
    """
    if sys.prefix == sys.base_prefix:
        return sys.executable
    exe = Path(os.path.realpath(sys.prefix)) / "bin" / "python"
    return str(exe) if exe.exists() else sys.executable


def _config_path(argv: Sequence[str]) -> str | None:
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def config_argv(
    process: str,
    argv: Sequence[str] | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> list[str]:
    """``argv`` with the options the endstation file of ``--config`` sets put in front.

    Also sets the process's ``EPICS_*`` variables (from ``[network]`` and its section) in
    ``environ`` (default ``os.environ``), and for the queue IOC ``$QSERVER_ZMQ_PUBLIC_KEY`` (from
    ``queue_server.public_key_file``) and ``$PVCOORD_REDIS_URL`` (from ``queue_server.redis_url``,
    unless already set: a URL with a password comes from a credential). For the coordination IOC
    ``$PVCOORD_STORE_URL``, when set, replaces ``store.url``. Without ``--config`` (or for the
    guard with a pvagw JSON file) ``argv`` is returned unchanged.

    Args:
        process: ``coordination``, ``registry``, ``queue``, ``guard``, ``flat`` or ``pvws``.
        argv: the command line without the program name (default ``sys.argv[1:]``).
        environ: environment to update.

    Raises:
        SystemExit: exit code 2 after printing every error of a bad endstation file (each with
            its line and code), as argparse does for bad options.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    path = _config_path(args)
    if path is None or (process == "guard" and not path.endswith(".toml")):
        return args
    try:
        cfg = load_endstation(path)
        opts = process_args(cfg, process)
        epics = process_env(cfg, process)
    except EndstationError as e:
        print(f"{process}: endstation file rejected:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as e:
        print(f"{process}: {path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    env.update(epics)
    if process == "pvws" and env.get(WEB_PASSWORD_ENV):
        opts += ["--password-file", env[WEB_PASSWORD_ENV]]
    if process == "coordination" and env.get(STORE_URL_ENV):
        opts[opts.index("--store") + 1] = env[STORE_URL_ENV]
    if process == "queue" and cfg.queue_server is not None:
        qs = cfg.queue_server
        if qs.redis_url and not env.get(REDIS_URL_ENV):
            env[REDIS_URL_ENV] = qs.redis_url
        if qs.public_key_file:
            try:
                env[ZMQ_KEY_ENV] = Path(qs.public_key_file).read_text().strip()
            except OSError as e:
                print(f"{process}: {path}: queue_server.public_key_file: {e}", file=sys.stderr)
                raise SystemExit(2) from None
    return opts + args


class ServiceNotifier:
    """systemd notification (``Type=notify``, ``WatchdogSec``) through ``sdnotify``.

    Args:
        environ: where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read
            (default ``os.environ``).

    Attributes:
        watchdog_interval: seconds between ``WATCHDOG=1`` (half of ``WatchdogSec``), or ``None``
            when systemd asked for no watchdog.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._notifier = sdnotify.SystemdNotifier() if env.get("NOTIFY_SOCKET") else None
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if self._notifier is not None and usec and (not pid or pid == str(os.getpid())):
            with contextlib.suppress(ValueError):
                self.watchdog_interval = max(0.05, int(usec) / 2e6)

    @property
    def active(self) -> bool:
        """Whether a service manager listens."""
        return self._notifier is not None

    def notify(self, state: str) -> None:
        """Send ``state`` (e.g. ``READY=1``); nothing outside systemd."""
        if self._notifier is not None:
            self._notifier.notify(state)

    def close(self) -> None:
        """Close the notification socket."""
        sock = getattr(self._notifier, "socket", None)
        if sock is not None:
            sock.close()
        self._notifier = None

    async def run(self, ready: asyncio.Event, stop: asyncio.Event, status: str = "") -> None:
        """Send ``READY=1`` once ``ready`` is set, then ``WATCHDOG=1``, ``STOPPING=1`` at the end.

        Runs as a task in the process's event loop: a loop that hangs stops the watchdog, and
        systemd restarts the process (``Restart=on-failure``).
        """
        try:
            waiters = [asyncio.create_task(ready.wait()), asyncio.create_task(stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if stop.is_set():
                return
            self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
            while not stop.is_set():
                if self.watchdog_interval is not None:
                    self.notify("WATCHDOG=1")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.watchdog_interval or 3600.0)
        finally:
            self.notify("STOPPING=1")


def run_as_service(
    serve: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, object]], status: str = ""
) -> None:
    """Run ``serve(stop, ready)`` in a new event loop as a systemd service.

    SIGTERM and SIGINT (``systemctl stop``, Ctrl-C) set ``stop``; ``serve`` sets ``ready`` once it
    serves. ``READY=1`` (with ``STATUS=status``) goes out when ``ready`` is set, ``WATCHDOG=1``
    while the loop runs, ``STOPPING=1`` at the end (:class:`ServiceNotifier`; nothing outside
    systemd). Exceptions of ``serve`` propagate after the notifier stopped. Every IOC and bridge
    ``main()`` runs through this.
    """

    async def run() -> None:
        stop = asyncio.Event()
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        notifier = ServiceNotifier()
        task = asyncio.create_task(notifier.run(ready, stop, status))
        try:
            await serve(stop, ready)
        finally:
            stop.set()
            await task
            notifier.close()

    asyncio.run(run())
