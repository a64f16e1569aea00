"""Client of the coordination IOC: acquire, renew and release device locks over PVAccess.

Two flavours with the same methods: :class:`AsyncClient` (``async``, ``p4p.client.asyncio``) and
:class:`Client`, its blocking face (each call runs on the client's own event loop thread)::

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

The errors, reply models, argument builders, parsers and the asyncio caller are in
:mod:`pvcoord.rpc` (shared with the services that call the coordination IOC) and are
re-exported here. PV names come from :mod:`pvdb.names` only. The untyped p4p API stays behind
these two modules: callers get
pydantic models (:class:`Grant`, :class:`Reply`, :class:`LockInfo`, :class:`pvdb.models.LockEvent`,
:class:`RegistryDevice`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Self, TypeVar

from p4p import Value
from p4p.client.thread import Context as ThreadContext

from pvdb.lockmodel import ErrorCode, error_text
from pvdb.models import DeviceSignal, LockEvent, LockType
from pvdb.names import (
    COORD_ACQUIRE,
    COORD_FORCE_RELEASE,
    COORD_RELEASE,
    COORD_RENEW,
    PVSpec,
)

from .rpc import (
    DEFAULT_CALL_TIMEOUT,
    AsyncCaller,
    BadRequestError,
    CallerBase,
    CoordError,
    Grant,
    LockInfo,
    LockLostError,
    NoAnswerError,
    RefusedError,
    RegistryDevice,
    Reply,
    acquire_args,
    context_conf,
    device_list,
    force_release_args,
    lock_type_of,
    nturi,
    p4p_errors,
    parse_events,
    parse_grant,
    parse_locks,
    parse_registry,
    parse_reply,
    release_args,
    renew_args,
    scalar,
    seconds_arg,
    table_rows,
)

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "AsyncCaller",
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
    "RefusedError",
    "RegistryDevice",
    "Reply",
    "acquire_args",
    "call_rpc",
    "device_list",
    "force_release_args",
    "get_pv",
    "lock_type_of",
    "nturi",
    "p4p_errors",
    "parse_events",
    "parse_grant",
    "parse_locks",
    "parse_registry",
    "parse_reply",
    "put_pv",
    "release_args",
    "renew_args",
    "scalar",
    "table_rows",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_MARGIN = 5.0
"""Seconds a blocking call waits for its result beyond the call timeout (which the asyncio call
enforces itself) before it gives up on the loop."""

RENEW_FRACTION = 1.0 / 3.0
"""A held lock is renewed every ``lease * RENEW_FRACTION`` seconds, so two renewals can fail
(IOC restarting, network hiccup) before the lease runs out."""

MIN_RENEW_INTERVAL = 0.2
"""Shortest renew period in seconds (bounds the load a very short lease puts on the IOC)."""




def _lost_error(err: RefusedError) -> LockLostError:
    return LockLostError(err.pv, err.text)




# --- blocking client --------------------------------------------------------------------------


class Client:
    """Blocking client of one endstation's coordination (and registry) IOC.

    A thin layer over :class:`pvcoord.rpc.AsyncCaller`: every call runs on the client's own event
    loop thread and waits for its result, so both flavours share one implementation (arguments,
    replies, errors, renewals).

    Args:
        prefix: endstation prefix with its trailing colon (``"BL01:"``).
        conf: EPICS_PVA_* settings (e.g. ``pvcoord.procs.client_conf(env)``); ``None`` reads the
            process environment.
        timeout: default seconds each call waits for an answer.
        registry_prefix: prefix of the registry IOC, if it differs from ``prefix``.

    Raises:
        ValueError: for a prefix that does not end in ``:``.
        BadRequestError: for a timeout that is not a positive number.
    """

    def __init__(
        self,
        prefix: str,
        conf: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        registry_prefix: str | None = None,
    ) -> None:
        CallerBase(prefix, timeout, registry_prefix)  # validate before starting anything
        self._conf = conf
        self._monitor_ctxt: ThreadContext | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pvcoord-client",
                                        daemon=True)
        self._thread.start()

        async def make() -> AsyncCaller:
            return AsyncCaller(prefix, conf, timeout, registry_prefix)

        try:
            self._caller: AsyncCaller = self._wait(make(), timeout)
        except BaseException:
            self._stop_loop()
            raise
        self._closed = False

    # the loop thread

    def _wait(self, coro: Coroutine[Any, Any, T], seconds: float, pv: str = "") -> T:
        """Run ``coro`` on the client's loop; wait for it (the call enforces its own timeout)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a pvcoord Client cannot be called from its own callbacks "
                               "(on_lost): hand the work to another thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=seconds + LOOP_MARGIN)
        except concurrent.futures.TimeoutError:
            if fut.done():  # the call's own NoAnswerError (a TimeoutError)
                raise
            fut.cancel()
            raise NoAnswerError(pv or self.prefix, seconds, "no result from the client loop") \
                from None

    def call_on_loop(
        self, coro: Coroutine[Any, Any, T], call_timeout: float | None, pv: str = ""
    ) -> T:
        """Run ``coro`` (a call of :class:`pvcoord.rpc.AsyncCaller`) on the client's loop.

        Returns its result; its errors are raised here.

        Raises:
            NoAnswerError: no result within the call timeout (plus a margin).
            RuntimeError: called from the loop thread itself (an ``on_lost`` callback).
        """
        return self._wait(coro, self.call_timeout(call_timeout), pv)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    # the caller's state

    @property
    def prefix(self) -> str:
        """The endstation prefix."""
        return self._caller.prefix

    @property
    def registry_prefix(self) -> str:
        """The registry IOC's prefix."""
        return self._caller.registry_prefix

    @property
    def timeout(self) -> float:
        """Default seconds a call waits."""
        return self._caller.timeout

    def pv(self, spec: PVSpec, device: str | None = None) -> str:
        """Full name of ``spec`` (from :mod:`pvdb.names`) under this client's prefix."""
        return self._caller.pv(spec, device)

    def call_timeout(self, call_timeout: float | None = None) -> float:
        """Seconds a call waits: ``call_timeout`` if given, else the client's ``timeout``."""
        return self._caller.call_timeout(call_timeout)

    def close(self) -> None:
        """Close the PVA contexts and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._monitor_ctxt is not None:
            self._monitor_ctxt.close()

        async def close_caller() -> None:
            self._caller.close()

        try:
            self._wait(close_caller(), 5.0)
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # raw operations

    def get(self, pv: str, call_timeout: float | None = None) -> Value:
        """GET any PV as a raw p4p ``Value`` (a :class:`NoAnswerError` after the call timeout)."""
        return self.call_on_loop(self._caller.get(pv, call_timeout), call_timeout, pv)

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
        request_id: str | None = None,
    ) -> Grant:
        """Acquire ``devices`` (all or none) with ``lock_type`` for a lease of ``timeout`` s.

        ``on_behalf_of`` names the user a trusted service acts for (policy
        ``access.trusted_services``); ``client_host`` that user's host.

        ``request_id`` (every mutating call has it): default a new random one per call. A call
        repeated with the same id (say after a :class:`NoAnswerError`, within 600 s) is answered
        with the first answer, the same key included, and applies nothing
        (:func:`pvcoord.rpc.with_request_id`); a PVA client's own re-send of a call whose reply
        was lost is such a repeat.

        Raises:
            RefusedError: held by someone of equal or higher priority (``code``
                ``holder-conflict``, ``holder`` names it), unknown device, type not allowed for
                this account, ...
            NoAnswerError: no answer within ``call_timeout`` (default: the client's timeout).
            BadRequestError: bad arguments, nothing sent.
        """
        return self.call_on_loop(self._caller.acquire(
            devices, lock_type, timeout, reason, plan_uid, on_behalf_of, client_host,
            call_timeout=call_timeout,
            request_id=request_id), call_timeout, self.pv(COORD_ACQUIRE))

    def release(
        self,
        devices: str | Iterable[str] | None = None,
        key: str | None = None,
        on_behalf_of: str | None = None,
        client_host: str | None = None,
        *,
        call_timeout: float | None = None,
        request_id: str | None = None,
    ) -> Reply:
        """Release by ``key``, or the caller's own locks on ``devices``.

        ``request_id``: as for :meth:`acquire`.

        Raises:
            RefusedError: wrong key, not the holder, or the lock was preempted/expired meanwhile.
            NoAnswerError: no answer within the call timeout.
        """
        return self.call_on_loop(self._caller.release(
            devices, key, on_behalf_of, client_host, call_timeout=call_timeout,
            request_id=request_id),
            call_timeout, self.pv(COORD_RELEASE))

    def renew(
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
        """Extend the lease to ``timeout`` s from now (``Reply.expires`` is the new end).

        ``request_id``: as for :meth:`acquire`.

        Raises:
            RefusedError: not held by the caller any more (preempted, expired: the code says).
            NoAnswerError: no answer within the call timeout.
        """
        return self.call_on_loop(self._caller.renew(
            devices, key, timeout, on_behalf_of, client_host, call_timeout=call_timeout,
            request_id=request_id),
            call_timeout, self.pv(COORD_RENEW))

    def force_release(
        self, devices: str | Iterable[str], reason: str = "", *, call_timeout: float | None = None,
        request_id: str | None = None,
    ) -> Reply:
        """Remove whoever's lock on ``devices`` (policy ``access.force_release`` accounts only).

        ``request_id``: as for :meth:`acquire`.

        Raises:
            RefusedError: the caller may not force-release, or a device is unknown.
        """
        return self.call_on_loop(
            self._caller.force_release(devices, reason, call_timeout=call_timeout,
                                       request_id=request_id),
            call_timeout, self.pv(COORD_FORCE_RELEASE))

    # state

    def locks(self, *, call_timeout: float | None = None) -> list[LockInfo]:
        """The active locks (``Coord:Locks``), sorted by device."""
        return self.call_on_loop(self._caller.locks(call_timeout=call_timeout), call_timeout)

    def events(self, *, call_timeout: float | None = None) -> list[LockEvent]:
        """The audit tail (``Coord:Events``), oldest first."""
        return self.call_on_loop(self._caller.events(call_timeout=call_timeout), call_timeout)

    def devices(self, *, call_timeout: float | None = None) -> list[str]:
        """Device names the coordination IOC accepts (``Coord:Devices``, includes ``beamline``)."""
        return self.call_on_loop(self._caller.devices(call_timeout=call_timeout), call_timeout)

    def heartbeat(self, *, call_timeout: float | None = None) -> int:
        """Current ``Coord:Heartbeat`` counter (+1 per second while the IOC runs)."""
        return self.call_on_loop(self._caller.heartbeat(call_timeout=call_timeout), call_timeout)

    def registry_devices(self, *, call_timeout: float | None = None) -> list[RegistryDevice]:
        """The registered devices (``Registry:Devices``)."""
        return self.call_on_loop(
            self._caller.registry_devices(call_timeout=call_timeout), call_timeout)

    def registry_signals(
        self, device: str, *, call_timeout: float | None = None
    ) -> list[DeviceSignal]:
        """The signals of ``device`` (``Registry:<device>:Signals``), sorted by name.

        Raises:
            NoAnswerError: no such PV answered (also for a device the registry does not have).
        """
        return self.call_on_loop(
            self._caller.registry_signals(device, call_timeout=call_timeout), call_timeout)

    def monitor(
        self, spec: PVSpec, callback: Callable[[Value | Exception], None]
    ) -> Any:
        """Subscribe to ``spec``; ``callback`` gets each update (raw Value) or a disconnect.

        Returns the p4p subscription; call ``.close()`` on it to stop. The callback runs on a
        p4p worker thread and must not block.
        """
        if self._monitor_ctxt is None:
            self._monitor_ctxt = ThreadContext("pva", nt=False, **context_conf(self._conf))
        return self._monitor_ctxt.monitor(self.pv(spec), callback, notify_disconnect=True)

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
        the IOC does not answer, the lock is *lost*: ``on_lost(error)`` is called from the
        client's loop thread (it must not call this client), :meth:`HeldLock.check` raises it, and
        leaving the block raises it (unless the block itself raised). On exit the lock is released
        by its key, also on an exception.

        Raises:
            RefusedError, NoAnswerError, BadRequestError: from the acquire, on entry.
            LockLostError: on exit, if the lock was lost while held.
        """
        held = AsyncHeldLock(
            self._caller, device_list(devices), lock_type_of(lock_type), timeout, reason,
            plan_uid, on_behalf_of, on_lost, renew_every, call_timeout, False,
        )
        return HeldLock(self, held)


def _renew_interval(lease: float, renew_every: float | None) -> float:
    if renew_every is not None:
        return max(MIN_RENEW_INTERVAL, float(renew_every))
    return max(MIN_RENEW_INTERVAL, lease * RENEW_FRACTION)


class HeldLock:
    """A lock held by :meth:`Client.lock` (use it as a context manager).

    The blocking face of an :class:`AsyncHeldLock` whose renewals run on the client's loop.

    Attributes:
        grant: the :class:`Grant` of the acquire (``None`` before entry).
        expires: current lease end in epoch seconds (updated by every renew).
        renewals: number of successful renews so far.
        lost: the :class:`LockLostError` error once the lock is lost, else ``None``.
    """

    def __init__(self, client: Client, held: AsyncHeldLock) -> None:
        self._client = client
        self._held = held

    @property
    def grant(self) -> Grant | None:
        """The acquire's grant (``None`` before entry)."""
        return self._held.grant

    @property
    def expires(self) -> float:
        """Current lease end (epoch s)."""
        return self._held.expires

    @property
    def renewals(self) -> int:
        """Successful renews so far."""
        return self._held.renewals

    @property
    def lost(self) -> LockLostError | None:
        """The error once the lock is lost."""
        return self._held.lost

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices held (as granted)."""
        return self._held.devices

    def check(self) -> None:
        """Raise :class:`LockLostError` if the lock was lost; otherwise return."""
        self._held.check()

    def __enter__(self) -> HeldLock:
        c = self._client
        c.call_on_loop(self._held.__aenter__(), self._held.call_timeout, c.pv(COORD_ACQUIRE))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        c = self._client
        c.call_on_loop(self._held.__aexit__(exc_type, exc, tb), self._held.call_timeout,
                       c.pv(COORD_RELEASE))


# --- asyncio client ---------------------------------------------------------------------------


class AsyncClient(AsyncCaller):
    """The asyncio flavour of :class:`Client`: same arguments, methods are coroutines.

    :class:`pvcoord.rpc.AsyncCaller` plus the lock context manager. Create it inside a running
    event loop; use ``with AsyncClient(...)`` or call :meth:`close`.
    """

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
        client: AsyncCaller,
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
        seconds_arg("timeout", lease)
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
        self.clock: Callable[[], float] = time.time
        """Wall clock (epoch s): only to turn a reply's ``expires`` into the time left."""
        self.monotonic: Callable[[], float] = time.monotonic
        """The clock the lease is timed on here (tests may set fake clocks)."""
        self._deadline = 0.0
        """:attr:`monotonic` time the lease ends, as of the last grant or renew reply."""

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices held (as granted)."""
        return self.grant.devices if self.grant else ()

    @property
    def call_timeout(self) -> float | None:
        """Seconds each of its calls waits (``None``: the client's timeout)."""
        return self._call_timeout

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
        self._lease_from(self.grant.expires)
        self._owner = asyncio.current_task()
        self._task = asyncio.create_task(self._renew_loop())
        return self

    def _lease_from(self, expires: float) -> None:
        """A grant or renew reply saying the lease ends at ``expires`` arrived now.

        ``expires`` is on the IOC's wall clock (0: not said, the full lease); it sets
        :attr:`expires`. The wall clock is read only here, to turn ``expires`` into the seconds
        left (at most the lease asked for); from then on the lease is timed on :attr:`monotonic`,
        so a wall-clock step here neither ends it early (cancelling the owner while the IOC still
        holds the lock) nor stretches it.
        """
        now = self.clock()
        left = min(expires - now, self._lease) if expires else self._lease
        self.expires = expires or now + self._lease
        self._deadline = self.monotonic() + left

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
                left = self._deadline - self.monotonic()
                if left <= 0:
                    self._lose(LockLostError(pv, error_text(
                        ErrorCode.EXPIRED, f"lease ran out while renewing failed: {e}")))
                    return
                wait = max(MIN_RENEW_INTERVAL, min(self._interval, left) / 2)
                continue
            self.renewals += 1
            self._lease_from(reply.expires)
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
                # ``released``: this release reached the IOC before (p4p re-sends an RPC whose
                # reply a crash of the IOC lost, and the restarted IOC says it was released)
                if e.code is not ErrorCode.RELEASED:
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
    with ThreadContext("pva", **context_conf(conf)) as ctxt, p4p_errors(pv, timeout):
        ctxt.put(pv, value, timeout=timeout, wait=True, get=False)


def get_pv(
    pv: str, timeout: float = DEFAULT_CALL_TIMEOUT, conf: Mapping[str, str] | None = None
) -> Any:
    """The current value of ``pv`` (unwrapped by p4p: a number, text, enum label or table).

    Raises:
        NoAnswerError: no answer within ``timeout`` seconds.
    """
    with ThreadContext("pva", **context_conf(conf)) as ctxt, p4p_errors(pv, timeout):
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
    with ThreadContext("pva", nt=False, **context_conf(conf)) as ctxt, p4p_errors(pv, timeout):
        v = ctxt.rpc(pv, nturi(pv, dict(args)), timeout=timeout)
    return v.todict() if isinstance(v, Value) else {"value": v}
