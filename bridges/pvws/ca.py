"""``ca://`` names read with Channel Access (caproto's asyncio client), as PVWS does.

On each connect the channel's DBR_CTRL value gives the metadata (units, precision, limits, enum
labels); then a DBR_TIME subscription gives value, severity and time. Conversion follows
:mod:`bridges.pvws.values` (same fields, same encodings). Writes to ``ca://`` names are decided
like any other and put over PVA under the same record name on the device network (decision 0071).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import numpy as np
from caproto import ChannelType
from caproto.asyncio.client import Context

from .config import PVName
from .pool import Upstream
from .values import SEVERITIES, Converted, _b64, dumps, num

EPICS_EPOCH = 631152000
"""Seconds from the POSIX epoch to the EPICS epoch (1990-01-01)."""

_NATIVE = {
    # native type -> (scalar vtype, array vtype, base64 field or None (JSON list), dtype)
    ChannelType.DOUBLE: ("VDouble", "VDoubleArray", "b64dbl", "<f8"),
    ChannelType.FLOAT: ("VFloat", "VFloatArray", "b64flt", "<f4"),
    ChannelType.LONG: ("VInt", "VIntArray", "b64int", "<i4"),
    ChannelType.INT: ("VShort", "VShortArray", "b64srt", "<i2"),
    ChannelType.CHAR: ("VByte", "VByteArray", "b64byt", "u1"),
    ChannelType.STRING: ("VString", "VStringArray", None, ""),
    ChannelType.ENUM: ("VEnum", "VEnumArray", None, ""),
}


def _text(x: Any) -> str:
    return x.decode("latin-1") if isinstance(x, bytes) else str(x)


def ca_meta(native: ChannelType, count: int, ctrl: Any) -> tuple[str, str, tuple[str, ...]]:
    """``(vtype, meta JSON fragment, labels)`` from a DBR_CTRL read response."""
    scalar, array, _, _ = _NATIVE.get(native, _NATIVE[ChannelType.STRING])
    vtype = array if count > 1 else scalar
    md = ctrl.metadata
    m: dict[str, Any] = {"vtype": vtype}
    labels: tuple[str, ...] = ()
    if native == ChannelType.ENUM:
        labels = tuple(_text(s) for s in getattr(md, "enum_strings", ()))
        m["labels"] = list(labels)
    elif native != ChannelType.STRING:
        m["units"] = _text(getattr(md, "units", b""))
        m["description"] = ""
        prec = getattr(md, "precision", None)
        if prec is not None:
            m["precision"] = int(prec)
        m["min"] = num(getattr(md, "lower_disp_limit", math.nan))
        m["max"] = num(getattr(md, "upper_disp_limit", math.nan))
        m["warn_low"] = num(getattr(md, "lower_warning_limit", math.nan))
        m["warn_high"] = num(getattr(md, "upper_warning_limit", math.nan))
        m["alarm_low"] = num(getattr(md, "lower_alarm_limit", math.nan))
        m["alarm_high"] = num(getattr(md, "upper_alarm_limit", math.nan))
    return vtype, dumps(m)[1:-1], labels


def ca_body(native: ChannelType, count: int, labels: tuple[str, ...], resp: Any
            ) -> tuple[str, str]:
    """``(severity, body JSON fragment)`` from a DBR_TIME monitor response."""
    md = resp.metadata
    sev_i = int(getattr(md, "severity", 0))
    sev = SEVERITIES[sev_i] if 0 <= sev_i < len(SEVERITIES) else "UNDEFINED"
    body: dict[str, Any] = {
        "seconds": int(getattr(md, "secondsSinceEpoch", 0)) + EPICS_EPOCH,
        "nanos": int(getattr(md, "nanoSeconds", 0)),
    }
    data = resp.data
    _, _, b64key, dtype = _NATIVE.get(native, _NATIVE[ChannelType.STRING])
    if native == ChannelType.STRING:
        texts = [_text(x) for x in data]
        if count > 1:
            body["value"] = texts
        else:
            body["text"] = texts[0] if texts else ""
    elif native == ChannelType.ENUM:
        idx = int(data[0]) if len(data) else 0
        body["value"] = idx
        body["text"] = labels[idx] if 0 <= idx < len(labels) else str(idx)
    elif count > 1 and b64key is not None:
        body[b64key] = _b64(np.asarray(data), dtype)
    else:
        body["value"] = num(data[0]) if len(data) else "NaN"
    return sev, dumps(body)[1:-1]


class CaUpstream(Upstream):
    """A Channel Access monitor for a ``ca://`` name."""

    def __init__(self, pvname: PVName, ctx: Context) -> None:
        super().__init__(pvname)
        self._ctx = ctx
        self._task: asyncio.Task[None] | None = None
        self._pv: Any = None
        self._sub: Any = None
        self._token: Any = None
        self._meta: tuple[str, str, tuple[str, ...]] | None = None
        self._native = ChannelType.STRING
        self._count = 1
        self._new_meta = True

    def start(self) -> None:  # noqa: D102
        self._task = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        # timeout=None: search until found (caproto accepts None; its default is a sentinel,
        # which is what pyright infers as the parameter's type)
        (self._pv,) = await self._ctx.get_pvs(
            self.pvname.name, connection_state_callback=self._on_state,
            timeout=None)  # pyright: ignore[reportArgumentType] - caproto untyped; None: no timeout (its doc)

    async def _on_state(self, pv: Any, state: str) -> None:
        if state == "connected":
            try:
                self._native = ChannelType(pv.channel.native_data_type)
                self._count = int(pv.channel.native_data_count)
                ctrl = await pv.read(data_type="control", timeout=5.0)
                self._meta = ca_meta(self._native, self._count, ctrl)
            except Exception:
                return
            self._new_meta = True
            if self._sub is None:
                self._sub = pv.subscribe(data_type="time")
                self._token = self._sub.add_callback(self._on_value)
        elif state in ("disconnected", "destroyed"):
            self.disconnected()

    async def _on_value(self, sub: Any, resp: Any) -> None:
        if self._meta is None:
            return
        vtype, meta, labels = self._meta
        try:
            sev, body = ca_body(self._native, self._count, labels, resp)
        except (ValueError, TypeError, IndexError):
            return
        numeric = vtype not in ("VString", "VStringArray") and not vtype.endswith("Array")
        new = self._new_meta
        self._new_meta = False
        self.connected = True
        self.publish(Converted(vtype, meta, sev, body, labels, numeric), new_meta=new)

    def close(self) -> None:  # noqa: D102
        if self._task is not None and not self._task.done():
            self._task.cancel()
        sub, token = self._sub, self._token
        self._sub = None
        if sub is not None:
            task = asyncio.get_running_loop().create_task(sub.remove_callback(token))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


async def close_context(ctx: Context) -> None:
    """Disconnect a caproto client context (shutdown)."""
    with contextlib.suppress(Exception):
        await ctx.disconnect()
