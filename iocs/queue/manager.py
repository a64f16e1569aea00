"""The RE Manager link of the queue IOC: 0MQ only, through ``bluesky_queueserver_api.zmq.aio``.

Status comes from the ``QS_Info`` push of the info socket (``--zmq-publish-console ON``; every
change plus a 1 s heartbeat). When no push has arrived for :data:`POLL_AFTER` seconds (a manager
started without console publishing, or one that went away) the link polls ``status`` every
:data:`POLL_PERIOD` seconds on its own request socket. Console text (``QS_Console``) is split into
lines. The link never talks to the RE worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bluesky_queueserver_api.zmq.aio import REManagerAPI

log = logging.getLogger(__name__)

POLL_AFTER = 1.2
"""Seconds without a ``QS_Info`` push after which status is polled (the push heartbeat is 1 s)."""
POLL_PERIOD = 0.25
"""Seconds between status polls while polling."""
POLL_TIMEOUT = 0.5
"""Seconds a status poll waits for the manager's reply."""
CONTROL_TIMEOUT = 2.0
"""Seconds a control or fetch request waits for the manager's reply (the API's default)."""

StatusCallback = Callable[[dict[str, Any], float, str], Awaitable[None]]
"""``await cb(status, manager_time, source)``; source is ``push`` or ``poll``."""
ConsoleCallback = Callable[[str], None]
"""``cb(text)`` with a chunk of console output."""


class ManagerError(RuntimeError):
    """The RE Manager refused a request; ``str(e)`` is its message verbatim."""


class ManagerUnreachableError(ManagerError):
    """The RE Manager did not answer (or the 0MQ request failed); ``str(e)`` says which."""


@dataclass
class Contact:
    """When the link last heard from the manager (``time.monotonic()`` seconds)."""

    push: float = -1e9
    poll: float = -1e9

    def last(self) -> float:
        """The newest contact of either kind."""
        return max(self.push, self.poll)


class ManagerLink:
    """Status push + poll fallback + console + requests to one RE Manager.

    Args:
        zmq_control: the manager's control address (``tcp://127.0.0.1:PORT``).
        zmq_info: its info (publish) address.
        on_status: awaited with every status (push or poll), in order.
        on_console: called with console text chunks.
    """

    def __init__(
        self,
        zmq_control: str,
        zmq_info: str,
        on_status: StatusCallback,
        on_console: ConsoleCallback | None = None,
    ) -> None:
        self.zmq_control, self.zmq_info = zmq_control, zmq_info
        self.on_status, self.on_console = on_status, on_console
        self.contact = Contact()
        self.api: REManagerAPI | None = None
        self._poll_api: REManagerAPI | None = None
        self._status_lock = asyncio.Lock()

    # --- requests -----------------------------------------------------------------------------

    async def call(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call an API method (``queue_start``, ``item_add``, ...) and return its reply.

        Raises:
            ManagerError: the manager's refusal message verbatim, or 'no reply within N s'.
        """
        if self.api is None:
            raise ManagerError("the RE Manager link is not started")
        try:
            return await getattr(self.api, method)(*args, **kwargs)
        except self.api.RequestFailedError as e:
            resp = getattr(e, "response", None) or {}
            raise ManagerError(str(resp.get("msg") or e)) from None
        except self.api.RequestTimeoutError:
            raise ManagerUnreachableError(
                f"the RE Manager did not answer {method} within {CONTROL_TIMEOUT:g} s "
                f"({self.zmq_control})"
            ) from None
        except Exception as e:  # 0MQ errors: report, never crash the IOC
            raise ManagerUnreachableError(f"{method} failed: {type(e).__name__}: {e}") from None

    async def refresh(self) -> dict[str, Any]:
        """Ask for the status now (``status(reload=True)``), deliver it like a push, return it.

        Raises:
            ManagerError: the manager did not answer.
        """
        sent = time.monotonic()
        status = dict(await self.call("status", reload=True))
        self.contact.poll = time.monotonic()
        await self._deliver(status, time.time(), "poll", asked=sent)
        return status

    async def deliver_push(self, status: dict[str, Any], mtime: float) -> None:
        """Deliver one ``QS_Info`` status (manager time ``mtime``) received now."""
        self.contact.push = time.monotonic()
        await self._deliver(status, mtime, "push")

    # --- tasks --------------------------------------------------------------------------------

    async def _deliver(
        self, status: dict[str, Any], mtime: float, source: str, asked: float | None = None
    ) -> None:
        """Hand ``status`` to ``on_status`` (serialized).

        ``asked``: the ``time.monotonic()`` a polled status was requested. If a push arrived
        after that, the reply is dropped: the push may be newer (delivering the reply after it
        would step the PVs back), and any change after the reply is pushed again anyway.
        """
        async with self._status_lock:
            if asked is not None and self.contact.push > asked:
                return
            try:
                await self.on_status(status, mtime, source)
            except Exception:  # one bad update must not stop the link
                log.exception("status handler failed")

    async def _push_loop(self) -> None:
        assert self.api is not None
        mon: Any = self.api.system_info_monitor  # set because the API has zmq_info_addr
        mon.enable()
        while True:
            try:
                msg = await mon.next_msg(timeout=0.5)
            except self.api.RequestTimeoutError:
                continue
            status = (msg.get("msg") or {}).get("status")
            if not isinstance(status, dict):
                continue
            mtime = msg.get("time")
            await self.deliver_push(
                status, float(mtime) if isinstance(mtime, int | float) else time.time()
            )

    async def _poll_loop(self) -> None:
        assert self._poll_api is not None
        while True:
            await asyncio.sleep(POLL_PERIOD)
            if time.monotonic() - self.contact.push < POLL_AFTER:
                continue
            sent = time.monotonic()
            try:
                status: Any = await self._poll_api.status(reload=True)
            except Exception as e:  # unreachable manager: keep polling
                log.debug("status poll failed: %s", e)
                continue
            if time.monotonic() - self.contact.push < POLL_AFTER:
                continue  # a push arrived meanwhile: it is newer
            self.contact.poll = time.monotonic()
            await self._deliver(dict(status), time.time(), "poll", asked=sent)

    async def _console_loop(self) -> None:
        assert self.api is not None
        mon: Any = self.api.console_monitor  # set because the API has zmq_info_addr
        mon.enable()
        while True:
            try:
                msg = await mon.next_msg(timeout=0.5)
            except self.api.RequestTimeoutError:
                continue
            text = msg.get("msg") if isinstance(msg, dict) else None
            if isinstance(text, str) and self.on_console is not None:
                self.on_console(text)

    async def run(self, stop: asyncio.Event) -> None:
        """Receive and poll until ``stop`` is set."""
        quiet = logging.getLogger("bluesky_queueserver.manager.comms")
        quiet.setLevel(logging.CRITICAL)  # a dead manager logs a traceback per failed poll
        self.api = REManagerAPI(
            zmq_control_addr=self.zmq_control, zmq_info_addr=self.zmq_info,
            timeout_recv=CONTROL_TIMEOUT, console_monitor_poll_timeout=0.2,
            system_info_monitor_poll_timeout=0.2,
        )
        self._poll_api = REManagerAPI(
            zmq_control_addr=self.zmq_control, zmq_info_addr=self.zmq_info,
            timeout_recv=POLL_TIMEOUT,
        )
        tasks = [
            asyncio.create_task(self._push_loop(), name="qs-push"),
            asyncio.create_task(self._poll_loop(), name="qs-poll"),
            asyncio.create_task(self._console_loop(), name="qs-console"),
        ]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for api in (self.api, self._poll_api):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(api.close(), 3.0)
