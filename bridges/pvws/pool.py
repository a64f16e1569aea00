"""Upstream channels shared by all sockets: one per name (``pva``/``ca``, ``loc``, ``sim``).

An :class:`Upstream` holds the latest converted state of its channel and tells each subscribed
:class:`Sub` when it changes; the socket decides when to send (throttling, coalescing). A channel
lives while at least one socket subscribes it (``/pvws/pool`` lists the reference counts).

PVA monitors are taken in from p4p's client thread in batches (:class:`MonitorBatch`): one hop
into the event loop for all channels with news since the loop last looked, and one conversion per
channel and batch (of its latest value), instead of one hop, one task wake-up and one conversion
per update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from p4p.client import raw
from p4p.client.asyncio import Context, Disconnected, Finished

from .config import PVName
from .values import DISCONNECTED_BODY, Converted, convert, local_enum, local_value

if TYPE_CHECKING:
    from .session import Sub

_log = logging.getLogger(__name__)


class Upstream:
    """One channel's latest state and its subscribers.

    Attributes:
        pvname: the parsed name.
        conv: the latest state (None until the first value arrived).
        gen: incremented when sockets must re-send metadata (first value, reconnect).
        connected: whether the last event was a value (not a disconnect).
        subs: the socket subscriptions.
    """

    writable_kind = False

    def __init__(self, pvname: PVName) -> None:
        self.pvname = pvname
        self.conv: Converted | None = None
        self.gen = 0
        self.connected = False
        self.subs: set[Sub] = set()
        self.updates = 0
        self._frames: dict[str, bytes] = {}

    @property
    def key(self) -> str:
        """The pool key."""
        return self.pvname.key

    def start(self) -> None:
        """Begin following the channel."""

    def close(self) -> None:
        """Stop following the channel."""

    def publish(self, conv: Converted, new_meta: bool = False) -> None:
        """Store ``conv`` and tell every subscriber."""
        if new_meta or self.conv is None:
            self.gen += 1
        self.conv = conv
        self.updates += 1
        self._frames.clear()
        for sub in list(self.subs):
            sub.socket.updated(sub)

    def frame(self, head: str) -> bytes:
        """The steady-state ``update`` frame of the latest state (UTF-8), for one PV name.

        ``head`` is a :class:`~bridges.pvws.session.Sub`'s ``{"type":"update","pv":NAME``; the
        frame adds only the value part (``seconds``, ``nanos``, value fields). Encoded once per
        state and name, shared by every socket that subscribes the channel under that name.
        """
        data = self._frames.get(head)
        if data is None:
            assert self.conv is not None
            data = self._frames[head] = (head + "," + self.conv.body + "}").encode()
        return data

    def disconnected(self) -> None:
        """Publish a disconnect (``value: "NaN"``, ``severity: INVALID``) once."""
        if not self.connected or self.conv is None:
            return
        self.connected = False
        old = self.conv
        self.publish(Converted(old.vtype, old.meta, "INVALID", DISCONNECTED_BODY, old.labels,
                               old.numeric))


class MonitorBatch:
    """Takes PVA monitor news from p4p's client thread into the event loop in batches.

    p4p's client thread calls :meth:`notify` when a channel's update queue becomes non-empty; the
    first notification since the loop last looked schedules one :meth:`_run` on the loop
    (``call_soon_threadsafe``), and later ones only add their channel. ``_run`` lets each channel
    take in everything queued (:meth:`PvaUpstream.take`).

    Args:
        loop: the bridge's event loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: dict[PvaUpstream, None] = {}
        self._scheduled = False
        self.batches = 0
        """Hops into the loop so far."""

    def notify(self, up: PvaUpstream) -> None:
        """``up`` has news (any thread)."""
        with self._lock:
            self._pending[up] = None
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed at shutdown
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._scheduled = False
        self.batches += 1
        for up in batch:
            try:
                up.take()
            except Exception:  # one channel's failure must not starve the others
                _log.exception("monitor update of %s failed", up.key)


class PvaUpstream(Upstream):
    """A PVA monitor (``pva://`` and ``ca://`` names: QSRV serves records over both).

    Args:
        pvname: the parsed name.
        ctx: the p4p client context (``nt=False``).
        batch: the pool's :class:`MonitorBatch`.
    """

    def __init__(self, pvname: PVName, ctx: Context, batch: MonitorBatch) -> None:
        super().__init__(pvname)
        self._ctx = ctx
        self._batch = batch
        self._sub: Any = None

    def start(self) -> None:  # noqa: D102
        # p4p's raw monitor (the FIFO its asyncio Context wraps): its handler runs on p4p's
        # client thread when the FIFO becomes non-empty; the values are popped on the loop.
        self._sub = raw.Context.monitor(self._ctx, self.pvname.name,
                                        lambda: self._batch.notify(self))

    def close(self) -> None:  # noqa: D102
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def take(self) -> None:
        """Take in every queued event (event loop): publish the latest value once.

        A disconnect is published in its place in the sequence (a value queued before it first),
        so a reconnect sends metadata again; values in a row are coalesced to the last one.
        """
        last: Any = None
        while self._sub is not None:
            ev = self._sub.pop()
            if ev is None:
                break
            if isinstance(ev, Exception):
                if last is not None:
                    self._value(last)
                    last = None
                if isinstance(ev, Disconnected):
                    self.disconnected()
                if isinstance(ev, Finished):
                    break
            else:
                last = ev
        if last is not None:
            self._value(last)

    def _value(self, v: Any) -> None:
        try:
            conv = convert(v)
        except Exception as e:  # a server sending something unexpected must not stop us
            conv = local_value(f"unconvertible value: {type(e).__name__}", time.time())
        reconnect = not self.connected
        self.connected = True
        self.publish(conv, new_meta=reconnect)


class LocUpstream(Upstream):
    """``loc://NAME(initial)``: a value held by the bridge, writable by web users."""

    writable_kind = True

    def __init__(self, pvname: PVName) -> None:
        super().__init__(pvname)
        arg = (pvname.arg or "").strip()
        self.value: float | str
        if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
            self.value = arg[1:-1]
        elif arg:
            try:
                self.value = float(arg)
            except ValueError:
                self.value = arg
        else:
            self.value = 0.0

    def start(self) -> None:  # noqa: D102
        self.connected = True
        self.publish(local_value(self.value, time.time()), new_meta=True)

    def write(self, value: float | str) -> None:
        """Set the value (a number for a numeric loc PV, text for a text one).

        Raises:
            ValueError: a text that is not a number for a numeric loc PV.
        """
        self.value = float(value) if isinstance(self.value, float) else str(value)
        self.publish(local_value(self.value, time.time()))


class SimUpstream(Upstream):
    """``sim://sine``, ``sim://ramp``, ``sim://noise`` (10 Hz) and ``sim://flipflop(N)``."""

    def __init__(self, pvname: PVName) -> None:
        super().__init__(pvname)
        self._task: asyncio.Task[None] | None = None
        self.period = 0.1
        if pvname.name == "flipflop":
            try:
                self.period = max(0.1, float(pvname.arg)) if pvname.arg else 1.0
            except ValueError:
                self.period = 1.0
            if not math.isfinite(self.period):
                self.period = 1.0

    def start(self) -> None:  # noqa: D102
        self.connected = True
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:  # noqa: D102
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _value(self, n: int, now: float) -> Converted:
        kind = self.pvname.name
        if kind == "flipflop":
            return local_enum(n % 2, ("false", "true"), now)
        if kind == "sine":
            return local_value(5.0 * math.sin(2 * math.pi * now / 10.0), now)
        if kind == "ramp":
            return local_value(now % 10.0, now)
        return local_value(random.uniform(-5.0, 5.0), now)

    async def _run(self) -> None:
        n = 0
        first = True
        while True:
            self.publish(self._value(n, time.time()), new_meta=first)
            first = False
            n += 1
            await asyncio.sleep(self.period)  # the channel's own update period, not a wait


class Pool:
    """Name key -> :class:`Upstream`, shared by all sockets of the bridge.

    Args:
        ctx_for: the p4p client context for ``pva://`` names.
        ca_for: the caproto client context for ``ca://`` names; None: read them over PVA.
    """

    def __init__(self, ctx_for: Callable[[], Context],
                 ca_for: Callable[[], Any] | None = None) -> None:
        self._ctx_for = ctx_for
        self._ca_for = ca_for
        self.channels: dict[str, Upstream] = {}
        self._batch: MonitorBatch | None = None

    @property
    def batch(self) -> MonitorBatch:
        """The :class:`MonitorBatch` of the PVA channels (made on first use, in the loop)."""
        if self._batch is None:
            self._batch = MonitorBatch(asyncio.get_running_loop())
        return self._batch

    def acquire(self, pvname: PVName, sub: Sub) -> Upstream:
        """The channel for ``pvname`` (started if new), with ``sub`` added to its subscribers."""
        up = self.channels.get(pvname.key)
        if up is None:
            if pvname.scheme == "loc":
                up = LocUpstream(pvname)
            elif pvname.scheme == "sim":
                up = SimUpstream(pvname)
            elif pvname.scheme == "ca" and self._ca_for is not None:
                from .ca import CaUpstream

                up = CaUpstream(pvname, self._ca_for())
            else:
                up = PvaUpstream(pvname, self._ctx_for(), self.batch)
            self.channels[pvname.key] = up
            up.subs.add(sub)
            sub.up = up
            up.start()
        else:
            up.subs.add(sub)
            sub.up = up
        return up

    def release(self, up: Upstream, sub: Sub) -> None:
        """Remove ``sub``; close the channel when nobody subscribes it any more."""
        up.subs.discard(sub)
        if not up.subs and self.channels.get(up.key) is up:
            del self.channels[up.key]
            up.close()

    def close(self) -> None:
        """Close every channel."""
        for up in list(self.channels.values()):
            up.close()
        self.channels.clear()
