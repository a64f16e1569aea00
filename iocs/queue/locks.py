"""Automatic queue locks: the queue IOC as a client of the coordination IOC (over PVA only).

- Queued items reserve their devices with ``QUEUE_QUEUED`` (only devices nobody else holds, so
  refusals do not flood the audit log).
- The running item holds ``QUEUE_EXECUTING`` (``planUid`` = its item uid) on the devices it names
  plus those the worker hook reports; renewed every lease/3 while the RE Manager is reachable
  (not while it is not: the lease then runs out); released when the item leaves the
  running slot, whatever its exit status (a failed item comes back with a new uid and gets new
  locks when it runs again).
- If the running item's acquire is refused (a ``MAINTENANCE`` lock, another queue's lock) the
  refusal is audited by the coordination IOC; :class:`LockKeeper` reports it to its owner, which
  stops and pauses the queue and shows the reason.

The queue IOC's own account holds the locks: releases and renewals name devices, never keys, so a
device that changes from queued to executing (a re-acquire by the same account changes the type)
never loses its lock in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from p4p.client.asyncio import Context

from pvcoord.rpc import AsyncCaller, CoordError, RefusedError, parse_locks, scalar
from pvdb.models import BEAMLINE, LockType
from pvdb.names import COORD_DEVICES, COORD_LOCKS

from .model import HeldBy, LockPlan, blockers, owner_account, plan_locks

log = logging.getLogger(__name__)

EXEC = LockType.QUEUE_EXECUTING
QUEUED = LockType.QUEUE_QUEUED

ConflictCallback = Callable[[str, str], Awaitable[None]]
"""``await cb(item_uid, message)`` when the running item's QUEUE_EXECUTING acquire is refused."""


@dataclass
class Inputs:
    """What the locks are planned from (set by the queue IOC on every queue change)."""

    running_uid: str = ""
    running_name: str = ""
    running_devices: tuple[str, ...] = ()
    queued: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hook_devices: dict[str, set[str]] = field(default_factory=dict)


class LockKeeper:
    """Keeps the queue's locks in line with the queue.

    Args:
        prefix: endstation prefix of the coordination IOC.
        account: the holder of the queue's locks: this process's account, or (with
            ``on_behalf``) a user this trusted-service process acts for (``--lock-owner``).
        conf: p4p client configuration (``None``: from the environment).
        on_conflict: awaited when the running item cannot get its QUEUE_EXECUTING locks.
        exec_lease: lease of QUEUE_EXECUTING locks, s (renewed every third of it).
        queued_lease: lease of QUEUE_QUEUED locks, s.
        on_behalf: send ``onBehalfOf=account`` with every request.
        monotonic: the clock renewal intervals and grant ages are timed on (default
            ``time.monotonic``; tests may pass a fake one). Never the wall clock: a step must
            neither stop renewals (the coordination IOC times leases monotonically, so a lock
            not renewed runs out) nor make a fresh grant look old or a lost one new.
    """

    def __init__(
        self,
        prefix: str,
        account: str,
        conf: Mapping[str, str] | None,
        on_conflict: ConflictCallback,
        exec_lease: float = 60.0,
        queued_lease: float = 600.0,
        on_behalf: bool = False,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.prefix, self.account = prefix, account
        self.monotonic: Callable[[], float] = monotonic or time.monotonic
        self._obo = account if on_behalf else None
        self.conf = conf
        self.on_conflict = on_conflict
        self.exec_lease, self.queued_lease = exec_lease, queued_lease
        self.inputs = Inputs()
        self.locks: dict[str, HeldBy] = {}
        """Every active lock, from the ``Coord:Locks`` monitor."""
        self.coordinated: frozenset[str] | None = None
        """Devices the coordination IOC accepts (``Coord:Devices``), None until known."""
        self.held: dict[str, tuple[LockType, str, float]] = {}
        """device -> (type, planUid, :attr:`monotonic` time granted) of the locks this IOC holds
        (when this process got the grant, not the coordination IOC's wall-clock ``acquired``)."""
        self.health = "starting"
        self.refused_items: dict[str, str] = {}
        """item uid -> the coordination IOC's refusal text of its QUEUE_EXECUTING acquire
        (``[code holder=...] message``; tried once per item)."""
        self.on_change: Callable[[], None] | None = None
        self.manager_reachable = True
        """Set by the queue IOC: while False (the RE Manager unreachable) QUEUE_EXECUTING is
        neither renewed nor acquired, so the running item's locks run out with their lease
        instead of outliving a dead manager."""
        self._client: AsyncCaller | None = None
        self._ctxt: Context | None = None
        self._subs: list = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._locks_seen = False
        self._last_renew: dict[LockType, float | None] = {EXEC: None, QUEUED: None}
        """:attr:`monotonic` time of the last acquire or renew per type (None: none yet)."""

    # --- monitors -------------------------------------------------------------------------------

    def _on_locks(self, value) -> None:
        if isinstance(value, Exception):
            self._locks_seen = False
            self.locks = {}
            self._set_health(f"coordination IOC not reachable ({type(value).__name__})")
            return
        try:
            rows = parse_locks(value)
        except CoordError as e:
            log.error("%s", e)
            return
        self.locks = {
            r.device: HeldBy(r.device, r.lock_type, r.owner, r.reason, r.plan_uid, r.expires)
            for r in rows
        }
        self._locks_seen = True
        self._forget_lost()
        self._wake.set()
        if self.on_change is not None:
            self.on_change()

    def _on_devices(self, value) -> None:
        if isinstance(value, Exception):
            return
        names = [str(d) for d in scalar(value) or []]
        self.coordinated = frozenset(names) - {BEAMLINE}
        self._wake.set()

    def _forget_lost(self) -> None:
        """Drop grants that ``Coord:Locks`` no longer shows as ours (preempted, expired)."""
        now = self.monotonic()
        for d, (lt, _uid, t) in list(self.held.items()):
            if now - t < 1.0:
                continue  # the monitor may not show a fresh grant yet
            row = self.locks.get(d)
            if row is None or owner_account(row.owner) != self.account or row.lock_type != lt:
                log.warning("lost %s lock on %s (now: %s)", lt.value, d,
                            row.describe() if row else "free")
                del self.held[d]

    def _set_health(self, text: str) -> None:
        if text != self.health:
            self.health = text
            if self.on_change is not None:
                self.on_change()

    # --- planning -------------------------------------------------------------------------------

    def set_manager_reachable(self, reachable: bool) -> None:
        """The RE Manager became reachable / unreachable (see :attr:`manager_reachable`)."""
        if reachable != self.manager_reachable:
            self.manager_reachable = reachable
            log.warning("RE Manager %s: QUEUE_EXECUTING locks %s", "reachable again" if reachable
                        else "unreachable", "kept again" if reachable else "no longer renewed")
            self._wake.set()

    def update(self, inputs: Inputs) -> None:
        """New queue state: reconcile soon."""
        self.inputs = inputs
        self._wake.set()

    def plan(self) -> LockPlan:
        """The locks wanted for the current inputs."""
        i = self.inputs
        return plan_locks(
            i.running_uid, i.running_devices, i.hook_devices.get(i.running_uid, set()),
            i.queued, self.coordinated,
        )

    def executing(self) -> list[str]:
        """Devices held QUEUE_EXECUTING now, sorted."""
        return sorted(d for d, (lt, _, _) in self.held.items() if lt is EXEC)

    def queued(self) -> list[str]:
        """Devices held QUEUE_QUEUED now, sorted."""
        return sorted(d for d, (lt, _, _) in self.held.items() if lt is QUEUED)

    async def refresh(self) -> None:
        """Read ``Coord:Locks`` with every change replied so far into :attr:`locks`.

        The monitor's table is posted coalesced, up to 50 ms after a change, and a decision
        right after someone's acquire must see it
        (:meth:`pvcoord.rpc.AsyncCaller.current_locks`).

        Raises:
            pvcoord.rpc.CoordError: as ``current_locks`` (the view is then unchanged).
        """
        if self._client is not None:
            self._on_locks(await self._client.current_locks())

    def item_blockers(self, devices: Sequence[str]) -> list[HeldBy]:
        """Locks that would refuse QUEUE_EXECUTING on ``devices`` now (coordinated only)."""
        known = self.coordinated or frozenset()
        return blockers([d for d in devices if d in known], self.locks, self.account, EXEC)

    # --- acting ---------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Release, acquire and renew so that the held locks match :meth:`plan`."""
        async with self._lock:
            if self._client is None or not self._locks_seen or self.coordinated is None:
                return
            plan = self.plan()
            await self._release(plan)
            if self.manager_reachable:
                await self._acquire_executing(plan)
            await self._acquire_queued(plan)
            await self._renew()
            if self.health.startswith(("coordination IOC", "starting")):
                self._set_health("OK")
        if self.on_change is not None:
            self.on_change()

    async def _release(self, plan: LockPlan) -> None:
        assert self._client is not None
        drop = sorted(set(self.held) - plan.executing - plan.queued)
        if not drop:
            return
        for d in drop:
            self.held.pop(d, None)
        try:
            await self._client.release(drop, on_behalf_of=self._obo)
        except CoordError:
            for d in drop:  # one of them was lost meanwhile: release the others one by one
                with contextlib.suppress(CoordError):
                    await self._client.release([d], on_behalf_of=self._obo)

    async def _acquire_executing(self, plan: LockPlan) -> None:
        assert self._client is not None
        uid = plan.running_uid
        need = sorted(d for d in plan.executing if self.held.get(d, (None, ""))[:2] != (EXEC, uid))
        if not need or not uid:
            return
        if uid in self.refused_items and self.item_blockers(need):
            return  # refused once (audited); retried only when the blocking lock is gone
        name = self.inputs.running_name or "item"
        try:
            await self._client.acquire(
                need, EXEC, timeout=self.exec_lease, reason=f"queue: running {name}",
                plan_uid=uid, on_behalf_of=self._obo,
            )
        except RefusedError as e:
            msg = e.message
            first = uid not in self.refused_items
            self.refused_items[uid] = e.text
            if first:
                log.warning("QUEUE_EXECUTING refused for %s (%s): %s", name, uid, msg)
                await self.on_conflict(uid, str(msg))
            return
        except CoordError as e:
            self._set_health(f"coordination IOC: {e}")
            return
        now = self.monotonic()
        for d in need:
            self.held[d] = (EXEC, uid, now)
        self.refused_items.pop(uid, None)
        self._last_renew[EXEC] = now

    async def _acquire_queued(self, plan: LockPlan) -> None:
        assert self._client is not None
        need = [d for d in sorted(plan.queued) if self.held.get(d, (None,))[0] is not QUEUED]
        free = [d for d in need if not blockers([d], self.locks, self.account, QUEUED)]
        groups: dict[str, list[str]] = {}
        for d in free:  # planUid of a reservation: the first queued item that uses the device
            groups.setdefault(plan.first_user.get(d, ""), []).append(d)
        now = self.monotonic()
        for uid, devs in groups.items():
            granted = await self._reserve(devs, uid)
            for d in granted:
                self.held[d] = (QUEUED, uid, now)
            if granted:
                self._last_renew[QUEUED] = now

    async def _reserve(self, devices: list[str], uid: str) -> list[str]:
        """QUEUE_QUEUED on ``devices`` (all at once, else one by one); returns those granted."""
        assert self._client is not None
        reason = "queue: reserved for queued items"
        try:
            await self._client.acquire(devices, QUEUED, timeout=self.queued_lease, reason=reason,
                                       plan_uid=uid, on_behalf_of=self._obo)
            return devices
        except CoordError:
            granted = []
            for d in devices:  # the table changed meanwhile
                try:
                    await self._client.acquire([d], QUEUED, timeout=self.queued_lease,
                                               reason=reason, plan_uid=uid,
                                               on_behalf_of=self._obo)
                    granted.append(d)
                except CoordError:
                    continue
            return granted

    async def _renew(self) -> None:
        assert self._client is not None
        now = self.monotonic()
        for lt, lease in ((EXEC, self.exec_lease), (QUEUED, self.queued_lease)):
            devs = sorted(d for d, (t, _, _) in self.held.items() if t is lt)
            last = self._last_renew[lt]
            if not devs or (last is not None and now - last < lease / 3):
                continue
            if lt is EXEC and not self.manager_reachable:
                continue  # nobody may be running the item: let the lease run out
            self._last_renew[lt] = now
            try:
                await self._client.renew(devs, timeout=lease, on_behalf_of=self._obo)
            except CoordError as e:
                log.warning("renew of %s failed: %s", ",".join(devs), e)
                for d in devs:
                    with contextlib.suppress(CoordError):
                        await self._client.renew([d], timeout=lease, on_behalf_of=self._obo)

    async def try_executing(self, devices: Sequence[str], uid: str, reason: str) -> str | None:
        """Request QUEUE_EXECUTING on ``devices`` for item ``uid`` now (one atomic request).

        Used when a start is refused on what ``Coord:Locks`` shows: the request leaves the
        refusal in the coordination IOC's audit events (``Coord:Events``). Returns ``None`` if it
        was granted (the blocking lock went away meanwhile; the locks are then held and
        reconciled like any other), else the coordination IOC's refusal message.
        """
        devs = sorted(set(devices))
        if not devs:
            return None
        async with self._lock:
            if self._client is None:
                return "the coordination IOC is not connected"
            try:
                await self._client.acquire(devs, EXEC, timeout=self.exec_lease, reason=reason,
                                           plan_uid=uid, on_behalf_of=self._obo)
            except RefusedError as e:
                return str(e.message)
            except CoordError as e:
                return f"coordination IOC: {e}"
            now = self.monotonic()
            for d in devs:
                self.held[d] = (EXEC, uid, now)
        self._wake.set()
        return None

    async def release_all(self) -> None:
        """Release every lock this IOC holds (at shutdown)."""
        async with self._lock:
            if self._client is None or not self.held:
                return
            devs = sorted(self.held)
            self.held.clear()
            with contextlib.suppress(CoordError):
                await self._client.release(devs, on_behalf_of=self._obo, call_timeout=2.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Monitor the coordination IOC and reconcile on every change (and every second)."""
        kws = {"conf": dict(self.conf), "useenv": False} if self.conf is not None else {}
        self._ctxt = Context("pva", nt=False, **kws)
        self._client = AsyncCaller(self.prefix, conf=self.conf, timeout=3.0)
        self._subs = [
            self._ctxt.monitor(COORD_LOCKS.name(self.prefix), self._on_locks_async,
                               notify_disconnect=True),
            self._ctxt.monitor(COORD_DEVICES.name(self.prefix), self._on_devices_async,
                               notify_disconnect=True),
        ]
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.reconcile()
                except Exception:  # keep the queue IOC serving
                    log.exception("lock reconcile failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.release_all(), 3.0)
            for s in self._subs:
                s.close()
            self._client.close()
            self._ctxt.close()

    async def _on_locks_async(self, value) -> None:
        self._on_locks(value)

    async def _on_devices_async(self, value) -> None:
        self._on_devices(value)

    def holds_executing(self, device: str, uid: str) -> bool:
        """Whether this IOC holds QUEUE_EXECUTING on ``device`` for item ``uid``."""
        return self.held.get(device, (None, ""))[:2] == (EXEC, uid)
