"""p4p helpers shared by pvcoord's IOCs: time stamps, NTTable values, RPC arguments, process main.

These are part of each IOC's p4p boundary (STYLE: the untyped p4p API stays behind one boundary);
the domain logic of every IOC is pure Python in its own package.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from p4p import Value
from p4p.nt import NTScalar, NTTable
from p4p.server.thread import SharedPV

from pvcoord.service import ServiceNotifier
from pvdb.process import PROCESSES, pvcoord_version


def stamp(v: Value, ts: float) -> Value:
    """Set ``v``'s ``timeStamp`` to ``ts`` (epoch seconds); return ``v``."""
    sec = int(ts)
    v["timeStamp.secondsPastEpoch"] = sec
    v["timeStamp.nanoseconds"] = int((ts - sec) * 1e9)
    return v


def table_value(
    nt: NTTable, columns: tuple[tuple[str, str], ...], rows: Iterable[tuple], ts: float
) -> Value:
    """An NTTable Value with every column set (also when empty) and a time stamp.

    (``NTTable.wrap`` drops empty columns, so posting an empty table would leave the old rows,
    and it skips the time stamp for a prebuilt Value.)
    """
    rows = list(rows)
    cols = {name: [r[i] for r in rows] for i, (name, _) in enumerate(columns)}
    return stamp(nt.type({"labels": [c for c, _ in columns], "value": cols}), ts)


def request_args(value: Value, error: type[Exception], example: str) -> dict[str, str]:
    """The arguments of an RPC request as strings.

    Accepts an NTURI (``pvcall``, ``p4p.client.cli rpc``: arguments under ``query``) or a plain
    structure of scalar fields (pvapy, other clients).

    Args:
        value: the request.
        error: exception class raised for a malformed request (the IOC's own error type).
        example: a correct call, shown in the error message.

    Raises:
        error: the request is not a structure of scalar arguments.
    """
    try:
        top = value.keys()
        src = value["query"] if "query" in top else value
        out: dict[str, str] = {}
        for k in src.keys():
            if src is value and k in ("scheme", "authority", "path"):
                continue
            v = src[k]
            if not isinstance(v, bool | int | float | str):
                raise error(f"malformed request: argument {k!r} is not a scalar")
            out[k] = str(v)
        return out
    except error:
        raise
    except Exception as e:  # noqa: BLE001 - any other shape is a malformed request
        raise error(
            f"malformed request ({type(e).__name__}): send an NTURI with string arguments, "
            f"e.g. {example}"
        ) from None


def setup_logging(level: str) -> None:
    """Log to stderr with time stamps at ``level`` (DEBUG, INFO, WARNING, ERROR)."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_until_signal(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve(stop)`` in a new event loop; SIGTERM and SIGINT set ``stop`` (systemctl stop)."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(run())


def run_as_service(
    serve: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, object]], status: str = ""
) -> None:
    """Like :func:`run_until_signal`, and tell systemd: ``serve(stop, ready)`` sets ``ready``.

    ``READY=1`` goes out when ``ready`` is set, ``WATCHDOG=1`` while the loop runs, ``STOPPING=1``
    at the end (:class:`pvcoord.service.ServiceNotifier`; nothing outside systemd).
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


STARTED = time.time()
"""When this process imported pvutil (its start, within the import time)."""


def add_process_info(
    provider: Any, prefix: str, process: str, started: float = STARTED
) -> None:
    """Serve ``Version`` and ``StartTime`` of ``process`` (:data:`pvdb.process.PROCESSES`).

    Args:
        provider: the IOC's ``StaticProvider``.
        prefix: endstation prefix.
        process: ``coordination``, ``registry`` or ``queue``.
        started: epoch seconds the process started (default :data:`STARTED`).
    """
    info = PROCESSES[process]
    assert info.version is not None and info.start_time is not None
    now = time.time()
    nt_s, nt_d = NTScalar("s"), NTScalar("d", display=True)
    start = nt_d.wrap(started, timestamp=now)
    start["display.units"] = info.start_time.units
    provider.add(info.version.name(prefix),
                 SharedPV(nt=nt_s, initial=nt_s.wrap(pvcoord_version(), timestamp=now)))
    provider.add(info.start_time.name(prefix), SharedPV(nt=nt_d, initial=start))
