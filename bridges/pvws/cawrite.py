"""``ca://`` writes over Channel Access on the device network, in a child process.

The bridge reads ``ca://`` names with caproto's asyncio client on the *client* network (the
process's ``EPICS_CA_*``). Writes, like every write of the bridge, go to the *device* network
(decision 0070). caproto (like libca) takes its CA address list from the process environment, so
one process cannot search two CA networks: the writes run in a child,
``python -m bridges.pvws.cawrite``, whose environment carries the device network's ``EPICS_CA_*``
(``--device-ca-conf``), and which puts with caproto's threading client (a real CA client).

The bridge decides every write first (:meth:`bridges.pvws.app.Conn.write`: the may-write decision
for the web user, the same as for ``pva://``); the child only carries it out.

Protocol (JSON lines; the child first says it is ready, then answers every request, in any
order)::

    <- {"ready": true}
    -> {"id": 7, "pv": "BL01:m1:Setpoint", "value": 2.5}
    <- {"id": 7, "ok": true}
    <- {"id": 7, "ok": false, "error": "no CA server answered for BL01:m1:Setpoint in 5.0 s"}

A string value is written as ``DBR_STRING`` (the IOC converts it, as ``caput`` does); a number in
the channel's native type.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pvcoord.service import shared_python

log = logging.getLogger("bridges.pvws.cawrite")

STARTUP_TIMEOUT = 30.0
"""Seconds the child may take to start (Python, caproto's import) before it says it is ready; a
put's own time (``timeout``) starts after that."""
WORKERS = 4
"""Puts carried out at once by the child (a slow IOC does not hold up the others)."""


class CaWriteError(RuntimeError):
    """A ``ca://`` put that was not carried out; ``str(e)`` says why (for the web user)."""


def device_ca_env(conf: Mapping[str, str], base: Mapping[str, str] | None = None
                  ) -> dict[str, str]:
    """The child's environment: the device network's ``EPICS_CA_*`` instead of the bridge's.

    ``base`` (default: this process's environment) without its ``EPICS_CA_*``, plus ``conf``.

    Raises:
        ValueError: a key of ``conf`` that is not ``EPICS_CA_*``.
    """
    bad = [k for k in conf if not k.startswith("EPICS_CA_")]
    if bad:
        raise ValueError(f"device CA configuration takes EPICS_CA_* keys only, not {bad}")
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("EPICS_CA_")}
    env.update(conf)
    return env


class CaWriter:
    """The bridge's side: a child process carrying out ``ca://`` puts (started on first use).

    Args:
        env: the child's environment (:func:`device_ca_env`).
        timeout: seconds a put may take (search, connection and the put's completion).
    """

    def __init__(self, env: Mapping[str, str], timeout: float) -> None:
        self.env = dict(env)
        self.timeout = timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._start_lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        """Process id of the running child, or ``None``."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None \
            else None

    async def _ensure(self) -> asyncio.subprocess.Process:
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            proc = await asyncio.create_subprocess_exec(
                shared_python(), "-m", "bridges.pvws.cawrite", "--timeout", str(self.timeout),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self.env)
            assert proc.stdout is not None
            first = b""
            try:
                first = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
            except (TimeoutError, ValueError):  # ValueError: a first line past the 64 KiB limit
                pass
            except BaseException:  # cancelled (the socket closed): never leave the child behind
                await asyncio.shield(_reap(proc))
                raise
            if _safe(first.decode(errors="replace")) != {"ready": True}:
                code = await asyncio.shield(_reap(proc))  # -9: we killed it after the wait
                raise CaWriteError(f"the CA writer did not start: no ready line within "
                                   f"{STARTUP_TIMEOUT:g} s (exit {code}, said {first[:120]!r})")
            self._proc = proc
            log.info("CA writer started (pid %d)", proc.pid)
            self._reader = asyncio.get_running_loop().create_task(self._read(proc))
            return proc

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                reply = json.loads(line)
                fut = self._pending.pop(int(reply["id"]), None)
            except (ValueError, KeyError, TypeError):
                log.warning("CA writer: unreadable reply %r", line[:200])
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)
        code = await proc.wait()
        log.warning("CA writer (pid %d) exited with %s", proc.pid, code)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CaWriteError(f"the CA writer exited ({code})"))
        self._pending.clear()

    async def put(self, name: str, value: float | int | str) -> None:
        """Write ``value`` to CA channel ``name`` on the device network; wait for completion.

        Raises:
            CaWriteError: no server answered, the IOC refused the put, or the child failed.
        """
        try:
            proc = await self._ensure()
        except OSError as e:
            raise CaWriteError(f"the CA writer cannot start: {e}") from None
        assert proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            proc.stdin.write((json.dumps({"id": rid, "pv": name, "value": value}) + "\n")
                             .encode())
            await proc.stdin.drain()
            reply = await asyncio.wait_for(fut, self.timeout + 2.0)
        except (BrokenPipeError, ConnectionResetError):
            raise CaWriteError("the CA writer is not running") from None
        except TimeoutError:
            raise CaWriteError(f"the CA writer did not answer for {name} in "
                               f"{self.timeout + 2.0:.1f} s") from None
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise CaWriteError(str(reply.get("error") or "put failed"))

    async def close(self) -> None:
        """Stop the child (SIGTERM to its pid, SIGKILL after 5 s)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


# --- the child ------------------------------------------------------------------------------------


async def _reap(proc: asyncio.subprocess.Process) -> int | None:
    """Kill a child that has not exited and wait for it; its exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    return await proc.wait()


def _put(ctx: Any, pvs: dict[str, Any], lock: threading.Lock, name: str, value: Any,
         timeout: float) -> str:
    """Carry out one put; return '' or why it failed."""
    from caproto import CaprotoTimeoutError, ChannelType

    with lock:
        pv = pvs.get(name)
        if pv is None:
            (pv,) = ctx.get_pvs(name, timeout=timeout)
            pvs[name] = pv
    try:
        pv.wait_for_connection(timeout=timeout)
    except (CaprotoTimeoutError, TimeoutError):
        return f"no CA server answered for {name} in {timeout:.1f} s"
    kind = ChannelType.STRING if isinstance(value, str) else None
    try:
        resp = pv.write([value], wait=True, timeout=timeout, data_type=kind)
    except (CaprotoTimeoutError, TimeoutError):
        return f"the CA put to {name} did not complete in {timeout:.1f} s"
    except Exception as e:  # refused by the client library (access rights, bad value)
        return f"CA put to {name} failed: {type(e).__name__}: {e}"
    status = getattr(resp, "status", None)  # a caproto CAStatusCode
    if status is not None and not getattr(status, "success", 0):
        why = getattr(status, "description", "") or str(status)
        return f"CA put to {name} refused by the IOC: {getattr(status, 'name', '?')} ({why})"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Serve put requests from stdin until it closes (the bridge's child process)."""
    p = argparse.ArgumentParser(prog="python -m bridges.pvws.cawrite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per put (default 5)")
    a = p.parse_args(argv)
    from caproto.threading.client import Context

    ctx = Context(timeout=a.timeout)
    pvs: dict[str, Any] = {}
    lock, out = threading.Lock(), threading.Lock()

    def answer(rid: object, why: str) -> None:
        line = json.dumps({"id": rid, "ok": not why, **({"error": why} if why else {})})
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def run(rid: object, name: str, value: Any) -> None:
        try:
            answer(rid, _put(ctx, pvs, lock, name, value, a.timeout))
        except Exception as e:  # every request is answered
            answer(rid, f"CA put to {name} failed: {type(e).__name__}: {e}")

    with out:
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
    with ThreadPoolExecutor(WORKERS) as pool:
        for line in sys.stdin:
            req = _safe(line)
            rid = req.get("id") if isinstance(req, dict) else None
            if not isinstance(req, dict) or not isinstance(req.get("pv"), str) or \
                    not isinstance(req.get("value"), int | float | str):
                answer(rid, "malformed request: give id, pv (a string) and value (a number or "
                       "a string)")
                continue
            pool.submit(run, rid, req["pv"], req["value"])
    ctx.disconnect()
    return 0


def _safe(line: str) -> object:
    with contextlib.suppress(ValueError):
        return json.loads(line)
    return None


if __name__ == "__main__":
    sys.exit(main())
