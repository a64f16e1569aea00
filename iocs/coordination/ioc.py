"""The p4p boundary of the coordination IOC: SharedPVs, RPC handlers, publishing.

Everything untyped (p4p ``Value``, ``ServerOperation``) stays in this module; the lock model is
:mod:`iocs.coordination.locktable`.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
from p4p import Type, Value
from p4p.client.thread import Context
from p4p.nt import NTEnum, NTScalar, NTTable
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from pvcoord.store import StoreError
from pvdb import names as pvn
from pvdb.lockmodel import CallerError, resolve_caller
from pvdb.models import BEAMLINE, Lock, LockEvent
from pvdb.policy import ANONYMOUS, HostRolesCache, host_roles
from pvdb.redact import redact

from .. import pvutil
from . import args as rpcargs
from .locktable import Identity, LockError, LockTable

log = logging.getLogger(__name__)

TICK = 0.05
"""Seconds between expiry checks (expiry is published within this plus one post)."""
NAME_CHECK_TIMEOUT = 0.3
"""Seconds the IOC looks for another server of its ``Coord:Authority`` before it serves (a GET
from a fresh context answers in about 15 ms on loopback; the look runs while the PVs are built)."""
REMAINING_SLICES = round(1 / TICK)
"""Ticks over which the devices' ``Remaining`` posts of one second are spread."""
LOCKS_INTERVAL = 0.05
"""Least seconds between two ``Coord:Locks`` posts while changes stream in (at most 20 posts a
second: the table's build grows with its rows, about 1 ms of CPU at 1,000; decision 0165)."""
LOCKS_SETTLE = 0.002
"""Seconds after a change, when the table was not posted for ``LOCKS_INTERVAL``, before it is
posted (the change's reply goes out first)."""
_LOCK_ROW_FIELDS = tuple(name for name, _ in pvn.LOCKS_COLUMNS)
_SEQ_FIELDS = list(pvn.LOCK_SEQ_FIELDS)
_NUMERIC = {"i": np.int32, "d": np.float64}
_ARRAY_CODES = {"i": "i", "d": "d"}
"""``array`` type codes of the numeric ``Coord:Locks`` columns (C int32 and double)."""
_DEVICE_FIELDS = ("state", "owner", "reason", "expires", "remaining")
"""The per-device PVs posted on a change, in order (keys of ``_device_pvs[device]``)."""
_FREE_VALUES = (0, "", "", 0.0, 0.0)
"""Their values for a free device."""


@functools.cache
def _nt_scalar(code: str, display: bool) -> NTScalar:
    """One NTScalar per (type code, display): building its Type is the costly part of a PV."""
    return NTScalar(code, display=display)


class AuthorityClashError(RuntimeError):
    """Another coordination IOC already serves this prefix; ``str(e)`` names it."""


class PrefixClaim:
    """This host's claim on a prefix, held for the life of the process.

    A listening abstract Unix socket named after the prefix and the PVA search port: the kernel
    frees it with the process (``kill -9`` included); a stopped process still holds it.

    The PVA name check (:func:`check_no_other_authority`) asks the network and gets no answer
    from an IOC that is stopped (SIGSTOP, a debugger) or too busy to answer within its timeout; a
    second IOC on that prefix then started. This claim does not depend on an answer. It covers
    IOCs on one host (one network namespace); the name check covers the others. A connection
    to the socket reads the holder's :func:`pvcoord.store.authority_text`.

    Raises:
        AuthorityClashError: another process on this host holds the claim (named by its text,
            or by its pid from ``/proc`` when it does not answer).
    """

    def __init__(self, prefix: str, port: str, who: str) -> None:
        digest = hashlib.sha256(prefix.encode()).hexdigest()[:32]  # any prefix fits the name
        self.name = f"\0pvcoord-coordination/{port}/{digest}".encode()
        self.who = who.encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.name)
        except OSError:
            self._sock.close()
            raise AuthorityClashError(
                f"another coordination IOC already serves {prefix}Coord:* on this host (PVA "
                f"search port {port}): {self._first()}; stop it first: one authority per "
                "prefix") from None
        self._sock.listen(8)
        threading.Thread(target=self._answer, name="pvcoord-prefix-claim", daemon=True).start()

    def _answer(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(1.0)
                    conn.sendall(self.who)
                except OSError:
                    pass

    def _first(self) -> str:
        """The holder's text, or its pid (from /proc) when it does not answer within 1 s."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(self.name)
                text = s.recv(512).decode("utf-8", "replace").strip()
                if text:
                    return text
            except OSError:
                pass
        pid = _abstract_socket_owner(self.name)
        return f"pid {pid if pid is not None else 'unknown'} (it does not answer: stopped?)"

    def close(self) -> None:
        """Give the claim up."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _abstract_socket_owner(name: bytes) -> int | None:
    """The pid holding the listening abstract Unix socket ``name`` (``/proc``), or None."""
    shown = "@" + name[1:].decode()
    try:
        with open("/proc/net/unix") as f:
            inodes = {parts[6] for line in f if len(parts := line.split()) >= 8
                      and parts[7] == shown}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return int(pid)
            except OSError:
                continue
    except OSError:
        return None
    return None


def search_port(conf: dict[str, str] | None = None) -> str:
    """The PVA search (broadcast) port a server with ``conf`` (``None``: the environment) uses."""
    src = conf if conf is not None else os.environ
    return (src.get("EPICS_PVAS_BROADCAST_PORT") or src.get("EPICS_PVA_BROADCAST_PORT")
            or "5076")


def check_no_other_authority(prefix: str, client_conf: dict[str, str] | None,
                             timeout: float = NAME_CHECK_TIMEOUT) -> None:
    """Refuse to start if some server already answers ``P Coord:Authority`` (or ``Heartbeat``).

    Raises:
        AuthorityClashError: naming the running IOC (its ``Coord:Authority`` text).
    """
    kws = {"conf": client_conf, "useenv": False} if client_conf is not None else {}
    with Context("pva", nt=False, **kws) as c:
        names = [pvn.COORD_AUTHORITY.name(prefix), pvn.COORD_HEARTBEAT.name(prefix)]
        # p4p is untyped: a list of names gives a list of a Value or an Exception per name
        got = cast(list[Value | Exception], c.get(names, timeout=timeout, throw=False))
    for name, v in zip(names, got, strict=True):
        if not isinstance(v, Exception):
            who = str(v["value"]) if name.endswith("Authority") else "an older IOC without it"
            raise AuthorityClashError(
                f"another coordination IOC already serves {prefix}Coord:* ({name} answers: "
                f"{who}); stop it first: one authority per prefix")


ACQUIRE_RESULT = Type(
    [("granted", "?"), ("key", "s"), ("devices", "as"), ("preempted", "as"), ("expires", "d"),
     ("message", "s")],
    id="pvcoord:AcquireResult:1.0",
)
RELEASE_RESULT = Type([("devices", "as"), ("message", "s")], id="pvcoord:ReleaseResult:1.0")
RENEW_RESULT = Type(
    [("devices", "as"), ("expires", "d"), ("message", "s")], id="pvcoord:RenewResult:1.0"
)


roles_of = host_roles
"""OS groups of an account on this host (empty if it does not exist here): for stored locks."""


def _event_row(e: LockEvent) -> tuple:
    """One ``Coord:Events`` row (``pvdb.names.EVENTS_COLUMNS`` order) of ``e``."""
    return (e.time, e.action.value, e.device, e.lock_type.value if e.lock_type else "",
            e.actor, e.holder, e.message)


class CoordinationIOC:
    """All PVs of the coordination IOC for one prefix, served by ``self.provider``.

    Args:
        prefix: endstation prefix ``P`` (with trailing ``:``).
        table: the lock table (its listener is set to this IOC's publisher).
        events_tail: rows in ``Coord:Events``.
        authority: who this IOC is (``pid ... on HOST for P since ...``), served as
            ``Coord:Authority`` so a second IOC on the prefix can name it.
    """

    def __init__(
        self, prefix: str, table: LockTable, events_tail: int = 50, authority: str = ""
    ) -> None:
        self.prefix = pvn.check_prefix(prefix)
        self.table = table
        self.provider = StaticProvider("pvcoord-coordination")
        pvutil.add_process_info(self.provider, self.prefix, "coordination")
        # the rows of Coord:Events (EVENTS_COLUMNS order), each built once when its event comes
        self._event_rows: deque[tuple] = deque(maxlen=events_tail)
        self._events_dirty = False
        self._device_pvs: dict[str, dict[str, SharedPV]] = {}
        self._device_order: list[str] = []
        self._ticks = 0
        self._last_posted: dict[tuple[str, str], object] = {}
        self._heartbeat = 0
        self._health = ""
        # Coord:Locks as columns, kept sorted by device and changed row by row (under the mutex):
        # lists of str and array.array of numbers (an insert or delete is a memmove, where
        # numpy's costs tens of microseconds), copied into numpy arrays when posted
        self._lock_devs: list[str] = []
        self._lock_cols: dict[str, list | array.array] = {
            f: (array.array(_ARRAY_CODES[code]) if code in _ARRAY_CODES else [])
            for f, code in pvn.LOCKS_COLUMNS}
        self._locks_version = 0
        """Number of the last lock change (``seq`` of ``Coord:LockChanges``)."""
        self.epoch = time.time_ns() // 1000
        """This run's ``epoch`` (start, microseconds since 1970): names the ``seq`` numbering."""
        self._roles = HostRolesCache()
        self._post_lock = threading.Lock()
        self._posted = 0
        self._kick = threading.Event()
        self._closing = threading.Event()
        self._publisher: threading.Thread | None = None
        self.server_conf: dict[str, str] = {}
        """The p4p server's configuration once serving (what a client needs to reach it)."""

        now = time.time()
        self._locks_nt = NTTable(pvn.LOCKS_COLUMNS, extra=_SEQ_FIELDS)
        self._changes_nt = NTTable(pvn.LOCK_CHANGES_COLUMNS, extra=_SEQ_FIELDS)
        self._events_nt = NTTable(pvn.EVENTS_COLUMNS)
        self.pv_locks = self._add(pvn.COORD_LOCKS, pvutil.read_only_pv(
            initial=self._seq_value(pvutil.table_value(
                self._locks_nt, pvn.LOCKS_COLUMNS, [], now), 0)))
        self.pv_changes = self._add(pvn.COORD_LOCK_CHANGES, pvutil.read_only_pv(
            initial=self._seq_value(pvutil.table_value(
                self._changes_nt, pvn.LOCK_CHANGES_COLUMNS, [], now), 0)))
        self.pv_events = self._add(pvn.COORD_EVENTS, pvutil.read_only_pv(
            initial=pvutil.table_value(self._events_nt, pvn.EVENTS_COLUMNS, [], now)))
        self.pv_last_event = self._add(pvn.COORD_LAST_EVENT, self._scalar("s", ""))
        self.pv_lock_count = self._add(pvn.COORD_LOCK_COUNT, self._scalar("i", 0))
        self.pv_heartbeat = self._add(pvn.COORD_HEARTBEAT, self._scalar("i", 0))
        self.pv_health = self._add(pvn.COORD_HEALTH, self._scalar("s", "starting"))
        self.pv_devices = self._add(pvn.COORD_DEVICES, self._scalar("as", [BEAMLINE]))
        self.authority = authority
        self.pv_authority = self._add(pvn.COORD_AUTHORITY, self._scalar("s", authority))
        for spec, fn in (
            (pvn.COORD_ACQUIRE, self._acquire), (pvn.COORD_RELEASE, self._release),
            (pvn.COORD_RENEW, self._renew), (pvn.COORD_FORCE_RELEASE, self._force_release),
        ):
            self._add(spec, SharedPV(handler=_rpc_handler(self, spec, fn),
                                     initial=NTScalar("s").wrap("", timestamp=now)))
        self._add_device(BEAMLINE)
        tail = table.store.recent_events(events_tail)
        self._event_rows.extend(map(_event_row, tail))
        self._events_dirty = True
        stored = set(tail)  # the start's rejections and expiries, once committed, are in it
        table.listener = self._on_change
        if table.devices is not None:
            self.set_devices(table.devices)
        with table.mutex:
            self._on_change(set(self._device_pvs) | {lk.device for lk in table.locks()},
                            [e for e in table.startup_events if e not in stored])
        self.wait_published()
        self._publisher = threading.Thread(target=self._publish_loop, daemon=True,
                                           name="pvcoord-locks-publisher")
        self._publisher.start()

    def close(self) -> None:
        """Stop the ``Coord:Locks`` publisher thread (after posting what it had pending)."""
        self._closing.set()
        self._kick.set()
        if self._publisher is not None:
            self._publisher.join(timeout=2)
            self._publisher = None
        self.wait_published()

    # --- construction helpers ---------------------------------------------------------------

    def _add(self, spec: pvn.PVSpec, pv: SharedPV, device: str | None = None) -> SharedPV:
        self.provider.add(spec.name(self.prefix, device=device), pv)
        return pv

    @staticmethod
    def _scalar(code: str, initial: object, units: str = "") -> SharedPV:
        """A scalar PV posted with prebuilt Values (:meth:`_post`)."""
        nt = _nt_scalar(code, bool(units))
        v = nt.wrap(initial, timestamp=time.time())
        if units:
            v["display.units"] = units
        return pvutil.read_only_pv(nt=nt, wrap=pvutil.prebuilt, initial=v)

    @staticmethod
    def _post(pv: SharedPV, value: object, ts: float) -> None:
        """Post ``value`` (an NTEnum's ``{"index": i}``) with time stamp ``ts``.

        For the PVs of :meth:`_scalar` and the devices' states: one Value built in one call.
        """
        nt = cast(NTScalar | NTEnum, pv.nt)  # every PV posted here was made with an nt
        pv.post(pvutil.stamped(nt.type, {"value": value}, ts))

    def _add_device(self, device: str) -> None:
        if device in self._device_pvs:
            return
        now = time.time()
        enum = NTEnum()
        state = pvutil.read_only_pv(nt=enum, wrap=pvutil.prebuilt, initial=enum.wrap(
            {"index": 0, "choices": list(pvn.DEVICE_STATES)}, timestamp=now))
        pvs = {
            "state": self._add(pvn.COORD_DEVICE_STATE, state, device),
            "owner": self._add(pvn.COORD_DEVICE_OWNER, self._scalar("s", ""), device),
            "reason": self._add(pvn.COORD_DEVICE_REASON, self._scalar("s", ""), device),
            "remaining": self._add(
                pvn.COORD_DEVICE_REMAINING, self._scalar("d", 0.0, units="s"), device),
            "expires": self._add(
                pvn.COORD_DEVICE_EXPIRES, self._scalar("d", 0.0, units="s"), device),
        }
        self._device_pvs[device] = pvs
        self._device_order.append(device)
        for field, v in zip(_DEVICE_FIELDS, _FREE_VALUES, strict=True):
            self._last_posted[(device, field)] = v  # the initial values: no post needed

    def set_devices(self, devices: Iterable[str]) -> None:
        """Accept locks for ``devices`` (from the registry) and serve their per-device PVs."""
        devices = sorted(set(devices) - {BEAMLINE})
        self.table.set_devices(devices)
        with self.table.mutex:
            for d in devices:
                self._add_device(d)
            self._post(self.pv_devices, [*devices, BEAMLINE], time.time())
        self._on_change(set(devices), [])
        self.wait_published()

    def set_health(self, text: str) -> None:
        """Publish ``Coord:Health`` if it changed."""
        if text != self._health:
            self._health = text
            self._post(self.pv_health, text, time.time())
            log.info("health: %s", text)

    # --- publishing ---------------------------------------------------------------------------

    def _post_if_changed(self, device: str, field: str, value: object, ts: float) -> None:
        key = (device, field)
        if self._last_posted.get(key) == value:
            return
        self._last_posted[key] = value
        self._post(self._device_pvs[device][field],
                   {"index": value} if field == "state" else value, ts)

    def _post_device(self, device: str, lock: Lock | None, now: float) -> None:
        """Post the per-device PVs of ``device`` whose values differ from the last post.

        (:meth:`_post_if_changed` for the five fields in one loop: it runs on every change.)
        """
        if lock is None:
            vals = _FREE_VALUES
        else:
            vals = (lock.lock_type.state_index, lock.holder, lock.reason, lock.expires,
                    round(self.table.remaining(lock), 1))
        last, pvs, post = self._last_posted, self._device_pvs[device], self._post
        for field, v in zip(_DEVICE_FIELDS, vals, strict=True):
            key = (device, field)
            if last.get(key) == v:
                continue
            last[key] = v
            post(pvs[field], {"index": v} if field == "state" else v, now)

    def _set_row(self, device: str, lock: Lock | None) -> tuple | None:
        """Insert, replace or remove ``device``'s row of the cached ``Coord:Locks`` columns.

        Returns the row as it is now (``()`` when removed), or None if it did not change.
        """
        i = bisect.bisect_left(self._lock_devs, device)
        present = i < len(self._lock_devs) and self._lock_devs[i] == device
        cols = self._lock_cols
        if lock is None:
            if not present:
                return None
            del self._lock_devs[i]
            for col in cols.values():
                del col[i]
            return ()
        row = (lock.device, lock.lock_type.value, lock.priority, lock.holder, lock.acquired,
               lock.expires, lock.reason, lock.plan_uid)
        if present:
            if all(cols[f][i] == v for f, v in zip(_LOCK_ROW_FIELDS, row, strict=True)):
                return None
            for f, v in zip(_LOCK_ROW_FIELDS, row, strict=True):
                cols[f][i] = v
        else:
            self._lock_devs.insert(i, device)
            for f, v in zip(_LOCK_ROW_FIELDS, row, strict=True):
                cols[f].insert(i, v)
        return row

    def _seq_value(self, v: Value, seq: int) -> Value:
        v["seq"] = seq
        v["epoch"] = self.epoch
        return v

    def _post_changes(self, rows: dict[str, tuple], now: float) -> None:
        """Post change ``_locks_version`` as ``Coord:LockChanges``.

        Called under the table mutex, so changes go out in ``seq`` order.
        """
        empty = ("", "", 0, "", 0.0, 0.0, "", "")
        out = [(*(r or (d, *empty[1:])), bool(r)) for d, r in sorted(rows.items())]
        self.pv_changes.post(self._seq_value(pvutil.table_value(
            self._changes_nt, pvn.LOCK_CHANGES_COLUMNS, out, now), self._locks_version))

    def post_locks(self) -> int:
        """Post ``Coord:Locks`` and ``Coord:LockCount`` from the cached columns; return the version.

        The columns are copied under the mutex (microseconds), the Value is built and posted
        outside it (numeric columns as numpy arrays: p4p converts those without a Python loop).
        """
        with self.table.mutex:
            version = self._locks_version
            src = self._lock_cols
            cols: dict[str, list | np.ndarray] = {
                f: (np.array(src[f], _NUMERIC[code]) if code in _NUMERIC else list(src[f]))
                for f, code in pvn.LOCKS_COLUMNS}
        now = time.time()
        v = self._locks_nt.type({"labels": list(_LOCK_ROW_FIELDS), "value": cols,
                                 "seq": version, "epoch": self.epoch})
        self.pv_locks.post(pvutil.stamp(v, now))
        self._post(self.pv_lock_count, len(cols["device"]), now)
        return version

    def publish_upto(self, version: int) -> int:
        """Post ``Coord:Locks`` unless a post of ``version`` or later went out; return the latest.

        Posts are serialised, and each takes the newest columns, so an older table never
        replaces a newer one.
        """
        with self._post_lock:
            if self._posted < version:
                self._posted = self.post_locks()
            return self._posted

    def wait_published(self) -> None:
        """Post ``Coord:Locks`` now if it lags behind the last change (outside the table mutex).

        Requests do not call this: their changes reach ``Coord:LockChanges`` before the reply,
        and the publisher thread posts the table (:meth:`_publish_loop`).
        """
        self.publish_upto(self._locks_version)

    def _publish_loop(self) -> None:
        """Post ``Coord:Locks`` after changes (the publisher thread).

        ``LOCKS_SETTLE`` s after the first change, then at most every ``LOCKS_INTERVAL`` s while
        changes keep coming; each post has every change made before it.
        """
        last = 0.0
        while not self._closing.is_set():
            self._kick.wait()
            delay = max(LOCKS_SETTLE, last + LOCKS_INTERVAL - time.monotonic())
            if self._closing.wait(delay):
                return
            self._kick.clear()
            try:
                self.publish_upto(self._locks_version)
            except Exception:  # keep publishing; the next change tries again
                log.exception("posting Coord:Locks failed")
            last = time.monotonic()

    def _on_change(self, devices: set[str], events: list[LockEvent]) -> None:
        """Listener of the lock table (called under its mutex, in order).

        Only what changed is posted: the per-device PVs of ``devices`` whose values differ (all
        devices for a ``beamline`` change), and the changed rows of ``Coord:Locks``.
        """
        now = time.time()
        with self.table.mutex:
            pvs = self._device_pvs
            affected = pvs if BEAMLINE in devices else devices
            for d in sorted(d for d in affected if d in pvs):
                self._post_device(d, self.table.effective(d), now)
            changed = {}
            for d in devices:
                row = self._set_row(d, self.table.get(d))
                if row is not None:
                    changed[d] = row
            if changed:
                self._locks_version += 1
                self._post_changes(changed, now)
                self._kick.set()
            if events:
                self._event_rows.extend(map(_event_row, events))
                self._events_dirty = True
                self._post(self.pv_last_event, events[-1].line(), now)

    def flush_events(self) -> None:
        """Post ``Coord:Events`` if events arrived since the last flush (coalesced).

        Called by the tick only (one thread), so posts stay in order; the table is built and
        posted outside the table mutex, which is held only to copy the rows (a request is not
        kept waiting for the ~0.3 ms of building 50 rows).
        """
        with self.table.mutex:
            if not self._events_dirty:
                return
            self._events_dirty = False
            rows = list(self._event_rows)
        self.pv_events.post(
            pvutil.table_value(self._events_nt, pvn.EVENTS_COLUMNS, rows, time.time()))

    def tick(self, second: bool) -> None:
        """Periodic work: expiry, flushing the store, remaining times; once a second heartbeat."""
        self.table.expire()  # published before the fsync, like a request's change
        self.table.flush()
        self.flush_events()
        if second:
            self.table.check_store()
            self.table.keep_authority()
            self._heartbeat += 1
            self._post(self.pv_heartbeat, self._heartbeat, time.time())
        self._post_remaining()

    def _post_remaining(self) -> None:
        """Post ``Coord:<dev>:Remaining`` of held devices: each device once a second.

        One ``REMAINING_SLICES``-th of the devices per tick, so that with 1,000 locked devices a
        tick holds the table mutex for about 50 posts, not 1,000 once a second (a request
        arriving then would wait ~15 ms).
        """
        k = self._ticks % REMAINING_SLICES
        self._ticks += 1
        now = time.time()
        with self.table.mutex:
            if not self._lock_devs:
                return
            for d in self._device_order[k::REMAINING_SLICES]:
                lk = self.table.effective(d)
                if lk is not None:
                    self._post_if_changed(
                        d, "remaining", round(self.table.remaining(lk), 1), now)

    # --- RPC handlers (called by _RPC, which finishes the operation) -------------------------

    def identity(self, op, args: dict[str, str]) -> Identity:
        """Who asks: the PVA account and peer host, or the user a trusted service names.

        The account is what the client claims (PVA ``ca`` authentication); the host is the peer
        address TCP proves; roles come only from this host's group database for accounts that
        exist here (never from the client), read at most once a second per account
        (:class:`pvdb.policy.HostRolesCache`). onBehalfOf is limited per service by the policy.
        """
        host = (op.peer() or "unknown").rsplit(":", 1)[0]
        try:
            c = resolve_caller(self.table.policy, pvutil.claimed_account(op) or ANONYMOUS, host,
                               args.get("onBehalfOf"), args.get("clientHost"), self._roles)
        except CallerError as e:
            raise LockError(str(e), e.code) from None
        return Identity(c.account, c.host, c.roles, actor=c.actor)

    def _acquire(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.ACQUIRE_ARGS, "Acquire")
        ident = self.identity(op, args)
        res = self.table.acquire(
            ident,
            rpcargs.devices_arg(args.get("device")),
            rpcargs.lock_type_arg(args.get("type")),
            rpcargs.timeout_arg(args.get("timeout")),
            args.get("reason", ""),
            args.get("planUid", ""),
            request_id=args.get(pvn.REQUEST_ID_ARG),
        )
        return ACQUIRE_RESULT({
            "granted": res.granted, "key": res.key, "devices": list(res.devices),
            "preempted": list(res.preempted), "expires": res.expires, "message": res.message,
        })

    def _release(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.RELEASE_ARGS, "Release")
        ident = self.identity(op, args)
        devs = self.table.release(
            ident, rpcargs.devices_arg(args.get("device")), args.get("key") or None,
            request_id=args.get(pvn.REQUEST_ID_ARG))
        return RELEASE_RESULT({"devices": list(devs), "message": f"released {', '.join(devs)}"})

    def _renew(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.RENEW_ARGS, "Renew")
        ident = self.identity(op, args)
        devs, expires = self.table.renew(
            ident, rpcargs.devices_arg(args.get("device")), args.get("key") or None,
            rpcargs.timeout_arg(args.get("timeout")), request_id=args.get(pvn.REQUEST_ID_ARG),
        )
        return RENEW_RESULT({"devices": list(devs), "expires": expires,
                             "message": f"renewed {', '.join(devs)}"})

    def _force_release(self, op, args: dict[str, str]) -> Value:
        rpcargs.check_names(args, pvn.FORCE_RELEASE_ARGS, "ForceRelease")
        ident = self.identity(op, args)
        devs = self.table.force_release(
            ident, rpcargs.devices_arg(args.get("device")), args.get("reason", ""),
            request_id=args.get(pvn.REQUEST_ID_ARG))
        return RELEASE_RESULT({"devices": list(devs),
                               "message": f"force-released {', '.join(devs)}"})


def _rpc_handler(ioc: CoordinationIOC, spec: pvn.PVSpec, fn: Callable[[Any, dict[str, str]], Value]
                 ) -> pvutil.RPC:
    """The handler of one coordination RPC: :class:`iocs.pvutil.RPC`, auditing bad requests."""

    def audit(op: Any, args: dict[str, str], err: Exception) -> None:
        if getattr(err, "audited", False):
            return  # refused by the lock table, which audited it
        ident = Identity(pvutil.claimed_account(op) or "anonymous",
                         (op.peer() or "unknown").rsplit(":", 1)[0])
        devices = [d.strip() for d in args.get("device", "?").split(",")]
        ioc.table.audit_refusal(ident, devices, None, f"{spec.suffix}: {err}",
                                *pvutil.refusal_head(err))

    def call(op: Any, args: dict[str, str]) -> Value:
        result = fn(op, args)  # Coord:LockChanges and the device PVs show the change ...
        ioc.table.durable()  # ... and the store's fsync (shared by requests in flight) is done
        return result

    return pvutil.RPC(spec.suffix, call, (LockError,),
                      "pvcall P Coord:Acquire device=m1 type=MANUAL_OPERATOR", on_refused=audit)


class RegistryFollower:
    """Keeps the IOC's device list equal to ``Registry:Devices`` (monitor over PVA)."""

    def __init__(self, ioc: CoordinationIOC, registry_prefix: str, ctxt: Context) -> None:
        self.ioc = ioc
        self.name = pvn.REGISTRY_DEVICES.name(registry_prefix)
        self.connected = False
        self._sub = ctxt.monitor(self.name, self._update, notify_disconnect=True)

    def _update(self, value) -> None:
        if isinstance(value, Exception):
            self.connected = False
            return
        try:
            names = [str(n) for n in value["value.name"]]
        except Exception:  # a registry of another shape
            log.exception("unexpected %s value", self.name)
            return
        self.connected = True
        self.ioc.set_devices(names)

    def close(self) -> None:
        """Stop monitoring."""
        self._sub.close()


def _prune(table: LockTable, retention: tuple[float, int]) -> None:
    """Apply the audit retention (age, count) to the store; a failure is logged, not fatal."""
    max_age, keep = retention
    try:
        n = table.store.prune_events(time.time() - max_age, keep)
    except StoreError as e:
        log.warning("audit retention: %s", e)
        return
    if n:
        log.info("audit retention: %d events older than %.0f days or beyond %d removed", n,
                 max_age / 86400, keep)


async def serve(
    prefix: str,
    table: LockTable,
    stop: asyncio.Event,
    registry_prefix: str | None = None,
    server_conf: dict[str, str] | None = None,
    client_conf: dict[str, str] | None = None,
    ready: Callable[[CoordinationIOC], None] | None = None,
    events_tail: int = 50,
    authority: str = "",
    name_check: float = NAME_CHECK_TIMEOUT,
    retention: tuple[float, int] = (365 * 86400.0, 1_000_000),
) -> None:
    """Serve the coordination PVs until ``stop`` is set.

    Args:
        prefix: endstation prefix.
        table: the lock table (with policy and store).
        stop: set it to shut down.
        registry_prefix: follow ``Registry:Devices`` under this prefix (``None``: the table's
            static device list is used).
        server_conf: p4p server configuration (``None``: from the environment).
        client_conf: p4p client configuration for the registry monitor (``None``: environment).
        ready: called with the running IOC once its PVs are served (``ioc.server_conf`` is the
            server's client configuration); every IOC's ``serve`` has this form.
        events_tail: rows of ``Coord:Events``.
        retention: audit events kept in the store: (maximum age in s, maximum count); pruned at
            start and every minute.
        authority: this IOC's description for ``Coord:Authority``.
        name_check: seconds to look for another IOC serving the prefix first (0: skip).

    Raises:
        AuthorityClashError: another IOC already serves ``prefix`` (before anything is served).
    """
    clash: list[BaseException] = []

    def look() -> None:
        try:
            check_no_other_authority(prefix, client_conf, name_check)
        except BaseException as e:
            clash.append(e)

    looker = threading.Thread(target=look, name="pvcoord-name-check", daemon=True)
    if name_check > 0:
        looker.start()  # meanwhile the PVs are built
    ioc = CoordinationIOC(prefix, table, events_tail=events_tail, authority=authority)
    if name_check > 0:
        looker.join()
        if clash:
            ioc.close()
            raise clash[0]
    server_kws = {"conf": server_conf, "useenv": False} if server_conf is not None else {}
    client_kws = {"conf": client_conf, "useenv": False} if client_conf is not None else {}
    follower = None
    ctxt = Context("pva", nt=False, **client_kws) if registry_prefix is not None else None
    try:
        with Server(providers=[ioc.provider], **server_kws) as server:
            ioc.server_conf = server.conf()
            if ctxt is not None and registry_prefix is not None:
                follower = RegistryFollower(ioc, registry_prefix, ctxt)
            log.info("coordination IOC serving %sCoord:* (%d locks loaded)", prefix,
                     len(table.locks()))
            if ready is not None:
                ready(ioc)
            ticks = 0
            while not stop.is_set():
                if ticks % int(60 / TICK) == 0:
                    _prune(table, retention)
                ticks += 1
                second = ticks % int(1 / TICK) == 0
                try:
                    ioc.tick(second)
                except Exception:  # keep serving; the health PV shows it
                    log.exception("tick failed")
                if table.authority_error is not None:
                    ioc.set_health(redact(
                        f"lost the store's authority: {table.authority_error}")[:200])
                elif table.store_error is not None:
                    ioc.set_health(redact(f"store failing: {table.store_error}")[:200])
                elif follower is not None and not follower.connected:
                    ioc.set_health(f"registry {follower.name} not connected")
                elif table.devices is None:
                    ioc.set_health("no device list")
                elif table.load_problems:
                    bad = table.rows_rejected
                    ioc.set_health(f"OK ({bad} bad stored row{'s' * (bad > 1)} rejected at "
                                   f"start, see Coord:Events: {table.load_problems[0]})"[:200])
                else:
                    ioc.set_health("OK")
                try:
                    await asyncio.wait_for(stop.wait(), TICK)
                except TimeoutError:
                    pass
    finally:
        if follower is not None:
            follower.close()
        if ctxt is not None:
            ctxt.close()
        ioc.close()
