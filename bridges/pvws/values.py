"""p4p ``Value`` -> PVWS ``update`` fields: pure functions, no network.

An upstream update is converted once (:func:`convert`) into a :class:`Converted`: the first-update
metadata (``vtype``, ``units``, limits, ``labels``...) as a JSON fragment, the severity name, and
the value part (``seconds``, ``nanos``, ``value`` / ``text`` / ``b64*`` / ``table``) as a JSON
fragment. Each websocket then only glues its own ``pv``, ``severity`` / ``readonly`` changes and
these fragments together, so 100 sockets cost one conversion.

Encoding as PVWS (and what its clients expect): non-finite numbers as the string ``"NaN"`` (never
bare ``NaN``: ``JSON.parse`` rejects it); enums as ``value`` = index and ``text`` = label; strings
in ``text``; arrays as padded standard base64 of little-endian bytes in ``b64dbl`` (float64),
``b64flt`` (float32), ``b64srt`` (int16), ``b64int`` (int32), ``b64byt`` (int8/uint8); other arrays
(int64, strings, booleans) as a JSON list in ``value``. NTTable: ``text`` (one line per row) plus
``table`` = ``{"labels": [...], "columns": {name: [...]}}`` (beyond PVWS). A boolean scalar is
sent as an enum ``false`` / ``true``.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SEVERITIES = ("NONE", "MINOR", "MAJOR", "INVALID", "UNDEFINED")
"""PVWS severity names by EPICS alarm severity number."""

_SCALAR_VTYPES = {
    "d": "VDouble", "f": "VFloat", "l": "VLong", "L": "VULong", "i": "VInt", "I": "VUInt",
    "h": "VShort", "H": "VUShort", "b": "VByte", "B": "VUByte", "s": "VString",
}
_ARRAY_B64 = {
    # p4p code -> (vtype, field, little-endian dtype)
    "ad": ("VDoubleArray", "b64dbl", "<f8"),
    "af": ("VFloatArray", "b64flt", "<f4"),
    "ah": ("VShortArray", "b64srt", "<i2"),
    "aH": ("VUShortArray", "b64srt", "<u2"),
    "ai": ("VIntArray", "b64int", "<i4"),
    "aI": ("VUIntArray", "b64int", "<u4"),
    "ab": ("VByteArray", "b64byt", "i1"),
    "aB": ("VUByteArray", "b64byt", "u1"),
}
_ARRAY_LIST = {"al": "VLongArray", "aL": "VULongArray", "as": "VStringArray",
               "a?": "VBooleanArray"}
BOOL_LABELS = ("false", "true")


def dumps(obj: Any) -> str:
    """Compact JSON that never contains bare ``NaN`` / ``Infinity`` (raises ``ValueError``)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def num(x: Any) -> float | int | str:
    """A JSON-safe number: non-finite floats become ``"NaN"``."""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int | np.integer):
        return int(x)
    f = float(x)
    return f if math.isfinite(f) else "NaN"


@dataclass(frozen=True)
class Converted:
    """One upstream update, ready to be glued into ``update`` messages.

    Attributes:
        vtype: the PVWS value type name (``VDouble``, ``VEnum``, ``VTable``...).
        meta: first-update fields (``vtype`` and, where known, ``units``, ``description``,
            ``precision``, limits, ``labels``) as a JSON fragment without braces.
        severity: ``NONE`` ... ``UNDEFINED``.
        body: ``seconds``, ``nanos`` and the value fields, as a JSON fragment without braces.
        labels: enum labels ('' tuple for non-enums), for writes by label.
        numeric: whether writes must be numbers (a text ``"42"`` is converted).
    """

    vtype: str
    meta: str
    severity: str
    body: str
    labels: tuple[str, ...] = ()
    numeric: bool = False


DISCONNECTED_BODY = '"value":"NaN"'
"""Value part of the update that announces a disconnect (with ``severity`` INVALID)."""


def _field(v: Any, key: str, default: Any = None) -> Any:
    try:
        return v[key]
    except (KeyError, TypeError, ValueError):
        return default


def _meta(v: Any, vtype: str, labels: tuple[str, ...] = ()) -> dict[str, Any]:
    m: dict[str, Any] = {"vtype": vtype}
    display = _field(v, "display")
    if display is not None:
        m["units"] = str(_field(display, "units", "") or "")
        m["description"] = str(_field(display, "description", "") or "")
        prec = _field(display, "precision")
        if prec is not None:
            m["precision"] = int(prec)
        else:
            fmt = str(_field(display, "format", "") or "")
            if fmt.startswith("%.") and fmt[-1:] in "fFeEgG" and fmt[2:-1].isdigit():
                m["precision"] = int(fmt[2:-1])
        m["min"] = num(_field(display, "limitLow", math.nan))
        m["max"] = num(_field(display, "limitHigh", math.nan))
    va = _field(v, "valueAlarm")
    if va is not None and vtype not in ("VString", "VEnum"):
        m["warn_low"] = num(_field(va, "lowWarningLimit", math.nan))
        m["warn_high"] = num(_field(va, "highWarningLimit", math.nan))
        m["alarm_low"] = num(_field(va, "lowAlarmLimit", math.nan))
        m["alarm_high"] = num(_field(va, "highAlarmLimit", math.nan))
    elif vtype not in ("VString", "VEnum", "VTable", "VStringArray", "VBooleanArray"):
        for k in ("warn_low", "warn_high", "alarm_low", "alarm_high"):
            m[k] = "NaN"
    if labels:
        m["labels"] = list(labels)
    return m


def _time(v: Any) -> dict[str, Any]:
    ts = _field(v, "timeStamp")
    if ts is None:
        return {}
    return {"seconds": int(_field(ts, "secondsPastEpoch", 0)),
            "nanos": int(_field(ts, "nanoseconds", 0))}


def severity_of(v: Any) -> str:
    """The PVWS severity name of ``v`` (``NONE`` when it carries no alarm)."""
    sev = _field(v, "alarm.severity")
    if sev is None:
        return "NONE"
    i = int(sev)
    return SEVERITIES[i] if 0 <= i < len(SEVERITIES) else "UNDEFINED"


def _b64(arr: Any, dtype: str) -> str:
    a = np.ascontiguousarray(np.asarray(arr), dtype=dtype)
    return base64.b64encode(a.tobytes()).decode("ascii")


def _jsonable(x: Any) -> Any:
    if isinstance(x, str | bool) or x is None:
        return x
    if isinstance(x, float | np.floating | int | np.integer):
        return num(x)
    if isinstance(x, np.ndarray):
        return [_jsonable(e) for e in x.tolist()]
    if isinstance(x, list | tuple):
        return [_jsonable(e) for e in x]
    return str(x)


def _table(v: Any) -> tuple[str, dict[str, Any]]:
    cols = v["value"]
    names = list(cols.keys())
    labels = [str(x) for x in (_field(v, "labels") or [])] or names
    columns = {n: _jsonable(cols[n] if cols[n] is not None else []) for n in names}
    rows = max((len(c) for c in columns.values()), default=0)
    lines = [" | ".join(labels)]
    for r in range(rows):
        lines.append(" | ".join(str(c[r]) if r < len(c) else "" for c in columns.values()))
    return "\n".join(lines), {"labels": labels, "columns": columns}


def convert(v: Any) -> Converted:
    """Convert one raw p4p ``Value`` (a ``nt=False`` monitor update) for PVWS.

    Handles NTScalar, NTScalarArray, NTEnum, NTTable and any other structure (sent as text).
    Never raises for a well-formed ``Value``.
    """
    sev = severity_of(v)
    body: dict[str, Any] = _time(v)
    ident = v.getID() if hasattr(v, "getID") else ""
    try:
        code = v.type().aspy("value")
    except (KeyError, TypeError, AttributeError):
        code = None
    labels: tuple[str, ...] = ()
    numeric = False
    if ident.startswith("epics:nt/NTTable"):
        vtype = "VTable"
        text, table = _table(v)
        body["text"] = text
        body["table"] = table
    elif ident.startswith("epics:nt/NTEnum") or (
        isinstance(code, tuple) and code[1] == "enum_t"
    ):
        vtype = "VEnum"
        labels = tuple(str(x) for x in v["value.choices"])
        idx = int(v["value.index"])
        body["value"] = idx
        body["text"] = labels[idx] if 0 <= idx < len(labels) else str(idx)
        numeric = True
    elif code == "?":
        vtype, labels, numeric = "VEnum", BOOL_LABELS, True
        idx = int(bool(v["value"]))
        body["value"] = idx
        body["text"] = BOOL_LABELS[idx]
    elif code == "s":
        vtype = "VString"
        body["text"] = str(v["value"])
    elif isinstance(code, str) and code in _SCALAR_VTYPES:
        vtype, numeric = _SCALAR_VTYPES[code], True
        body["value"] = num(v["value"])
    elif isinstance(code, str) and code in _ARRAY_B64:
        vtype, key, dtype = _ARRAY_B64[code]
        body[key] = _b64(v["value"], dtype)
    elif isinstance(code, str) and code in _ARRAY_LIST:
        vtype = _ARRAY_LIST[code]
        body["value"] = _jsonable(v["value"])
    else:
        vtype = "VString"
        try:
            body["text"] = dumps(_jsonable_struct(v))
        except (TypeError, ValueError):
            body["text"] = str(v)
    meta = _meta(v, vtype, labels)
    return Converted(vtype, dumps(meta)[1:-1], sev, dumps(body)[1:-1], labels, numeric)


def _jsonable_struct(v: Any) -> Any:
    try:
        d = v.todict()
    except AttributeError:
        return _jsonable(v)

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): walk(y) for k, y in x.items()}
        return _jsonable(x)

    return walk(d)


def local_value(value: float | str | int, seconds: float) -> Converted:
    """A :class:`Converted` for a bridge-local value (``loc://``, ``sim://``), severity NONE."""
    body: dict[str, Any] = {"seconds": int(seconds), "nanos": int((seconds % 1) * 1e9)}
    if isinstance(value, str):
        vtype = "VString"
        body["text"] = value
        meta: dict[str, Any] = {"vtype": vtype}
    else:
        vtype = "VDouble" if isinstance(value, float) else "VLong"
        body["value"] = num(value)
        meta = {"vtype": vtype, "units": "", "description": "", "precision": 3,
                "min": "NaN", "max": "NaN", "warn_low": "NaN", "warn_high": "NaN",
                "alarm_low": "NaN", "alarm_high": "NaN"}
    return Converted(vtype, dumps(meta)[1:-1], "NONE", dumps(body)[1:-1], (),
                     not isinstance(value, str))


def local_enum(index: int, labels: tuple[str, ...], seconds: float) -> Converted:
    """A :class:`Converted` enum for a bridge-local value (``sim://flipflop``)."""
    body = {"seconds": int(seconds), "nanos": int((seconds % 1) * 1e9), "value": index,
            "text": labels[index]}
    meta = {"vtype": "VEnum", "labels": list(labels)}
    return Converted("VEnum", dumps(meta)[1:-1], "NONE", dumps(body)[1:-1], labels, True)
