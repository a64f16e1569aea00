"""The p4p boundary of the queue IOC: SharedPVs, posting with alarm severity, RPC handlers.

Everything untyped (p4p ``Value``, ``ServerOperation``) stays here; what to post is decided in
:mod:`iocs.queue.model` and :mod:`iocs.queue.ioc`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p4p import Type, Value
from p4p.nt import NTEnum, NTScalar, NTTable
from p4p.server import StaticProvider
from p4p.server.asyncio import SharedPV

from pvdb import queue as qn
from pvdb.lockmodel import Caller, CallerError, ErrorCode, resolve_caller
from pvdb.names import PVKind, PVSpec
from pvdb.policy import ANONYMOUS, HostRolesCache, Policy
from pvdb.redact import redact

from .. import pvutil
from .model import BadRequestError

log = logging.getLogger(__name__)

INVALID = 3
"""EPICS alarm severity INVALID."""

RPC_RESULT = Type([("message", "s"), ("itemUid", "s")], id="pvcoord:QueueResult:1.0")
"""Reply of every control RPC: a one-line message, and the item uid for ItemAdd/ItemRemove."""

_CODES = {
    PVKind.STRING: "s",
    PVKind.DOUBLE: "d",
    PVKind.INT: "i",
    PVKind.STRING_ARRAY: "as",
    PVKind.DOUBLE_ARRAY: "ad",
}
_EMPTY: dict[PVKind, object] = {
    PVKind.STRING: "",
    PVKind.DOUBLE: 0.0,
    PVKind.INT: 0,
    PVKind.STRING_ARRAY: [],
    PVKind.DOUBLE_ARRAY: [],
}


def _stamp(v: Value, ts: float, severity: int, message: str) -> Value:
    sec = int(ts)
    v["timeStamp.secondsPastEpoch"] = sec
    v["timeStamp.nanoseconds"] = int((ts - sec) * 1e9)
    v["alarm.severity"] = severity
    v["alarm.status"] = 0 if severity == 0 else 1
    v["alarm.message"] = message
    return v


@dataclass
class _Served:
    spec: PVSpec
    pv: SharedPV
    nt: Any
    value: object
    columns: tuple[tuple[str, str], ...] = ()


class QueuePVs:
    """Every non-RPC queue PV of one prefix, with the value last posted and a common alarm.

    :meth:`set` posts only changes; :meth:`set_alarm` reposts every PV (except
    :data:`pvdb.queue.NEVER_INVALID`) with the new severity and message.
    """

    def __init__(self, prefix: str, provider: StaticProvider) -> None:
        self.prefix = prefix
        self.provider = provider
        self.severity = INVALID
        self.alarm_message = "no message from the RE Manager yet"
        self._pvs: dict[str, _Served] = {}
        now = time.time()
        for spec in qn.QUEUE_PVS:
            if spec.kind is PVKind.RPC:
                continue
            self._add(spec, now)

    def _add(self, spec: PVSpec, now: float) -> None:
        sev, msg = (0, "") if spec in qn.NEVER_INVALID else (self.severity, self.alarm_message)
        if spec.kind is PVKind.NTTABLE:
            nt = NTTable(list(spec.columns))
            served = _Served(spec, None, nt, [], spec.columns)  # type: ignore[arg-type]
            initial = self._table(served, [], now, sev, msg)
        elif spec.kind is PVKind.NTENUM:
            nt = NTEnum()
            served = _Served(spec, None, nt, 0)  # type: ignore[arg-type]
            initial = _stamp(
                nt.wrap({"index": 0, "choices": list(spec.choices)}), now, sev, msg
            )
        else:
            nt = NTScalar(_CODES[spec.kind], display=True)
            value = _EMPTY[spec.kind]
            served = _Served(spec, None, nt, value)  # type: ignore[arg-type]
            initial = _stamp(nt.wrap(value), now, sev, msg)
            initial["display.description"] = spec.description[:120]
            if spec.units:
                initial["display.units"] = spec.units
        served.pv = SharedPV(handler=pvutil.READ_ONLY, initial=initial)
        self._pvs[spec.suffix] = served
        self.provider.add(spec.name(self.prefix), served.pv)

    @staticmethod
    def _table(served: _Served, rows: Iterable[tuple], ts: float, sev: int, msg: str) -> Value:
        rows = list(rows)
        cols = {name: [r[i] for r in rows] for i, (name, _) in enumerate(served.columns)}
        v = served.nt.type({"labels": [c for c, _ in served.columns], "value": cols})
        return _stamp(v, ts, sev, msg)

    def _post(self, served: _Served, value: object, ts: float) -> None:
        if served.spec in qn.NEVER_INVALID:
            sev, msg = 0, ""
        else:
            sev, msg = self.severity, self.alarm_message
        if served.spec.kind is PVKind.NTTABLE:
            v = self._table(served, value, ts, sev, msg)  # type: ignore[arg-type]
        elif served.spec.kind is PVKind.NTENUM:
            v = served.nt.type()
            v["value.index"] = int(value)  # type: ignore[call-overload]
            v = _stamp(v, ts, sev, msg)
        else:
            v = _stamp(served.nt.wrap(value), ts, sev, msg)
        served.pv.post(v)

    def get(self, spec: PVSpec) -> object:
        """The value last posted to ``spec`` (rows for a table, index for an enum)."""
        return self._pvs[spec.suffix].value

    def set(self, spec: PVSpec, value: object, ts: float | None = None) -> bool:
        """Post ``value`` to ``spec`` if it differs from the last one; return whether it did.

        Values: str, int, float, list of str, table rows (list of tuples in column order), enum
        index (int).
        """
        return self.set_suffix(spec.suffix, value, ts)

    def set_suffix(self, suffix: str, value: object, ts: float | None = None) -> bool:
        """:meth:`set` by PV suffix (``Queue:ItemsInQueue``)."""
        served = self._pvs[suffix]
        if isinstance(value, tuple) and served.spec.kind is PVKind.STRING_ARRAY:
            value = list(value)
        value = _redacted(value)
        if served.value == value:
            return False
        served.value = value
        self._post(served, value, time.time() if ts is None else ts)
        return True

    def set_alarm(self, severity: int, message: str) -> None:
        """Set the alarm of every PV (except the never-INVALID ones) and repost them."""
        if severity == self.severity and message == self.alarm_message:
            return
        self.severity, self.alarm_message = severity, message
        now = time.time()
        for served in self._pvs.values():
            if served.spec not in qn.NEVER_INVALID:
                self._post(served, served.value, now)


def _redacted(value: object) -> object:
    """``value`` with every password hidden (:func:`pvdb.redact.redact`) in its strings.

    The RE Manager's console, item messages and tracebacks may quote a redis URL or a password.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_redacted(v) for v in value)
    return value


ControlFn = Callable[[Caller, dict[str, str]], Awaitable[tuple[str, str]]]
"""``async fn(caller, args) -> (message, item_uid)``; raises :class:`BadRequestError` or
:class:`ControlError` with the message for the caller. ``args`` has no ``onBehalfOf`` /
``clientHost`` (they are resolved into ``caller``)."""


class ControlError(RuntimeError):
    """A control call the RE Manager (or the lock state) refused; the message is for the caller.

    Attributes:
        code: the :class:`pvdb.lockmodel.ErrorCode` (``manager-refused`` unless given).
        holder: ``account@host`` of the lock that caused it, or ''.
    """

    def __init__(
        self, message: str, code: ErrorCode = ErrorCode.MANAGER_REFUSED, holder: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.holder = holder


EXAMPLE = "pvcall P Queue:ItemAdd name=count 'args=[[\"det1\"]]'"
"""A correct call, shown when a request is malformed."""


class ControlRPC(pvutil.AsyncRPC):
    """Handler of one control RPC (:class:`iocs.pvutil.AsyncRPC`).

    Who calls is :func:`pvdb.lockmodel.resolve_caller` of the PVA account, the peer host and the
    optional ``onBehalfOf`` / ``clientHost`` arguments (the coordination IOC's rule and codes:
    ``not-allowed`` for a caller that is no trusted service or may not act for that user);
    that :class:`~pvdb.lockmodel.Caller` and the other arguments go to ``fn``; its
    ``(message, item_uid)`` is the reply.
    """

    def __init__(self, spec: PVSpec, fn: ControlFn, policy: Policy) -> None:
        self.spec, self.fn, self.policy = spec, fn, policy
        self._roles = HostRolesCache()  # groups read at most once a second per account
        super().__init__(spec.suffix, self._call, (BadRequestError, ControlError, CallerError),
                         EXAMPLE)

    async def _call(self, op: Any, args: dict[str, str]) -> Value:
        args = dict(args)
        on_behalf_of, client_host = args.pop("onBehalfOf", None), args.pop("clientHost", None)
        host = (op.peer() or "unknown").rsplit(":", 1)[0]
        # roles only from this host's group database, never the client's claim
        caller = resolve_caller(self.policy, pvutil.claimed_account(op) or ANONYMOUS, host,
                                on_behalf_of, client_host, self._roles)
        message, uid = await self.fn(caller, args)
        return RPC_RESULT({"message": redact(message), "itemUid": uid})


def add_rpcs(
    prefix: str, provider: StaticProvider, handlers: Mapping[PVSpec, ControlFn], policy: Policy
) -> list[SharedPV]:
    """Serve one RPC PV per entry of ``handlers`` (callers resolved under ``policy``)."""
    out = []
    now = time.time()
    for spec, fn in handlers.items():
        pv = SharedPV(handler=ControlRPC(spec, fn, policy),
                      initial=NTScalar("s").wrap("", timestamp=now))
        provider.add(spec.name(prefix), pv)
        out.append(pv)
    return out
