"""RunEngine hook: a plan never acts on a device someone else holds at equal or higher priority.

Activate it with one line in a profile collection's startup file (after ``RE`` is created)::

    from pvcoord.worker_hook import lock_guard; RE.preprocessors.append(lock_guard())

and start the RE Manager with these environment variables (the worker inherits them):

- ``PVCOORD_PREFIX``: the endstation prefix (``BL01:``), as given to the queue IOC.
- ``PVCOORD_REDIS_URL``: the redis the queue IOC answers on (its ``--redis``), e.g.
  ``redis://:PASSWORD@127.0.0.1:6380/0`` for a password-protected redis (``redis://USER:PASS@...``
  for an ACL user); the password never appears in messages.
- ``PVCOORD_STORE``: the coordination IOC's store (its ``--store``: ``sqlite:///PATH`` on this
  host, or ``redis://HOST:PORT/DB``), read-only. Optional but recommended: without it the hook
  relies on the queue IOC alone and does not see locks taken during the plan.
- ``PVCOORD_HOOK_TIMEOUT``: seconds to wait for the queue IOC's answer (default 3).

How it works (no EPICS traffic through the RE worker: docs/architecture.md):

1. For every *acting* message (:data:`ACTING`: ``set``, ``trigger``, ``stage``, ``kickoff``,
   ``complete``, ``prepare``, ``configure``) it finds the registry devices the message's object
   writes, once per object and plan (:meth:`PlanCheck.devices_of`):

   - **by PV**: the write PVs of the object's writable signals (ophyd ``EpicsSignal``
     ``setpoint_pvname``, every component of an ``EpicsMotor`` or ``Device``, ophyd-async write
     sources: :func:`pvcoord.devicewalk.written_pvs`; the root device's, following
     ``.parent``, when the object itself has none) go to the queue IOC in a *resolve request*;
     it answers from the registry's one PV -> device map (:class:`pvdb.devicemap.DeviceMap`
     from ``Registry:DevicePVs`` and ``Registry:Devices``). So ``EpicsMotor('BL01:m1',
     name='sample_x')`` is device ``m1``, whatever its ophyd name. A PV of no registered
     device follows the policy's ``fields.unregistered`` for the queue's account (default
     ``staff``: refused with ``not-allowed`` unless that account is staff). A registry that
     does not answer refuses the message (``not-ready``, fail closed).
   - **by name** only for an object without any PV (simulated and soft devices, as in
     bluesky-queueserver's ``profile_collection_sim``): the root device's ophyd ``name`` is
     taken as the registry name.

   Cleanup messages (:data:`EXEMPT`: ``unstage``, ``stop``) pass for devices this plan itself
   staged or moved (an acting message on them passed), so a refusal is never hidden by a second
   error during cleanup. A cleanup message on a device the plan never acted on is not a way
   around the locks: when the store shows a lock on that device (or there is no store, or its
   devices cannot be told) it is replaced by a ``null`` message (the device is not touched, the
   cleanup goes on).
2. It reads the locks from the store. A device (or the ``beamline``) held at a priority stronger
   than ``QUEUE_EXECUTING`` (``MAINTENANCE``) raises :class:`DeviceLockedError`, after telling
   the queue IOC (a request marked ``refusing``), which asks for the lock anyway so that the
   coordination IOC audits the refusal and ``Queue:StopReason`` shows it.
3. The first time a plan acts on a device, the hook asks the queue IOC over redis (a request on
   list :func:`pvdb.queue.hook_request_key`, the answer on :func:`pvdb.queue.hook_reply_key`) to
   hold ``QUEUE_EXECUTING`` on it for the running item. The IOC acquires it through the
   coordination IOC if the static analysis of the item missed it (a device reached through a
   module global), so every device the plan uses shows as ``QueueExecuting``. A refusal (another
   holder of equal or higher priority, no running queue item, no answer) raises
   :class:`DeviceLockedError` *before* the message reaches the device.
4. Later messages to a confirmed device only re-check the store: if the plan's lock was preempted
   (``MAINTENANCE`` taken during the plan) the next acting message raises. The plan's own
   ``QUEUE_EXECUTING`` row is trusted until its lease ends as timed here on the monotonic clock
   (from when this process first read that ``expires``); then the queue IOC is asked again.

Time: a lock row in the store is a held lock. The coordination IOC deletes the row in the tick
its (monotonic) lease ends and shifts the stored wall-clock times when its own clock steps, so
the hook does not drop rows by comparing their ``expires`` with *this* process's wall clock:
a forward step here (or a clock ahead of the IOC's) hid every lock, so a ``set`` was not refused
at once and a ``stop``/``unstage`` reached a device held in MAINTENANCE. A row left in the store
while the coordination IOC is down still refuses (fail closed: the IOC decides at its restart).

The error is thrown into the plan, so its own cleanup (``unstage``, ``close_run``) runs; the RE
Manager reports the item as failed, puts it back at the front of the queue and stops the queue.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from typing import Any

from bluesky.preprocessors import msg_mutator
from bluesky.utils import Msg

from pvcoord.devicewalk import written_pvs
from pvdb import lockmodel
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode
from pvdb.models import Lock, LockType
from pvdb.names import check_prefix

ACTING: frozenset[str] = frozenset(
    {"set", "trigger", "stage", "kickoff", "complete", "prepare", "configure"}
)
"""Msg commands that act on a device and are checked."""
EXEMPT: frozenset[str] = frozenset({"unstage", "stop"})
"""Cleanup commands: never refused for a device the plan acted on (they run after a failure and
must not hide it); dropped for a held device it never acted on."""

UNCOORDINATED_RECHECK = 1.0
"""Seconds a queue IOC's "not a coordinated device" answer is trusted before asking again."""

DEFAULT_TIMEOUT = 3.0
"""Seconds to wait for the queue IOC's answer to a lock request."""
MAX_TIMEOUT = 600.0
"""Longest ``PVCOORD_HOOK_TIMEOUT`` accepted (seconds)."""

EXEC = LockType.QUEUE_EXECUTING


class DeviceLockedError(RuntimeError):
    """A plan tried to act on a device it may not act on; the message names holder and reason.

    Attributes:
        code: the :class:`pvdb.lockmodel.ErrorCode` of the refusal (``None`` if the queue IOC
            sent none).
        holder: ``account@host`` of the lock that refused it, or ''.
    """

    def __init__(
        self, message: str, code: ErrorCode | None = ErrorCode.HOLDER_CONFLICT, holder: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.holder = holder


class HookConfigError(RuntimeError):
    """The hook is not configured (a missing environment variable, an unreachable store)."""


def root_device(obj: Any) -> Any:
    """The top-level device of ``obj`` (a signal or component), following ``.parent``."""
    seen = 0
    while getattr(obj, "parent", None) is not None and seen < 64:
        obj = obj.parent
        seen += 1
    return obj


def describe(lock: Lock, device: str | None = None) -> str:
    """The lock in the one refusal format (:func:`pvdb.lockmodel.describe`), as of now."""
    return lockmodel.describe(lock, time.time(), device)


def effective(locks: Mapping[str, Lock], device: str) -> Lock | None:
    """The lock governing ``device`` (:func:`pvdb.lockmodel.effective`)."""
    return lockmodel.effective(locks, device)


def normalize_store_url(url: str) -> str:
    """``sqlite:////abs/path`` (an absolute path after ``sqlite:///``) -> ``sqlite:///abs/path``.

    The read-only SQLite open uses a ``file:`` URI, in which ``//abs`` would be a host name.
    """
    if url.startswith("sqlite:////"):
        return "sqlite:///" + url[len("sqlite:///"):].lstrip("/")
    return url


class LockGuard:
    """The preprocessor: ``RE.preprocessors.append(LockGuard(...))`` (or :func:`lock_guard`).

    Args:
        prefix: endstation prefix of the queue IOC.
        redis_url: redis where the queue IOC serves lock requests.
        store_url: the coordination IOC's store (read-only), or ``None``.
        timeout: seconds to wait for the queue IOC's answer.
        store: an already opened store (tests), instead of ``store_url``.

    Raises:
        HookConfigError: a bad prefix or a store that cannot be opened.
    """

    def __init__(
        self,
        prefix: str,
        redis_url: str,
        store_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        store: Any = None,
    ) -> None:
        import redis  # imported in the worker only when the hook is used

        from pvcoord.store import StoreError, open_store

        try:
            self.prefix = check_prefix(prefix)
        except ValueError as e:
            raise HookConfigError(f"pvcoord worker hook: {e}") from None
        self.timeout = float(timeout)
        self.clock: Callable[[], float] = time.time
        """Wall clock (epoch s): only to turn a row's ``expires`` into the time left."""
        self.monotonic: Callable[[], float] = time.monotonic
        """The clock this process times the plan's own lease on (tests may set fake clocks)."""
        self._lease_ends: dict[tuple[str, float, float], float] = {}
        """(device, acquired, expires) of a row -> :attr:`monotonic` time its lease ends, noted
        when this process first read that row."""
        self.redis_url = redis_url
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=self.timeout + 2, socket_connect_timeout=self.timeout
        )
        self._redis_error = redis.RedisError
        self._store_error: type[Exception] = StoreError
        self.store = store
        if store is None and store_url:
            try:
                self.store = open_store(
                    normalize_store_url(store_url), namespace=self.prefix, readonly=True
                )
            except StoreError as e:
                raise HookConfigError(f"pvcoord worker hook: {e}") from None

    def __call__(self, plan: Generator) -> Generator:
        """Wrap one plan (the RunEngine calls this for every plan it runs)."""
        return msg_mutator(plan, PlanCheck(self))

    # --- lock state without EPICS -------------------------------------------------------------

    def snapshot(self) -> dict[str, Lock]:
        """The locks in the store, by device (empty without a store).

        Every row counts, whatever its ``expires`` says against this process's wall clock: the
        coordination IOC deletes a row when the lease ends (timed on its monotonic clock) and
        rewrites the wall-clock times when its clock steps (module docstring, "Time").

        Raises:
            DeviceLockedError: the store cannot be read (fail closed).
        """
        if self.store is None:
            return {}
        try:
            locks = self.store.load_locks()
        except self._store_error as e:
            raise DeviceLockedError(f"pvcoord: cannot read the lock store, refusing: {e}",
                                    ErrorCode.STORE_UNAVAILABLE) from None
        rows = {(lk.device, lk.acquired, lk.expires) for lk in locks}
        self._lease_ends = {k: v for k, v in self._lease_ends.items() if k in rows}
        return {lk.device: lk for lk in locks}

    def lease_running(self, lock: Lock) -> bool:
        """Whether ``lock``'s lease has time left, timed on :attr:`monotonic`.

        The time left is ``expires`` minus the wall clock when this process first reads the row
        (a renew or a clock-step rewrite is a new row); a wall-clock step after that changes
        nothing.
        """
        k = (lock.device, lock.acquired, lock.expires)
        end = self._lease_ends.get(k)
        if end is None:
            end = self._lease_ends[k] = self.monotonic() + (lock.expires - self.clock())
        return self.monotonic() < end

    def report_refusal(self, device: str, why: str) -> None:
        """Tell the queue IOC that the hook refuses ``device`` (held MAINTENANCE in the store).

        The same request as :meth:`request`, marked ``refusing``: the queue IOC asks for
        QUEUE_EXECUTING on the device for the running item, so the coordination IOC refuses and
        audits it (``Coord:Events``) and the IOC shows the reason in ``Queue:StopReason`` and
        stops the queue. Waits for the answer (up to the timeout: the item must still be running
        when the IOC looks) and ignores it; no answer is not an error here (the hook refuses
        anyway).
        """
        try:
            self.request(device, refusing=why)
        except (DeviceLockedError, ValueError):
            pass

    def request(self, device: str, refusing: str | None = None) -> dict[str, Any]:
        """Ask the queue IOC to hold QUEUE_EXECUTING on ``device`` for the running item.

        Returns the IOC's answer ``{"granted", "coordinated", "planUid", "owner", "message"}``.
        ``refusing``: the hook refuses the message anyway, for this reason (see
        :meth:`report_refusal`).

        Raises:
            DeviceLockedError: no answer within the timeout, or redis unreachable.
        """
        body: dict[str, Any] = {"device": device}
        if refusing is not None:
            body["refusing"] = refusing
        return self._ask(body, f"a lock request for {device}", device)

    def resolve(self, pvs: list[str], what: str = "an ophyd object") -> dict[str, list[str]]:
        """The registered devices ``pvs`` belong to: ``{device: [pv, ...]}``.

        Asked from the queue IOC (a resolve request, in parts of :data:`pvdb.queue.HOOK_MAX_PVS`
        names), which reads the registry's PV -> device map (:class:`pvdb.devicemap.DeviceMap`)
        and applies the policy's ``fields.unregistered`` to PVs of no device.

        Raises:
            DeviceLockedError: no answer, the registry unknown (``state-unknown``/``not-ready``:
                fail closed), or a PV of no device the policy does not let the queue write
                (``not-allowed``).
        """
        devices: dict[str, list[str]] = {}
        for i in range(0, len(pvs), qn.HOOK_MAX_PVS):
            answer = self._ask({"pvs": pvs[i:i + qn.HOOK_MAX_PVS]},
                               f"which devices the PVs of {what} belong to", what)
            if not answer.get("granted"):
                raise DeviceLockedError(
                    f"pvcoord: refused to act on {what}: {answer.get('message', 'refused')}",
                    _code(answer.get("code") or answer.get("error")),
                    str(answer.get("holder") or ""))
            got = answer.get("devices")
            if not isinstance(got, dict) or not all(
                    isinstance(names, list) for names in got.values()):
                raise DeviceLockedError(
                    f"pvcoord: the queue IOC's answer for {what} is not a device map: "
                    f"{str(answer)[:200]}", ErrorCode.STATE_UNKNOWN)
            for device, names in got.items():
                devices.setdefault(str(device), []).extend(str(n) for n in names)
        return devices

    def _send(self, fields: dict[str, Any], reply_key: str) -> Any:
        """Push one request (with its pending key when it says ``pending``); BLPOP the reply."""
        pipe = self._redis.pipeline(transaction=True)
        if fields.get("pending"):
            pipe.set(qn.hook_pending_key(self.prefix, str(fields["id"])), b"1",
                     px=max(1, int(self.timeout * 1000)))
        pipe.lpush(qn.hook_request_key(self.prefix), json.dumps(fields))
        pipe.execute()
        return self._redis.blpop([reply_key], timeout=self.timeout)

    @staticmethod
    def _old_ioc(raw: bytes | str) -> bool:
        """The answer of a queue IOC older than the ``pending`` field (it refuses the field)."""
        try:
            answer = json.loads(raw)
        except ValueError:
            return False
        return (isinstance(answer, dict) and answer.get("error") == "unknown_field"
                and "pending" in str(answer.get("message", "")))

    def _ask(self, body: dict[str, Any], what: str, subject: str) -> dict[str, Any]:
        """Send one request to the queue IOC and wait for its answer (see 0023)."""
        rid = uuid.uuid4().hex
        # the queue IOC answers while the pending key lives (its time to live is our wait,
        # timed by the redis server), so no two clocks are compared; "time" is for a queue IOC
        # older than "pending", which refuses the field: then the request goes again without it
        fields = {"id": rid, **body, "time": time.time(), "pid": os.getpid(), "pending": True}
        reply_key = qn.hook_reply_key(self.prefix, rid)
        try:
            got = self._send(fields, reply_key)
            if got and self._old_ioc(got[1]):
                fields = {k: v for k, v in fields.items() if k != "pending"}
                fields["time"] = time.time()
                got = self._send(fields, reply_key)
        except self._redis_error as e:
            raise DeviceLockedError(
                f"pvcoord: cannot ask the queue IOC {what} "
                f"({qn.redact_url(self.redis_url)}: {e}); refusing to act on {subject}",
                ErrorCode.STATE_UNKNOWN,
            ) from None
        if not got:
            raise DeviceLockedError(
                f"pvcoord: the queue IOC did not answer {what} within "
                f"{self.timeout:g} s on {qn.redact_url(self.redis_url)} (is python -m iocs.queue "
                f"running with --prefix {self.prefix} --redis ...?); refusing to act on {subject}",
                ErrorCode.STATE_UNKNOWN,
            )
        try:
            answer = json.loads(got[1])
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise DeviceLockedError(
                f"pvcoord: the queue IOC's answer to {what} is not a JSON object "
                f"({got[1][:80]!r}); refusing to act on {subject}", ErrorCode.STATE_UNKNOWN)
        return answer


class PlanCheck:
    """The per-plan state of :class:`LockGuard`: devices resolved and confirmed for this plan."""

    def __init__(self, guard: LockGuard) -> None:
        self.guard = guard
        self.confirmed: dict[str, str] = {}
        """device -> planUid of the QUEUE_EXECUTING lock the queue IOC confirmed."""
        self.uncoordinated: dict[str, float] = {}
        """device -> monotonic time of the queue IOC's "not coordinated" answer."""
        self.acted: set[str] = set()
        """Devices an acting message of this plan passed for (their cleanup is exempt)."""
        self.dropped: list[str] = []
        """``"unstage m2"``: cleanup replaced by ``null`` (a held device never acted on)."""
        self.checked = 0
        self.resolved: dict[int, tuple[Any, tuple[str, ...]]] = {}
        """id(object) -> (the object, the registry devices its messages act on)."""

    def __call__(self, msg: Any) -> Any:
        """Check one message; return it (or a ``null`` message) or raise DeviceLockedError."""
        if msg.obj is None or (msg.command not in ACTING and msg.command not in EXEMPT):
            return msg
        if msg.command in EXEMPT:
            return self._cleanup(msg)
        devices = self.devices_of(msg.obj)
        self.checked += 1
        shown = _label(root_device(msg.obj))
        for device in devices:
            self.check(msg.command, device, shown)
        self.acted.update(devices)
        return msg

    def devices_of(self, obj: Any) -> tuple[str, ...]:
        """The registry devices a message to ``obj`` acts on (resolved once per plan).

        By PV: the write PVs of ``obj``'s writable signals (:func:`pvcoord.devicewalk.written_pvs`;
        of its root device when ``obj`` itself has no PV), through the registry's PV -> device
        map (:meth:`LockGuard.resolve`). By name only for an object without any PV (simulated
        and soft devices): the root device's ophyd ``name``. An object with PVs none of which
        is written, or without name, acts on no device.

        Raises:
            DeviceLockedError: the PVs cannot be told, or resolved (see :meth:`LockGuard.resolve`).
        """
        hit = self.resolved.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        root = root_device(obj)
        try:
            pvs, has_pvs = written_pvs(obj)
            if not has_pvs and root is not obj:
                pvs, has_pvs = written_pvs(root)
        except Exception as e:  # an object whose signals cannot be walked: fail closed
            raise DeviceLockedError(
                f"pvcoord: cannot tell which PVs {_label(obj)} writes "
                f"({type(e).__name__}: {e}); refusing to act on it",
                ErrorCode.STATE_UNKNOWN) from None
        if has_pvs:
            devices = tuple(self.guard.resolve(pvs, _label(obj))) if pvs else ()
        else:
            name = getattr(root, "name", None)
            devices = (name,) if isinstance(name, str) and name else ()
        self.resolved[id(obj)] = (obj, devices)
        return devices

    def _cleanup(self, msg: Any) -> Any:
        """``stop`` / ``unstage``: pass for devices the plan acted on, else ``null`` if held."""
        try:
            devices: tuple[str, ...] | None = self.devices_of(msg.obj)
        except DeviceLockedError:
            devices = None  # which devices it is cannot be told: do not touch it
        if devices is not None:
            left = [d for d in devices if d not in self.acted]
            if not left:
                return msg
            if self.guard.store is not None:
                try:
                    locks = self.guard.snapshot()
                    held = any(effective(locks, d) is not None for d in left)
                except DeviceLockedError:
                    held = True
                if not held:
                    return msg
        what = ",".join(devices) if devices else _label(msg.obj)
        self.dropped.append(f"{msg.command} {what}")
        return Msg("null")

    def check(self, command: str, device: str, shown: str = "") -> None:
        """Raise :class:`DeviceLockedError` unless this plan may ``command`` ``device`` now.

        ``shown``: the ophyd name of the object, named in the refusal when it differs.
        """
        locks = self.guard.snapshot()
        lk = effective(locks, device)
        alias = f" (ophyd object {shown!r})" if shown and shown != device else ""
        refusal = (f"pvcoord: refused {command!r} on {device}{alias} before it reached the "
                   "device")
        if lk is not None and lockmodel.outranks(lk.lock_type, EXEC):
            why = lockmodel.conflict_text(lk, EXEC, time.time(), device)
            self.guard.report_refusal(device, why)
            raise DeviceLockedError(f"{refusal}: {why}", ErrorCode.HOLDER_CONFLICT, lk.holder)
        seen = self.uncoordinated.get(device)
        if seen is not None and time.monotonic() - seen < UNCOORDINATED_RECHECK:
            return  # the queue IOC said so a moment ago; the store check above still ran
        uid = self.confirmed.get(device)
        if uid is not None:
            if self.guard.store is None:
                return  # without a store the queue IOC's confirmation is all we know
            ours = lk is not None and lk.lock_type is EXEC and lk.plan_uid == uid
            if lk is not None and ours and self.guard.lease_running(lk):
                return  # still ours
            if lk is not None and not ours and not lockmodel.can_preempt(EXEC, lk.lock_type):
                raise DeviceLockedError(f"{refusal}: the plan's lock is gone: "
                                        f"{describe(lk, device)}", ErrorCode.PREEMPTED, lk.holder)
            # free, held weaker, or our lease ran out (by our clock): ask again
        answer = self.guard.request(device)
        if not answer.get("granted"):
            raise DeviceLockedError(f"{refusal}: {answer.get('message', 'refused')}",
                                    _code(answer.get("code")), str(answer.get("holder") or ""))
        if answer.get("coordinated", True) is False:
            self.uncoordinated[device] = time.monotonic()
            return
        self.uncoordinated.pop(device, None)
        self.confirmed[device] = str(answer.get("planUid", ""))


def _label(obj: Any) -> str:
    """The ophyd name of ``obj`` (a signal: ``device.signal`` as ophyd names it), or its type."""
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) and name else type(obj).__name__


def _code(value: object) -> ErrorCode | None:
    try:
        return ErrorCode(str(value))
    except ValueError:
        return None


def lock_guard(
    prefix: str | None = None,
    redis_url: str | None = None,
    store_url: str | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> Callable[[Generator], Generator]:
    """The preprocessor for ``RE.preprocessors``, configured from arguments or the environment.

    Arguments default to ``PVCOORD_PREFIX``, ``PVCOORD_REDIS_URL``, ``PVCOORD_STORE`` and
    ``PVCOORD_HOOK_TIMEOUT`` (see the module docstring).

    Raises:
        HookConfigError: prefix or redis URL missing, or the store cannot be opened: the startup
            file fails, so the RE environment does not open unguarded.
    """
    env = os.environ if environ is None else environ
    prefix = prefix or env.get("PVCOORD_PREFIX")
    redis_url = redis_url or env.get("PVCOORD_REDIS_URL")
    store_url = store_url or env.get("PVCOORD_STORE") or None
    if not prefix or not redis_url:
        raise HookConfigError(
            "pvcoord worker hook: set PVCOORD_PREFIX and PVCOORD_REDIS_URL in the RE Manager's "
            "environment (or pass prefix= and redis_url= to lock_guard())"
        )
    if timeout is None:
        try:
            timeout = float(env.get("PVCOORD_HOOK_TIMEOUT", DEFAULT_TIMEOUT))
        except ValueError:
            raise HookConfigError("PVCOORD_HOOK_TIMEOUT must be a number of seconds") from None
    if not (math.isfinite(timeout) and 0.01 <= timeout <= MAX_TIMEOUT):
        raise HookConfigError(f"PVCOORD_HOOK_TIMEOUT must be 0.01-{MAX_TIMEOUT:g} seconds, "
                              f"not {timeout!r}")
    return LockGuard(prefix, redis_url, store_url, timeout)
