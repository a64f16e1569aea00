"""One websocket: its subscriptions, per-PV coalescing and its bounded outgoing queue.

Sending is done by one writer task per socket. Updates are never queued as messages: a PV with
news is put in the ``ready`` set (at most once) and its message is built from the channel's
*latest* state when the writer gets to it. So a client that reads slowly costs at most one
pending update per subscribed PV, never loses the last state, and does not slow other sockets
(its writer waits on its own TCP buffer). Each merged update is counted (``coalesced``).
Non-update messages (replies, errors, echo) go to a deque of ``queue_size``; when it is full the
oldest is dropped and counted (``dropped``).

Throttling: a PV is sent at most once per ``throttle`` seconds per socket; an update inside the
period arms a timer that sends the then-latest state at the period's end.

Fairness between sockets: a writer sends at most ``SLICE`` frames, then yields to the event loop,
so every other socket with news (and every upstream update waiting to be taken in) gets a turn
between two slices of a long burst. A socket with one fresh update therefore waits for about one
slice of each busy socket, not for their whole bursts (``docs/decisions/0150-*.md``). The TCP
connection of a socket with a burst stays corked across its slices and is uncorked when its queue
is empty. The steady-state frame of an update (no metadata, severity or readonly change) is
encoded once per channel and PV name (:meth:`Upstream.frame`) and shared by every socket.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from .pool import Upstream

_ids = itertools.count(1)

SLICE = 1
"""Frames a socket's writer sends before it yields to the event loop (see the module docstring).

One frame per turn: a round of 100 busy sockets is then ~100 frames (about 1.5 ms), the longest a
socket with one fresh update waits per loop iteration; the TCP connection stays corked across
turns, so slicing adds task switches (a few microseconds per frame), not socket writes.
"""

ReadonlyFn = Callable[[str | None, Upstream], tuple[bool, str]]


class Sub:
    """One PV subscribed on one socket, under the exact name the client used."""

    __slots__ = ("socket", "pv", "head", "up", "sent_gen", "sent_sev", "sent_ro", "sent_reason",
                 "last_sent", "timer")

    def __init__(self, socket: Socket, pv: str) -> None:
        self.socket = socket
        self.pv = pv
        self.head = '{"type":"update","pv":' + json.dumps(pv)
        self.up: Upstream | None = None
        self.sent_gen = -1
        self.sent_sev: str | None = None
        self.sent_ro: bool | None = None
        self.sent_reason = ""
        self.last_sent = 0.0
        self.timer: asyncio.TimerHandle | None = None


class Socket:
    """State of one ``/pvws/pv`` websocket.

    Args:
        ws: the prepared websocket.
        user: the web user of the upgrade request (None: not logged in).
        host: the peer host.
        throttle: coalescing period, seconds.
        queue_size: bound of the non-update message queue.
        readonly: ``(user, upstream) -> (readonly, reason)``, the may-write decision for this user.
    """

    def __init__(self, ws: web.WebSocketResponse, user: str | None, host: str, throttle: float,
                 queue_size: int, readonly: ReadonlyFn) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.user = user
        self.host = host
        self.throttle = throttle
        self.readonly = readonly
        self.created = time.time()
        self.last_client_message = 0.0
        self.last_message_sent = 0.0
        self.subs: dict[str, Sub] = {}
        self.ready: dict[str, None] = {}
        self.control: deque[str] = deque(maxlen=queue_size)
        self.dropped = 0
        self.coalesced = 0
        self.sent = 0
        self.errors = 0
        self.max_size = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.tcp_socket: Any = None
        """The connection's socket (for ``TCP_CORK``), set by the app once known."""

    # --- producer side ------------------------------------------------------------------------

    def send_control(self, msg: dict[str, Any]) -> None:
        """Queue a non-update message (reply, error, device info)."""
        self.send_text(json.dumps(msg, separators=(",", ":"), allow_nan=False))

    def send_text(self, text: str) -> None:
        """Queue a text frame as is (``echo``)."""
        if self._closed:
            return
        if len(self.control) == self.control.maxlen:
            self.dropped += 1
        self.control.append(text)
        self._wake.set()

    def error(self, code: str, message: str, **extra: Any) -> None:
        """Queue ``{"type": "error", "code", "message", ...}``."""
        self.errors += 1
        self.send_control({"type": "error", "code": code, "message": message, **extra})

    def updated(self, sub: Sub) -> None:
        """The channel of ``sub`` has news: send now, or when its throttle period ends."""
        if self._closed:
            return
        if sub.pv in self.ready or sub.timer is not None:
            self.coalesced += 1
            return
        wait = sub.last_sent + self.throttle - time.monotonic()
        if wait <= 0:
            self.ready[sub.pv] = None
            self._wake.set()
        else:
            sub.timer = self._loop.call_later(wait, self._due, sub)

    def _due(self, sub: Sub) -> None:
        sub.timer = None
        if not self._closed and self.subs.get(sub.pv) is sub:
            self.ready[sub.pv] = None
            self._wake.set()

    def access_changed(self) -> None:
        """Lock state or registry changed: re-send where ``readonly`` or its reason changed.

        Unthrottled: a flip reaches the client at once.
        """
        for sub in self.subs.values():
            if sub.up is None or sub.up.conv is None or sub.sent_ro is None:
                continue
            ro, reason = self.readonly(self.user, sub.up)
            changed = ro != sub.sent_ro or (ro and reason != sub.sent_reason)
            if changed and sub.pv not in self.ready:
                if sub.timer is not None:
                    sub.timer.cancel()
                    sub.timer = None
                self.ready[sub.pv] = None
                self._wake.set()

    def drop_sub(self, pv: str) -> Sub | None:
        """Forget ``pv`` on this socket (returns its :class:`Sub`)."""
        sub = self.subs.pop(pv, None)
        if sub is not None:
            self.ready.pop(pv, None)
            if sub.timer is not None:
                sub.timer.cancel()
                sub.timer = None
        return sub

    # --- writer side --------------------------------------------------------------------------

    def build(self, sub: Sub) -> bytes | None:
        """The ``update`` frame (UTF-8) for ``sub`` from its channel's latest state (None: nothing).

        The steady-state frame (nothing changed but the value) is the channel's shared encoding
        (:meth:`Upstream.frame`); only frames with metadata, severity or readonly news are built
        for this socket.
        """
        up = sub.up
        if up is None or up.conv is None:
            return None
        conv = up.conv
        ro, reason = self.readonly(self.user, up)
        first = sub.sent_gen != up.gen
        sub.last_sent = time.monotonic()
        if (not first and conv.severity == sub.sent_sev and ro == sub.sent_ro
                and (not ro or not reason or reason == sub.sent_reason)):
            sub.sent_reason = reason if ro else ""
            return up.frame(sub.head)
        parts = [sub.head]
        if first:
            parts.append("," + conv.meta)
            sub.sent_gen = up.gen
        if first or conv.severity != sub.sent_sev:
            parts.append(f',"severity":"{conv.severity}"')
            sub.sent_sev = conv.severity
        if first or ro != sub.sent_ro:
            parts.append(',"readonly":' + ("true" if ro else "false"))
            sub.sent_ro = ro
        if ro and reason and (first or reason != sub.sent_reason):
            parts.append(',"readonly_reason":' + json.dumps(reason))
        sub.sent_reason = reason if ro else ""
        parts.append("," + conv.body + "}")
        return "".join(parts).encode()

    def _cork(self, on: bool) -> None:
        """``TCP_CORK`` on the connection while a burst is written (Linux; else nothing).

        One ``send`` per websocket frame made the socket writes about two thirds of the event
        loop's time in a burst of updates (py-spy, ``benchmarks/bench_pvws.py``); corked, the
        kernel only appends to the buffer and sends full segments when uncorked.
        """
        sock = self.tcp_socket
        if sock is None or not hasattr(socket, "TCP_CORK"):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            self.tcp_socket = None  # not a TCP socket (or closed): stop trying

    async def run_writer(self) -> None:
        """Send queued messages until the socket closes.

        ``SLICE`` frames per turn, then a yield to the loop while more are queued; a burst of
        several frames is written corked and uncorked when the queue is empty.
        """
        ws = self.ws
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            corked = len(self.control) + len(self.ready) > 1
            if corked:
                self._cork(True)
            try:
                while await self._write_slice(ws):
                    await asyncio.sleep(0)  # a turn for the other sockets and upstream updates
            finally:
                if corked:
                    self._cork(False)

    async def _write_slice(self, ws: web.WebSocketResponse) -> bool:
        """Send up to ``SLICE`` queued messages (control messages first); True: more are queued."""
        n = 0
        while not self._closed and (self.control or self.ready):
            if n >= SLICE:
                return True
            if self.control:
                data: bytes | None = self.control.popleft().encode()
            else:
                pv = next(iter(self.ready))
                del self.ready[pv]
                sub = self.subs.get(pv)
                data = self.build(sub) if sub is not None else None
            if data is None:
                continue
            try:
                await ws.send_frame(data, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError):
                self._closed = True
                return False
            n += 1
            self.sent += 1
            self.last_message_sent = time.time()
            self.max_size = max(self.max_size, len(data))
        return False

    def close(self) -> None:
        """Stop sending; cancel timers (subscriptions are released by the caller)."""
        self._closed = True
        self._wake.set()
        for sub in self.subs.values():
            if sub.timer is not None:
                sub.timer.cancel()
                sub.timer = None

    @property
    def queued(self) -> int:
        """Messages waiting to be sent (control + PVs with a pending update)."""
        return len(self.control) + len(self.ready)

    def summary(self) -> dict[str, Any]:
        """This socket for ``/pvws/summary`` (PVWS fields plus drops and coalesced counts)."""
        arrays = sum(1 for s in self.subs.values()
                     if s.up is not None and s.up.conv is not None
                     and s.up.conv.vtype.endswith("Array"))
        return {
            "id": str(self.id), "created": _iso(self.created),
            "last_client_message": _iso(self.last_client_message),
            "last_message_sent": _iso(self.last_message_sent), "queued": self.queued,
            "pvs": len(self.subs), "arrays": arrays, "max_size": self.max_size,
            "user": self.user or "", "host": self.host, "sent": self.sent,
            "dropped": self.dropped, "coalesced": self.coalesced, "errors": self.errors,
        }


def _iso(t: float) -> str:
    if not t:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
