"""The IOCs' shared p4p boundary: time stamps, NTTable values, the RPC skeleton, process main.

These are the IOCs' one p4p boundary (the untyped p4p API stays behind it); the domain logic of
every IOC is pure Python in its own package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from p4p import Value
from p4p.nt import NTScalar, NTTable
from p4p.server.raw import Handler
from p4p.server.thread import SharedPV

from pvdb.lockmodel import ErrorCode, error_text
from pvdb.process import PROCESSES, pvcoord_version
from pvdb.redact import install_log_redaction, redact

log = logging.getLogger(__name__)


def stamp(v: Value, ts: float) -> Value:
    """Set ``v``'s ``timeStamp`` to ``ts`` (epoch seconds); return ``v``."""
    sec = int(ts)
    v["timeStamp.secondsPastEpoch"] = sec
    v["timeStamp.nanoseconds"] = int((ts - sec) * 1e9)
    return v


def stamped(typ: Any, fields: dict[str, Any], ts: float) -> Value:
    """A Value of ``typ`` with ``fields`` and ``timeStamp`` ``ts`` (epoch s), built in one call.

    About half the cost of an NT ``wrap`` (which assigns field by field); post it to a SharedPV
    made with ``wrap=prebuilt``. Only the given fields are marked: a post leaves the others
    (``display.units``, ``value.choices``) as they are.
    """
    sec = int(ts)
    return Value(typ, {**fields, "timeStamp": {"secondsPastEpoch": sec,
                                               "nanoseconds": int((ts - sec) * 1e9)}})


class ReadOnly(Handler):
    """Handler of a PV that clients only read: a put or an RPC gets a coded error.

    (Without a handler p4p answers "Put not supported" / "RPC not supported", without the
    machine-readable code every pvcoord error carries.)
    """

    @staticmethod
    def _name(op: Any) -> str:
        try:
            return str(op.name())
        except Exception:  # a wrapped operation without its name
            return "this PV"

    def put(self, pv: Any, op: Any) -> None:  # noqa: D102 - p4p callback
        op.done(error=error_text(ErrorCode.BAD_ARGUMENT, f"{self._name(op)} is read-only: it "
                                 "shows the IOC's state; change that through the IOC's RPCs"))

    def rpc(self, pv: Any, op: Any) -> None:  # noqa: D102 - p4p callback
        op.done(error=error_text(ErrorCode.BAD_ARGUMENT,
                                 f"{self._name(op)} is not an RPC: read it with get or monitor"))


READ_ONLY = ReadOnly()
"""The one :class:`ReadOnly` handler (it keeps no state): pass it as ``handler=`` to a thread or
asyncio ``SharedPV``."""


def read_only_pv(**kws: Any) -> SharedPV:
    """A p4p thread ``SharedPV`` whose puts and RPCs are refused with a code (:class:`ReadOnly`).

    ``kws``: ``nt=``, ``wrap=``, ``initial=`` as for ``SharedPV``.
    """
    return SharedPV(handler=READ_ONLY, **kws)


def prebuilt(value: Value, **_kws: Any) -> Value:
    """SharedPV ``wrap=`` for PVs posted only prebuilt Values (:func:`stamped`): no conversion."""
    return value


def table_value(
    nt: NTTable, columns: tuple[tuple[str, str], ...], rows: Iterable[tuple], ts: float
) -> Value:
    """An NTTable Value with every column set (also when empty) and a time stamp.

    (``NTTable.wrap`` drops empty columns, so posting an empty table would leave the old rows,
    and it skips the time stamp for a prebuilt Value.)
    """
    rows = list(rows)
    cols = {name: [r[i] for r in rows] for i, (name, _) in enumerate(columns)}
    return stamp(nt.type({"labels": [c for c, _ in columns], "value": cols}), ts)


def claimed_account(op: Any) -> str:
    """The PVA account a client claimed (``""`` for none), as the server decoded it.

    A name whose bytes are not UTF-8 makes p4p's ``op.account()`` raise; it comes back as
    ``"\ufffd"``, which no account pattern accepts, so the request is refused as malformed
    (``bad-argument``) instead of failing inside the handler.
    """
    try:
        return op.account() or ""
    except UnicodeDecodeError:
        return "\ufffd"


_URI_FIELDS = frozenset(("scheme", "authority", "path"))
"""NTURI fields that are not arguments (skipped in a request without ``query``)."""


def request_args(value: Value, error: type[Exception], example: str) -> dict[str, str]:
    """The arguments of an RPC request as strings.

    Accepts an NTURI (``pvcall``, ``p4p.client.cli rpc``: arguments under ``query``) or a plain
    structure of scalar fields (pvapy, other clients).

    Args:
        value: the request.
        error: exception class raised for a malformed request (the IOC's own error type).
        example: a correct call, shown in the error message.

    Raises:
        error: the request is not a structure of scalar arguments.
    """
    try:
        if "query" in value.keys():
            fields = value["query"].todict()  # one conversion of the whole structure
        else:
            fields = {k: v for k, v in value.todict().items() if k not in _URI_FIELDS}
        out: dict[str, str] = {}
        for k, v in fields.items():
            if not isinstance(v, bool | int | float | str):
                raise error(f"malformed request: argument {k!r} is not a scalar")
            out[k] = v if type(v) is str else str(v)
        return out
    except error:
        raise
    except Exception as e:  # any other shape is a malformed request
        raise error(
            f"malformed request ({type(e).__name__}): send an NTURI with string arguments, "
            f"e.g. {example}"
        ) from None


def refusal_head(err: Exception) -> tuple[ErrorCode, str]:
    """``(code, holder)`` of a refusal, read from the exception if it has them.

    ``err.code`` (a :class:`pvdb.lockmodel.ErrorCode`, default ``bad-argument``) and
    ``err.holder`` (default '').
    """
    code = getattr(err, "code", None)
    holder = getattr(err, "holder", "") or ""
    return (code if isinstance(code, ErrorCode) else ErrorCode.BAD_ARGUMENT), str(holder)


def refusal_text(err: Exception) -> str:
    """The RPC error text of a refusal: ``[code holder=...] message`` (:func:`refusal_head`)."""
    code, holder = refusal_head(err)
    return error_text(code, redact(str(err)), holder)


RefusalHook = Callable[[Any, dict[str, str], Exception], None]
"""``hook(op, args, error)``: called after a refusal was sent (e.g. to audit it)."""


class RPC(Handler):
    """The one RPC handler skeleton of pvcoord's IOCs: parse, call, always finish the operation.

    ``call(op, args)`` gets the ``ServerOperation`` and the string arguments and returns the reply
    ``Value``. An exception of one of ``errors`` becomes an RPC error with its code
    (:func:`refusal_text`); any other is an ``[internal]`` error (logged); a put is refused.

    Args:
        name: the PV suffix, for messages (``Coord:Acquire``).
        call: the operation.
        errors: the refusals ``call`` raises; the first is also raised for a malformed request.
        example: a correct call, shown when the request is malformed.
        on_refused: called after a refusal was sent.
    """

    def __init__(
        self,
        name: str,
        call: Callable[[Any, dict[str, str]], Any],
        errors: tuple[type[Exception], ...],
        example: str,
        on_refused: RefusalHook | None = None,
    ) -> None:
        self.name, self.call, self.errors = name, call, errors
        self.example, self.on_refused = example, on_refused

    def rpc(self, pv: Any, op: Any) -> None:  # noqa: D102 - p4p callback
        args: dict[str, str] = {}
        try:
            args = request_args(op.value(), self.errors[0], self.example)
            op.done(self.call(op, args))
        except self.errors as e:
            self.refuse(op, args, e)
        except Exception as e:  # never leave an RPC unanswered
            self.internal(op, e)

    def refuse(self, op: Any, args: dict[str, str], err: Exception) -> None:
        """Finish ``op`` with the refusal ``err`` and call ``on_refused``."""
        op.done(error=refusal_text(err))
        if self.on_refused is not None:
            try:
                self.on_refused(op, args, err)
            except Exception:  # the reply is sent; a hook failure is only logged
                log.exception("%s: refusal hook failed", self.name)

    def internal(self, op: Any, err: Exception) -> None:
        """Finish ``op`` with an ``[internal]`` error for an unexpected exception (logged)."""
        log.exception("%s failed", self.name)
        op.done(error=error_text(ErrorCode.INTERNAL, redact(
            f"internal error in {self.name}: {type(err).__name__}: {err}")))

    def put(self, pv: Any, op: Any) -> None:  # noqa: D102 - p4p callback
        op.done(error=error_text(
            ErrorCode.BAD_ARGUMENT, f"{self.name} is an RPC: use pvcall / p4p rpc, not put"))


class AsyncRPC(RPC):
    """:class:`RPC` for an ``asyncio`` SharedPV: ``call`` is a coroutine function.

    Cancelled at shutdown, the caller still gets an answer (``[shutting-down]``).
    """

    def __init__(
        self,
        name: str,
        call: Callable[[Any, dict[str, str]], Awaitable[Any]],
        errors: tuple[type[Exception], ...],
        example: str,
        on_refused: RefusalHook | None = None,
    ) -> None:
        super().__init__(name, call, errors, example, on_refused)
        self.acall = call

    async def rpc(self, pv: Any, op: Any) -> None:  # noqa: D102 - p4p callback  # pyright: ignore[reportIncompatibleMethodOverride]
        args: dict[str, str] = {}
        try:
            args = request_args(op.value(), self.errors[0], self.example)
            op.done(await self.acall(op, args))
        except self.errors as e:
            self.refuse(op, args, e)
        except Exception as e:  # never leave an RPC unanswered
            self.internal(op, e)
        except BaseException:
            op.done(error=error_text(
                ErrorCode.SHUTTING_DOWN, f"{self.name} not done: the IOC is shutting down"))
            raise


def setup_logging(level: str) -> None:
    """Log to stderr with time stamps at ``level`` (DEBUG, INFO, WARNING, ERROR).

    Every line passes :func:`pvdb.redact.redact` (no password in a log line).
    """
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()


STARTED = time.time()
"""When this process imported pvutil (its start, within the import time)."""


def add_process_info(
    provider: Any, prefix: str, process: str, started: float = STARTED
) -> None:
    """Serve ``Version`` and ``StartTime`` of ``process`` (:data:`pvdb.process.PROCESSES`).

    Args:
        provider: the IOC's ``StaticProvider``.
        prefix: endstation prefix.
        process: ``coordination``, ``registry`` or ``queue``.
        started: epoch seconds the process started (default :data:`STARTED`).
    """
    info = PROCESSES[process]
    assert info.version is not None and info.start_time is not None
    now = time.time()
    nt_s, nt_d = NTScalar("s"), NTScalar("d", display=True)
    start = nt_d.wrap(started, timestamp=now)
    start["display.units"] = info.start_time.units
    provider.add(info.version.name(prefix),
                 read_only_pv(nt=nt_s, initial=nt_s.wrap(pvcoord_version(), timestamp=now)))
    provider.add(info.start_time.name(prefix), read_only_pv(nt=nt_d, initial=start))
