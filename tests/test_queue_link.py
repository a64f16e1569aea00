"""Unit tier: ordering in the RE Manager link (``iocs.queue.manager.ManagerLink``).

A stand-in for the API object makes a ``status`` reply arrive after a newer push, which a real
manager does only rarely; the real link is exercised by tests/test_queue_ioc.py.
"""

from __future__ import annotations

import asyncio
import time

from iocs.queue.manager import ManagerLink


class SlowStatusAPI:
    """``status`` answers only when the test opens the gate, with an older state."""

    class RequestFailedError(Exception):
        pass

    class RequestTimeoutError(Exception):
        pass

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()

    async def status(self, reload: bool = False) -> dict:
        self.asked.set()
        await self.gate.wait()
        return {"manager_state": "idle"}  # generated before the push below


def test_a_refresh_reply_older_than_a_push_is_not_delivered_after_it():
    async def scenario() -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []

        async def on_status(status, mtime, source):
            got.append((status["manager_state"], source))

        link = ManagerLink("tcp://127.0.0.1:9", "tcp://127.0.0.1:9", on_status)
        api = SlowStatusAPI()
        link.api = api
        pending = asyncio.create_task(link.refresh())
        await asyncio.wait_for(api.asked.wait(), 5)
        await link.deliver_push({"manager_state": "executing_queue"}, time.time())
        api.gate.set()
        assert (await asyncio.wait_for(pending, 5))["manager_state"] == "idle"
        # without a push in between, a refresh is delivered
        api.gate = asyncio.Event()
        api.gate.set()
        await link.refresh()
        return got

    got = asyncio.run(scenario())
    assert got == [("executing_queue", "push"), ("idle", "poll")]
