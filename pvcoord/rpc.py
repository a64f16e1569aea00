"""Calls to the coordination IOC over PVAccess (asyncio): the client part that services share.

The user's client library (:mod:`pvcoord.client`: the blocking :class:`pvcoord.client.Client`,
the lock context managers, the CLI) builds on this module, and so do the services that call the
coordination IOC for their users (the queue IOC's automatic locks, the bridges' Take/Release):
no IOC or bridge imports the client library itself (an import-linter contract).

What is here: the errors (one mapping of p4p errors, :func:`p4p_errors`; refusals carry the
:class:`pvdb.lockmodel.ErrorCode` and holder of the server's text), the reply models, the
pvcall-style argument builders and reply parsers (pure, testable without a network), and
:class:`AsyncCaller`, the asyncio caller of every coordination RPC and state PV. Every mutating
call (acquire, release, renew, force-release) carries a fresh random ``requestId``
(:func:`with_request_id`), so a PVA re-send of it is answered, never applied twice.

PV names come from :mod:`pvdb.names` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

from p4p import Value
from p4p.client.asyncio import Context as AsyncContext
from p4p.client.thread import Disconnected, RemoteError
from p4p.nt import NTURI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pvdb.devicemap import DeviceMap
from pvdb.lockmodel import ErrorCode, new_request_id, parse_error_text, request_id_problem
from pvdb.models import DeviceSignal, EventAction, LockEvent, LockType
from pvdb.names import (
    ACQUIRE_ARGS,
    COORD_ACQUIRE,
    COORD_DEVICES,
    COORD_EVENTS,
    COORD_FORCE_RELEASE,
    COORD_HEARTBEAT,
    COORD_LOCK_CHANGES,
    COORD_LOCKS,
    COORD_RELEASE,
    COORD_RENEW,
    FORCE_RELEASE_ARGS,
    REGISTRY_DEVICE_PVS,
    REGISTRY_DEVICE_SIGNALS,
    REGISTRY_DEVICES,
    RELEASE_ARGS,
    RENEW_ARGS,
    REQUEST_ID_ARG,
    PVSpec,
    check_prefix,
)

_log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT = 5.0
"""Seconds one client call waits for the IOC (several loopback round trips are ~1 ms each)."""

# --- errors -----------------------------------------------------------------------------------


class CoordError(Exception):
    """Base of every error this client raises; ``str(e)`` is a sentence for an operator."""


class BadRequestError(CoordError, ValueError):
    """The request was rejected by the client before anything was sent.

    ``code`` is ``bad-argument``, as the server would say.
    """

    code: ErrorCode = ErrorCode.BAD_ARGUMENT
    holder: str = ""


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


def seconds_arg(name: str, value: float | str) -> str:
    """``value`` as the text of a positive, finite number of seconds.

    Raises:
        BadRequestError: naming ``name`` when it is not one.
    """
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
        args["timeout"] = seconds_arg("timeout", timeout)
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
        args["timeout"] = seconds_arg("timeout", timeout)
    return args


def force_release_args(devices: str | Iterable[str], reason: str = "") -> dict[str, str]:
    """String arguments of ``Coord:ForceRelease``."""
    args = {"device": ",".join(device_list(devices)), "reason": reason}
    assert set(args) <= set(FORCE_RELEASE_ARGS), args
    return args


def with_request_id(args: Mapping[str, str], request_id: str | None = None) -> dict[str, str]:
    """``args`` plus ``requestId``: ``request_id``, or a new random one (one per call).

    The IOC answers a request whose id it knows (a PVA client's re-send of an RPC whose reply was
    lost, or the caller's own retry with the same id) with the first answer, applying nothing.

    Raises:
        BadRequestError: a given ``request_id`` of the wrong form (nothing sent).
    """
    if request_id is None:
        request_id = new_request_id()
    if not isinstance(request_id, str):
        raise BadRequestError(f"requestId must be a string, not {type(request_id).__name__}")
    problem = request_id_problem(request_id)
    if problem is not None:
        raise BadRequestError(problem)
    return {**args, REQUEST_ID_ARG: request_id}


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
    """NTTable ``value`` (a p4p Value, or ``{"value": {column: list}}``) -> one dict per row.

    A column that was never set (p4p gives None, or an empty array while other columns have
    rows: ``NTTable.wrap`` leaves empty columns unset) is left out of the rows, so a parser's
    ``row.get(column, default)`` applies and ``row[column]`` names it as missing.

    Raises:
        CoordError: not a table, or non-empty columns of different lengths (named with their
            lengths: a row is never dropped or made up).
    """
    f = _fields(value)
    cols = f.get("value", f)
    if not isinstance(cols, Mapping):
        raise CoordError(f"unexpected table {value!r}")
    columns = {n: [_py(x) for x in c] for n, c in cols.items() if c is not None and len(c)}
    lengths = {n: len(c) for n, c in columns.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{n} {k}" for n, k in lengths.items())
        raise CoordError(f"a table whose columns have different lengths ({shown} rows)")
    n = next(iter(lengths.values()), 0)
    return [{name: col[i] for name, col in columns.items()} for i in range(n)]


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
    """Rows of ``Coord:Events`` as :class:`pvdb.models.LockEvent`, oldest first.

    A row whose action this client does not know (a newer IOC's) is skipped, not an error.
    """
    out = []
    known = {a.value for a in EventAction}
    for r in table_rows(value):
        if r.get("action") not in known and isinstance(r.get("action"), str):
            continue
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


def parse_device_map(device_pvs: Any, devices: Any) -> DeviceMap:
    """The one PV -> device map (:class:`pvdb.devicemap.DeviceMap`) from the registry's tables.

    Args:
        device_pvs: a ``Registry:DevicePVs`` value (columns ``pv``, ``device``).
        devices: a ``Registry:Devices`` value (its ``pvPrefix`` column).

    Raises:
        CoordError: a table of another shape.
        pvdb.devicemap.DeviceMapError: one PV or prefix claimed by two devices.
    """
    try:
        pvs = [(str(r["pv"]), str(r["device"])) for r in table_rows(device_pvs)]
        prefixes = [(d.name, d.pv_prefix) for d in parse_registry(devices)]
    except (KeyError, ValidationError) as e:
        raise CoordError(f"a registry table of another shape (no column {e})") from None
    return DeviceMap(pvs, prefixes)


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
        except (KeyError, ValidationError, ValueError) as e:
            raise CoordError(f"malformed Registry signals row {r!r}: {e}") from None
    return out


def table_includes(table_pv: str, table: Any, change: Any, deadline: float, timeout: float
                   ) -> bool:
    """Whether a ``Coord:Locks`` value includes the change of a ``Coord:LockChanges`` value.

    True also when the table comes from another IOC run (its ``epoch`` differs: newer). The
    check of :meth:`AsyncCaller.current_locks` and :func:`current_locks`.

    Raises:
        NoAnswerError: it does not, and the monotonic ``deadline`` has passed (``timeout``: the
            call timeout, for the message).
        CoordError: a value lacks ``seq`` or ``epoch`` (not a coordination IOC of this version).
    """
    try:
        if table["epoch"] != change["epoch"] or table["seq"] >= change["seq"]:
            return True
    except KeyError as e:
        raise CoordError(f"{table_pv} has no {e.args[0]} field: not a pvcoord coordination IOC "
                         "of this version") from None
    if time.monotonic() >= deadline:
        raise NoAnswerError(table_pv, timeout, f"it shows lock change {table['seq']}, "
                            f"Coord:LockChanges showed {change['seq']}")
    return False


def current_locks(ctxt: Any, prefix: str, timeout: float) -> Value:
    """:meth:`AsyncCaller.current_locks` with a p4p thread ``Context`` (``nt=False`` or not).

    Raises:
        NoAnswerError: the table did not catch up within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    table_pv = COORD_LOCKS.name(prefix)
    table = ctxt.get(table_pv, timeout=timeout)
    change = ctxt.get(COORD_LOCK_CHANGES.name(prefix),
                      timeout=max(0.05, deadline - time.monotonic()))
    while not table_includes(table_pv, table, change, deadline, timeout):
        time.sleep(0.005)
        table = ctxt.get(table_pv, timeout=max(0.05, deadline - time.monotonic()))
    return table


def scalar(value: Any) -> Any:
    """The ``value`` field of an NTScalar/NTScalarArray (a p4p Value or an unwrapped one)."""
    if isinstance(value, Value):
        v = value["value"]
        return list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v
    return value


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


class CallerBase:
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


def context_conf(conf: Mapping[str, str] | None) -> dict[str, Any]:
    """p4p ``Context`` keywords: the EPICS_PVA_* entries of ``conf``, or the environment."""
    if conf is None:
        return {"useenv": True}
    return {"conf": {k: v for k, v in conf.items() if k.startswith("EPICS_PVA")}, "useenv": False}


class AsyncCaller(CallerBase):
    """The asyncio caller of one endstation's coordination (and registry) IOC.

    Arguments as :class:`pvcoord.client.Client`; the methods are coroutines with the same
    arguments, returns and errors as the client's. Create it inside a running event loop; use
    ``with AsyncCaller(...)`` or call :meth:`close`.
    """

    def __init__(
        self,
        prefix: str,
        conf: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        registry_prefix: str | None = None,
    ) -> None:
        super().__init__(prefix, timeout, registry_prefix)
        self._ctxt = AsyncContext("pva", nt=False, **context_conf(conf))

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
        request_id: str | None = None,
    ) -> Grant:
        """See :meth:`pvcoord.client.Client.acquire`."""
        args = with_request_id(acquire_args(
            devices, lock_type, timeout, reason, plan_uid, on_behalf_of, client_host
        ), request_id)
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
        request_id: str | None = None,
    ) -> Reply:
        """See :meth:`pvcoord.client.Client.release`."""
        args = with_request_id(release_args(devices, key, on_behalf_of, client_host), request_id)
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
        request_id: str | None = None,
    ) -> Reply:
        """See :meth:`pvcoord.client.Client.renew`."""
        args = with_request_id(renew_args(devices, key, timeout, on_behalf_of, client_host),
                               request_id)
        return parse_reply(await self._rpc(COORD_RENEW, args, call_timeout))

    async def force_release(
        self, devices: str | Iterable[str], reason: str = "", *, call_timeout: float | None = None,
        request_id: str | None = None,
    ) -> Reply:
        """See :meth:`pvcoord.client.Client.force_release`."""
        args = with_request_id(force_release_args(devices, reason), request_id)
        return parse_reply(await self._rpc(COORD_FORCE_RELEASE, args, call_timeout))

    async def locks(self, *, call_timeout: float | None = None) -> list[LockInfo]:
        """See :meth:`pvcoord.client.Client.locks`."""
        return parse_locks(await self.current_locks(call_timeout))

    async def current_locks(self, call_timeout: float | None = None) -> Value:
        """``Coord:Locks`` with every change replied before this call (raw p4p ``Value``).

        The table is posted coalesced (up to 50 ms after a change); ``Coord:LockChanges`` is
        posted before each reply. So: read the table and the newest change's ``seq``, and the
        table again until it includes that change (or comes from a newer IOC run), every 5 ms.

        Raises:
            NoAnswerError: no answer, or the table did not catch up, within the call timeout.
        """
        t = self.call_timeout(call_timeout)
        deadline = time.monotonic() + t
        change_pv, table_pv = self.pv(COORD_LOCK_CHANGES), self.pv(COORD_LOCKS)
        table = await self.get(table_pv, t)
        change = await self.get(change_pv, max(0.05, deadline - time.monotonic()))
        while not table_includes(table_pv, table, change, deadline, t):
            await asyncio.sleep(0.005)
            table = await self.get(table_pv, max(0.05, deadline - time.monotonic()))
        return table

    async def events(self, *, call_timeout: float | None = None) -> list[LockEvent]:
        """See :meth:`pvcoord.client.Client.events`."""
        return parse_events(await self.get(self.pv(COORD_EVENTS), call_timeout))

    async def devices(self, *, call_timeout: float | None = None) -> list[str]:
        """See :meth:`pvcoord.client.Client.devices`."""
        return [str(d) for d in scalar(await self.get(self.pv(COORD_DEVICES), call_timeout))]

    async def heartbeat(self, *, call_timeout: float | None = None) -> int:
        """See :meth:`pvcoord.client.Client.heartbeat`."""
        return int(scalar(await self.get(self.pv(COORD_HEARTBEAT), call_timeout)))

    async def registry_devices(
        self, *, call_timeout: float | None = None
    ) -> list[RegistryDevice]:
        """See :meth:`pvcoord.client.Client.registry_devices`."""
        return parse_registry(await self.get(self.pv(REGISTRY_DEVICES), call_timeout))

    async def device_map(self, *, call_timeout: float | None = None) -> DeviceMap:
        """The registry's PV -> device map now (two GETs; see :func:`parse_device_map`).

        Raises:
            NoAnswerError: the registry IOC did not answer.
            CoordError: a table of another shape.
            pvdb.devicemap.DeviceMapError: the registry gives a PV or prefix to two devices.
        """
        pvs, devices = await asyncio.gather(
            self.get(self.pv(REGISTRY_DEVICE_PVS), call_timeout),
            self.get(self.pv(REGISTRY_DEVICES), call_timeout))
        return parse_device_map(pvs, devices)

    async def registry_signals(
        self, device: str, *, call_timeout: float | None = None
    ) -> list[DeviceSignal]:
        """See :meth:`pvcoord.client.Client.registry_signals`."""
        return parse_signals(
            await self.get(self.pv(REGISTRY_DEVICE_SIGNALS, device), call_timeout))
