"""Generate pvcoord's Phoebus screens (``opi/*.bob``) from ``pvdb``: ``python opi/make_screens.py``.

The screens use the macro ``P`` (endstation prefix, with its colon) and, in ``device_lock.bob``
and ``device.bob``, ``DEV`` (device name). ``tests/test_project.py`` checks the committed files
equal this output and that every ``pv_name`` resolves to a pvdb spec; ``tests/test_opi.py``
checks the widget set and connects to every PV on a running bridge.

- ``overview.bob``: every device of the demo registry (``pvdb.demo``) in one row: lock state
  (colour per lock type), owner, remaining lease, readback and setpoint over CA (the setpoint
  entry greys out when the CA bridge gives no write access), Take / Release buttons (CA puts to
  the bridge's command PVs), the device's message, a button that opens ``device.bob``.
- ``device.bob`` (macro ``DEV``): one device with its registry data, lock and commands.
- ``coordination.bob``, ``device_lock.bob``: the coordination IOC over PVA.
- ``queue.bob``: the queue IOC over PVA.

Widget types, versions and properties used are only those in :data:`WIDGET_SET` (the Phoebus 5
sources each comes from are listed in docs/decisions/0062-phoebus-widget-set.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pvdb import demo
from pvdb import flat as fl
from pvdb import names as pvn
from pvdb import queue as qn

HERE = Path(__file__).resolve().parent
P = "$(P)"
DEV = "$(DEV)"
ROW_H = 28


VERSIONS = {"action_button": "3.0.0", "textentry": "3.0.0"}
"""Widget versions Phoebus 5 writes for these types (others: 2.0.0)."""

WIDGET_SET: dict[str, frozenset[str]] = {
    kind: frozenset({"name", "x", "y", "width", "height", *props})
    for kind, props in {
        "label": {"text"},
        "textupdate": {"pv_name", "show_units"},
        "textentry": {"pv_name"},
        "multi_state_led": {"pv_name", "states", "fallback_label", "fallback_color"},
        "action_button": {"pv_name", "text", "actions", "tooltip"},
        "embedded": {"file", "macros"},
        "table": {"pv_name"},
    }.items()
}
"""The widget types and properties the generator may write (checked by tests/test_opi.py)."""

STATE_COLORS = {
    "Free": (0, 160, 0), "Maintenance": (200, 0, 0), "QueueExecuting": (255, 120, 0),
    "ManualOperator": (230, 200, 0), "QueueQueued": (80, 120, 255),
}
"""Colour of each lock state (``Coord:<device>:State`` labels) in the state LED."""


def color(name: str, rgb: tuple[int, int, int]) -> str:
    """A Phoebus colour element."""
    r, g, b = rgb
    return f'<color name="{escape(name)}" red="{r}" green="{g}" blue="{b}"></color>'


def widget(kind: str, name: str, x: int, y: int, w: int, h: int, **props: str) -> str:
    """One Phoebus display-builder widget as XML (property values are XML already)."""
    body = "".join(f"<{k}>{v}</{k}>" for k, v in props.items())
    version = VERSIONS.get(kind, "2.0.0")
    return (f'  <widget type="{kind}" version="{version}"><name>{escape(name)}</name>'
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


# --- CA screens (through the CA bridge) -------------------------------------------------------

READBACK_SETPOINT: dict[str, tuple[pvn.PVSpec, pvn.PVSpec]] = {
    "SimMotor": (demo.MOTOR_READBACK, demo.MOTOR_SETPOINT),
    "SimDetector": (demo.DET_VALUE, demo.DET_ACQUIRE_TIME_PV),
    "SimShutter": (demo.SHUTTER_STATUS, demo.SHUTTER_COMMAND),
}
"""Device class -> (readback, setpoint) shown in the overview (classes of the demo registry)."""


def ca(spec: pvn.PVSpec, device: str = DEV) -> str:
    """``ca://`` name of a spec with the macros (CA: the bridge pushes access rights)."""
    return escape("ca://" + P + spec.suffix.replace("{device}", device))


def pva(spec: pvn.PVSpec, device: str = DEV) -> str:
    """``pva://`` name of a spec with the macros (long texts: no 40-character CA limit)."""
    return escape("pva://" + P + spec.suffix.replace("{device}", device))


def state_led(name: str, x: int, y: int, w: int, h: int, device: str = DEV) -> str:
    """The lock state as a multi-state LED with a label per state, over CA."""
    states = "".join(
        f"<state><value>{i}</value><label>{label}</label><color>"
        f"{color(label, STATE_COLORS[label])}</color></state>"
        for i, label in enumerate(pvn.DEVICE_STATES)
    )
    return widget("multi_state_led", name, x, y, w, h,
                  pv_name=ca(pvn.COORD_DEVICE_STATE, device), states=states,
                  fallback_label="unknown", fallback_color=color("Invalid", (160, 160, 160)))


def command_button(name: str, spec: pvn.PVSpec, text: str, x: int, y: int, w: int, h: int,
                   device: str = DEV) -> str:
    """An action button writing 1 to a command PV over CA (greyed out without write access)."""
    pv = ca(spec, device)
    action = (f'<action type="write_pv"><pv_name>{pv}</pv_name><value>1</value>'
              f"<description>{escape(text)}</description></action>")
    return widget("action_button", name, x, y, w, h, pv_name=pv, text=escape(text),
                  actions=action, tooltip=escape(f"{text}: {spec.description}"))


def open_button(name: str, device: str, x: int, y: int, w: int, h: int) -> str:
    """An action button that opens device.bob for ``device`` in a new tab."""
    action = (f'<action type="open_display"><file>device.bob</file><target>tab</target>'
              f"<macros><DEV>{escape(device)}</DEV></macros>"
              f"<description>{escape(device)}</description></action>")
    return widget("action_button", name, x, y, w, h, text=escape(device), actions=action,
                  tooltip=escape(f"open the screen of {device}"))


def overview(devices: list[demo.DemoDevice]) -> str:
    """Every device in a row: lock, owner, remaining, readback, setpoint, Take/Release, message."""
    cols = [("Device", 10, 90), ("Lock", 105, 130), ("Owner", 240, 170), ("Left", 415, 60),
            ("Readback", 480, 90), ("Setpoint", 575, 90), ("", 670, 130), ("Message", 805, 425)]
    ws = [widget("label", "Title", 10, 10, 800, 30,
                 text="pvcoord beamline overview: $(P) (Channel Access through the CA bridge)"),
          widget("label", "HealthLabel", 10, 44, 90, 24, text="Bridge"),
          widget("textupdate", "Health", 100, 44, 600, 24, pv_name=pva(fl.FLAT_HEALTH)),
          widget("label", "LocksLabel", 720, 44, 60, 24, text="Locks"),
          widget("textupdate", "LockCount", 780, 44, 60, 24, pv_name=ca(fl.FLAT_LOCK_COUNT))]
    y = 76
    for label, x, w in cols:
        if label:
            ws.append(widget("label", f"Header {label}", x, y, w, 24, text=label))
    y += 26
    for dev in devices:
        d = dev.name
        ws += [
            open_button(f"{d} open", d, 10, y, 90, ROW_H),
            state_led(f"{d} lock", 105, y, 130, ROW_H, d),
            widget("textupdate", f"{d} owner", 240, y, 170, ROW_H,
                   pv_name=pva(pvn.COORD_DEVICE_OWNER, d)),
            widget("textupdate", f"{d} remaining", 415, y, 60, ROW_H,
                   pv_name=ca(pvn.COORD_DEVICE_REMAINING, d), show_units="true"),
        ]
        rs = READBACK_SETPOINT.get(dev.device_class)
        if rs is not None:
            ws += [widget("textupdate", f"{d} readback", 480, y, 90, ROW_H, pv_name=ca(rs[0], d),
                          show_units="true"),
                   widget("textentry", f"{d} setpoint", 575, y, 90, ROW_H, pv_name=ca(rs[1], d))]
        ws += [
            command_button(f"{d} take", fl.FLAT_TAKE, "Take", 670, y, 62, ROW_H, d),
            command_button(f"{d} release", fl.FLAT_RELEASE, "Release", 737, y, 63, ROW_H, d),
            widget("textupdate", f"{d} message", 805, y, 425, ROW_H,
                   pv_name=pva(fl.FLAT_MESSAGE, d)),
        ]
        y += ROW_H + 4
    ws.append(widget("label", "Hint", 10, y + 6, 1220, 24,
                     text=escape("A setpoint you may not write is greyed out (CA access rights "
                                 "from the lock state); Take / Release act for your account.")))
    return display("pvcoord overview", 1240, y + 40, ws)


def device_screen() -> str:
    """One device (macro DEV): registry data, lock, Take / Release, message, its setpoint."""
    rows: list[tuple[str, str]] = [
        ("Class", widget("textupdate", "Class", 150, 0, 300, 24,
                         pv_name=pva(fl.FLAT_DEVICE_CLASS))),
        ("Description", widget("textupdate", "Description", 150, 0, 500, 24,
                               pv_name=pva(fl.FLAT_DESCRIPTION))),
        ("Connected", widget("textupdate", "Connected", 150, 0, 100, 24,
                             pv_name=ca(fl.FLAT_CONNECTED))),
        ("Lock", state_led("Lock", 150, 0, 160, 24)),
        ("Owner", widget("textupdate", "Owner", 150, 0, 300, 24,
                         pv_name=pva(pvn.COORD_DEVICE_OWNER))),
        ("Reason", widget("textupdate", "Reason", 150, 0, 500, 24,
                          pv_name=pva(pvn.COORD_DEVICE_REASON))),
        ("Remaining", widget("textupdate", "Remaining", 150, 0, 100, 24,
                             pv_name=ca(pvn.COORD_DEVICE_REMAINING), show_units="true")),
        ("Message", widget("textupdate", "Message", 150, 0, 500, 24,
                           pv_name=pva(fl.FLAT_MESSAGE))),
    ]
    ws = [widget("label", "Title", 10, 10, 640, 30, text="pvcoord device $(DEV) on $(P)")]
    y = 50
    for label, w in rows:
        ws.append(widget("label", f"{label}Label", 10, y, 130, 24, text=label))
        ws.append(w.replace("<y>0</y>", f"<y>{y}</y>", 1))
        y += 28
    ws += [command_button("Take", fl.FLAT_TAKE, "Take", 150, y + 6, 100, 30),
           command_button("Release", fl.FLAT_RELEASE, "Release", 260, y + 6, 100, 30)]
    return display("pvcoord device", 670, y + 50, ws)


def screens() -> dict[str, str]:
    """File name -> content of every generated screen."""
    devices = [d.name for d in demo.DEVICES] + ["beamline"]
    return {"device_lock.bob": device_lock(), "coordination.bob": coordination(devices),
            "queue.bob": queue(), "overview.bob": overview(list(demo.DEVICES)),
            "device.bob": device_screen()}


if __name__ == "__main__":
    for fname, text in screens().items():
        (HERE / fname).write_text(text)
        print("wrote", HERE / fname)
