"""The bridge's PVA channels (``bridges.pvws.pool``) against an in-process p4p server.

p4p's monitor FIFO is taken into the event loop in batches (``MonitorBatch``): the latest value
of a run of updates is published, a disconnect is published in its place. The subscriber here
only counts notifications (a stand-in for a websocket, whose sending is tested against the real
bridge in tests/test_pvws_system.py).
"""

from __future__ import annotations

import asyncio
import json
import time

from p4p.client.asyncio import Context
from p4p.nt import NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from bridges.pvws.config import parse_name
from bridges.pvws.pool import Pool

TIMEOUT = 10.0


class Counter:
    """Counts ``updated`` calls (the one method a channel calls on a socket)."""

    def __init__(self) -> None:
        self.n = 0

    def updated(self, sub: object) -> None:
        self.n += 1


def _value(up) -> float:
    assert up.conv is not None
    return json.loads("{" + up.conv.body + "}")["value"]


class Sub:
    def __init__(self, socket: Counter) -> None:
        self.socket = socket
        self.up = None


async def _until(pred, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)  # polling a condition with a deadline, not a readiness sleep


def test_batches_keep_the_last_value_and_publish_the_disconnect():
    async def run() -> None:
        pv = SharedPV(nt=NTScalar("d"), initial=0.0)
        server = Server(providers=[{"t:a": pv}], isolate=True)
        ctx = Context("pva", conf=server.conf(), useenv=False, nt=False)
        pool = Pool(lambda: ctx)
        counter = Counter()
        sub = Sub(counter)
        try:
            up = pool.acquire(parse_name("pva://t:a", "pva"), sub)  # type: ignore[arg-type]
            await _until(lambda: up.conv is not None, "first value")
            assert up.gen == 1 and up.connected
            for i in range(1, 201):
                pv.post(float(i))
            await _until(lambda: _value(up) == 200.0, "the last value")
            assert 2 <= up.updates <= 201 and counter.n == up.updates
            assert pool.batch.batches <= up.updates
            server.stop()
            await _until(lambda: not up.connected, "the disconnect")
            conv = up.conv
            assert conv is not None
            assert conv.severity == "INVALID" and conv.body == '"value":"NaN"'
            assert up.gen == 1  # metadata again only when a value comes back
        finally:
            pool.close()
            ctx.close()
            server.stop()

    asyncio.run(run())
