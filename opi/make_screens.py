"""Generate pvcoord's Phoebus screens (``opi/*.bob``) from ``pvdb``: ``python opi/make_screens.py``.

The screens use the macro ``P`` (endstation prefix, with its colon) and, in ``device_lock.bob``,
``DEV`` (device name). ``tests/test_project.py`` checks the committed files equal this output and
that every ``pv_name`` resolves to a pvdb spec.
"""

from __future__ import annotations

import sys
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pvdb import demo
from pvdb import names as pvn
from pvdb import queue as qn

HERE = Path(__file__).resolve().parent
P = "$(P)"
DEV = "$(DEV)"
ROW_H = 28


def widget(kind: str, name: str, x: int, y: int, w: int, h: int, **props: str) -> str:
    """One Phoebus display-builder widget as XML."""
    body = "".join(f"<{k}>{v}</{k}>" for k, v in props.items())
    return (f'  <widget type="{kind}" version="2.0.0"><name>{escape(name)}</name>'
            f"<x>{x}</x><y>{y}</y><width>{w}</width><height>{h}</height>{body}</widget>\n")


def display(name: str, w: int, h: int, widgets: list[str]) -> str:
    """A whole .bob file."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<display version="2.0.0">\n'
            f"  <name>{escape(name)}</name>\n  <width>{w}</width>\n  <height>{h}</height>\n"
            + "".join(widgets) + "</display>\n")


def device_lock() -> str:
    """One row: device name, lock state, owner, remaining lease, reason."""
    def pv(spec: pvn.PVSpec) -> str:
        return escape("pva://" + P + spec.suffix.replace("{device}", DEV))
    return display("pvcoord device lock row", 860, ROW_H, [
        widget("label", "Device", 0, 0, 100, ROW_H, text=DEV),
        widget("textupdate", "State", 100, 0, 150, ROW_H, pv_name=pv(pvn.COORD_DEVICE_STATE)),
        widget("textupdate", "Owner", 255, 0, 220, ROW_H, pv_name=pv(pvn.COORD_DEVICE_OWNER)),
        widget("textupdate", "Remaining", 480, 0, 80, ROW_H,
               pv_name=pv(pvn.COORD_DEVICE_REMAINING), show_units="true"),
        widget("textupdate", "Reason", 565, 0, 295, ROW_H, pv_name=pv(pvn.COORD_DEVICE_REASON)),
    ])


def coordination(devices: list[str]) -> str:
    """Overview: health, last event, one row per device, the locks table."""
    def pv(spec: pvn.PVSpec) -> str:
        return escape("pva://" + P + spec.suffix)
    ws = [
        widget("label", "Title", 10, 10, 600, 30, text="pvcoord device locks: $(P)"),
        widget("label", "HealthLabel", 10, 50, 90, 24, text="Health"),
        widget("textupdate", "Health", 100, 50, 250, 24, pv_name=pv(pvn.COORD_HEALTH)),
        widget("label", "LocksLabel", 370, 50, 60, 24, text="Locks"),
        widget("textupdate", "LockCount", 430, 50, 60, 24, pv_name=pv(pvn.COORD_LOCK_COUNT)),
        widget("label", "BeatLabel", 510, 50, 90, 24, text="Heartbeat"),
        widget("textupdate", "Heartbeat", 600, 50, 80, 24, pv_name=pv(pvn.COORD_HEARTBEAT)),
        widget("label", "EventLabel", 10, 80, 90, 24, text="Last event"),
        widget("textupdate", "LastEvent", 100, 80, 760, 24, pv_name=pv(pvn.COORD_LAST_EVENT)),
    ]
    y = 120
    for d in devices:
        ws.append(widget("embedded", f"Row {d}", 10, y, 860, ROW_H, file="device_lock.bob",
                         macros=f"<DEV>{escape(d)}</DEV>"))
        y += ROW_H + 2
    ws.append(widget("table", "Locks", 10, y + 10, 860, 200, pv_name=pv(pvn.COORD_LOCKS)))
    return display("pvcoord coordination", 880, y + 220, ws)


def queue() -> str:
    """The queue server at a glance: states, running item, next items, why pvcoord stopped it.

    Read-only: Phoebus action buttons write PVs and cannot call the queue IOC's RPCs (use
    ``pvcoord call P Queue:QueueStart`` and friends).
    """
    def pv(spec: pvn.PVSpec) -> str:
        return escape("pva://" + P + spec.suffix)
    rows: list[tuple[str, pvn.PVSpec, int]] = [
        ("Manager", qn.MANAGER_STATE, 200), ("RunEngine", qn.RE_STATE, 200),
        ("Environment", qn.WORKER_ENVIRONMENT_STATE, 200), ("Connection", qn.CONNECTION, 200),
        ("In queue", qn.ITEMS_IN_QUEUE, 80), ("In history", qn.ITEMS_IN_HISTORY, 80),
        ("Running", qn.RUNNING_ITEM_NAME, 300), ("Arguments", qn.RUNNING_ITEM_ARGS, 720),
        ("User", qn.RUNNING_ITEM_USER, 200), ("Holds", qn.EXECUTING_DEVICES, 720),
        ("Next", qn.NEXT_ITEM, 720), ("Queue", qn.ITEM_NAMES, 720),
        ("Reserved", qn.QUEUED_DEVICES, 720), ("Last exit", qn.LAST_EXIT_STATUS, 200),
        ("Last message", qn.LAST_ITEM_MSG, 720), ("Stopped by pvcoord", qn.STOP_REASON, 720),
        ("Locks", qn.LOCK_HEALTH, 300), ("Console", qn.CONSOLE, 720),
    ]
    ws = [widget("label", "Title", 10, 10, 600, 30, text="pvcoord queue server: $(P)")]
    y = 50
    for label, spec, w in rows:
        ws.append(widget("label", f"{label}Label", 10, y, 140, 24, text=escape(label)))
        ws.append(widget("textupdate", label, 150, y, w, 24, pv_name=pv(spec)))
        y += 28
    ws.append(widget("table", "Items", 10, y + 10, 860, 200, pv_name=pv(qn.ITEMS)))
    return display("pvcoord queue", 880, y + 220, ws)


def screens() -> dict[str, str]:
    """File name -> content of every generated screen."""
    devices = [d.name for d in demo.DEVICES] + ["beamline"]
    return {"device_lock.bob": device_lock(), "coordination.bob": coordination(devices),
            "queue.bob": queue()}


if __name__ == "__main__":
    for fname, text in screens().items():
        (HERE / fname).write_text(text)
        print("wrote", HERE / fname)
