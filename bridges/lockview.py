"""One follower of the coordination and registry state over PVA, for every front that decides.

:class:`LockView` monitors, with one p4p client context,

* ``P Coord:Locks``, ``P Coord:LockChanges`` and ``P Coord:Heartbeat`` -> a
  :class:`~bridges.guard.decision.LockState` (the table and each change merged in ``seq`` order
  by :class:`~bridges.guard.decision.LockStream`, so a change is seen as soon as its request is
  replied, without the whole table; then :class:`~bridges.guard.decision.LockFeed`: unknown
  until all arrived, stale when the heartbeat stops advancing for ``stale_after`` s, unknown
  when one disconnects, the table cannot be read or a change was missed: fail closed);
* ``R Registry:DevicePVs`` and ``R Registry:Devices`` -> a
  :class:`~bridges.guard.decision.DeviceMap` (unknown until both arrived; an unreadable table
  drops the map; a disconnect keeps the last map, device membership does not go stale), the
  device rows and each device's PV names.

and calls its listeners whenever the lock state (known flag or locks) or the registry changes,
including the moment the heartbeat goes stale (noticed by a ticker thread every ``tick`` s).
The may-write decision itself stays in :func:`bridges.guard.decision.decide`; this module only
gathers its inputs. Used by the CA bridge (``bridges.flat``) and the web bridge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from p4p.client.thread import Context, Disconnected

from pvdb.names import (
    COORD_HEARTBEAT,
    COORD_LOCK_CHANGES,
    COORD_LOCKS,
    LOCK_SEQ_FIELDS,
    REGISTRY_DEVICE_PVS,
    REGISTRY_DEVICES,
)

from .guard.decision import (
    STALE_AFTER,
    DeviceMap,
    LockFeed,
    LockState,
    LockStream,
    parse_lock_changes,
    parse_locks,
)

_log = logging.getLogger(__name__)

TICK = 0.1
"""Seconds between staleness checks of the ticker thread."""
HURRY = 1.0
"""Seconds between prompt searches (p4p ``hurryUp``) while a followed PV is disconnected, so a
restarted IOC is found at once instead of after the client's search back-off."""
CHANGES_QUEUE = 256
"""Depth of the server's queue for the ``Coord:LockChanges`` monitor (pvRequest
``record[queueSize=N]``): changes of a burst are not squashed before this many are waiting."""
RENEW = 3.0
"""Seconds a followed PV may stay disconnected before the client context is replaced by a new
one (observed: a context whose server was killed did not find the restarted IOC on a new port
for over 10 s on loopback, while a new context found it at once)."""


@dataclass(frozen=True)
class DeviceRow:
    """One row of ``Registry:Devices`` (the columns a front shows)."""

    name: str
    device_class: str = ""
    capabilities: str = ""
    pv_prefix: str = ""
    ioc: str = ""
    description: str = ""
    connected: bool = False


@dataclass(frozen=True)
class Snapshot:
    """What a listener gets: the inputs of one decision, consistent with each other.

    Attributes:
        state: the lock state (``known`` False: fail closed).
        devices: PV name -> device map (``known`` False until both registry tables arrived).
        rows: the registered devices, in registry order.
        pvs: device name -> its PV names (from ``Registry:DevicePVs``), in registry order.
    """

    state: LockState
    devices: DeviceMap
    rows: tuple[DeviceRow, ...]
    pvs: Mapping[str, tuple[str, ...]]

    @property
    def device_names(self) -> list[str]:
        """Registered device names, in registry order."""
        return [r.name for r in self.rows]


Listener = Callable[[Snapshot], None]


class LockView:
    """Follows lock, heartbeat and registry PVs; thread-safe; calls listeners on change.

    Construct, add listeners (:attr:`listeners`), :meth:`start`, :meth:`close` at the end.
    Listeners run on p4p's callback thread or the ticker thread, outside the view's lock; a
    failing listener is logged and does not stop the others.

    Args:
        prefix: endstation prefix ``P`` of the coordination IOC (``Coord:...``).
        registry_prefix: prefix of the registry IOC (default ``prefix``).
        conf: p4p client configuration (``EPICS_PVA_*`` keys, used with ``useenv=False``); None:
            this process's environment.
        stale_after: seconds without a heartbeat advance before the lock state is stale.
        tick: seconds between staleness checks (0: no ticker thread; call :meth:`refresh`).
        monotonic: clock for staleness (injectable for unit tests).
    """

    def __init__(
        self,
        prefix: str,
        registry_prefix: str | None = None,
        conf: Mapping[str, str] | None = None,
        stale_after: float = STALE_AFTER,
        tick: float = TICK,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.registry_prefix = registry_prefix or prefix
        self.conf = dict(conf) if conf is not None else None
        self.tick = tick
        self.listeners: list[Listener] = []
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._feed = LockFeed(stale_after)
        self._stream = LockStream()
        self._state = LockState()
        self._devices = DeviceMap()
        self._pv_rows: list[tuple[str, str]] | None = None
        self._rows: list[DeviceRow] | None = None
        self._bad: dict[str, str] = {}
        self._map_key: tuple[Any, ...] | None = None
        self._ctxt: Context | None = None
        self._subs: list[Any] = []
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._down: set[str] = {"locks", "changes", "beat", "pvs", "devices"}
        self._last_hurry = 0.0
        self._down_since: float | None = None
        self._outage_renewals = 0
        self.renewals = 0
        """Client contexts replaced after a long disconnect (for logs and tests)."""
        self._snapshot = Snapshot(self._state, self._devices, (), {})

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the client context and the five monitors; start the ticker thread."""
        if self._ctxt is not None:
            return
        self._open()
        if self.tick > 0:
            self._ticker = threading.Thread(target=self._tick_loop, name="lockview-tick",
                                            daemon=True)
            self._ticker.start()

    def _open(self) -> None:
        if self.conf is not None:
            ctxt = Context("pva", conf=self.conf, useenv=False, nt=False)
        else:
            ctxt = Context("pva", nt=False)
        subs = []
        # a change squashed in the server's queue (4 deep by default) would make the view wait
        # for the next table (fail closed, up to 50 ms): a deeper queue for the changes
        changes_request = f"record[queueSize={CHANGES_QUEUE}]"
        for spec, prefix, cb in (
            (COORD_LOCKS, self.prefix, self._on_locks),
            (COORD_LOCK_CHANGES, self.prefix, self._on_changes),
            (COORD_HEARTBEAT, self.prefix, self._on_beat),
            (REGISTRY_DEVICE_PVS, self.registry_prefix, self._on_device_pvs),
            (REGISTRY_DEVICES, self.registry_prefix, self._on_devices),
        ):
            subs.append(ctxt.monitor(
                spec.name(prefix), self._safe(spec.suffix, cb), notify_disconnect=True,
                request=changes_request if spec is COORD_LOCK_CHANGES else None))
        self._ctxt, self._subs = ctxt, subs

    def _renew(self, quiet: bool = False) -> None:
        """Replace the client context (a followed PV stayed disconnected for RENEW s)."""
        old_ctxt, old_subs = self._ctxt, self._subs
        self.renewals += 1
        (_log.debug if quiet else _log.warning)(
            "%s still disconnected after %.0f s: new client context",
            ", ".join(sorted(self._down)), RENEW)
        self._open()
        for sub in old_subs:
            sub.close()
        if old_ctxt is not None:
            old_ctxt.close()

    def close(self) -> None:
        """Stop the ticker, the monitors and the context (idempotent)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
        for sub in self._subs:
            sub.close()
        self._subs.clear()
        if self._ctxt is not None:
            self._ctxt.close()
            self._ctxt = None

    def __enter__(self) -> LockView:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.refresh()
                self.hurry()
            except Exception:
                _log.exception("lock view refresh failed")

    def hurry(self) -> None:
        """While a followed PV is disconnected, search again promptly.

        A prompt search (``hurryUp``) every HURRY s, and a new client context every RENEW s.
        """
        now = self._monotonic()
        ctxt = self._ctxt
        if not self._down or ctxt is None or self._stop.is_set():
            self._down_since = None
            self._outage_renewals = 0
            return
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= RENEW:
            self._down_since = now
            self._outage_renewals += 1
            self._renew(quiet=self._outage_renewals > 1)
        elif now - self._last_hurry >= HURRY:
            self._last_hurry = now
            ctxt.hurryUp()

    @staticmethod
    def _safe(name: str, cb: Callable[[Any], None]) -> Callable[[Any], None]:
        def safe(v: Any) -> None:
            try:
                cb(v)
            except Exception:
                _log.exception("handling %s update", name)

        return safe

    # --- what fronts read ---------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The current inputs (lock state, device map, rows, PVs), consistent with each other."""
        return self._snapshot

    @property
    def state(self) -> LockState:
        """The current lock state (``known`` False: fail closed)."""
        return self._snapshot.state

    @property
    def devices(self) -> DeviceMap:
        """The current PV -> device map."""
        return self._snapshot.devices

    def registry_problem(self) -> str:
        """'' when both registry tables are known and readable, else what is missing or wrong."""
        with self._lock:
            problems = list(self._bad.values())
            for spec, rows in ((REGISTRY_DEVICE_PVS, self._pv_rows),
                               (REGISTRY_DEVICES, self._rows)):
                full = spec.name(self.registry_prefix)
                if rows is None and full not in self._bad:
                    problems.append(f"{full} not received")
            return "; ".join(problems)

    # --- inputs (p4p callback thread) ---------------------------------------------------------

    def _track(self, which: str, v: Any) -> None:
        if isinstance(v, Disconnected):
            self._down.add(which)
        elif not isinstance(v, Exception):
            self._down.discard(which)

    def _on_locks(self, v: Any) -> None:
        self._on_lock_update("locks", v, parse_locks, self._stream.table)

    def _on_changes(self, v: Any) -> None:
        self._on_lock_update("changes", v, parse_lock_changes, self._stream.change)

    def _on_lock_update(self, which: str, v: Any, parse: Callable[[Any], Any],
                        apply: Callable[[Any, int, int], None]) -> None:
        """A ``Coord:Locks`` (``which`` "locks") or ``Coord:LockChanges`` update or error."""
        self._track(which, v)
        name = "Coord:Locks" if which == "locks" else "Coord:LockChanges"
        if isinstance(v, Exception):
            why = (f"{name} disconnected" if which == "changes" else "") if isinstance(
                v, Disconnected) else f"{name}: {v!r}"
            with self._lock:
                self._stream.reset()  # the IOC may come back as a new run
                self._feed.locks_lost(why)
        else:
            try:
                cols = v["value"]
                rows = parse({k: _column(cols[k]) for k in cols.keys()})
                seq, epoch = (_seq_field(v, f) for f, _ in LOCK_SEQ_FIELDS)
            except (KeyError, ValueError, TypeError) as e:
                what = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                with self._lock:
                    self._stream.reset()
                    self._feed.locks_lost(what if which == "locks" else f"{name} {what}")
            else:
                with self._lock:
                    apply(rows, seq, epoch)
                    locks = self._stream.locks
                    if locks is None:
                        self._feed.locks_waiting(self._stream.why_behind)
                    else:
                        self._feed.locks_update(locks, _stamp(v))
        self.refresh()

    def _on_beat(self, v: Any) -> None:
        self._track("beat", v)
        with self._lock:
            if isinstance(v, Exception):
                self._feed.beat_lost()
            else:
                self._feed.beat(v["value"], self._monotonic())
        self.refresh()

    def _on_device_pvs(self, v: Any) -> None:
        name = REGISTRY_DEVICE_PVS.name(self.registry_prefix)
        self._track("pvs", v)
        if isinstance(v, Exception):
            return  # keep the last map: membership does not go stale like locks do
        try:
            cols = v["value"]
            rows = list(zip((str(x) for x in _column(cols["pv"])),
                            (str(x) for x in _column(cols["device"])), strict=True))
        except (KeyError, ValueError, TypeError) as e:
            self._unreadable(name, e)
            return
        with self._lock:
            self._pv_rows = rows
            self._bad.pop(name, None)
        self._remap()

    def _on_devices(self, v: Any) -> None:
        name = REGISTRY_DEVICES.name(self.registry_prefix)
        self._track("devices", v)
        if isinstance(v, Exception):
            return
        try:
            cols = v["value"]
            names = [str(x) for x in _column(cols["name"])]
            n = len(names)

            def col(key: str, default: Any) -> list[Any]:
                try:
                    c = _column(cols[key])
                except (KeyError, ValueError):
                    return [default] * n
                if len(c) != n:
                    raise ValueError(f"column {key} has {len(c)} rows, name has {n}")
                return c

            prefixes = [str(x) for x in _column(cols["pvPrefix"])]
            if len(prefixes) != n:
                raise ValueError(f"column pvPrefix has {len(prefixes)} rows, name has {n}")
            rows = [
                DeviceRow(nm, str(dc), str(cap), pp, str(ioc), str(desc), bool(conn))
                for nm, dc, cap, pp, ioc, desc, conn in zip(
                    names, col("deviceClass", ""), col("capabilities", ""), prefixes,
                    col("ioc", ""), col("description", ""), col("connected", False),
                    strict=True,
                )
            ]
        except (KeyError, ValueError, TypeError) as e:
            self._unreadable(name, e)
            return
        with self._lock:
            self._rows = rows
            self._bad.pop(name, None)
        self._remap()

    def _unreadable(self, name: str, e: Exception) -> None:
        what = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        _log.error("%s: cannot read the registry table: %s; device writes refused", name, what)
        with self._lock:
            self._bad[name] = f"{name} unreadable ({what})"
        self._remap()

    def _remap(self) -> None:
        why = self.registry_problem()
        with self._lock:
            rows = self._rows or []
            # the map's inputs only: a repost of Registry:Devices for a connectivity flag (or a
            # description) keeps the map object, so followers need not re-decide every channel
            key = (why, tuple(self._pv_rows or ()),
                   tuple((r.name, r.pv_prefix, r.device_class) for r in rows))
            if key != self._map_key:
                self._map_key = key
                self._devices = DeviceMap(known=False, why_unknown=why) if why else DeviceMap(
                    self._pv_rows or [], [(r.name, r.pv_prefix) for r in rows], known=True,
                    classes={r.name: r.device_class for r in rows})
        self.refresh(registry_changed=True)

    # --- change detection ---------------------------------------------------------------------

    def refresh(self, registry_changed: bool = False) -> bool:
        """Recompute the lock state (staleness included); call the listeners if anything changed.

        Called by the ticker thread every ``tick`` s and after each update. Returns whether the
        listeners were called.
        """
        with self._lock:
            new = self._feed.state(self._monotonic())
            old = self._state
            changed = registry_changed or new.known != old.known or new.locks != old.locks
            if not changed and new.why_unknown == old.why_unknown and new.stamp == old.stamp:
                return False
            if new.known != old.known:
                _log.warning("lock state %s",
                             "fresh again" if new.known else f"UNKNOWN: {new.why_unknown}")
            self._state = new
            pvs: dict[str, list[str]] = {}
            for pv, dev in self._pv_rows or []:
                pvs.setdefault(dev, []).append(pv)
            snap = Snapshot(new, self._devices, tuple(self._rows or ()),
                            {d: tuple(p) for d, p in pvs.items()})
            self._snapshot = snap
        if not changed:
            return False
        for cb in list(self.listeners):
            try:
                cb(snap)
            except Exception:
                _log.exception("lock view listener failed")
        return True


def _seq_field(v: Any, name: str) -> int:
    try:
        return int(v[name])
    except KeyError:
        raise ValueError(f"no {name} field (a coordination IOC older than this follower?)"
                         ) from None


def _column(x: Any) -> list[Any]:
    """An NTTable column as a list (p4p gives None for a column that was never set)."""
    return [] if x is None else list(x)


def _stamp(v: Any) -> float:
    try:
        return float(v["timeStamp.secondsPastEpoch"]) + 1e-9 * float(v["timeStamp.nanoseconds"])
    except (KeyError, TypeError):
        return 0.0
