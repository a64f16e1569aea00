"""``GET /pvws/names.json``: every PV name the beamline web client uses, built from ``pvdb``.

The web client (``bridges/pvws/static/``) spells no PV name: it fetches this document once and
subscribes to what it lists. The document is a JSON object::

    {
      "prefix": "DEMO:",
      "pv": {"locks": "DEMO:Coord:Locks", "managerState": "DEMO:Queue:ManagerState", ...},
      "device": {"state": "DEMO:Coord:{device}:State", "owner": ..., "remaining": ..., ...},
      "classes": {"SimMotor": {"readback": "DEMO:{device}:Readback",
                               "setpoint": "DEMO:{device}:Setpoint"}, ...},
      "health": [{"process": "coordination", "heartbeat": "DEMO:Coord:Heartbeat",
                  "status": ["DEMO:Coord:Health"]}, ...],
      "queueRpc": {"start": {"pv": "DEMO:Queue:QueueStart", "args": []}, ...},
      "lockTypes": ["MAINTENANCE", ...], "deviceStates": ["Free", ...],
      "managerStates": [...], "beamline": "beamline"
    }

``{device}`` in a template is replaced by a registry device name. ``classes`` says which PV of a
device class is its readback and which its setpoint (the device panel's two columns); a device of
another class shows its registry PVs without a setpoint. ``health`` has one entry per pvcoord
process that serves a heartbeat PV (found in every ``pvdb`` spec module, so a new process appears
without a change here), with its status strings (PVs whose suffix ends in ``Health``).
``queueRpc`` is what ``POST /api/queue/{key}`` (:mod:`bridges.pvws.rpc`) accepts.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pvdb import catalog
from pvdb import demo as demo_pvs
from pvdb import names as pvn
from pvdb import queue as qn
from pvdb.lockmodel import ON_BEHALF_ARGS
from pvdb.models import BEAMLINE, LockType
from pvdb.names import PVKind, PVSpec

DEVICE_TEMPLATE = "{device}"
"""The placeholder of per-device templates in the document."""

FIXED_PVS: dict[str, PVSpec] = {
    "locks": pvn.COORD_LOCKS,
    "events": pvn.COORD_EVENTS,
    "lastEvent": pvn.COORD_LAST_EVENT,
    "lockCount": pvn.COORD_LOCK_COUNT,
    "coordDevices": pvn.COORD_DEVICES,
    "registryDevices": pvn.REGISTRY_DEVICES,
    "registryNames": pvn.REGISTRY_NAMES,
    "managerState": qn.MANAGER_STATE,
    "reState": qn.RE_STATE,
    "workerState": qn.WORKER_ENVIRONMENT_STATE,
    "itemsInQueue": qn.ITEMS_IN_QUEUE,
    "itemsInHistory": qn.ITEMS_IN_HISTORY,
    "runningUid": qn.RUNNING_ITEM_UID,
    "runningName": qn.RUNNING_ITEM_NAME,
    "runningArgs": qn.RUNNING_ITEM_ARGS,
    "runningUser": qn.RUNNING_ITEM_USER,
    "runningStart": qn.RUNNING_ITEM_START,
    "items": qn.ITEMS,
    "history": qn.HISTORY,
    "stopPending": qn.QUEUE_STOP_PENDING,
    "stopReason": qn.STOP_REASON,
    "lastExitStatus": qn.LAST_EXIT_STATUS,
    "lastItemMsg": qn.LAST_ITEM_MSG,
    "consoleLines": qn.CONSOLE_LINES_PV,
    "connection": qn.CONNECTION,
}
"""Key in ``pv`` -> the PV (keys are what the JavaScript uses)."""

DEVICE_PVS: dict[str, PVSpec] = {
    "state": pvn.COORD_DEVICE_STATE,
    "owner": pvn.COORD_DEVICE_OWNER,
    "reason": pvn.COORD_DEVICE_REASON,
    "remaining": pvn.COORD_DEVICE_REMAINING,
    "expires": pvn.COORD_DEVICE_EXPIRES,
}
"""Key in ``device`` -> the per-device PV of the coordination IOC."""

CLASS_ROLES: dict[str, tuple[PVSpec, PVSpec | None]] = {
    "SimMotor": (demo_pvs.MOTOR_READBACK, demo_pvs.MOTOR_SETPOINT),
    "SimDetector": (demo_pvs.DET_VALUE, demo_pvs.DET_ACQUIRE_TIME_PV),
    "SimShutter": (demo_pvs.SHUTTER_STATUS, demo_pvs.SHUTTER_COMMAND),
}
"""Device class -> (readback, setpoint) PVs shown in the device panel (the demo's classes)."""

QUEUE_RPCS: dict[str, PVSpec] = {
    "start": qn.QUEUE_START,
    "stop": qn.QUEUE_STOP,
    "stopCancel": qn.QUEUE_STOP_CANCEL,
    "pause": qn.RE_PAUSE,
    "resume": qn.RE_RESUME,
    "reStop": qn.RE_STOP,
    "abort": qn.RE_ABORT,
    "halt": qn.RE_HALT,
    "envOpen": qn.ENVIRONMENT_OPEN,
    "envClose": qn.ENVIRONMENT_CLOSE,
    "add": qn.ITEM_ADD,
    "remove": qn.ITEM_REMOVE,
}
"""Key of ``POST /api/queue/{key}`` -> the queue IOC's RPC."""
if hasattr(qn, "ITEM_MOVE"):  # the queue IOC's move RPC, where this pvdb has it
    QUEUE_RPCS["move"] = qn.ITEM_MOVE


def web_args(spec: PVSpec) -> tuple[str, ...]:
    """The arguments a web client may give a queue RPC.

    The RPC's own arguments, without ``onBehalfOf`` / ``clientHost``: the bridge sets those to
    the logged-in web user and the browser's address (:mod:`bridges.pvws.rpc`).
    """
    return tuple(a for a in spec.args if a not in ON_BEHALF_ARGS)


def _template(spec: PVSpec, prefix: str) -> str:
    return spec.name(prefix, device=DEVICE_TEMPLATE)


def health_entries(prefix: str) -> list[dict[str, Any]]:
    """One entry per process serving a ``...Heartbeat`` PV: its heartbeat and status PVs.

    Returns:
        ``[{"process": server, "heartbeat": pv, "status": [pv, ...]}]`` in catalog order.
    """
    beats: dict[str, str] = {}
    status: dict[str, list[str]] = {}
    for module, _title in catalog.SPEC_MODULES:
        for spec in catalog.specs(module):
            if spec.per_device or spec.kind is PVKind.RPC:
                continue
            if spec.suffix.endswith("Heartbeat"):
                beats.setdefault(spec.server, spec.name(prefix))
            elif spec.suffix.endswith("Health") and spec.kind is PVKind.STRING:
                status.setdefault(spec.server, []).append(spec.name(prefix))
    return [
        {"process": server, "heartbeat": pv, "status": status.get(server, [])}
        for server, pv in beats.items()
    ]


def names_document(prefix: str, registry_prefix: str = "") -> dict[str, Any]:
    """The JSON document of ``/pvws/names.json`` for endstation ``prefix`` (shape above).

    Args:
        prefix: the endstation prefix ``P`` (with its trailing colon).
        registry_prefix: the registry IOC's prefix, if not ``prefix``.

    Raises:
        ValueError: if a prefix is not a valid endstation prefix (see ``pvdb.names``).
    """
    pvn.check_prefix(prefix)
    reg = pvn.check_prefix(registry_prefix) if registry_prefix else prefix
    return {
        "prefix": prefix,
        "pv": {
            key: spec.name(reg if spec.server == "registry" else prefix)
            for key, spec in FIXED_PVS.items()
        },
        "device": {key: _template(spec, prefix) for key, spec in DEVICE_PVS.items()},
        "classes": {
            cls: {
                "readback": _template(rb, prefix),
                "setpoint": _template(sp, prefix) if sp is not None else None,
            }
            for cls, (rb, sp) in CLASS_ROLES.items()
        },
        "health": health_entries(prefix),
        "queueRpc": {
            key: {"pv": spec.name(prefix), "args": list(web_args(spec))}
            for key, spec in QUEUE_RPCS.items()
        },
        "lockTypes": [t.value for t in LockType],
        "deviceStates": list(pvn.DEVICE_STATES),
        "managerStates": list(qn.MANAGER_STATES),
        "beamline": BEAMLINE,
        "deviceTemplate": DEVICE_TEMPLATE,
    }


def setup(app: web.Application) -> None:
    """Add ``GET /pvws/names.json`` to the bridge's app (called by ``make_app``)."""
    from . import app as bridge

    async def names_json(request: web.Request) -> web.Response:
        cfg = request.app[bridge.CONFIG]
        return web.json_response(
            names_document(cfg.prefix, cfg.registry_prefix), headers={"Cache-Control": "no-cache"}
        )

    app.router.add_get("/pvws/names.json", names_json)
