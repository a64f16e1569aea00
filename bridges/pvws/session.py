"""One websocket: its subscriptions, per-PV coalescing and its bounded outgoing queue.

Updates are never queued as messages: a PV with news is put in the socket's ``ready`` set (at
most once) and its message is built from the channel's *latest* state when the socket's turn to
send comes. So a client that reads slowly costs at most one pending update per subscribed PV,
never loses the last state, and does not slow other sockets. Each merged update is counted
(``coalesced``). Non-update messages (replies, errors, echo) go to a deque of ``queue_size``;
when it is full the oldest is dropped and counted (``dropped``).

Throttling: a PV is sent at most once per ``throttle`` seconds per socket; an update inside the
period arms a timer that sends the then-latest state at the period's end.

Sending (``docs/decisions/0150-pvws-fair-sender.md``): one :class:`Sender` task per bridge gives
the sockets with something to send their turns, as a fair queue with priority for sparse sockets
(like fq_codel's new and old flow lists). A socket that had nothing queued gets a first turn of
``NEW_QUANTUM`` frame before the sockets in the middle of a burst, which then get turns of up to
``OLD_QUANTUM`` frames in the order their news came. The sender yields to the event loop every
``BUDGET`` seconds of writing, so upstream updates are taken in during a long burst. A socket
with one fresh update thus waits for about one frame of each other socket that just got news,
not for their bursts.

The sender only writes what cannot make it wait: a frame of at most ``INLINE_MAX`` bytes into an
empty transport buffer. A socket whose client reads slowly (bytes buffered), or with a larger
frame, is handed to its own task, which waits on that socket's TCP buffer alone and gives the
socket back when its queue is empty. A burst is written corked (pushed every ``CORK_BYTES``).
The steady-state frame of an update (no metadata, severity or readonly change) is encoded once
per channel and PV name (:meth:`Upstream.frame`) and shared by every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from .pool import Upstream

_ids = itertools.count(1)
_log = logging.getLogger(__name__)

NEW_QUANTUM = 1
"""Frames of the first turn of a socket that had nothing queued (its fresh update goes first)."""
OLD_QUANTUM = 256
"""Frames of a later turn of a socket in the middle of a burst (written corked): large, so the
sockets in a burst are served in the order their news came (each sends its burst in one go,
pausing only for the sender's yields), and the connection is pushed once per turn."""
BUDGET = 0.001
"""Seconds of writing after which the sender yields to the event loop (upstream updates)."""
INLINE_MAX = 16 * 1024
"""Largest frame the sender writes itself (aiohttp writes frames up to 16 KiB without waiting,
compressed or not); larger frames are written by the socket's own task."""
CORK_BYTES = 8192
"""Bytes written to a corked connection after which it is pushed (uncorked and corked again).

Linux sends no partial segment of a corked connection until it is uncorked or 200 ms have
passed, and a new connection's send buffer is 16 KiB (``tcp_wmem``): a corked burst larger
than the buffer would stall for those 200 ms. Pushing every 8 KiB (and whenever asyncio had to
buffer: the kernel refused bytes) keeps the batching (segments of ~50 frames, not one each) and
never lets the buffer fill with held data.
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
        sender: the bridge's :class:`Sender`.
    """

    def __init__(self, ws: web.WebSocketResponse, user: str | None, host: str, throttle: float,
                 queue_size: int, readonly: ReadonlyFn, sender: Sender) -> None:
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
        self.sender = sender
        self.scheduled = False
        """Whether the socket is in the sender's queues."""
        self._own: asyncio.Task[None] | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.tcp_socket: Any = None
        """The connection's socket (for ``TCP_CORK``), set by the app once known."""
        self.transport: Any = None
        """The connection's asyncio transport (its write buffer size), set by the app."""
        self._corked = False
        self._corked_bytes = 0

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
        self._activate()

    def error(self, code: str, message: str, **extra: Any) -> None:
        """Queue ``{"type": "error", "code", "message", ...}``."""
        self.errors += 1
        self.send_control({"type": "error", "code": code, "message": message, **extra})

    def _activate(self) -> None:
        """Something is queued: let the sender (or this socket's own task) send it."""
        if not self._closed and self._own is None and not self.scheduled:
            self.sender.schedule(self)

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
            self._activate()
        else:
            sub.timer = self._loop.call_later(wait, self._due, sub)

    def _due(self, sub: Sub) -> None:
        sub.timer = None
        if not self._closed and self.subs.get(sub.pv) is sub:
            self.ready[sub.pv] = None
            self._activate()

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
                self._activate()

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
        self._corked = on
        self._corked_bytes = 0
        sock = self.tcp_socket
        if sock is None or not hasattr(socket, "TCP_CORK"):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            self.tcp_socket = None  # not a TCP socket (or closed): stop trying

    def _wrote(self, n: int) -> None:
        """``n`` bytes were written: push a corked connection every ``CORK_BYTES``.

        When asyncio had to buffer (the kernel's buffer is full: a slow reader), the connection
        is uncorked for the rest of the burst, so no partial segment is held back.
        """
        if not self._corked:
            return
        self._corked_bytes += n
        tr = self.transport
        if tr is not None and tr.get_write_buffer_size():
            self._cork(False)
        elif self._corked_bytes >= CORK_BYTES:
            self._cork(False)
            self._cork(True)

    def _next(self) -> bytes | None:
        """Pop the next message to send (control messages first), None when nothing is queued."""
        while self.control or self.ready:
            if self.control:
                return self.control.popleft().encode()
            pv = next(iter(self.ready))
            del self.ready[pv]
            sub = self.subs.get(pv)
            data = self.build(sub) if sub is not None else None
            if data is not None:
                return data
        return None

    async def _send(self, data: bytes) -> bool:
        """Write one frame; False when the connection is gone (the socket is closed then)."""
        try:
            await self.ws.send_frame(data, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError):
            self._closed = True
            return False
        self._wrote(len(data))
        self.sent += 1
        self.last_message_sent = time.time()
        self.max_size = max(self.max_size, len(data))
        return True

    def _inline(self, data: bytes) -> bool:
        """Whether writing ``data`` now cannot make the writer wait (see the module docstring)."""
        tr = self.transport
        return (len(data) <= INLINE_MAX and tr is not None and not tr.is_closing()
                and tr.get_write_buffer_size() == 0)

    async def turn(self, quantum: int, until: float) -> tuple[bool, int]:
        """Send up to ``quantum`` messages for the :class:`Sender`, until ``until`` (monotonic).

        Returns ``(more, sent)``: whether more are queued and how many were sent. A burst (more
        than one message queued) is written corked; the cork stays on from a first turn into the
        next and over the sender's yields (a turn cut short by the budget goes on first), so a
        burst is pushed in few segments; it is released at the end of a full turn.
        A message that could make the writer wait goes to this socket's own task (which keeps
        the socket until its queue is empty); the turn ends there.
        """
        n = 0
        if not self._corked and self.queued > 1:
            self._cork(True)
        while n < quantum and not self._closed:
            data = self._next()
            if data is None:
                break
            if not self._inline(data):
                self._own = asyncio.get_running_loop().create_task(
                    self._write_own(data), name=f"pvws-socket-{self.id}")
                return False, n
            if not await self._send(data):
                break
            n += 1
            if time.monotonic() >= until:
                break
        more = bool(self.queued) and not self._closed
        if self._corked and not (more and (quantum == NEW_QUANTUM or n < quantum)):
            self._cork(False)  # kept while the burst goes on in the next turn (or after a yield)
        return more, n

    async def _write_own(self, first: bytes) -> None:
        """This socket's own writer: ``first`` and the rest of the queue, corked.

        Waits on this connection's buffer as long as needed, then gives the socket back.
        """
        self._cork(True)
        try:
            data: bytes | None = first
            while data is not None and await self._send(data):
                data = self._next()
        finally:
            self._cork(False)
            self._own = None
        if self.queued and not self._closed:
            self._activate()

    def close(self) -> None:
        """Stop sending; cancel timers and this socket's own writer.

        The caller releases the subscriptions.
        """
        self._closed = True
        if self._own is not None:
            self._own.cancel()
        for sub in self.subs.values():
            if sub.timer is not None:
                sub.timer.cancel()
                sub.timer = None

    def needs_turn(self) -> bool:
        """Whether the socket has something queued for the sender (not for its own task)."""
        return bool(self.queued) and self._own is None and not self._closed

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


class Sender:
    """Gives the bridge's sockets their turns to send (one task; see the module docstring).

    ``new`` holds sockets that had nothing queued when they got news, ``old`` those in the middle
    of a burst; ``new`` is served first, one ``NEW_QUANTUM`` turn each, then ``old`` in rotation,
    ``OLD_QUANTUM`` frames a turn.
    """

    def __init__(self) -> None:
        self.new: deque[Socket] = deque()
        self.old: deque[Socket] = deque()
        self.turns = 0
        self.yields = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the sender task (from the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pvws-sender")

    async def stop(self) -> None:
        """Stop the sender task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def schedule(self, sock: Socket) -> None:
        """``sock`` has something to send and was idle: queue it as a new flow."""
        sock.scheduled = True
        self.new.append(sock)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            since = time.monotonic()
            while self.new or self.old:
                if self.new:
                    sock, quantum = self.new.popleft(), NEW_QUANTUM
                else:
                    sock, quantum = self.old.popleft(), OLD_QUANTUM
                self.turns += 1
                try:
                    more, sent = await sock.turn(quantum, since + BUDGET)
                except Exception:  # one socket's failure must not stop every socket's sending
                    _log.exception("socket %s: sending failed", sock.id)
                    sock.close()
                    more, sent = False, 0
                if more and quantum == OLD_QUANTUM and sent < quantum:
                    self.old.appendleft(sock)  # cut short by the budget: it goes on first
                elif more:
                    self.old.append(sock)
                else:
                    sock.scheduled = False
                    if sock.needs_turn():
                        self.schedule(sock)
                if time.monotonic() - since > BUDGET:
                    self.yields += 1
                    await asyncio.sleep(0)  # upstream updates and client messages get in
                    since = time.monotonic()
