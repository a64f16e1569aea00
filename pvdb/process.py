"""Which processes an endstation runs and the PVs that tell whether each is up.

Every pvcoord process serves, next to its own PVs, a ``Version`` (the pvcoord version it runs)
and a ``StartTime`` (epoch seconds it started; uptime = now - start). With its heartbeat counter
and health text these make one row of ``pvcoord status``::

    >>> PROCESSES["coordination"].version.name("BL01:")
    'BL01:Coord:Version'

The CA bridge serves them on both protocols (CA and PVA, with ``Flat:Heartbeat`` and
``Flat:Health``); the web bridge (``bridges.pvws``, otherwise websockets and HTTP only) serves
``Web:Heartbeat``, ``Web:Version`` and ``Web:StartTime`` over PVA for this purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from . import flat, guard, queue
from .names import COORD_HEALTH, COORD_HEARTBEAT, REGISTRY_HEARTBEAT, PVKind, PVSpec

HEARTBEAT_STALE = 3.0
"""Seconds after which a heartbeat that did not change means the process is not serving."""


def _version(server: str, segment: str) -> PVSpec:
    return PVSpec(server, f"{segment}:Version", PVKind.STRING,
                  "pvcoord version this process runs (package version).")


def _start(server: str, segment: str) -> PVSpec:
    return PVSpec(server, f"{segment}:StartTime", PVKind.DOUBLE,
                  "When this process started, epoch seconds (uptime = now - StartTime).",
                  units="s")


COORD_VERSION = _version("coordination", "Coord")
COORD_START_TIME = _start("coordination", "Coord")
REGISTRY_VERSION = _version("registry", "Registry")
REGISTRY_START_TIME = _start("registry", "Registry")
QUEUE_VERSION = _version("queue", "Queue")
QUEUE_START_TIME = _start("queue", "Queue")
GUARD_VERSION = _version("guard", "Guard")
GUARD_START_TIME = _start("guard", "Guard")
FLAT_VERSION = _version(flat.SERVER, "Flat")
FLAT_START_TIME = _start(flat.SERVER, "Flat")
WEB_SERVER = "pvws"
"""Value of :attr:`PVSpec.server` for the web bridge's PVs (its status PVs only)."""
WEB_HEARTBEAT = PVSpec(WEB_SERVER, "Web:Heartbeat", PVKind.INT,
                       "Counter incremented every second by the web bridge.")
WEB_VERSION = _version(WEB_SERVER, "Web")
WEB_START_TIME = _start(WEB_SERVER, "Web")


@dataclass(frozen=True)
class ProcessPVs:
    """The status PVs of one process.

    Attributes:
        name: process name (as in the endstation file and the systemd unit).
        module: its ``python -m`` entry.
        heartbeat: counter incremented every second.
        health: ``'OK'`` or what is wrong (``None``: the process has no health PV).
        version: :data:`COORD_VERSION` and friends.
        start_time: :data:`COORD_START_TIME` and friends.
    """

    name: str
    module: str
    heartbeat: PVSpec | None
    health: PVSpec | None
    version: PVSpec | None
    start_time: PVSpec | None


PROCESSES: dict[str, ProcessPVs] = {
    "registry": ProcessPVs("registry", "iocs.registry", REGISTRY_HEARTBEAT, None,
                           REGISTRY_VERSION, REGISTRY_START_TIME),
    "coordination": ProcessPVs("coordination", "iocs.coordination", COORD_HEARTBEAT,
                               COORD_HEALTH, COORD_VERSION, COORD_START_TIME),
    "queue": ProcessPVs("queue", "iocs.queue", queue.HEARTBEAT, queue.LOCK_HEALTH,
                        QUEUE_VERSION, QUEUE_START_TIME),
    "guard": ProcessPVs("guard", "bridges.guard", guard.GUARD_HEARTBEAT, guard.GUARD_HEALTH,
                        GUARD_VERSION, GUARD_START_TIME),
    "flat": ProcessPVs("flat", "bridges.flat", flat.FLAT_HEARTBEAT, flat.FLAT_HEALTH,
                       FLAT_VERSION, FLAT_START_TIME),
    "pvws": ProcessPVs("pvws", "bridges.pvws", WEB_HEARTBEAT, None, WEB_VERSION,
                       WEB_START_TIME),
}
"""Status PVs of every process, in start order."""

PROCESS_PVS = (
    COORD_VERSION, COORD_START_TIME, REGISTRY_VERSION, REGISTRY_START_TIME, QUEUE_VERSION,
    QUEUE_START_TIME, GUARD_VERSION, GUARD_START_TIME, FLAT_VERSION, FLAT_START_TIME,
    WEB_HEARTBEAT, WEB_VERSION, WEB_START_TIME,
)


def pvcoord_version() -> str:
    """The installed pvcoord package version (``'unknown'`` when run from an uninstalled tree)."""
    try:
        return metadata.version("pvcoord")
    except metadata.PackageNotFoundError:
        return "unknown"
