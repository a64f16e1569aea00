"""Upstream PVA values (p4p, raw ``Value``) as caproto entries and their updates.

One :class:`Mirror` per upstream name: the first monitor update decides the entry's class
(NTEnum -> enum, double/float -> double, integer/boolean -> integer, string -> string; arrays
keep their element type, with the first update's length as maximum); later updates write value,
alarm, time stamp and (when changed) display/control metadata with ``verify_value=False``, so
nothing is echoed upstream.
"""

from __future__ import annotations

import logging
from typing import Any

from caproto import AlarmSeverity, AlarmStatus, ChannelAlarm

from .entries import ProxyDouble, ProxyEnum, ProxyInteger, ProxyString

_log = logging.getLogger(__name__)

_DOUBLE = set("df")
_INTEGER = set("bBhHiIlL?")
_STATUS = {s.name: s for s in AlarmStatus}


class UnsupportedTypeError(ValueError):
    """An upstream structure the bridge cannot show over CA."""


def _get(v: Any, key: str, default: Any = None) -> Any:
    try:
        return v[key]
    except (KeyError, TypeError, ValueError):
        return default


def stamp_of(v: Any) -> float | None:
    """Epoch seconds of ``v``'s ``timeStamp``, None if absent or zero."""
    sec = _get(v, "timeStamp.secondsPastEpoch")
    if not sec:
        return None
    return float(sec) + 1e-9 * float(_get(v, "timeStamp.nanoseconds", 0) or 0)


def alarm_of(v: Any) -> tuple[AlarmStatus, AlarmSeverity]:
    """CA alarm status and severity of ``v`` (QSRV puts the CA status name in the message)."""
    sev = int(_get(v, "alarm.severity", 0) or 0)
    severity = AlarmSeverity(min(max(sev, 0), 3))
    msg = str(_get(v, "alarm.message", "") or "").strip().upper()
    status = _STATUS.get(msg)
    if status is None:
        status = AlarmStatus.NO_ALARM if severity == AlarmSeverity.NO_ALARM else AlarmStatus.UDF
    return status, severity


def kind_of(v: Any) -> tuple[str, bool]:
    """``(kind, is_array)``: kind is ``enum``, ``double``, ``integer`` or ``string``.

    Raises:
        UnsupportedTypeError: the ``value`` field is missing or a structure other than an enum.
    """
    t = v.type()
    if "value" not in t.keys():
        raise UnsupportedTypeError("no value field")
    vt = t["value"]
    if not isinstance(vt, str):
        if "index" in vt.keys() and "choices" in vt.keys():
            return "enum", False
        raise UnsupportedTypeError(f"value is a structure ({v.getID()})")
    arr = vt.startswith("a")
    code = vt[1:] if arr else vt
    if code in _DOUBLE:
        return "double", arr
    if code in _INTEGER:
        return "integer", arr
    if code == "s":
        return "string", arr
    raise UnsupportedTypeError(f"value type {vt!r}")


def _metadata(v: Any, kind: str) -> dict[str, Any]:
    if kind not in ("double", "integer"):
        return {}
    md: dict[str, Any] = {}
    units = _get(v, "display.units")
    if units is not None:
        md["units"] = str(units)
    if kind == "double":
        prec = _get(v, "display.precision")
        if prec is not None:
            md["precision"] = int(prec)
    for ca_key, pva_key in (
        ("lower_disp_limit", "display.limitLow"), ("upper_disp_limit", "display.limitHigh"),
        ("lower_ctrl_limit", "control.limitLow"), ("upper_ctrl_limit", "control.limitHigh"),
        ("lower_alarm_limit", "valueAlarm.lowAlarmLimit"),
        ("lower_warning_limit", "valueAlarm.lowWarningLimit"),
        ("upper_warning_limit", "valueAlarm.highWarningLimit"),
        ("upper_alarm_limit", "valueAlarm.highAlarmLimit"),
    ):
        x = _get(v, pva_key)
        if x is not None:
            try:
                fx = float(x)
            except (TypeError, ValueError):
                continue
            if fx == fx:  # not NaN
                md[ca_key] = int(fx) if kind == "integer" else fx
    return md


_METADATA_ROOTS = frozenset({"display", "control", "valueAlarm"})


def _changed_roots(v: Any) -> set[str] | None:
    """Top-level fields marked changed in a monitor update (None if unknown: assume all)."""
    try:
        return {f.split(".", 1)[0] for f in v.changedSet()}
    except (AttributeError, TypeError):
        return None


def value_of(v: Any, kind: str, arr: bool) -> Any:
    """The CA value for an update (an enum gives its label)."""
    if kind == "enum":
        idx = int(_get(v, "value.index", 0) or 0)
        choices = list(_get(v, "value.choices", []) or [])
        return choices[idx] if 0 <= idx < len(choices) else str(idx)
    x = v["value"]
    if arr:
        return list(x) if len(x) else [0] if kind != "string" else [""]
    return x


def make_entry(v: Any, pvname: str) -> tuple[Any, str, bool]:
    """A new caproto entry for the first update ``v`` of ``pvname``; ``(entry, kind, array)``.

    Raises:
        UnsupportedTypeError: see :func:`kind_of`.
    """
    kind, arr = kind_of(v)
    status, severity = alarm_of(v)
    ts = stamp_of(v)
    common: dict[str, Any] = {
        "timestamp": ts, "alarm": ChannelAlarm(status=status, severity=severity),
    }
    if kind == "enum":
        choices = [str(c) for c in (_get(v, "value.choices", []) or [])] or ["0"]
        entry = ProxyEnum(value=value_of(v, kind, arr), enum_strings=choices, **common)
    elif kind == "string":
        value = value_of(v, kind, arr)
        entry = ProxyString(value=value, max_length=len(value) if arr else None,
                            long_string_max_length=4096, **common)
    else:
        cls = ProxyDouble if kind == "double" else ProxyInteger
        value = value_of(v, kind, arr)
        md = _metadata(v, kind)
        entry = cls(value=value, max_length=max(len(value), 1) if arr else None, **md, **common)
    entry.pvname = pvname
    entry.connected = True
    return entry, kind, arr


class Mirror:
    """State of one upstream channel and its caproto entry (created by the first update)."""

    def __init__(self, pvname: str) -> None:
        self.pvname = pvname
        self.entry: Any = None
        self.kind = ""
        self.array = False
        self.sub: Any = None
        self.error = ""
        self.inflight = 0
        """Forwarded puts to this PV not completed yet."""
        self.held: list[Any] = []
        """Updates held back while a put is in flight (applied in order after its reply)."""
        self.timer: Any = None
        self.releasing: Any = None
        self._md: dict[str, Any] | None = None
        self._alarm: tuple[AlarmStatus, AlarmSeverity] | None = None
        self._choices: list[str] = []

    async def update(self, v: Any) -> None:
        """Write upstream update ``v`` into the entry (created before by :func:`make_entry`).

        Alarm and metadata are passed to caproto only when they changed (the per-update cost is
        what limits the forwarded rate).
        """
        e = self.entry
        kw: dict[str, Any] = {}
        changed = _changed_roots(v)
        if changed is None or "alarm" in changed or not e.connected:
            alarm = alarm_of(v)
            if alarm != self._alarm or not e.connected:
                self._alarm = alarm
                kw["status"], kw["severity"] = alarm
        ts = stamp_of(v)
        if ts is not None:
            kw["timestamp"] = ts
        if self.kind == "enum":
            choices = [str(c) for c in (_get(v, "value.choices", []) or [])]
            if choices and choices != self._choices:
                self._choices = choices
                await e.write_metadata(enum_strings=choices, publish=False)
        elif self._md is None or changed is None or changed & _METADATA_ROOTS:
            md = _metadata(v, self.kind)
            if md != self._md:
                self._md = md
                kw.update(md)
        value = value_of(v, self.kind, self.array)
        if self.array and isinstance(value, list) and len(value) > e.max_length:
            value = value[: e.max_length]
        e.connected = True
        await e.write(value, verify_value=False, **kw)

    async def disconnected(self) -> None:
        """The upstream channel is gone: INVALID / LINK until it returns."""
        e = self.entry
        if e is None:
            return
        e.connected = False
        await e.alarm.write(status=AlarmStatus.LINK, severity=AlarmSeverity.INVALID_ALARM)
