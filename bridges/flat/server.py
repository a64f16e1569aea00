"""The CA bridge process: caproto CA server + p4p PVA server + lock view + upstream mirrors.

:class:`FlatBridge` owns everything and runs on one asyncio loop:

* a caproto asyncio server (:class:`FlatContext`, own CA port) whose circuits take the host from
  the peer address and the user name from the first ``CLIENT_NAME`` only (:class:`FlatCircuit`);
* a :class:`~bridges.lockview.LockView` (lock table, heartbeat, registry); on every change the
  screen PVs are updated and the access rights of every open device channel are recomputed with
  :func:`bridges.guard.decision.decide` and pushed (``ACCESS_RIGHTS``) where they changed;
* one :class:`~bridges.flat.upstream.Mirror` per device PV (p4p asyncio client on the device
  network); CA names of a device that the registry does not list (record fields such as
  ``.DESC``) are mirrored on first search;
* a p4p server for the bridge's own PVs over PVA (``Flat:...``), whose Take/Release puts act for
  the PVA account that wrote them;
* a p4p asyncio client on the service network for ``Coord:Acquire`` / ``Coord:Release`` with
  ``onBehalfOf`` (the bridge's account must be a trusted service in the policy).
"""

from __future__ import annotations

import asyncio
import grp
import logging
import numbers
import os
import pwd
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import caproto as ca
from caproto import AccessRights, AlarmSeverity, AlarmStatus
from caproto.asyncio.server import Context as CaContext
from caproto.asyncio.server import VirtualCircuit
from p4p.client.asyncio import Context as PvaClient
from p4p.client.raw import Context as RawPvaClient
from p4p.nt import NTURI, NTEnum, NTScalar
from p4p.server import Server as PvaServer
from p4p.server import StaticProvider
from p4p.server.asyncio import SharedPV

from pvdb import flat as fl
from pvdb.lockmodel import new_request_id
from pvdb.models import LockType
from pvdb.names import (
    COORD_ACQUIRE,
    COORD_DEVICE_OWNER,
    COORD_DEVICE_REASON,
    COORD_DEVICE_REMAINING,
    COORD_DEVICE_STATE,
    COORD_RELEASE,
    DEVICE_STATES,
    REQUEST_ID_ARG,
)
from pvdb.policy import Policy
from pvdb.process import FLAT_START_TIME, FLAT_VERSION, pvcoord_version

from ..guard.decision import STALE_AFTER, Decision, HeldLock, LockState, decide
from ..lockview import LockView, Snapshot
from . import commands as cmd
from .caput import CA_KEYS, ECA_NORMAL, CaUpstream
from .commands import Code, CommandError
from .entries import (
    READ_ONLY,
    READ_WRITE,
    Command,
    CommandEnum,
    CommandString,
    Proxy,
    ScreenDouble,
    ScreenEnum,
    ScreenInteger,
    ScreenString,
)
from .upstream import Mirror, UnsupportedTypeError, make_entry

_log = logging.getLogger(__name__)
_log_audit = logging.getLogger("bridges.flat.audit")

PUT_TIMEOUT = 300.0
"""Seconds a forwarded put may take upstream (a put-callback waits for the device)."""
RPC_TIMEOUT = 5.0
"""Seconds a Coord:Acquire / Coord:Release call may take."""
MIRROR_GIVE_UP = 5.0
"""Seconds an on-demand mirror (a name the registry does not list) may take to connect."""
MAX_ON_DEMAND = 5000
"""On-demand mirrors kept at most (names of registered devices the registry does not list)."""
HOLD_MAX = 0.02
"""Seconds an update of a PV may wait for the reply of a put in flight to it (decision 0155)."""
MAX_PENDING_COMMANDS = 64
"""Take/Release requests waiting at once; more are refused with ``busy``."""
MAX_DECISIONS = 10000
"""Cached decisions kept at most between two lock/registry changes (then the cache restarts)."""
OWNER_MAX = 39
"""Characters of an owner over CA (DBR_STRING); the full text with ``NAME$``."""


class PutRefusedError(Exception):
    """A forwarded write refused by the lock decision, or failed upstream (text for the client)."""


# --- CA identity -------------------------------------------------------------------------------


class FlatCircuit(VirtualCircuit):
    """A client circuit whose identity is fixed: host = peer IP, user = first CLIENT_NAME.

    ``HOST_NAME`` is recorded (:attr:`claimed_host`) but never used; a ``CLIENT_NAME`` after
    the first one, or after a channel was created, is ignored (logged): a client cannot rename
    itself to a holder on an open circuit.
    """

    def __init__(self, circuit, client, context, **kws) -> None:
        super().__init__(circuit, client, context, **kws)
        self.client_hostname = str(circuit.address[0])
        self.claimed_host: str | None = None

    async def _process_command(self, command):
        if isinstance(command, ca.HostNameRequest):
            self.claimed_host = command.name
            return []
        if isinstance(command, ca.ClientNameRequest):
            if self.client_username is None and not self.circuit.channels:
                self.client_username = command.name
            elif command.name != self.client_username:
                _log.warning("ignored CA rename of %s@%s to %r (identity is fixed at the first "
                             "CLIENT_NAME)", self.client_username, self.client_hostname,
                             command.name)
            return []
        return await super()._process_command(command)


class FlatPVDB(dict):
    """The CA name table; a missing name of a registered device starts an on-demand mirror."""

    def __init__(self, bridge: FlatBridge) -> None:
        super().__init__()
        self.bridge = bridge

    def __missing__(self, key: str):
        self.bridge.on_demand(key)
        raise KeyError(key)


class FlatContext(CaContext):
    """caproto's asyncio server context with :class:`FlatCircuit` circuits."""

    CircuitClass = FlatCircuit


# --- helpers -----------------------------------------------------------------------------------


def roles_of(user: str) -> tuple[str, ...]:
    """OS groups of ``user`` on this host (empty if the account does not exist here)."""
    try:
        pw = pwd.getpwnam(user)
        return tuple(sorted(grp.getgrgid(g).gr_name for g in os.getgrouplist(user, pw.pw_gid)))
    except (KeyError, OSError):
        return ()


def effective_lock(state: LockState, device: str) -> HeldLock | None:
    """The lock that shows on ``device``: the strongest of its own and a beamline lock."""
    held = state.locks_on(device)
    if not held:
        return None

    def prio(lk: HeldLock) -> int:
        try:
            return LockType(lk.lock_type).priority
        except ValueError:
            return 99

    return min(held, key=prio)


def state_label(lock: HeldLock | None) -> str:
    """``Coord:<device>:State`` label for a lock (``Free`` for none)."""
    if lock is None:
        return DEVICE_STATES[0]
    try:
        return LockType(lock.lock_type).state_label
    except ValueError:
        return DEVICE_STATES[0]


@dataclass
class _Twin:
    """One bridge PV on both protocols: a caproto entry and a p4p SharedPV."""

    name: str
    ca: Any
    pva: SharedPV | None
    choices: tuple[str, ...] = ()
    """Enum labels of the PVA side ('' for a scalar PV)."""
    last: Any = None


# --- the bridge --------------------------------------------------------------------------------


class FlatBridge:
    """The CA bridge of one endstation.

    Args:
        prefix: endstation prefix ``P`` (coordination IOC, bridge PVs).
        policy: the endstation policy (the same file as the guard's).
        registry_prefix: prefix of the registry IOC (default ``prefix``).
        upstream_conf: p4p client configuration of the device network (``EPICS_PVA_*``);
            None: this process's environment.
        service_conf: p4p client configuration of the service network (coordination and
            registry IOCs); None: this process's environment.
        pva_conf: p4p server configuration for the bridge's PVA PVs; None: the environment.
        stale_after: seconds without a coordination heartbeat before failing closed.
        put_timeout: seconds a forwarded put may take upstream.
        ca_interfaces: CA server interfaces (default ``EPICS_CAS_INTF_ADDR_LIST``).
    """

    def __init__(
        self,
        prefix: str,
        policy: Policy,
        registry_prefix: str | None = None,
        upstream_conf: Mapping[str, str] | None = None,
        service_conf: Mapping[str, str] | None = None,
        pva_conf: Mapping[str, str] | None = None,
        stale_after: float = STALE_AFTER,
        put_timeout: float = PUT_TIMEOUT,
        ca_interfaces: list[str] | None = None,
    ) -> None:
        self.prefix = prefix
        self.policy = policy
        self.registry_prefix = registry_prefix or prefix
        # EPICS_CA_* keys: the device network's CA, for forwarded puts (decision 0155)
        ca_env = {k: v for k, v in (upstream_conf or {}).items() if k in CA_KEYS}
        pva_up = {k: v for k, v in (upstream_conf or {}).items() if k not in CA_KEYS}
        self.upstream_conf = pva_up if upstream_conf is not None and pva_up else None
        self._ca_up: CaUpstream | None = CaUpstream(ca_env) if ca_env else None
        self.service_conf = dict(service_conf) if service_conf is not None else None
        self.pva_conf = dict(pva_conf) if pva_conf is not None else None
        self.put_timeout = put_timeout
        self.ca_interfaces = ca_interfaces
        self.view = LockView(prefix, self.registry_prefix, self.service_conf, stale_after)
        self.pvdb = FlatPVDB(self)
        self.ca: FlatContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.snap: Snapshot = self.view.snapshot
        self._mirrors: dict[str, Mirror] = {}
        self._on_demand: dict[str, float] = {}  # name -> monotonic time it was started
        self._refused_names: dict[str, float] = {}
        self._twins: dict[str, _Twin] = {}
        self._devices: list[str] = []
        self._roles: dict[str, tuple[str, ...]] = {}
        self._decisions: dict[tuple[str, str, str | None], Decision] = {}
        """Decisions taken on :attr:`snap` (a pure function of it): emptied when it changes."""
        self._put_request: Any = None
        self._push_needed = asyncio.Event()
        self._pending: dict[tuple[str, str, str], asyncio.Future] = {}
        self._beat = 0
        self.pushes = 0
        self.pva_puts = 0
        """Puts forwarded over PVA since start (the ones over CA: ``CaUpstream.puts``)."""
        """Access-rights messages sent since start (for tests and the benchmark)."""
        self._upstream: PvaClient | None = None
        self._service: PvaClient | None = None
        self._pva_server: PvaServer | None = None
        self._provider = StaticProvider("pvcoord-flat")
        self._tasks: list[asyncio.Task] = []
        self.started = time.time()
        """Epoch seconds this bridge was made (served as ``Flat:StartTime``)."""

    # --- running ------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (then close everything); ``ready`` is set once serving."""
        self.loop = asyncio.get_running_loop()
        if self._ca_up is not None:
            self._ca_up.open(self.loop)  # first: it sets the CA environment while libca starts
        self._upstream = self._client(self.upstream_conf)
        self._service = self._client(self.service_conf)
        # with completion (a put-callback waits for the device), parsed once
        self._put_request = PvaClient.makeRequest("field()record[block=true,process=passive]")
        self._make_global_pvs()
        self.ca = FlatContext(self.pvdb, self.ca_interfaces)
        if self.pva_conf is not None:
            self._pva_server = PvaServer(providers=[self._provider], conf=self.pva_conf,
                                         useenv=False)
        else:
            self._pva_server = PvaServer(providers=[self._provider])
        self.view.listeners.append(self._from_thread)
        ca_task = asyncio.create_task(self.ca.run(), name="ca-server")
        self._tasks = [
            ca_task,
            asyncio.create_task(self._push_loop(), name="push-rights"),
            asyncio.create_task(self._every_second(), name="every-second"),
        ]
        self.view.start()
        try:
            await self._wait_port()
            if self._ca_up is not None:
                self._ca_up.own_port = self.ca_port()
            _log.info("CA server on port %s (TCP) of %s; PVA server %s", self.ca.port,
                      self.ca_interfaces or "EPICS_CAS_INTF_ADDR_LIST",
                      self._pva_server.conf())
            if ready is not None:
                ready.set()
            stop_task = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stop_task, ca_task],
                                         return_when=asyncio.FIRST_COMPLETED)
            if ca_task in done and not stop_task.done():
                stop_task.cancel()
                ca_task.result()  # raises what stopped the CA server
        finally:
            await self.close()

    async def _wait_port(self) -> None:
        assert self.ca is not None
        while self.ca.port is None:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop the servers, monitors and clients."""
        self.view.close()
        if self._ca_up is not None:
            self._ca_up.close()
            _log.info("forwarded puts: %d over CA, %d over PVA", self._ca_up.puts,
                      self.pva_puts)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        for m in self._mirrors.values():
            if m.sub is not None:
                m.sub.close()
        if self._pva_server is not None:
            self._pva_server.stop()
            self._pva_server = None
        for c in (self._upstream, self._service):
            if c is not None:
                c.close()

    @staticmethod
    def _client(conf: Mapping[str, str] | None) -> PvaClient:
        if conf is None:
            return PvaClient("pva", nt=False)
        return PvaClient("pva", conf=dict(conf), useenv=False, nt=False)

    def ca_port(self) -> int | None:
        """The CA server's TCP port (None before it is bound)."""
        port = self.ca.port if self.ca is not None else None
        return int(port) if port is not None else None

    # --- lock view -> loop --------------------------------------------------------------------

    def _from_thread(self, snap: Snapshot) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._changed, snap)

    def _changed(self, snap: Snapshot) -> None:
        self.snap = snap
        self._decisions.clear()
        self._push_needed.set()

    async def _push_loop(self) -> None:
        while True:
            await self._push_needed.wait()
            self._push_needed.clear()
            try:
                snap = self.snap
                await self._sync_devices(snap)
                await self.push_rights()
                await self._update_screens(snap)
            except Exception:
                _log.exception("applying a lock/registry change failed")

    async def push_rights(self) -> int:
        """Recompute the rights of every open device channel; send those that changed.

        Returns the number of ACCESS_RIGHTS messages sent.
        """
        if self.ca is None:
            return 0
        sent = 0
        cache: dict[tuple[str, str | None, str | None], AccessRights] = {}
        for vc in list(self.ca.circuits):
            if not vc.connected:
                continue
            batch = []
            for chan in list(vc.circuit.channels.values()):
                try:
                    if chan.states[ca.SERVER] is not ca.CONNECTED:
                        continue
                    entry = self.pvdb.get(chan.name)
                    if entry is None:
                        entry = self.ca[chan.name]
                except (KeyError, ca.CaprotoKeyError, AttributeError):
                    continue
                if not isinstance(entry, Proxy):
                    continue
                key = (entry.pvname, vc.client_username, vc.client_hostname)
                rights = cache.get(key)
                if rights is None:
                    rights = cache[key] = self.device_access(entry, vc.client_hostname,
                                                             vc.client_username)
                if rights != chan.access_rights:
                    batch.append(ca.AccessRightsResponse(cid=chan.cid, access_rights=rights))
            if batch:
                try:
                    await vc.send(*batch)  # one TCP write per client
                except Exception:  # a dead circuit: its channels go too
                    continue
                sent += len(batch)
        self.pushes += sent
        return sent

    # --- decisions (Owner protocol) -----------------------------------------------------------

    def roles(self, user: str) -> tuple[str, ...]:
        """OS groups of ``user`` (cached)."""
        r = self._roles.get(user)
        if r is None:
            r = self._roles[user] = roles_of(user)
        return r

    def decide(self, pvname: str, user: str | None, host: str | None = None,
               cached: bool = True) -> Decision:
        """The guard's decision for CA user ``user`` at peer ``host`` writing ``pvname`` now.

        Taken once per (PV, user, host) and lock/registry snapshot (it is a function of them):
        the access rights of a channel and every put on it until the next change reuse it.
        ``cached=False`` decides afresh (a refusal's text names the time left on the lock).
        """
        key = (pvname, user or "", host)
        d = self._decisions.get(key) if cached else None
        if d is None:
            account = user or ""
            snap = self.snap
            d = decide(self.policy, snap.state, snap.devices, pvname, account,
                       self.roles(account) if account else (), host)
            if len(self._decisions) >= MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = d
        return d

    def device_access(self, entry: Proxy, host: str | None, user: str | None) -> AccessRights:
        """READ, plus WRITE when the upstream is connected and the decision allows it."""
        if not entry.connected:
            return READ_ONLY
        return READ_WRITE if self.decide(entry.pvname, user, host).allowed else READ_ONLY

    def command_access(self, host: str | None, user: str | None) -> AccessRights:
        """Command PVs are writable by any client that named itself."""
        return READ_WRITE if user else READ_ONLY

    async def forward(self, entry: Proxy, user: str | None, host: str | None,
                      values: list[Any]) -> None:
        """Decide, then put upstream and wait for completion; raise :class:`PutRefusedError`."""
        d = self.decide(entry.pvname, user, host)
        if not d.allowed:
            d = self.decide(entry.pvname, user, host, cached=False)
        if not d.allowed:
            _log_audit.warning("refused %s@%s put %s: %s", user, host, entry.pvname, d.reason)
            raise PutRefusedError(d.reason)
        if not entry.connected:
            raise PutRefusedError(f"{entry.pvname}: the device IOC is not connected")
        if d.locked:
            _log_audit.info("allowed %s@%s put %s (%s)", user, host, entry.pvname, d.reason)
        max_length = getattr(entry, "max_length", 1)
        value: Any = values[0] if max_length == 1 and len(values) == 1 else list(values)
        enum_strings = getattr(entry, "enum_strings", None)
        if enum_strings is not None:
            choices = list(enum_strings)
            if isinstance(value, str | bytes):
                text = value.decode() if isinstance(value, bytes) else value
                if text not in choices:
                    raise PutRefusedError(f"{entry.pvname}: {text!r} is not one of {choices}")
                value = choices.index(text)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or not 0 <= int(value) < len(choices):
                raise PutRefusedError(f"{entry.pvname}: {value!r} is not an index of {choices}")
            body: dict[str, Any] = {"value.index": int(value)}
        else:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            body = {"value": value}
        m = self._mirrors.get(entry.pvname)
        if m is not None:
            m.inflight += 1
        try:
            await self._send(entry.pvname, value, body)
        finally:
            if m is not None:
                m.inflight -= 1
                if not m.inflight and m.held:
                    self._release_held(m)  # runs after this put's CA reply is written

    async def _send(self, name: str, value: Any, body: dict[str, Any]) -> None:
        """Put upstream (CA where it can, else PVA) and wait for the completion."""
        if self._ca_up is not None:  # one CA round trip where the device IOC serves it
            fut = self._ca_up.put(name, value if isinstance(value, list) else [value])
            if fut is not None:
                await self._await_ca(name, fut)
                return
        try:
            async with asyncio.timeout(self.put_timeout):
                await self._put_upstream(name, body)
        except TimeoutError:
            raise PutRefusedError(f"{name}: the upstream put did not complete in "
                                  f"{self.put_timeout:g} s") from None
        except Exception as e:
            raise PutRefusedError(f"{name}: upstream put failed: {e}") from None

    async def _await_ca(self, name: str, fut: asyncio.Future) -> None:
        """Wait for a CA put's completion status; raise :class:`PutRefusedError` unless normal."""
        assert self._ca_up is not None
        try:
            async with asyncio.timeout(self.put_timeout):
                status = await fut
        except TimeoutError:
            raise PutRefusedError(f"{name}: the upstream put did not complete in "
                                  f"{self.put_timeout:g} s") from None
        if status != ECA_NORMAL:
            raise PutRefusedError(f"{name}: upstream put failed (CA): "
                                  f"{self._ca_up.message(status)}")

    async def _put_upstream(self, name: str, body: dict[str, Any]) -> None:
        """Put ``body`` to upstream ``name`` with completion; return when it completed.

        p4p's raw put (the asyncio ``Context.put`` minus its ``close()`` before returning):
        closing a finished operation waits twice for pvxs's worker thread (``cancel()`` and the
        operation's deleter call into it synchronously), so the close is queued to run after
        the caller's CA reply is written (decision 0155). Cancelling the await (the put
        timeout) closes the operation too, which cancels it upstream.

        Raises:
            Exception: p4p's ``RemoteError`` (refused or failed upstream), ``Disconnected``,
                ``Cancelled``, or the builder's error (``body`` does not fit the PV's type).
        """
        loop = self.loop
        assert loop is not None and self._upstream is not None
        fut = loop.create_future()

        def settle(result: Any) -> None:  # on the loop
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(None)

        def done(result: Any) -> None:  # on pvxs's worker thread
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(settle, result)
                except RuntimeError:  # the loop closed meanwhile: nobody waits
                    pass

        op = RawPvaClient.put(self._upstream, name, done, builder=body,
                              request=self._put_request, get=False)
        self.pva_puts += 1
        try:
            await fut
        finally:
            loop.call_soon(op.close)

    # --- device PVs ---------------------------------------------------------------------------

    async def _sync_devices(self, snap: Snapshot) -> None:
        """Mirror every registered PV; create the per-device screen PVs of new devices."""
        for names in snap.pvs.values():
            for name in names:
                if name not in self._mirrors:
                    self._start_mirror(name)
        for device in snap.device_names:
            if device not in self._devices:
                self._make_device_pvs(device)
                self._devices.append(device)

    def _start_mirror(self, name: str) -> Mirror:
        m = Mirror(name)
        self._mirrors[name] = m
        assert self._upstream is not None

        async def cb(v: Any) -> None:
            try:
                await self._mirror_update(m, v)
            except Exception:
                _log.exception("mirror update of %s failed", name)

        m.sub = self._upstream.monitor(name, cb, notify_disconnect=True)
        if self._ca_up is not None:
            self._ca_up.prepare(name)  # connected by the time a client puts (decision 0155)
        return m

    async def _mirror_update(self, m: Mirror, v: Any) -> None:
        """An upstream update (or disconnect) of ``m``, applied to its CA entry.

        Held back while a put to it is in flight (that put's CA reply goes first, decision
        0155), at most :data:`HOLD_MAX` s; held updates are applied in order.
        """
        if m.inflight or m.held or m.releasing is not None:
            m.held.append(v)
            if m.inflight and m.timer is None and m.releasing is None:
                assert self.loop is not None
                m.timer = self.loop.call_later(HOLD_MAX, self._release_held, m)
            return
        await self._apply_update(m, v)

    def _release_held(self, m: Mirror) -> None:
        """Apply ``m``'s held updates in a task of their own (after the current callback)."""
        if m.timer is not None:
            m.timer.cancel()
            m.timer = None
        if m.releasing is None and m.held:
            m.releasing = asyncio.create_task(self._apply_held(m))

    async def _apply_held(self, m: Mirror) -> None:
        try:
            while m.held:
                v = m.held.pop(0)
                try:
                    await self._apply_update(m, v)
                except Exception:
                    _log.exception("mirror update of %s failed", m.pvname)
        finally:
            m.releasing = None

    async def _apply_update(self, m: Mirror, v: Any) -> None:
        if isinstance(v, Exception):
            if m.entry is not None and m.entry.connected:
                await m.disconnected()
                self._push_needed.set()
            return
        if m.entry is None:
            try:
                entry, kind, arr = make_entry(v, m.pvname)
            except UnsupportedTypeError as e:
                m.error = str(e)
                _log.warning("%s cannot be served over CA: %s", m.pvname, e)
                return
            entry.owner = self
            m.entry, m.kind, m.array = entry, kind, arr
            dict.__setitem__(self.pvdb, m.pvname, entry)
            self._on_demand.pop(m.pvname, None)
            return
        was = m.entry.connected
        await m.update(v)
        if not was:
            self._push_needed.set()

    def on_demand(self, name: str) -> None:
        """A CA client searched ``name``, which is not served yet: mirror it if it is a device's.

        Only names the registry maps to a device (record fields, prefix matches); at most
        :data:`MAX_ON_DEMAND` at a time; a name that did not connect within
        :data:`MIRROR_GIVE_UP` s is not tried again for a while.
        """
        if self.loop is None or name in self._mirrors:
            return
        now = time.monotonic()
        if now - self._refused_names.get(name, -1e9) < 30.0:
            return
        base = name[:-1] if name.endswith("$") else name
        if base != name or "{" in name or "[" in name:
            return  # caproto resolves modifiers and filters on the base name itself
        devices = self.snap.devices
        if not devices.known or devices.device_of(name) is None:
            return
        if len(self._on_demand) >= MAX_ON_DEMAND:
            return
        self._on_demand[name] = now
        self._start_mirror(name)

    async def _forget_dead_on_demand(self) -> None:
        now = time.monotonic()
        for name, when in list(self._refused_names.items()):
            if now - when >= 30.0:
                del self._refused_names[name]
        for name, started in list(self._on_demand.items()):
            m = self._mirrors.get(name)
            if m is not None and m.entry is None and now - started > MIRROR_GIVE_UP:
                if m.sub is not None:
                    m.sub.close()
                del self._mirrors[name]
                del self._on_demand[name]
                if self._ca_up is not None:
                    self._ca_up.forget(name)
                self._refused_names[name] = now

    # --- screen and command PVs ---------------------------------------------------------------

    def _twin(self, name: str, ca_entry: Any, pva: SharedPV | None,
              choices: tuple[str, ...] = ()) -> _Twin:
        t = _Twin(name, ca_entry, pva, choices)
        dict.__setitem__(self.pvdb, name, ca_entry)
        if isinstance(ca_entry, ScreenString | CommandString):
            # NAME.VAL$ reads (or writes) the whole text as a CHAR array (caproto parses the
            # long-string modifier only after a field)
            dict.__setitem__(self.pvdb, name + ".VAL", ca_entry)
        if pva is not None:
            self._provider.add(name, pva)
        self._twins[name] = t
        return t

    def _pva_pv(self, nt: Any, initial: Any, handler: Any = None) -> SharedPV:
        return SharedPV(nt=nt, initial=initial, handler=handler, timestamp=time.time())

    def _make_global_pvs(self) -> None:
        p = self.prefix
        text = {"value": "", "long_string_max_length": cmd.TEXT_MAX}
        self._twin(fl.FLAT_HEALTH.name(p), ScreenString(**{**text, "value": "starting"}),
                   self._pva_pv(NTScalar("s"), "starting"))
        self._twin(fl.FLAT_HEARTBEAT.name(p), ScreenInteger(value=0),
                   self._pva_pv(NTScalar("i"), 0))
        version = pvcoord_version()
        self._twin(FLAT_VERSION.name(p), ScreenString(**{**text, "value": version}),
                   self._pva_pv(NTScalar("s"), version))
        start = NTScalar("d", display=True).wrap(self.started, timestamp=time.time())
        start["display.units"] = FLAT_START_TIME.units
        self._twin(FLAT_START_TIME.name(p),
                   ScreenDouble(value=self.started, units=FLAT_START_TIME.units, precision=3),
                   SharedPV(nt=NTScalar("d", display=True), initial=start))
        self._twin(fl.FLAT_LOCK_COUNT.name(p), ScreenInteger(value=0),
                   self._pva_pv(NTScalar("i"), 0))
        self._twin(fl.FLAT_DEVICES.name(p), ScreenString(value=[""], max_length=256),
                   self._pva_pv(NTScalar("as"), []))
        self._twin(fl.FLAT_MESSAGE_ALL.name(p), ScreenString(**text),
                   self._pva_pv(NTScalar("s"), ""))
        for spec, action in ((fl.FLAT_TAKE_DEVICE, "take"), (fl.FLAT_RELEASE_DEVICE, "release")):
            name = spec.name(p)
            entry = CommandString(value="", long_string_max_length=cmd.TEXT_MAX)
            self._command_entry(entry, name, "", action)
            self._twin(name, entry,
                       self._pva_pv(NTScalar("s"), "", _PvaCommand(self, name, "", action)))

    def _command_entry(self, entry: Command, name: str, device: str, action: str) -> None:
        entry.owner = self
        entry.pvname = name
        entry.device = device
        entry.action = action

    def _make_device_pvs(self, device: str) -> None:
        p = self.prefix
        text = {"value": "", "long_string_max_length": cmd.TEXT_MAX}
        # coordination IOC names, over CA only (over PVA the coordination IOC serves them)
        self._twin(COORD_DEVICE_STATE.name(p, device),
                   ScreenEnum(value=DEVICE_STATES[0], enum_strings=list(DEVICE_STATES)), None)
        self._twin(COORD_DEVICE_OWNER.name(p, device), ScreenString(**text), None)
        self._twin(COORD_DEVICE_REASON.name(p, device), ScreenString(**text), None)
        self._twin(COORD_DEVICE_REMAINING.name(p, device),
                   ScreenDouble(value=0.0, units=COORD_DEVICE_REMAINING.units, precision=1),
                   None)
        for spec, action, labels in ((fl.FLAT_TAKE, "take", fl.TAKE_CHOICES),
                                     (fl.FLAT_RELEASE, "release", fl.RELEASE_CHOICES)):
            name = spec.name(p, device)
            entry = CommandEnum(value=labels[0], enum_strings=list(labels))
            self._command_entry(entry, name, device, action)
            pva = self._pva_pv(NTEnum(), {"index": 0, "choices": list(labels)},
                               _PvaCommand(self, name, device, action))
            self._twin(name, entry, pva, labels)
        self._twin(fl.FLAT_MESSAGE.name(p, device), ScreenString(**text),
                   self._pva_pv(NTScalar("s"), ""))
        self._twin(fl.FLAT_CONNECTED.name(p, device),
                   ScreenEnum(value=fl.YES_NO[0], enum_strings=list(fl.YES_NO)),
                   self._pva_pv(NTEnum(), {"index": 0, "choices": list(fl.YES_NO)}), fl.YES_NO)
        self._twin(fl.FLAT_DESCRIPTION.name(p, device), ScreenString(**text),
                   self._pva_pv(NTScalar("s"), ""))
        self._twin(fl.FLAT_DEVICE_CLASS.name(p, device), ScreenString(**text),
                   self._pva_pv(NTScalar("s"), ""))

    async def _set(self, name: str, value: Any, severity: AlarmSeverity | None = None) -> None:
        """Update a bridge PV on both protocols (only when it changed)."""
        t = self._twins.get(name)
        if t is None:
            return
        if t.last == (value, severity):
            return
        t.last = (value, severity)
        now = time.time()
        kw: dict[str, Any] = {"timestamp": now}
        if severity is not None:
            kw["severity"] = severity
            kw["status"] = (AlarmStatus.NO_ALARM if severity == AlarmSeverity.NO_ALARM
                            else AlarmStatus.LINK)
        ca_value = value
        if isinstance(t.ca, ScreenString) and isinstance(value, list):
            ca_value = [str(v)[:39] for v in value] or [""]
        await t.ca.write(ca_value, verify_value=False, **kw)
        if t.pva is not None:
            if t.choices:
                t.pva.post({"index": t.choices.index(value), "choices": list(t.choices)},
                           timestamp=now)
            else:
                t.pva.post(value, timestamp=now)

    async def message(self, device: str, text: str) -> None:
        """Show ``text`` in the device's message PV ('' device: the global one)."""
        name = (fl.FLAT_MESSAGE.name(self.prefix, device) if device
                else fl.FLAT_MESSAGE_ALL.name(self.prefix))
        t = self._twins.get(name)
        if t is not None:
            t.last = None  # a repeated message is still a new event
        await self._set(name, text)

    async def _update_screens(self, snap: Snapshot) -> None:
        p = self.prefix
        state = snap.state
        bad = None if state.known else AlarmSeverity.INVALID_ALARM
        now = time.time()
        for row in snap.rows:
            d = row.name
            if d not in self._devices:
                continue
            lk = effective_lock(state, d)
            await self._set(COORD_DEVICE_STATE.name(p, d), state_label(lk), bad)
            await self._set(COORD_DEVICE_OWNER.name(p, d), lk.holder if lk else "", bad)
            await self._set(COORD_DEVICE_REASON.name(p, d), lk.reason if lk else "", bad)
            remaining = max(0.0, round(lk.expires - now, 1)) if lk else 0.0
            await self._set(COORD_DEVICE_REMAINING.name(p, d), remaining, bad)
            await self._set(fl.FLAT_CONNECTED.name(p, d), fl.YES_NO[int(row.connected)])
            await self._set(fl.FLAT_DESCRIPTION.name(p, d), row.description)
            await self._set(fl.FLAT_DEVICE_CLASS.name(p, d), row.device_class)
        await self._set(fl.FLAT_DEVICES.name(p), snap.device_names)
        await self._set(fl.FLAT_LOCK_COUNT.name(p), len(state.locks), bad)
        await self._set(fl.FLAT_HEALTH.name(p), self.health(snap))

    def health(self, snap: Snapshot | None = None) -> str:
        """'OK' or why device writes are refused."""
        snap = snap or self.snap
        problems = []
        if not snap.devices.known:
            problems.append(f"{snap.devices.why_unknown or 'registry not received'}: device "
                            "writes refused")
        if not snap.state.known:
            problems.append(f"lock state unknown ({snap.state.why_unknown}): device writes "
                            "refused")
        return "; ".join(problems) or "OK"

    async def _every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._beat += 1
                await self._set(fl.FLAT_HEARTBEAT.name(self.prefix), self._beat)
                await self._update_screens(self.snap)
                await self._forget_dead_on_demand()
                if self._upstream is not None and any(
                        m.entry is not None and not m.entry.connected
                        for m in self._mirrors.values()):
                    self._upstream.hurryUp()  # a restarted device IOC: search now
            except Exception:
                _log.exception("periodic update failed")

    # --- Take / Release -----------------------------------------------------------------------

    async def command(self, entry: Command, user: str | None, host: str | None,
                      values: list[Any], data_type: Any) -> None:
        """A CA put to a command PV (see :meth:`run_command`); raise to fail the put."""
        msg = await self.run_command(entry.pvname, entry.device, entry.action, user, host,
                                     values, "CA")
        if not msg.startswith((Code.GRANTED.value, Code.RELEASED.value)):
            raise CommandError(Code(msg.split(":", 1)[0]), msg.split(": ", 1)[-1])

    async def run_command(self, pvname: str, device: str, action: str, user: str | None,
                          host: str | None, values: list[Any], via: str) -> str:
        """Validate a command put, act on behalf of ``user``, set the message PV; return it.

        Args:
            pvname: the command PV (for messages).
            device: its device ('' for ``Flat:Take`` / ``Flat:Release``: the devices are in
                ``values``).
            action: ``take`` or ``release``.
            user: the writing account (CA user or PVA account).
            host: its host (peer IP).
            values: the put's elements.
            via: ``CA`` or ``PVA`` (shown in the lock's reason).
        """
        try:
            if not user:
                raise CommandError(Code.NO_IDENTITY,
                                   f"{pvname}: the client gave no user name; nothing done")
            if device:
                cmd.command_value(values, "Take" if action == "take" else "Release", pvname)
                devices = [device]
            else:
                if len(values) != 1:
                    raise CommandError(Code.BAD_VALUE,
                                       f"{pvname}: put one string, not {len(values)} elements")
                text = cmd.decode_text(values[0] if isinstance(values[0], bytes | str)
                                       else str(values[0]), pvname)
                devices = cmd.device_names(text, self.snap.device_names, pvname)
            msg = await self._coalesced(action, devices, user, host or "", via)
        except CommandError as e:
            msg = str(e)
        _log_audit.info("%s %s@%s %s: %s", via, user, host, pvname, msg)
        await self.message(device, msg)
        return msg

    async def _coalesced(self, action: str, devices: list[str], user: str, host: str,
                         via: str) -> str:
        """One request per (action, devices, user) at a time: a burst shares its answer."""
        key = (action, ",".join(devices), user)
        fut = self._pending.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        if len(self._pending) >= MAX_PENDING_COMMANDS:
            raise CommandError(Code.BUSY, f"{len(self._pending)} commands are waiting; try again")
        assert self.loop is not None
        fut = self.loop.create_future()
        self._pending[key] = fut
        try:
            msg = await self._ask(action, devices, user, host, via)
        except CommandError as e:
            msg = str(e)
        finally:
            self._pending.pop(key, None)
        fut.set_result(msg)
        return msg

    async def _ask(self, action: str, devices: list[str], user: str, host: str,
                   via: str) -> str:
        p = self.prefix
        args = {"device": ",".join(devices), "onBehalfOf": user, "clientHost": host}
        if action == "take":
            spec = COORD_ACQUIRE
            args.update(type=LockType.MANUAL_OPERATOR.value,
                        reason=f"Take on a screen ({via}, via the CA bridge)")
        else:
            spec = COORD_RELEASE
        name = spec.name(p)
        args[REQUEST_ID_ARG] = new_request_id()  # a PVA re-send after a lost reply: answered
        uri = NTURI([(k, "s") for k in args]).wrap(name, kws=args)
        assert self._service is not None
        try:
            reply = await asyncio.wait_for(self._service.rpc(name, uri), RPC_TIMEOUT)
        except TimeoutError:
            raise CommandError(Code.UNAVAILABLE,
                               f"the coordination IOC ({name}) did not answer in "
                               f"{RPC_TIMEOUT:g} s; nothing changed") from None
        except Exception as e:
            text = str(e) or type(e).__name__
            if "Disconnected" in type(e).__name__ or "imeout" in text:
                raise CommandError(Code.UNAVAILABLE, f"{name}: {text}") from None
            raise cmd.refusal(text) from None
        if action == "take":
            try:
                expires = float(reply["expires"])
                devs = [str(d) for d in reply["devices"]] or devices
            except (KeyError, TypeError, ValueError):
                expires, devs = 0.0, devices
            return cmd.granted(devs, user, expires)
        try:
            devs = [str(d) for d in reply["devices"]] or devices
        except (KeyError, TypeError):
            devs = devices
        return cmd.released(devs, user)


class _PvaCommand:
    """p4p handler of a command PV over PVA: the writing PVA account acts."""

    def __init__(self, bridge: FlatBridge, name: str, device: str, action: str) -> None:
        self.bridge, self.name, self.device, self.action = bridge, name, device, action

    async def put(self, pv: SharedPV, op: Any) -> None:
        try:
            v = op.value()
            v = getattr(v, "raw", v)  # the NT wrapper (ntenum, ntstr) of a SharedPV
            if self.device:
                values: list[Any] = [_pva_index(v)]
            else:
                values = [str(v["value"])]
            user = op.account() or ""
            host = (op.peer() or "").rsplit(":", 1)[0]
            msg = await self.bridge.run_command(self.name, self.device, self.action, user, host,
                                                values, "PVA")
        except Exception as e:  # run_command answers every refusal itself: this is a defect
            _log.exception("PVA command %s failed", self.name)
            op.done(error=cmd.message(Code.INTERNAL, f"{self.name}: {type(e).__name__}: {e}"))
            return
        if msg.startswith((Code.GRANTED.value, Code.RELEASED.value)):
            op.done()
        else:
            op.done(error=msg)


def _pva_index(v: Any) -> Any:
    """The index of an NTEnum put (or the plain value of a scalar put)."""
    try:
        return int(v["value.index"])
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return v["value"]
    except (KeyError, TypeError):
        return None


def names_of(pvs: Iterable[str]) -> list[str]:
    """Sorted unique names (helper for logs and tests)."""
    return sorted(set(pvs))
