"""Client of the coordination IOC: acquire, renew and release device locks over PVAccess.

Two flavours with the same methods: :class:`Client` (blocking, ``p4p.client.thread``) and
:class:`AsyncClient` (``async``, ``p4p.client.asyncio``)::

    from pvcoord.client import Client

    with Client("BL01:") as c:
        with c.lock(["m1", "m2"], "MANUAL_OPERATOR", timeout=60, reason="align") as held:
            ...                 # the lease is renewed in the background every timeout/3 s
            held.check()        # raises LockLostError if the lock was preempted or expired
        print(c.locks())        # rows of BL01:Coord:Locks

Every call sends pvcall-style string arguments (an NTURI whose query fields are all strings, as
``python -m p4p.client.cli rpc NAME key=value`` does) and waits at most ``call_timeout`` seconds
(default: the client's ``timeout``, 5 s). Errors are :class:`CoordError` subclasses:

- :class:`RefusedError`: the IOC answered with an error (its message names the holder, the bad
  argument, ...); :class:`LockLostError` when that happens to a held lock's renew. ``.code`` is
  the machine-readable :class:`pvdb.lockmodel.ErrorCode` of the refusal (``None`` for a server
  that sends none, e.g. a gateway's "Put permission denied"), ``.holder`` the ``account@host``
  it names, if any.
- :class:`NoAnswerError`: the IOC did not answer within the call timeout (not running, wrong
  prefix or EPICS settings).
- :class:`BadRequestError`: the request was rejected before sending (unknown lock type, no device).

PV names come from :mod:`pvdb.names` only. The untyped p4p API stays in this module: callers get
pydantic models (:class:`Grant`, :class:`Reply`, :class:`LockInfo`, :class:`pvdb.models.LockEvent`,
:class:`RegistryDevice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

from p4p import Value
from p4p.client.asyncio import Context as AsyncContext
from p4p.client.thread import Context as ThreadContext
from p4p.client.thread import Disconnected, RemoteError
from p4p.nt import NTURI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pvdb.lockmodel import ErrorCode, error_text, parse_error_text
from pvdb.models import DeviceSignal, LockEvent, LockType
from pvdb.names import (
    ACQUIRE_ARGS,
    COORD_ACQUIRE,
    COORD_DEVICES,
    COORD_EVENTS,
    COORD_FORCE_RELEASE,
    COORD_HEARTBEAT,
    COORD_LOCKS,
    COORD_RELEASE,
    COORD_RENEW,
    FORCE_RELEASE_ARGS,
    REGISTRY_DEVICE_SIGNALS,
    REGISTRY_DEVICES,
    RELEASE_ARGS,
    RENEW_ARGS,
    PVSpec,
    check_prefix,
)

__all__ = [
    "AsyncClient",
    "AsyncHeldLock",
    "BadRequestError",
    "Client",
    "CoordError",
    "ErrorCode",
    "Grant",
    "HeldLock",
    "LockInfo",
    "LockLostError",
    "NoAnswerError",
    "RegistryDevice",
    "RefusedError",
    "Reply",
]

_log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT = 5.0
"""Seconds one client call waits for the IOC (several loopback round trips are ~1 ms each)."""

RENEW_FRACTION = 1.0 / 3.0
"""A held lock is renewed every ``lease * RENEW_FRACTION`` seconds, so two renewals can fail
(IOC restarting, network hiccup) before the lease runs out."""

MIN_RENEW_INTERVAL = 0.2
"""Shortest renew period in seconds (bounds the load a very short lease puts on the IOC)."""


# --- errors -----------------------------------------------------------------------------------


class CoordError(Exception):
    """Base of every error this client raises; ``str(e)`` is a sentence for an operator."""


class BadRequestError(CoordError, ValueError):
    """The request was rejected by the client before anything was sent."""


class RefusedError(CoordError):
    """The IOC refused the request.

    Attributes:
        pv: the PV that refused.
        code: the :class:`pvdb.lockmodel.ErrorCode` of the refusal, ``None`` if the server sent
            none (a gateway, another server).
        holder: ``account@host`` of the lock that caused it, or ''.
        message: the server's sentence (names the holder), without the ``[code]`` head.
        text: the server's error text as received.
    """

    def __init__(self, pv: str, text: str) -> None:
        parsed = parse_error_text(text)
        super().__init__(parsed.message)
        self.pv = pv
        self.text = text
        self.code: ErrorCode | None = parsed.code
        self.holder = parsed.holder
        self.message = parsed.message


class LockLostError(RefusedError):
    """A held lock is gone: preempted, expired or force-released (``message`` says which)."""


class NoAnswerError(CoordError, TimeoutError):
    """No answer from ``pv`` within the call timeout."""

    def __init__(self, pv: str, timeout: float, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"no answer from {pv} within {timeout:g} s{extra}: is the coordination IOC running, "
            "and are the prefix and EPICS_PVA_* settings right?"
        )
        self.pv = pv
        self.timeout = timeout


# --- results ----------------------------------------------------------------------------------


class Grant(BaseModel):
    """Reply of ``Coord:Acquire``.

    Attributes:
        granted: always true for a returned grant (a refusal raises :class:`RefusedError`).
        key: secret that releases or renews these locks; never printed by this library.
        devices: devices now held (``beamline`` for a whole-beamline lock).
        preempted: devices whose previous, lower-priority holder was preempted.
        expires: lease end as epoch seconds.
        message: the server's one-line summary.
    """

    model_config = ConfigDict(frozen=True)

    granted: bool
    key: str = Field(default="", repr=False)
    devices: tuple[str, ...] = ()
    preempted: tuple[str, ...] = ()
    expires: float = 0.0
    message: str = ""


class Reply(BaseModel):
    """Reply of ``Coord:Release``, ``Coord:Renew`` and ``Coord:ForceRelease``.

    Attributes:
        devices: devices the action applied to (empty if the server does not say).
        expires: new lease end (epoch seconds) for a renew, else 0.
        message: the server's one-line summary.
    """

    model_config = ConfigDict(frozen=True)

    devices: tuple[str, ...] = ()
    expires: float = 0.0
    message: str = ""


class LockInfo(BaseModel):
    """One row of ``Coord:Locks`` (times are epoch seconds; ``owner`` is ``account@host``)."""

    model_config = ConfigDict(frozen=True)

    device: str
    lock_type: LockType
    priority: int
    owner: str
    acquired: float
    expires: float
    reason: str = ""
    plan_uid: str = ""

    def remaining(self, now: float | None = None) -> float:
        """Seconds until the lease ends (0 if already past)."""
        return max(0.0, self.expires - (time.time() if now is None else now))


class RegistryDevice(BaseModel):
    """One row of ``Registry:Devices`` (``capabilities`` split into a tuple)."""

    model_config = ConfigDict(frozen=True)

    name: str
    device_class: str = ""
    capabilities: tuple[str, ...] = ()
    pv_prefix: str = ""
    ioc: str = ""
    description: str = ""
    connected: bool = False


# --- the p4p boundary: pure conversions, testable without a network ---------------------------


def device_list(devices: str | Iterable[str]) -> list[str]:
    """Normalise ``"m1, m2"`` or ``["m1", "m2"]`` to ``["m1", "m2"]``.

    Raises:
        BadRequestError: if no device name is left.
    """
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    out = [str(d).strip() for d in items if str(d).strip()]
    if not out:
        raise BadRequestError("name at least one device (or 'beamline')")
    return out


def lock_type_of(value: str | LockType) -> LockType:
    """Return the :class:`LockType` named by ``value`` (case-insensitive, ``-`` for ``_``).

    Raises:
        BadRequestError: for an unknown type, listing the valid ones.
    """
    if isinstance(value, LockType):
        return value
    try:
        return LockType(str(value).strip().upper().replace("-", "_"))
    except ValueError:
        valid = ", ".join(t.value for t in LockType)
        raise BadRequestError(f"unknown lock type {value!r}: use one of {valid}") from None


def _seconds(name: str, value: float | str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadRequestError(f"{name} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise BadRequestError(f"{name} must be a positive number of seconds, not {value!r}")
    return repr(v)


def acquire_args(
    devices: str | Iterable[str],
    lock_type: str | LockType,
    timeout: float | None = None,
    reason: str = "",
    plan_uid: str = "",
    on_behalf_of: str | None = None,
    client_host: str | None = None,
) -> dict[str, str]:
    """The string arguments of one ``Coord:Acquire`` call (names from ``pvdb.ACQUIRE_ARGS``).

    ``timeout`` is the lease in seconds (``None``: the policy's default lease for the type).

    Raises:
        BadRequestError: no device, unknown lock type, or a lease that is not a positive number.
    """
    args = {
        "device": ",".join(device_list(devices)),
        "type": lock_type_of(lock_type).value,
        "reason": reason,
    }
    if timeout is not None:
        args["timeout"] = _seconds("timeout", timeout)
    if plan_uid:
        args["planUid"] = plan_uid
    if on_behalf_of:
        args["onBehalfOf"] = on_behalf_of
    if client_host:
        args["clientHost"] = client_host
    assert set(args) <= set(ACQUIRE_ARGS), args
    return args


def _owner_args(
    spec_args: Sequence[str],
    devices: str | Iterable[str] | None,
    key: str | None,
    on_behalf_of: str | None,
    client_host: str | None,
) -> dict[str, str]:
    if devices is None and not key:
        raise BadRequestError("give the devices or the key of the lock")
    args: dict[str, str] = {}
    if devices is not None:
        args["device"] = ",".join(device_list(devices))
    if key:
        args["key"] = key
    if on_behalf_of:
        args["onBehalfOf"] = on_behalf_of
    if client_host:
        args["clientHost"] = client_host
    assert set(args) <= set(spec_args), args
    return args


def release_args(
    devices: str | Iterable[str] | None = None,
    key: str | None = None,
    on_behalf_of: str | None = None,
    client_host: str | None = None,
) -> dict[str, str]:
    """String arguments of ``Coord:Release``: by ``key``, or the caller's own locks on devices."""
    return _owner_args(RELEASE_ARGS, devices, key, on_behalf_of, client_host)


def renew_args(
    devices: str | Iterable[str] | None = None,
    key: str | None = None,
    timeout: float | None = None,
    on_behalf_of: str | None = None,
    client_host: str | None = None,
) -> dict[str, str]:
    """String arguments of ``Coord:Renew``; ``timeout`` is the new lease from now, in seconds."""
    args = _owner_args(RENEW_ARGS, devices, key, on_behalf_of, client_host)
    if timeout is not None:
        args["timeout"] = _seconds("timeout", timeout)
    return args


def force_release_args(devices: str | Iterable[str], reason: str = "") -> dict[str, str]:
    """String arguments of ``Coord:ForceRelease``."""
    args = {"device": ",".join(device_list(devices)), "reason": reason}
    assert set(args) <= set(FORCE_RELEASE_ARGS), args
    return args


def nturi(pv: str, args: Mapping[str, str]) -> Value:
    """Wrap string ``args`` as the NTURI that ``pvcall``/``p4p.client.cli rpc`` would send."""
    return NTURI([(k, "s") for k in args]).wrap(pv, kws=dict(args))


def _fields(value: Any) -> dict[str, Any]:
    if isinstance(value, Value):
        return value.todict()
    if isinstance(value, Mapping):
        return dict(value)
    raise CoordError(f"unexpected reply {value!r}: expected a structure")


def _strings(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(s for s in v.split(",") if s)
    return tuple(str(s) for s in v)


def parse_grant(pv: str, value: Any) -> Grant:
    """Turn a ``Coord:Acquire`` reply into a :class:`Grant`.

    Raises:
        RefusedError: if the reply says ``granted`` is false (the server should raise an RPC error
            instead; this covers a server that answers with a structure).
    """
    f = _fields(value)
    grant = Grant(
        granted=bool(f.get("granted", False)),
        key=str(f.get("key", "")),
        devices=_strings(f.get("devices")),
        preempted=_strings(f.get("preempted")),
        expires=float(f.get("expires", 0.0) or 0.0),
        message=str(f.get("message", "")),
    )
    if not grant.granted:
        raise RefusedError(pv, grant.message or "not granted")
    return grant


def parse_reply(value: Any) -> Reply:
    """Turn a release / renew / force-release reply into a :class:`Reply`."""
    try:
        f = _fields(value)
    except CoordError:
        return Reply(message=str(value))
    if "value" in f and not ({"devices", "message"} & set(f)):  # an NTScalar reply
        return Reply(message=str(f["value"]))
    return Reply(
        devices=_strings(f.get("devices")),
        expires=float(f.get("expires", 0.0) or 0.0),
        message=str(f.get("message", "")),
    )


def table_rows(value: Any) -> list[dict[str, Any]]:
    """NTTable ``value`` (a p4p Value, or ``{"value": {column: list}}``) -> one dict per row."""
    f = _fields(value)
    cols = f.get("value", f)
    if not isinstance(cols, Mapping):
        raise CoordError(f"unexpected table {value!r}")
    names = list(cols)
    columns = [[_py(x) for x in (cols[n] if cols[n] is not None else [])] for n in names]
    n = min((len(c) for c in columns), default=0)
    return [{name: col[i] for name, col in zip(names, columns, strict=True)} for i in range(n)]


def _py(x: Any) -> Any:
    """A numpy scalar as the plain Python number (``item()``), anything else unchanged."""
    return x.item() if hasattr(x, "item") and not isinstance(x, str) else x


def parse_locks(value: Any) -> list[LockInfo]:
    """Rows of ``Coord:Locks`` as :class:`LockInfo` (column names from ``pvdb.LOCKS_COLUMNS``)."""
    out = []
    for r in table_rows(value):
        try:
            out.append(
                LockInfo(
                    device=r["device"],
                    lock_type=r["lockType"],
                    priority=int(r["priority"]),
                    owner=r["owner"],
                    acquired=float(r["acquired"]),
                    expires=float(r["expires"]),
                    reason=r.get("reason", ""),
                    plan_uid=r.get("planUid", ""),
                )
            )
        except (KeyError, ValidationError, ValueError) as e:
            raise CoordError(f"malformed Coord:Locks row {r!r}: {e}") from None
    return out


def parse_events(value: Any) -> list[LockEvent]:
    """Rows of ``Coord:Events`` as :class:`pvdb.models.LockEvent`, oldest first."""
    out = []
    for r in table_rows(value):
        try:
            out.append(
                LockEvent(
                    time=float(r["time"]),
                    action=r["action"],
                    device=r["device"],
                    lock_type=r.get("lockType") or None,
                    actor=r.get("actor", ""),
                    holder=r.get("holder", ""),
                    message=r.get("message", ""),
                )
            )
        except (KeyError, ValidationError, ValueError) as e:
            raise CoordError(f"malformed Coord:Events row {r!r}: {e}") from None
    return out


def parse_registry(value: Any) -> list[RegistryDevice]:
    """Rows of ``Registry:Devices`` as :class:`RegistryDevice`."""
    out = []
    for r in table_rows(value):
        caps = tuple(c.strip() for c in str(r.get("capabilities", "")).split(",") if c.strip())
        out.append(
            RegistryDevice(
                name=r["name"],
                device_class=r.get("deviceClass", ""),
                capabilities=caps,
                pv_prefix=r.get("pvPrefix", ""),
                ioc=r.get("ioc", ""),
                description=r.get("description", ""),
                connected=bool(r.get("connected", False)),
            )
        )
    return out


def parse_signals(value: Any) -> list[DeviceSignal]:
    """Rows of ``Registry:<device>:Signals`` as :class:`pvdb.models.DeviceSignal`.

    Raises:
        CoordError: a row that is not a valid signal.
    """
    out = []
    for r in table_rows(value):
        try:
            out.append(DeviceSignal(
                name=r["signal"], kind=r.get("kind", ""), access=r.get("access", ""),
                read_pv=r.get("readPv", ""), write_pv=r.get("writePv", ""),
            ))
        except (KeyError, ValidationError) as e:
            raise CoordError(f"malformed Registry signals row {r!r}: {e}") from None
    return out


def scalar(value: Any) -> Any:
    """The ``value`` field of an NTScalar/NTScalarArray (a p4p Value or an unwrapped one)."""
    if isinstance(value, Value):
        v = value["value"]
        return list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v
    return value


def _lost_error(err: RefusedError) -> LockLostError:
    return LockLostError(err.pv, err.text)


@contextlib.contextmanager
def p4p_errors(pv: str, timeout: float) -> Iterator[None]:
    """The one mapping of p4p errors to this client's errors, around one call on ``pv``.

    A remote error becomes :class:`RefusedError` (with its code and holder), a timeout or a
    disconnect :class:`NoAnswerError` (after ``timeout`` s).
    """
    try:
        yield
    except RemoteError as e:
        raise RefusedError(pv, str(e)) from None
    except (TimeoutError, Disconnected) as e:
        raise NoAnswerError(pv, timeout, "disconnected" if isinstance(e, Disconnected) else "") \
            from None


# --- shared client state ----------------------------------------------------------------------


class _Base:
    """Prefix, PV names, the call timeout and the context's lifetime shared by both flavours."""

    _ctxt: Any

    def __init__(
        self, prefix: str, timeout: float, registry_prefix: str | None
    ) -> None:
        self.prefix = check_prefix(prefix)
        self.registry_prefix = check_prefix(registry_prefix or prefix)
        if not (timeout > 0 and math.isfinite(timeout)):
            raise BadRequestError(
                f"call timeout must be a positive number of seconds, not {timeout}"
            )
        self.timeout = float(timeout)

    def pv(self, spec: PVSpec, device: str | None = None) -> str:
        """Full name of ``spec`` (from :mod:`pvdb.names`) under this client's prefix."""
        prefix = self.registry_prefix if spec.server == "registry" else self.prefix
        return spec.name(prefix, device=device)

    def call_timeout(self, call_timeout: float | None = None) -> float:
        """Seconds a call waits: ``call_timeout`` if given, else the client's ``timeout``."""
        return self.timeout if call_timeout is None else float(call_timeout)

    def close(self) -> None:
        """Close the PVA context (idempotent)."""
        self._ctxt.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _context_conf(conf: Mapping[str, str] | None) -> dict[str, Any]:
    if conf is None:
        return {"useenv": True}
    return {"conf": {k: v for k, v in conf.items() if k.startswith("EPICS_PVA")}, "useenv": False}


# --- blocking client --------------------------------------------------------------------------


class Client(_Base):
    """Blocking client of one endstation's coordination (and registry) IOC.

    Args:
        prefix: endstation prefix with its trailing colon (``"BL01:"``).
        conf: EPICS_PVA_* settings (e.g. ``pvcoord.procs.client_conf(env)``); ``None`` reads the
            process environment.
        timeout: default seconds each call waits for an answer.
        registry_prefix: prefix of the registry IOC, if it differs from ``prefix``.

    Raises:
        ValueError: for a prefix that does not end in ``:``.
    """

    def __init__(
        self,
        prefix: str,
        conf: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        registry_prefix: str | None = None,
    ) -> None:
        super().__init__(prefix, timeout, registry_prefix)
        self._ctxt = ThreadContext("pva", nt=False, **_context_conf(conf))

    # raw operations

    def _rpc(self, spec: PVSpec, args: Mapping[str, str], call_timeout: float | None) -> Any:
        pv = self.pv(spec)
        t = self.call_timeout(call_timeout)
        with p4p_errors(pv, t):
            return self._ctxt.rpc(pv, nturi(pv, args), timeout=t)

    def get(self, pv: str, call_timeout: float | None = None) -> Value:
        """GET any PV as a raw p4p ``Value`` (a :class:`NoAnswerError` after the call timeout)."""
        t = self.call_timeout(call_timeout)
        with p4p_errors(pv, t):
            return self._ctxt.get(pv, timeout=t)

    # lock operations

    def acquire(
        self,
        devices: str | Iterable[str],
        lock_type: str | LockType,
        timeout: float | None = None,
        reason: str = "",
        plan_uid: str = "",
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
    ) -> Grant:
        """Acquire ``devices`` (all or none) with ``lock_type`` for a lease of ``timeout`` s.

        ``on_behalf_of`` names the user a trusted service acts for (policy
        ``access.trusted_services``); ``client_host`` that user's host.

        Raises:
            RefusedError: held by someone of equal or higher priority (the message names holder,
                type, reason and expiry), unknown device, type not allowed for this account, ...
            NoAnswerError: no answer within ``call_timeout`` (default: the client's timeout).
            BadRequestError: bad arguments, nothing sent.
        """
        args = acquire_args(
            devices, lock_type, timeout, reason, plan_uid, on_behalf_of, client_host
        )
        return parse_grant(self.pv(COORD_ACQUIRE), self._rpc(COORD_ACQUIRE, args, call_timeout))

    def release(
        self,
        devices: str | Iterable[str] | None = None,
        key: str | None = None,
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
    ) -> Reply:
        """Release by ``key``, or the caller's own locks on ``devices``.

        Raises:
            RefusedError: wrong key, not the holder, or the lock was preempted/expired meanwhile.
            NoAnswerError: no answer within the call timeout.
        """
        args = release_args(devices, key, on_behalf_of, client_host)
        return parse_reply(self._rpc(COORD_RELEASE, args, call_timeout))

    def renew(
        self,
        devices: str | Iterable[str] | None = None,
        key: str | None = None,
        timeout: float | None = None,
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
    ) -> Reply:
        """Extend the lease to ``timeout`` s from now (``Reply.expires`` is the new end).

        Raises:
            RefusedError: not held by the caller any more (preempted, expired: the message says).
            NoAnswerError: no answer within the call timeout.
        """
        args = renew_args(devices, key, timeout, on_behalf_of, client_host)
        return parse_reply(self._rpc(COORD_RENEW, args, call_timeout))

    def force_release(
        self, devices: str | Iterable[str], reason: str = "", *, call_timeout: float | None = None
    ) -> Reply:
        """Remove whoever's lock on ``devices`` (policy ``access.force_release`` accounts only).

        Raises:
            RefusedError: the caller may not force-release, or a device is unknown.
        """
        args = force_release_args(devices, reason)
        return parse_reply(self._rpc(COORD_FORCE_RELEASE, args, call_timeout))

    # state

    def locks(self, *, call_timeout: float | None = None) -> list[LockInfo]:
        """The active locks (``Coord:Locks``), sorted by device."""
        return parse_locks(self.get(self.pv(COORD_LOCKS), call_timeout))

    def events(self, *, call_timeout: float | None = None) -> list[LockEvent]:
        """The audit tail (``Coord:Events``), oldest first."""
        return parse_events(self.get(self.pv(COORD_EVENTS), call_timeout))

    def devices(self, *, call_timeout: float | None = None) -> list[str]:
        """Device names the coordination IOC accepts (``Coord:Devices``, includes ``beamline``)."""
        return [str(d) for d in scalar(self.get(self.pv(COORD_DEVICES), call_timeout))]

    def heartbeat(self, *, call_timeout: float | None = None) -> int:
        """Current ``Coord:Heartbeat`` counter (+1 per second while the IOC runs)."""
        return int(scalar(self.get(self.pv(COORD_HEARTBEAT), call_timeout)))

    def registry_devices(self, *, call_timeout: float | None = None) -> list[RegistryDevice]:
        """The registered devices (``Registry:Devices``)."""
        return parse_registry(self.get(self.pv(REGISTRY_DEVICES), call_timeout))

    def registry_signals(
        self, device: str, *, call_timeout: float | None = None
    ) -> list[DeviceSignal]:
        """The signals of ``device`` (``Registry:<device>:Signals``), sorted by name.

        Raises:
            NoAnswerError: no such PV answered (also for a device the registry does not have).
        """
        return parse_signals(self.get(self.pv(REGISTRY_DEVICE_SIGNALS, device), call_timeout))

    def monitor(
        self, spec: PVSpec, callback: Callable[[Value | Exception], None]
    ) -> Any:
        """Subscribe to ``spec``; ``callback`` gets each update (raw Value) or a disconnect.

        Returns the p4p subscription; call ``.close()`` on it to stop. The callback runs on a
        p4p worker thread and must not block.
        """
        return self._ctxt.monitor(self.pv(spec), callback, notify_disconnect=True)

    # the context manager

    def lock(
        self,
        devices: str | Iterable[str],
        lock_type: str | LockType,
        timeout: float,
        reason: str = "",
        plan_uid: str = "",
        on_behalf_of: str | None = None,
        *,
        on_lost: Callable[[LockLostError], None] | None = None,
        renew_every: float | None = None,
        call_timeout: float | None = None,
    ) -> HeldLock:
        """Context manager: acquire on entry, renew in the background, release on exit.

        The lease (``timeout`` s) is renewed every ``renew_every`` s (default ``timeout / 3``).
        If a renew is refused (preempted, expired, force-released) or the lease runs out while
        the IOC does not answer, the lock is *lost*: ``on_lost(error)`` is called from the renew
        thread, :meth:`HeldLock.check` raises it, and leaving the block raises it (unless the
        block itself raised). On exit the lock is released by its key, also on an exception.

        Raises:
            RefusedError, NoAnswerError, BadRequestError: from the acquire, on entry.
            LockLostError: on exit, if the lock was lost while held.
        """
        return HeldLock(
            self, device_list(devices), lock_type_of(lock_type), timeout, reason, plan_uid,
            on_behalf_of, on_lost, renew_every, call_timeout,
        )


def _renew_interval(lease: float, renew_every: float | None) -> float:
    if renew_every is not None:
        return max(MIN_RENEW_INTERVAL, float(renew_every))
    return max(MIN_RENEW_INTERVAL, lease * RENEW_FRACTION)


class HeldLock:
    """A lock held by :meth:`Client.lock` (use it as a context manager).

    Attributes:
        grant: the :class:`Grant` of the acquire (``None`` before entry).
        expires: current lease end in epoch seconds (updated by every renew).
        renewals: number of successful renews so far.
        lost: the :class:`LockLostError` error once the lock is lost, else ``None``.
    """

    def __init__(
        self,
        client: Client,
        devices: list[str],
        lock_type: LockType,
        lease: float,
        reason: str,
        plan_uid: str,
        on_behalf_of: str | None,
        on_lost: Callable[[LockLostError], None] | None,
        renew_every: float | None,
        call_timeout: float | None,
    ) -> None:
        _seconds("timeout", lease)
        self._client = client
        self._args = (devices, lock_type, lease, reason, plan_uid, on_behalf_of)
        self._lease = float(lease)
        self._interval = _renew_interval(self._lease, renew_every)
        self._on_lost = on_lost
        self._call_timeout = call_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.grant: Grant | None = None
        self.expires = 0.0
        self.renewals = 0
        self.lost: LockLostError | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices held (as granted)."""
        return self.grant.devices if self.grant else ()

    def check(self) -> None:
        """Raise :class:`LockLostError` if the lock was lost; otherwise return."""
        if self.lost is not None:
            raise self.lost

    def __enter__(self) -> HeldLock:
        devices, lock_type, lease, reason, plan_uid, on_behalf_of = self._args
        self.grant = self._client.acquire(
            devices, lock_type, lease, reason, plan_uid, on_behalf_of,
            call_timeout=self._call_timeout,
        )
        self.expires = self.grant.expires
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"pvcoord-renew-{','.join(devices)}", daemon=True
        )
        self._thread.start()
        return self

    def _lose(self, err: LockLostError) -> None:
        self.lost = err
        if self._on_lost is not None:
            try:
                self._on_lost(err)
            except Exception:  # a broken callback must not kill the renew thread silently
                _log.exception("on_lost callback failed")

    def _renew_loop(self) -> None:
        assert self.grant is not None
        pv = self._client.pv(COORD_RENEW)
        wait = self._interval
        while not self._stop.wait(wait):
            try:
                reply = self._client.renew(
                    key=self.grant.key, timeout=self._lease, call_timeout=self._call_timeout
                )
            except RefusedError as e:
                self._lose(_lost_error(e))
                return
            except NoAnswerError as e:
                if time.time() >= self.expires:
                    self._lose(LockLostError(pv, error_text(
                        ErrorCode.EXPIRED, f"lease ran out while renewing failed: {e}")))
                    return
                wait = max(MIN_RENEW_INTERVAL, min(self._interval, self.expires - time.time()) / 2)
                continue
            self.renewals += 1
            self.expires = reply.expires or (time.time() + self._lease)
            wait = self._interval

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._client.call_timeout(self._call_timeout) + 1.0)
        if self.lost is None and self.grant is not None:
            try:
                self._client.release(key=self.grant.key, call_timeout=self._call_timeout)
            except RefusedError as e:
                self.lost = _lost_error(e)
            except NoAnswerError:
                if exc_type is None:
                    raise
                _log.warning("could not release %s after an error", ",".join(self.devices))
                return
        if self.lost is not None and exc_type is None:
            raise self.lost


# --- asyncio client ---------------------------------------------------------------------------


class AsyncClient(_Base):
    """The asyncio flavour of :class:`Client`: same arguments, methods are coroutines.

    Create it inside a running event loop; use ``with AsyncClient(...)`` or call :meth:`close`.
    """

    def __init__(
        self,
        prefix: str,
        conf: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        registry_prefix: str | None = None,
    ) -> None:
        super().__init__(prefix, timeout, registry_prefix)
        self._ctxt = AsyncContext("pva", nt=False, **_context_conf(conf))

    async def _timed(self, pv: str, coro: Awaitable[Any], call_timeout: float | None) -> Any:
        t = self.call_timeout(call_timeout)
        with p4p_errors(pv, t):
            return await asyncio.wait_for(coro, timeout=t)

    async def _rpc(
        self, spec: PVSpec, args: Mapping[str, str], call_timeout: float | None
    ) -> Any:
        pv = self.pv(spec)
        return await self._timed(pv, self._ctxt.rpc(pv, nturi(pv, args)), call_timeout)

    async def get(self, pv: str, call_timeout: float | None = None) -> Value:
        """GET any PV as a raw p4p ``Value``."""
        return await self._timed(pv, self._ctxt.get(pv), call_timeout)

    async def acquire(
        self,
        devices: str | Iterable[str],
        lock_type: str | LockType,
        timeout: float | None = None,
        reason: str = "",
        plan_uid: str = "",
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
    ) -> Grant:
        """See :meth:`Client.acquire`."""
        args = acquire_args(
            devices, lock_type, timeout, reason, plan_uid, on_behalf_of, client_host
        )
        reply = await self._rpc(COORD_ACQUIRE, args, call_timeout)
        return parse_grant(self.pv(COORD_ACQUIRE), reply)

    async def release(
        self,
        devices: str | Iterable[str] | None = None,
        key: str | None = None,
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
    ) -> Reply:
        """See :meth:`Client.release`."""
        args = release_args(devices, key, on_behalf_of, client_host)
        return parse_reply(await self._rpc(COORD_RELEASE, args, call_timeout))

    async def renew(
        self,
        devices: str | Iterable[str] | None = None,
        key: str | None = None,
        timeout: float | None = None,
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
    ) -> Reply:
        """See :meth:`Client.renew`."""
        args = renew_args(devices, key, timeout, on_behalf_of, client_host)
        return parse_reply(await self._rpc(COORD_RENEW, args, call_timeout))

    async def force_release(
        self, devices: str | Iterable[str], reason: str = "", *, call_timeout: float | None = None
    ) -> Reply:
        """See :meth:`Client.force_release`."""
        args = force_release_args(devices, reason)
        return parse_reply(await self._rpc(COORD_FORCE_RELEASE, args, call_timeout))

    async def locks(self, *, call_timeout: float | None = None) -> list[LockInfo]:
        """See :meth:`Client.locks`."""
        return parse_locks(await self.get(self.pv(COORD_LOCKS), call_timeout))

    async def events(self, *, call_timeout: float | None = None) -> list[LockEvent]:
        """See :meth:`Client.events`."""
        return parse_events(await self.get(self.pv(COORD_EVENTS), call_timeout))

    async def devices(self, *, call_timeout: float | None = None) -> list[str]:
        """See :meth:`Client.devices`."""
        return [str(d) for d in scalar(await self.get(self.pv(COORD_DEVICES), call_timeout))]

    async def heartbeat(self, *, call_timeout: float | None = None) -> int:
        """See :meth:`Client.heartbeat`."""
        return int(scalar(await self.get(self.pv(COORD_HEARTBEAT), call_timeout)))

    async def registry_devices(
        self, *, call_timeout: float | None = None
    ) -> list[RegistryDevice]:
        """See :meth:`Client.registry_devices`."""
        return parse_registry(await self.get(self.pv(REGISTRY_DEVICES), call_timeout))

    async def registry_signals(
        self, device: str, *, call_timeout: float | None = None
    ) -> list[DeviceSignal]:
        """See :meth:`Client.registry_signals`."""
        return parse_signals(
            await self.get(self.pv(REGISTRY_DEVICE_SIGNALS, device), call_timeout)
        )

    def lock(
        self,
        devices: str | Iterable[str],
        lock_type: str | LockType,
        timeout: float,
        reason: str = "",
        plan_uid: str = "",
        on_behalf_of: str | None = None,
        *,
        on_lost: Callable[[LockLostError], None] | None = None,
        renew_every: float | None = None,
        call_timeout: float | None = None,
        cancel_on_loss: bool = False,
    ) -> AsyncHeldLock:
        """Async context manager (``async with``); see :meth:`Client.lock`.

        With ``cancel_on_loss=True`` the task inside the block is cancelled as soon as the lock is
        lost, and leaving the block raises :class:`LockLostError` instead of ``CancelledError`` (the
        pattern of ``asyncio.timeout``).
        """
        return AsyncHeldLock(
            self, device_list(devices), lock_type_of(lock_type), timeout, reason, plan_uid,
            on_behalf_of, on_lost, renew_every, call_timeout, cancel_on_loss,
        )


class AsyncHeldLock:
    """A lock held by :meth:`AsyncClient.lock`; attributes as in :class:`HeldLock`."""

    def __init__(
        self,
        client: AsyncClient,
        devices: list[str],
        lock_type: LockType,
        lease: float,
        reason: str,
        plan_uid: str,
        on_behalf_of: str | None,
        on_lost: Callable[[LockLostError], None] | None,
        renew_every: float | None,
        call_timeout: float | None,
        cancel_on_loss: bool,
    ) -> None:
        _seconds("timeout", lease)
        self._client = client
        self._args = (devices, lock_type, lease, reason, plan_uid, on_behalf_of)
        self._lease = float(lease)
        self._interval = _renew_interval(self._lease, renew_every)
        self._on_lost = on_lost
        self._call_timeout = call_timeout
        self._cancel_on_loss = cancel_on_loss
        self._task: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._cancelled_by_us = False
        self.grant: Grant | None = None
        self.expires = 0.0
        self.renewals = 0
        self.lost: LockLostError | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices held (as granted)."""
        return self.grant.devices if self.grant else ()

    def check(self) -> None:
        """Raise :class:`LockLostError` if the lock was lost; otherwise return."""
        if self.lost is not None:
            raise self.lost

    async def __aenter__(self) -> AsyncHeldLock:
        devices, lock_type, lease, reason, plan_uid, on_behalf_of = self._args
        self.grant = await self._client.acquire(
            devices, lock_type, lease, reason, plan_uid, on_behalf_of,
            call_timeout=self._call_timeout,
        )
        self.expires = self.grant.expires
        self._owner = asyncio.current_task()
        self._task = asyncio.create_task(self._renew_loop())
        return self

    def _lose(self, err: LockLostError) -> None:
        self.lost = err
        if self._on_lost is not None:
            try:
                self._on_lost(err)
            except Exception:
                _log.exception("on_lost callback failed")
        if self._cancel_on_loss and self._owner is not None and not self._owner.done():
            self._cancelled_by_us = True
            self._owner.cancel()

    async def _renew_loop(self) -> None:
        assert self.grant is not None
        pv = self._client.pv(COORD_RENEW)
        wait = self._interval
        while True:
            await asyncio.sleep(wait)
            try:
                reply = await self._client.renew(
                    key=self.grant.key, timeout=self._lease, call_timeout=self._call_timeout
                )
            except RefusedError as e:
                self._lose(_lost_error(e))
                return
            except NoAnswerError as e:
                if time.time() >= self.expires:
                    self._lose(LockLostError(pv, error_text(
                        ErrorCode.EXPIRED, f"lease ran out while renewing failed: {e}")))
                    return
                wait = max(MIN_RENEW_INTERVAL, min(self._interval, self.expires - time.time()) / 2)
                continue
            self.renewals += 1
            self.expires = reply.expires or (time.time() + self._lease)
            wait = self._interval

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lost is None and self.grant is not None:
            try:
                await self._client.release(key=self.grant.key, call_timeout=self._call_timeout)
            except RefusedError as e:
                self.lost = _lost_error(e)
            except NoAnswerError:
                if exc_type is None:
                    raise
                _log.warning("could not release %s after an error", ",".join(self.devices))
                return False
        if self._cancelled_by_us and exc_type is asyncio.CancelledError and self._owner:
            self._owner.uncancel()
            assert self.lost is not None
            raise self.lost from exc
        if self.lost is not None and exc_type is None:
            raise self.lost
        return False



# --- plain PV access (for the CLI's `pvcoord put`/`get`: p4p 4.3.0's own `cli put` is broken) ---


def put_pv(
    pv: str, value: str, timeout: float = DEFAULT_CALL_TIMEOUT,
    conf: Mapping[str, str] | None = None,
) -> None:
    """Put ``value`` (text, converted by the server's type) to ``pv`` and wait for completion.

    Raises:
        RefusedError: the server (or a gateway in between) refused it; ``message`` is its text,
            e.g. ``Put permission denied by gateway``.
        NoAnswerError: no answer within ``timeout`` seconds.
    """
    with ThreadContext("pva", **_context_conf(conf)) as ctxt, p4p_errors(pv, timeout):
        ctxt.put(pv, value, timeout=timeout, wait=True, get=False)


def get_pv(
    pv: str, timeout: float = DEFAULT_CALL_TIMEOUT, conf: Mapping[str, str] | None = None
) -> Any:
    """The current value of ``pv`` (unwrapped by p4p: a number, text, enum label or table).

    Raises:
        NoAnswerError: no answer within ``timeout`` seconds.
    """
    with ThreadContext("pva", **_context_conf(conf)) as ctxt, p4p_errors(pv, timeout):
        return ctxt.get(pv, timeout=timeout)


def call_rpc(
    pv: str, args: Mapping[str, str], timeout: float = DEFAULT_CALL_TIMEOUT,
    conf: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Call RPC ``pv`` with string arguments, exactly as EPICS ``pvcall`` sends them.

    (``python -m p4p.client.cli rpc`` JSON-decodes values that start with ``[`` or ``{`` and then
    cannot send them; this never decodes.) Returns the reply's fields as a dict.

    Raises:
        RefusedError: the server's error text.
        NoAnswerError: no answer within ``timeout`` seconds.
    """
    with ThreadContext("pva", nt=False, **_context_conf(conf)) as ctxt, p4p_errors(pv, timeout):
        v = ctxt.rpc(pv, nturi(pv, dict(args)), timeout=timeout)
    return v.todict() if isinstance(v, Value) else {"value": v}
