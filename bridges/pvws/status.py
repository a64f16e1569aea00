"""The web bridge's status PVs over PVA (``pvcoord status``): heartbeat, version, start time.

The web bridge otherwise serves websockets and HTTP only; these three PVs (names in
:mod:`pvdb.process`: ``P Web:Heartbeat``, ``P Web:Version``, ``P Web:StartTime``) let an
operator's ``pvcoord status`` tell whether it is up, which pvcoord it runs and since when, as for
every other process. The p4p server takes ``EPICS_PVAS_*`` from the environment, or the given
configuration (in-process tests: ``Server(isolate=True)``'s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from p4p.nt import NTScalar
from p4p.server import Server, StaticProvider
from p4p.server.asyncio import SharedPV

from pvdb.process import PROCESSES, WEB_SERVER, pvcoord_version

_log = logging.getLogger(__name__)

BEAT_PERIOD = 1.0
"""Seconds between heartbeat posts."""


class StatusPVs:
    """A p4p server with the web bridge's status PVs; the heartbeat counts while it runs.

    Args:
        prefix: endstation prefix ``P``.
        conf: p4p server configuration (``EPICS_PVAS_*``); None: this process's environment.
        started: epoch seconds the bridge started (``Web:StartTime``).
    """

    def __init__(self, prefix: str, conf: Mapping[str, str] | None = None,
                 started: float | None = None) -> None:
        info = PROCESSES[WEB_SERVER]
        assert info.heartbeat and info.version and info.start_time
        now = time.time()
        self.started = now if started is None else started
        self.beats = 0
        nt_d = NTScalar("d", display=True)
        start = nt_d.wrap(self.started, timestamp=now)
        start["display.units"] = info.start_time.units
        self.heartbeat = SharedPV(nt=NTScalar("i"), initial=0, timestamp=now)
        self.names = {
            info.heartbeat.name(prefix): self.heartbeat,
            info.version.name(prefix): SharedPV(nt=NTScalar("s"), initial=pvcoord_version(),
                                                timestamp=now),
            info.start_time.name(prefix): SharedPV(nt=nt_d, initial=start),
        }
        provider = StaticProvider("pvcoord-web-status")
        for name, pv in self.names.items():
            provider.add(name, pv)
        if conf is None:
            self.server = Server(providers=[provider])
        else:
            self.server = Server(providers=[provider], conf=dict(conf), useenv=False)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start posting the heartbeat (call from the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="web-heartbeat")
        _log.info("status PVs %s on PVA %s", ", ".join(self.names), self.server.conf())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT_PERIOD)
            self.beats += 1
            self.heartbeat.post(self.beats, timestamp=time.time())

    async def close(self) -> None:
        """Stop the heartbeat and the server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.server.stop()
