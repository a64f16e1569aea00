"""The queue IOC: RE Manager status -> PVs, control RPCs, automatic locks, worker-hook requests.

:func:`serve` is the coroutine tests call; :mod:`iocs.queue.__main__` wires signals to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from p4p.server import Server, StaticProvider

from pvcoord.rpc import AsyncCaller, CoordError
from pvdb import queue as qn
from pvdb.devicemap import DeviceMapError
from pvdb.lockmodel import Caller, ErrorCode, parse_error_text
from pvdb.names import REGISTRY_DEVICE_PVS, check_prefix
from pvdb.policy import Policy, host_roles
from pvdb.redact import register_url

from .. import pvutil
from . import model
from .locks import Inputs, LockKeeper
from .manager import POLL_AFTER, ManagerError, ManagerLink, ManagerUnreachableError
from .model import BadRequestError
from .pvs import INVALID, ControlError, QueuePVs, add_rpcs

log = logging.getLogger(__name__)

HOOK_REQUEST_MAX_AGE = 10.0
"""Seconds after which a worker-hook request without ``pending`` (an older hook) is stale (the
hook gave up long ago) and dropped; judged by the hook's wall clock against this IOC's. A request
with ``pending`` is judged by :func:`pvdb.queue.hook_pending_key` instead (no clocks compared)."""
HOOK_REPLY_TTL = 30
"""Seconds a reply stays in redis for the hook to pick up."""


def _who(caller: Caller) -> str:
    """``alice@host``, or ``alice@host (by pvcoord-web)`` on behalf of a user, for the log."""
    return f"{caller.account}@{caller.host}" + (f" (by {caller.actor})" if caller.actor else "")


def this_account() -> str:
    """The OS account of this process: what PVA servers see as our ``account``."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class QueueIOC:
    """State and behaviour of one queue IOC (no p4p types cross this class's methods).

    Args:
        prefix: endstation prefix ``P``.
        zmq_control: the RE Manager's control address.
        zmq_info: the RE Manager's info (publish) address.
        policy: who may use the control RPCs (``access.queue_control``).
        locks: whether to take automatic locks through the coordination IOC.
        client_conf: p4p client configuration for the coordination IOC (``None``: environment).
        coord_prefix: prefix of the coordination IOC (default: ``prefix``).
        redis_url: redis of the worker hook's requests (``None``: no hook requests served).
        user_group: RE Manager user group of items added through ``Queue:ItemAdd``.
        exec_lease: QUEUE_EXECUTING lease in s.
        queued_lease: QUEUE_QUEUED lease in s.
        lock_owner: hold the locks as this user (``onBehalfOf``; this process's account must be
            a trusted service in the coordination IOC's policy); default: this process's account.
        registry_prefix: prefix of the registry IOC whose PV -> device map answers the hook's
            resolve requests (default: ``coord_prefix``, else ``prefix``).
    """

    def __init__(
        self,
        prefix: str,
        zmq_control: str,
        zmq_info: str,
        policy: Policy,
        locks: bool = True,
        client_conf: Mapping[str, str] | None = None,
        coord_prefix: str | None = None,
        redis_url: str | None = None,
        user_group: str = "primary",
        exec_lease: float = 60.0,
        queued_lease: float = 600.0,
        lock_owner: str | None = None,
        registry_prefix: str | None = None,
    ) -> None:
        self.prefix = check_prefix(prefix)
        self.registry_prefix = check_prefix(registry_prefix or coord_prefix or prefix)
        self.client_conf = client_conf
        self._registry: AsyncCaller | None = None
        self.policy = policy
        self.user_group = user_group
        self.redis_url = redis_url
        self.hook_health = ""
        """Why the worker-hook channel does not work ('' when it does)."""
        self.resolve_health = ""
        """Why the hook's resolve requests fail (the registry unreachable), '' when they work."""
        self.bad_hook_requests = 0
        """Malformed worker-hook requests received (answered when they had a valid id)."""
        self._bad_hook_logged = -1e9
        register_url(redis_url)  # its password is hidden in every PV, message and log line
        self.provider = StaticProvider("pvcoord-queue")
        pvutil.add_process_info(self.provider, self.prefix, "queue")
        self.server_conf: dict[str, str] = {}
        """The p4p server's configuration once serving (what a client needs to reach it)."""
        self.pvs = QueuePVs(self.prefix, self.provider)
        self.rpcs = add_rpcs(self.prefix, self.provider, self._handlers(), policy)
        self.link = ManagerLink(zmq_control, zmq_info, self.on_status, self.on_console)
        self.account = lock_owner or this_account()
        self.keeper: LockKeeper | None = None
        if locks:
            self.keeper = LockKeeper(
                check_prefix(coord_prefix or prefix), self.account, client_conf,
                self.on_conflict, exec_lease=exec_lease, queued_lease=queued_lease,
                on_behalf=lock_owner is not None,
            )
            self.keeper.on_change = self._locks_changed
        else:
            self.pvs.set(qn.LOCK_HEALTH, "disabled")
        self.status: dict[str, Any] = {}
        self._uids: dict[str, Any] = {}
        self.devices_allowed: list[str] = []
        self.plans_allowed: list[str] = []
        self.queue_items: list[dict[str, Any]] = []
        self.running = model.RunningItem()
        self.history: list[dict[str, Any]] = []
        self.hook_devices: dict[str, set[str]] = {}
        self._hook_pending: dict[str, int] = {}
        """item uid -> worker-hook requests being answered for it (no pause on a conflict)."""
        self._console: deque[str] = deque(maxlen=qn.CONSOLE_LINES)
        self._console_partial = ""
        self._console_dirty = False
        self._acted_next: tuple[str, str] | None = None
        self._heartbeat = 0
        self._fetch_wake = asyncio.Event()
        self._fetch_lock = asyncio.Lock()

    # --- status ---------------------------------------------------------------------------------

    async def on_status(self, status: dict[str, Any], mtime: float, source: str) -> None:
        """One status from the manager (push or poll): post it, fetch what changed."""
        now = time.time()
        prev_state = self.status.get("manager_state")
        self.status = status
        self._update_connection()
        for suffix, v in model.status_values(status).items():
            self.pvs.set_suffix(suffix, v, now)
        self.pvs.set(qn.STATUS_TIME, float(mtime), now)
        state = status.get("manager_state")
        if state == "starting_queue" and prev_state != "starting_queue":
            self.pvs.set(qn.STOP_REASON, "")
            self._acted_next = None
        self._fetch_wake.set()  # fetches run in _fetcher: the next status is not delayed

    async def fetch(self) -> None:
        """Fetch whatever the last status says changed (serialized), then check the next item."""
        async with self._fetch_lock:
            await self._fetch_changed(self.status)
            await self._check_next_item()

    async def _fetcher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fetch_wake.wait(), 0.5)
            if not self._fetch_wake.is_set():
                continue
            self._fetch_wake.clear()
            try:
                await self.fetch()
            except Exception:  # keep fetching
                log.exception("fetch failed")

    async def _fetch_changed(self, status: Mapping[str, Any]) -> None:
        """Fetch devices/plans allowed, queue and history whose change token moved."""

        def changed(key: str) -> bool:
            return key in status and status[key] != self._uids.get(key)

        try:
            if changed("devices_allowed_uid"):
                reply = await self.link.call("devices_allowed")
                self.devices_allowed = sorted((reply.get("devices_allowed") or {}).keys())
                self._uids["devices_allowed_uid"] = status["devices_allowed_uid"]
                self._uids.pop("plan_queue_uid", None)  # device columns depend on it
                self._uids.pop("plan_history_uid", None)
            if changed("plans_allowed_uid"):
                reply = await self.link.call("plans_allowed")
                self.plans_allowed = sorted((reply.get("plans_allowed") or {}).keys())
                self._uids["plans_allowed_uid"] = status["plans_allowed_uid"]
            if changed("plan_queue_uid") or (
                status.get("running_item_uid") or "") != self.running.uid:
                reply = await self.link.call("queue_get", reload=True)
                self._set_queue(reply)
                self._uids["plan_queue_uid"] = reply.get("plan_queue_uid")
            if changed("plan_history_uid"):
                reply = await self.link.call("history_get", reload=True)
                self._set_history(reply)
                self._uids["plan_history_uid"] = reply.get("plan_history_uid")
        except ManagerError as e:
            log.warning("fetch failed (retried with the next status): %s", e)

    def _set_queue(self, reply: Mapping[str, Any]) -> None:
        now = time.time()
        items = list(reply.get("items") or [])
        devs = self.devices_allowed
        self.queue_items = items
        self.running = model.running_item(reply.get("running_item"), devs)
        r = self.running
        self.pvs.set(qn.RUNNING_ITEM_NAME, r.name, now)
        self.pvs.set(qn.RUNNING_ITEM_ARGS, r.args, now)
        self.pvs.set(qn.RUNNING_ITEM_USER, r.user, now)
        self.pvs.set(qn.RUNNING_ITEM_START, r.start, now)
        self.pvs.set(qn.RUNNING_ITEM_DEVICES, list(r.devices), now)
        self.pvs.set(qn.ITEMS, model.item_rows(items, devs), now)
        self.pvs.set(qn.ITEM_NAMES, [str(i.get("name", "")) for i in items], now)
        self.pvs.set(qn.ITEM_SUMMARIES, [model.item_summary(i, devs) for i in items], now)
        self.pvs.set(qn.ITEM_UIDS, [str(i.get("item_uid", "")) for i in items], now)
        self.pvs.set(qn.NEXT_ITEM, model.item_summary(items[0], devs) if items else "", now)
        self.hook_devices = {k: v for k, v in self.hook_devices.items() if k == r.uid}
        self._update_lock_inputs()

    def _set_history(self, reply: Mapping[str, Any]) -> None:
        now = time.time()
        items = list(reply.get("items") or [])
        devs = self.devices_allowed
        rows = model.history_rows(items, devs)
        self.history = items
        self.pvs.set(qn.HISTORY, rows, now)
        shown = items[-qn.HISTORY_ROWS:]
        self.pvs.set(qn.HISTORY_SUMMARIES, [
            f"{model.item_summary(i, devs)} -> {row[5]}" for i, row in zip(shown, rows, strict=True)
        ], now)
        self.pvs.set(qn.HISTORY_EXIT_STATUS, [row[5] for row in rows], now)
        self.pvs.set(qn.LAST_EXIT_STATUS, rows[-1][5] if rows else "", now)
        self.pvs.set(qn.LAST_ITEM_MSG, rows[-1][8] if rows else "", now)

    def _update_connection(self) -> None:
        age = time.monotonic() - self.link.contact.last()
        if self.keeper is not None:
            self.keeper.set_manager_reachable(age <= qn.UNREACHABLE_AFTER)
        if age > qn.UNREACHABLE_AFTER:
            conn = 0
            self.pvs.set_alarm(INVALID, f"RE Manager not reachable: no message for {age:.1f} s")
        else:
            push_age = time.monotonic() - self.link.contact.push
            conn = 1 if push_age < POLL_AFTER + 0.3 else 2
            self.pvs.set_alarm(0, "")
        self.pvs.set(qn.CONNECTION, conn)

    # --- console --------------------------------------------------------------------------------

    def on_console(self, text: str) -> None:
        """A chunk of console output: split into lines (posted by the tick)."""
        text = self._console_partial + text
        lines = text.split("\n")
        self._console_partial = lines.pop()
        for line in lines:
            self._console.append(line.rstrip("\r"))
        self._console_dirty = bool(lines) or self._console_dirty

    def _post_console(self) -> None:
        if not self._console_dirty:
            return
        self._console_dirty = False
        lines = list(self._console)
        now = time.time()
        self.pvs.set(qn.CONSOLE_LINES_PV, lines, now)
        self.pvs.set(qn.CONSOLE, "\n".join(lines), now)

    # --- locks ----------------------------------------------------------------------------------

    def item_devices(self, item: Mapping[str, Any]) -> tuple[str, ...]:
        """Devices ``item`` names (from the manager's devices_allowed)."""
        return model.item_devices(item, self.devices_allowed)

    def _update_lock_inputs(self) -> None:
        if self.keeper is None:
            return
        r = self.running
        self.keeper.update(Inputs(
            running_uid=r.uid, running_name=r.name, running_devices=r.devices,
            queued=tuple((str(i.get("item_uid", "")), self.item_devices(i))
                         for i in self.queue_items),
            hook_devices={k: set(v) for k, v in self.hook_devices.items()},
        ))

    def _locks_changed(self) -> None:
        if self.keeper is None:
            return
        now = time.time()
        self.pvs.set(qn.EXECUTING_DEVICES, self.keeper.executing(), now)
        self.pvs.set(qn.QUEUED_DEVICES, self.keeper.queued(), now)
        health = self.keeper.health
        for extra in (self.hook_health, self.resolve_health):
            if extra:
                health = extra if health == "OK" else f"{health}; {extra}"
        self.pvs.set(qn.LOCK_HEALTH, health, now)

    def next_item_blockers(self) -> tuple[dict[str, Any] | None, list[model.HeldBy]]:
        """The item that runs next and the locks that would refuse its QUEUE_EXECUTING."""
        if not self.queue_items or self.keeper is None:
            return None, []
        item = self.queue_items[0]
        return item, self.keeper.item_blockers(self.item_devices(item))

    async def _check_next_item(self) -> None:
        """Stop the queue before an item whose device is held at higher priority starts."""
        if self.status.get("manager_state") not in ("executing_queue", "starting_queue"):
            return
        if self.status.get("queue_stop_pending"):
            return
        item, blocking = self.next_item_blockers()
        if item is None or not blocking:
            return
        first = blocking[0]
        key = (str(item.get("item_uid")), f"{first.device} {first.lock_type} {first.holder}")
        if self._acted_next == key:
            return
        self._acted_next = key
        reason = (
            f"queue stopped by pvcoord before item {item.get('name')} ({key[0]}): "
            + "; ".join(b.describe() for b in blocking)
        )
        log.warning("%s", reason)
        self.pvs.set(qn.STOP_REASON, reason)
        with contextlib.suppress(ManagerError):
            await self.link.call("queue_stop")

    async def on_conflict(self, uid: str, message: str) -> None:
        """The running item's QUEUE_EXECUTING acquire was refused: stop and pause the queue.

        During a worker-hook request for the item the plan is not paused: the hook refuses the
        message and the plan fails at once (a pause would race with its cleanup).
        """
        name = self.running.name if self.running.uid == uid else "item"
        hook = uid in self._hook_pending
        what = "stopped" if hook else "paused and stopped"
        reason = f"queue {what} by pvcoord: {name} ({uid}) may not act on its devices: {message}"
        log.warning("%s", reason)
        self.pvs.set(qn.STOP_REASON, reason)
        with contextlib.suppress(ManagerError):
            await self.link.call("queue_stop")
        if not hook:
            with contextlib.suppress(ManagerError):
                await self.link.call("re_pause", "immediate")

    # --- worker hook requests (redis) -----------------------------------------------------------

    async def handle_hook_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one worker-hook request ``{"id", "device", "time"[, "refusing"]}``.

        Returns ``{"granted": bool, "coordinated": bool, "planUid": str, "owner": str,
        "message": str, "code": str, "holder": str}`` (``code``: the
        :class:`pvdb.lockmodel.ErrorCode` of a refusal, '' when granted; ``holder``: who holds
        the device, if that is the reason): granted when this IOC holds QUEUE_EXECUTING on the
        device for the running item (acquired now if needed), or when the device is not
        coordinated.
        ``refusing`` (the reason) says the hook refuses the message anyway (it saw a MAINTENANCE
        lock in the store): the request is still made, so the coordination IOC refuses and audits
        it and ``Queue:StopReason`` shows why; the answer is ignored.
        """
        device = str(request.get("device", ""))
        base = {"granted": False, "coordinated": True, "planUid": "", "owner": self.account,
                "code": "", "holder": ""}
        if self.keeper is None:
            return {**base, "code": ErrorCode.NOT_READY,
                    "message": "the queue IOC runs without automatic locks (--no-locks)"}
        try:
            await self.link.refresh()  # the worker started the item: make sure we know it
            await self.fetch()
        except ManagerError as e:
            return {**base, "code": ErrorCode.MANAGER_UNAVAILABLE,
                    "message": f"the queue IOC cannot reach the RE Manager: {e}"}
        uid = self.running.uid
        if not uid:
            return {**base, "code": ErrorCode.NOT_ALLOWED,
                    "message": "no queue item is running (the hook guards queue plans)"}
        if self.keeper.coordinated is None:
            return {**base, "code": ErrorCode.NOT_READY,
                    "message": "the coordination IOC is not connected (device list "
                               "unknown): refusing to act on unverified devices"}
        if device not in self.keeper.coordinated:
            return {**base, "granted": True, "coordinated": False,
                    "message": f"{device} is not a coordinated device"}
        if not self.keeper.holds_executing(device, uid):
            self._hook_pending[uid] = self._hook_pending.get(uid, 0) + 1
            try:
                self.hook_devices.setdefault(uid, set()).add(device)
                self._update_lock_inputs()
                await self.keeper.reconcile()
            finally:
                self._hook_pending[uid] -= 1
                if not self._hook_pending[uid]:
                    del self._hook_pending[uid]
        if self.keeper.holds_executing(device, uid):
            return {**base, "granted": True, "planUid": uid,
                    "message": f"QUEUE_EXECUTING on {device} for {uid}"}
        refused = self.keeper.refused_items.get(uid)
        if refused is None:
            return {**base, "code": ErrorCode.NOT_READY,
                    "message": f"QUEUE_EXECUTING on {device} not granted: {self.keeper.health}"}
        p = parse_error_text(refused)
        return {**base, "code": p.code or ErrorCode.HOLDER_CONFLICT, "holder": p.holder,
                "message": f"QUEUE_EXECUTING on {device} not granted: {p.message}"}

    async def handle_resolve_request(self, pvs: tuple[str, ...]) -> dict[str, Any]:
        """Answer one resolve request of the worker hook: which registered devices ``pvs`` are.

        The map is the registry's (``Registry:DevicePVs`` and ``Registry:Devices``, read now:
        :class:`pvdb.devicemap.DeviceMap`). PVs of no registered device follow the policy's
        ``fields.unregistered`` for this IOC's account (the queue's writer).

        Returns ``{"granted", "coordinated", "planUid", "owner", "message", "code", "holder",
        "devices": {device: [pv, ...]}, "unregistered": [pv, ...]}``; ``granted`` False with
        ``code`` ``not-ready`` (the registry did not answer or is inconsistent: the hook fails
        closed) or ``not-allowed`` (an unregistered PV the policy does not let the queue write).
        """
        base: dict[str, Any] = {"granted": False, "coordinated": True, "planUid": "",
                                "owner": self.account, "code": "", "holder": "", "devices": {},
                                "unregistered": []}
        registry = REGISTRY_DEVICE_PVS.name(self.registry_prefix)
        try:
            dmap = await self._registry_client().device_map()
        except (CoordError, DeviceMapError) as e:
            self._set_resolve_health(f"worker-hook PV lookups fail: {registry}: {e}")
            return {**base, "code": ErrorCode.NOT_READY,
                    "message": f"cannot tell which devices {len(pvs)} PV(s) belong to "
                               f"({registry}: {e}): refusing (fail closed)"}
        self._set_resolve_health("")
        devices, unregistered = dmap.group(pvs)
        reply = {**base, "devices": devices, "unregistered": unregistered}
        if unregistered:
            why = self.policy.unregistered_refusal(self.account, host_roles(self.account))
            if why:
                shown = ", ".join(unregistered[:3]) + (" ..." if len(unregistered) > 3 else "")
                return {**reply, "code": ErrorCode.NOT_ALLOWED,
                        "message": f"{shown}: {why} (the queue writes as {self.account})"}
        return {**reply, "granted": True,
                "message": f"{len(pvs)} PV(s): devices {sorted(devices) or 'none'}, "
                           f"{len(unregistered)} unregistered"}

    def _set_resolve_health(self, why: str) -> None:
        if self.resolve_health != why:
            self.resolve_health = why
            self._locks_changed()

    def _hook_channel_ok(self) -> None:
        if self.hook_health:
            self.hook_health = ""
            self._locks_changed()

    def _hook_channel_down(self, why: str) -> None:
        if self.hook_health != why:
            self.hook_health = why
            self._locks_changed()

    async def _answer_hook_message(self, r, raw: bytes | str) -> None:
        """Validate one message of the request list; answer it (a bad one with its code)."""
        try:
            req = qn.parse_hook_request(raw)
        except qn.HookRequestError as e:
            self.bad_hook_requests += 1
            now = time.monotonic()
            if now - self._bad_hook_logged >= 1.0:  # at most one line a second, with the count
                self._bad_hook_logged = now
                log.warning("malformed worker-hook request (%d so far): %s; message %r",
                            self.bad_hook_requests, e, raw[:120])
            if e.request_id is None:
                return  # no valid id: there is no reply key to answer on
            reply = {"granted": False, "coordinated": True, "planUid": "", "owner": self.account,
                     "error": e.code, "message": f"malformed worker-hook request: {e}"}
            rid = e.request_id
        else:
            rid = req.id
            if req.pending:
                if not await r.exists(qn.hook_pending_key(self.prefix, rid)):
                    return  # the hook's wait ran out (its key's time to live, on redis's clock)
            elif time.time() - req.time > HOOK_REQUEST_MAX_AGE:
                return  # an older hook: it gave up on it long ago (by the two wall clocks)
            try:
                if req.pvs:
                    reply = await self.handle_resolve_request(req.pvs)
                else:
                    reply = await self.handle_hook_request(
                        {"id": req.id, "device": req.device, "time": req.time,
                         **({"refusing": req.refusing} if req.refusing is not None else {})})
            except Exception as e:
                log.exception("worker-hook request failed")
                reply = {"granted": False, "coordinated": True,
                         "message": f"queue IOC error: {type(e).__name__}: {e}"}
        rkey = qn.hook_reply_key(self.prefix, rid)
        try:
            async with r.pipeline(transaction=True) as pipe:
                pipe.lpush(rkey, json.dumps(reply))
                pipe.expire(rkey, HOOK_REPLY_TTL)
                pipe.delete(qn.hook_pending_key(self.prefix, rid))
                await pipe.execute()
        except Exception as e:
            log.warning("cannot answer worker-hook request %s: %s", rid, e)

    def _registry_client(self) -> AsyncCaller:
        """The registry client of the PV lookups (made on first use)."""
        if self._registry is None:
            self._registry = AsyncCaller(self.registry_prefix, conf=self.client_conf, timeout=3.0)
        return self._registry

    async def _warm_registry(self) -> None:
        """Search and connect the registry's PVs now (a failure is only logged).

        So the first plan's PV lookup does not pay for the search inside the hook's wait
        (``PVCOORD_HOOK_TIMEOUT``).
        """
        try:
            await self._registry_client().device_map()
        except Exception as e:  # the lookup itself says it again when a plan asks
            log.info("registry not reachable yet for the worker hook's PV lookups: %s", e)

    async def serve_hook_requests(self, stop: asyncio.Event) -> None:
        """Answer worker-hook requests on ``redis_url`` until ``stop`` is set (see 0023)."""
        import redis.asyncio as aioredis  # only with --redis

        assert self.redis_url is not None
        r = aioredis.Redis.from_url(self.redis_url, socket_timeout=5.0)
        key = qn.hook_request_key(self.prefix)
        warm = asyncio.create_task(self._warm_registry(), name="warm-registry")
        try:
            while not stop.is_set():
                try:
                    got = await r.brpop([key], timeout=1)
                except Exception as e:  # redis down: retry, say it in the log
                    why = f"worker-hook channel {qn.redact_url(self.redis_url)}: {e}"
                    log.warning("%s", why)
                    self._hook_channel_down(why)
                    await asyncio.sleep(1.0)
                    continue
                self._hook_channel_ok()
                if not got:
                    continue
                try:
                    await self._answer_hook_message(r, got[1])
                except Exception:  # one message never stops the hook server
                    log.exception("worker-hook request not answered")
        finally:
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm  # before the registry client it uses is closed
            await r.aclose()
            if self._registry is not None:
                self._registry.close()
                self._registry = None

    # --- control --------------------------------------------------------------------------------

    def _allow(self, caller: Caller, rpc: str) -> None:
        """Refuse ``caller`` unless ``queue_control`` names it (from its host).

        For an on-behalf-of call the caller is the user (from its ``clientHost``), not the
        service.
        """
        if not self.policy.may_control_queue(caller.account, caller.roles, caller.host):
            allowed = ", ".join(self.policy.access.queue_control) or "nobody"
            raise BadRequestError(
                f"{rpc}: account {caller.account!r} may not control the queue (policy "
                f"queue_control: {allowed}); nothing was changed", ErrorCode.NOT_ALLOWED,
            )

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return await self.link.call(method, *args, **kwargs)
        except ManagerUnreachableError as e:
            raise ControlError(f"{method} not done: {e}", ErrorCode.MANAGER_UNAVAILABLE) from None
        except ManagerError as e:
            raise ControlError(f"RE Manager refused {method}: {e}") from None

    def _simple(self, spec, method: str, done: str):
        async def fn(caller: Caller, args: dict[str, str]):
            self._allow(caller, spec.suffix)
            model.check_args(args, spec.args, spec.suffix)
            await self._call(method)
            log.info("%s by %s", method, _who(caller))
            return done, ""
        return fn

    async def _queue_start(self, caller: Caller, args: dict[str, str]):
        spec = qn.QUEUE_START
        self._allow(caller, spec.suffix)
        model.check_args(args, spec.args, spec.suffix)
        items = (await self._call("queue_get", reload=True)).get("items") or []
        item = items[0] if items else None
        if item is not None and self.keeper is not None:
            try:  # a MAINTENANCE taken just now must count (the monitor's table may lag)
                await self.keeper.refresh()
            except CoordError as e:  # the monitor's view then; the hook still checks each set
                log.warning("queue start: cannot read the current locks (%s)", e)
        blocking = (
            self.keeper.item_blockers(self.item_devices(item))
            if item is not None and self.keeper is not None else []
        )
        if item is not None and blocking and self.keeper is not None:
            # ask for the item's locks anyway: the coordination IOC refuses and audits it
            # (Coord:Events shows who was refused and why), and the reason is shown here too
            uid = str(item.get("item_uid", ""))
            devs = [d for d in self.item_devices(item) if d in (self.keeper.coordinated or ())]
            refusal = await self.keeper.try_executing(
                devs, uid, f"queue: start of {item.get('name')} requested by {_who(caller)}")
            if refusal is not None:
                reason = (
                    f"queue not started: the next item {item.get('name')} ({uid}) needs a device "
                    f"held at higher priority: {'; '.join(b.describe() for b in blocking)}"
                )
                log.warning("%s (coordination IOC: %s)", reason, refusal)
                self.pvs.set(qn.STOP_REASON, reason)
                raise ControlError(reason, ErrorCode.HOLDER_CONFLICT, blocking[0].holder)
        await self._call("queue_start")
        log.info("queue_start by %s", _who(caller))
        return "queue started", ""

    async def _re_pause(self, caller: Caller, args: dict[str, str]):
        self._allow(caller, qn.RE_PAUSE.suffix)
        option = model.parse_pause(args)
        await self._call("re_pause", option)
        return f"pause ({option}) requested", ""

    async def _item_add(self, caller: Caller, args: dict[str, str]):
        self._allow(caller, qn.ITEM_ADD.suffix)
        new = model.parse_item_add(args, self.plans_allowed or None)
        # the item's user: the caller, or the user a trusted service acts for
        kwargs: dict[str, Any] = {"user": caller.account, "user_group": self.user_group}
        if new.pos is not None:
            kwargs["pos"] = new.pos
        reply = await self._call("item_add", new.item, **kwargs)
        uid = str((reply.get("item") or {}).get("item_uid", ""))
        log.info("item_add %s by %s -> %s", new.item.get("name"), _who(caller), uid)
        return f"added {new.item['name']} ({uid}); queue size {reply.get('qsize')}", uid

    async def _item_remove(self, caller: Caller, args: dict[str, str]):
        self._allow(caller, qn.ITEM_REMOVE.suffix)
        which = model.parse_item_remove(args)
        reply = await self._call("item_remove", **which)
        uid = str((reply.get("item") or {}).get("item_uid", ""))
        log.info("item_remove %s by %s", which, _who(caller))
        return f"removed {(reply.get('item') or {}).get('name', 'item')} ({uid})", uid

    async def _item_move(self, caller: Caller, args: dict[str, str]):
        self._allow(caller, qn.ITEM_MOVE.suffix)
        which = model.parse_item_move(args)
        reply = await self._call("item_move", **which)
        item = reply.get("item") or {}
        uid = str(item.get("item_uid", ""))
        log.info("item_move %s by %s", which, _who(caller))
        return f"moved {item.get('name', 'item')} ({uid}); queue size {reply.get('qsize')}", uid

    def _handlers(self):
        return {
            qn.QUEUE_START: self._queue_start,
            qn.QUEUE_STOP: self._simple(qn.QUEUE_STOP, "queue_stop", "queue stop requested"),
            qn.QUEUE_STOP_CANCEL: self._simple(
                qn.QUEUE_STOP_CANCEL, "queue_stop_cancel", "queue stop cancelled"),
            qn.RE_PAUSE: self._re_pause,
            qn.RE_RESUME: self._simple(qn.RE_RESUME, "re_resume", "resume requested"),
            qn.RE_STOP: self._simple(qn.RE_STOP, "re_stop", "stop requested"),
            qn.RE_ABORT: self._simple(qn.RE_ABORT, "re_abort", "abort requested"),
            qn.RE_HALT: self._simple(qn.RE_HALT, "re_halt", "halt requested"),
            qn.ENVIRONMENT_OPEN: self._simple(
                qn.ENVIRONMENT_OPEN, "environment_open", "environment opening"),
            qn.ENVIRONMENT_CLOSE: self._simple(
                qn.ENVIRONMENT_CLOSE, "environment_close", "environment closing"),
            qn.ITEM_ADD: self._item_add,
            qn.ITEM_REMOVE: self._item_remove,
            qn.ITEM_MOVE: self._item_move,
        }

    # --- periodic -------------------------------------------------------------------------------

    async def _ticker(self, stop: asyncio.Event) -> None:
        next_beat = time.monotonic() + 1.0
        while not stop.is_set():
            # every 0.1 s, and just after the moment the manager becomes unreachable, so INVALID
            # is posted UNREACHABLE_AFTER (not up to one tick later) after the last message
            left = self.link.contact.last() + qn.UNREACHABLE_AFTER - time.monotonic()
            wait = min(0.1, left + 0.002) if left > 0 else 0.1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            try:
                self._update_connection()
                self._post_console()
                if time.monotonic() >= next_beat:
                    next_beat += 1.0
                    self._heartbeat += 1
                    self.pvs.set(qn.HEARTBEAT, self._heartbeat)
            except Exception:  # keep ticking
                log.exception("tick failed")

    async def run(self, stop: asyncio.Event) -> None:
        """Run the manager link, lock keeper, hook server and ticker until ``stop`` is set."""
        tasks = [
            asyncio.create_task(self.link.run(stop), name="link"),
            asyncio.create_task(self._ticker(stop), name="ticker"),
            asyncio.create_task(self._fetcher(stop), name="fetcher"),
        ]
        if self.keeper is not None:
            tasks.append(asyncio.create_task(self.keeper.run(stop), name="locks"))
        if self.redis_url is not None:
            tasks.append(asyncio.create_task(self.serve_hook_requests(stop), name="hook"))
        try:
            await stop.wait()
        finally:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for t, res in zip(tasks, results, strict=True):
                if isinstance(res, Exception):
                    log.error("%s ended with %r", t.get_name(), res)


async def serve(
    prefix: str,
    zmq_control: str,
    zmq_info: str,
    stop: asyncio.Event,
    policy: Policy | None = None,
    locks: bool = True,
    redis_url: str | None = None,
    server_conf: Mapping[str, str] | None = None,
    client_conf: Mapping[str, str] | None = None,
    ready: Callable[[QueueIOC], None] | None = None,
    coord_prefix: str | None = None,
    exec_lease: float = 60.0,
    queued_lease: float = 600.0,
    lock_owner: str | None = None,
    registry_prefix: str | None = None,
) -> QueueIOC:
    """Serve the queue PVs until ``stop`` is set; returns the IOC object (for tests).

    Args:
        prefix: endstation prefix.
        zmq_control: RE Manager control address (``tcp://HOST:PORT``).
        zmq_info: RE Manager info (publish) address.
        stop: set it to shut down (held locks are released first).
        policy: control permissions (default: the built-in policy).
        locks: take automatic locks through the coordination IOC under ``coord_prefix``.
        redis_url: serve worker-hook lock requests from this redis (``None``: none).
        server_conf: p4p server configuration (``None``: from the environment).
        client_conf: p4p client configuration for the coordination IOC.
        ready: called with the running IOC once its PVs are served (``ioc.server_conf`` is the
            server's client configuration); every IOC's ``serve`` has this form.
        coord_prefix: prefix of the coordination IOC (default: ``prefix``).
        exec_lease: QUEUE_EXECUTING lease in s.
        queued_lease: QUEUE_QUEUED lease in s.
        lock_owner: hold the locks on behalf of this user (see :class:`QueueIOC`).
        registry_prefix: prefix of the registry IOC (default: ``coord_prefix``, else ``prefix``).
    """
    ioc = QueueIOC(
        prefix, zmq_control, zmq_info, policy or Policy(), locks=locks, client_conf=client_conf,
        coord_prefix=coord_prefix, redis_url=redis_url, exec_lease=exec_lease,
        queued_lease=queued_lease, lock_owner=lock_owner, registry_prefix=registry_prefix,
    )
    server_kws: dict[str, Any] = (
        {"conf": dict(server_conf), "useenv": False} if server_conf is not None else {}
    )
    with Server(providers=[ioc.provider], **server_kws) as server:
        ioc.server_conf = server.conf()
        log.info("queue IOC serving %sQueue:* for RE Manager %s", prefix, zmq_control)
        if ready is not None:
            ready(ioc)
        await ioc.run(stop)
    return ioc
