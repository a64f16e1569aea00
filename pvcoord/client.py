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

The errors, reply models, argument builders, parsers and the asyncio caller are in
:mod:`pvcoord.rpc` (shared with the services that call the coordination IOC) and are
re-exported here. PV names come from :mod:`pvdb.names` only. The untyped p4p API stays behind
these two modules: callers get
pydantic models (:class:`Grant`, :class:`Reply`, :class:`LockInfo`, :class:`pvdb.models.LockEvent`,
:class:`RegistryDevice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from p4p import Value
from p4p.client.thread import Context as ThreadContext

from pvdb.lockmodel import ErrorCode, error_text
from pvdb.models import LockEvent, LockType
from pvdb.names import (
    COORD_ACQUIRE,
    COORD_DEVICES,
    COORD_EVENTS,
    COORD_FORCE_RELEASE,
    COORD_HEARTBEAT,
    COORD_LOCKS,
    COORD_RELEASE,
    COORD_RENEW,
    REGISTRY_DEVICES,
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

RENEW_FRACTION = 1.0 / 3.0
"""A held lock is renewed every ``lease * RENEW_FRACTION`` seconds, so two renewals can fail
(IOC restarting, network hiccup) before the lease runs out."""

MIN_RENEW_INTERVAL = 0.2
"""Shortest renew period in seconds (bounds the load a very short lease puts on the IOC)."""




def _lost_error(err: RefusedError) -> LockLostError:
    return LockLostError(err.pv, err.text)




# --- blocking client --------------------------------------------------------------------------


class Client(CallerBase):
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
        self._ctxt = ThreadContext("pva", nt=False, **context_conf(conf))

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
        seconds_arg("timeout", lease)
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
