"""The p4p boundary of the guard: p4p's gateway engine with a lock-aware access decision.

Built from the same parts as ``pvagw`` (``p4p.gw.GWHandler``, ``p4p._gw.Provider``,
``p4p.asLib.Engine``, ``p4p.asLib.pvlist.PVList``); the differences:

* :class:`GuardEngine` (an ``asLib.Engine``) hands each new channel to the :class:`GuardCore`
  and evaluates the site's ACF on a stand-in, so the channel's ``put``/``rpc`` flags are
  ``ACF grant AND lock decision``. ACF ``INP`` updates and lock changes both re-apply live.
* :class:`GuardHandler` never proxies pvcoord's own service PVs (``Coord:``, ``Registry:``,
  ``Guard:``, ``Queue:`` under the prefixes): a client reaching ``Coord:Acquire`` through the
  guard would act as the guard's account.
* puts the guard must report come back through ``GWHandler.audit`` and are classified by the
  core (``p4p.gw.audit`` still gets the site ACF's TRAPWRITE lines, as with pvagw).
* lock state and the registry map come from :class:`bridges.lockview.LockView` (``Coord:Locks``,
  ``Coord:Heartbeat``, ``Registry:DevicePVs``, ``Registry:Devices``), as in the other bridges.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from p4p import _gw  # pyright: ignore[reportAttributeAccessIssue] - compiled, no stubs
from p4p.asLib import Engine
from p4p.asLib.pvlist import PVList
from p4p.asLib.yacc import parse as parse_acf
from p4p.client.thread import Context
from p4p.gw import GWHandler, GWStats
from p4p.nt import NTScalar, NTTable
from p4p.server import Server, StaticProvider, removeProvider
from p4p.server.thread import SharedPV
from p4p.wrapper import Type, Value
from typing_extensions import override

from pvdb import catalog
from pvdb.guard import (
    AUDIT_COLUMNS,
    GUARD_ALLOWED_LOCKED,
    GUARD_APPLY_LATENCY,
    GUARD_AUDIT,
    GUARD_CHANNELS,
    GUARD_CONFIRM_REGISTRY,
    GUARD_HEALTH,
    GUARD_HEARTBEAT,
    GUARD_LAST_AUDIT,
    GUARD_LOCK_STATE_OK,
    GUARD_REFUSED,
    GUARD_WHAT_IF,
    WHAT_IF_FIELDS,
)
from pvdb.lockmodel import ErrorCode, error_text
from pvdb.policy import Policy
from pvdb.process import GUARD_START_TIME, GUARD_VERSION, pvcoord_version

from ..lockview import LockView, Snapshot
from .config import GuardConfig, GuardConfigError, read_site_file
from .core import AuditRecord, GuardCore, GuardedChannel, parse_audit_line
from .decision import DeviceMap, LockState

_log = logging.getLogger(__name__)
_log_audit = logging.getLogger("bridges.guard.audit")
_log_gw_audit = logging.getLogger("p4p.gw.audit")

STARTED = time.time()
"""When the guard process imported this module (its start, for ``Guard:StartTime``)."""

WHAT_IF_TYPE = Type(list(WHAT_IF_FIELDS), id="pvcoord:guard/WhatIf:1.0")
CONFIRM_TYPE = Type([("message", "s")], id="pvcoord:guard/ConfirmRegistry:1.0")


def service_prefixes(*prefixes: str) -> tuple[str, ...]:
    """Name prefixes of pvcoord's own PVs: ``P Coord:``, ``P Registry:``, ``P Queue:``, ...

    One per service family of :func:`pvdb.catalog.service_specs`, under each prefix.
    """
    segments = {catalog.family(spec) for spec in catalog.service_specs()}
    return tuple(sorted({p + s for p in prefixes for s in segments}))


class _Capture:
    """A channel stand-in that only records the ACF's grant (for the what-if RPC)."""

    name = b"<what-if>"

    def __init__(self) -> None:
        self.perm: dict[str, Any] = {}

    def access(self, **kws: Any) -> None:
        self.perm = kws


class GuardEngine(Engine):
    """p4p's ACF engine, with every gateway channel routed through the :class:`GuardCore`.

    Args:
        core: decides and applies.
        pvlist: the server's pvlist (the what-if RPC maps a client's name through it).
        acf: site ACF text ('' for pvagw's default: everyone may write).
        ctxt: client context for ACF ``INP`` PVs.
    """

    def __init__(self, core: GuardCore, pvlist: PVList, acf: str = "", ctxt: Any = None) -> None:
        self._core = core
        self.pvlist = pvlist
        super().__init__(acf or None, ctxt=ctxt)

    def create(self, channel, group, user, host, level, roles=()):  # noqa: D102 - asLib API
        if isinstance(channel, GuardedChannel):
            proxy = channel
            # asLib's _recompute() drops the roles: use the ones the channel was created with
            roles = roles or proxy.roles
        elif isinstance(channel, _gw.Channel):
            # not reached through GuardHandler (which calls track()): ``channel.name`` is the
            # upstream name (p4p sets it to the name it was created with); the client's name is
            # unknown here, so both are that name (the decision is on the upstream name anyway)
            name = channel.name.decode()
            proxy = self._core.track(channel, name, name, user, host, channel.peer, roles)
        else:
            return super().create(channel, group, user, host, level, list(roles))
        return super().create(proxy, group, user, host, level, list(roles))

    def track(self, channel: Any, dsname: str, usname: str, group: str, user: str, host: str,
              level: int, roles: list[str], peer: str) -> GuardedChannel:
        """Enforce on a new gateway channel whose names are known from its creation.

        Args:
            channel: the ``_gw.Channel``.
            dsname: the name the client asked for (downstream; audit records use it).
            usname: the name after the site pvlist (upstream, the IOC's; decisions use it).
            group: the ASG the pvlist gave.
            user: the client's account.
            host: the client's IP address.
            level: the ASL the pvlist gave.
            roles: the client's OS groups.
            peer: the client's ``ip:port`` (the gateway's audit lines carry it).
        """
        proxy = self._core.track(channel, dsname, usname, user, host, peer, roles)
        super().create(proxy, group, user, host, level, list(roles))
        return proxy

    def acf_grant(self, pv: str, account: str, host: str,
                  roles: list[str]) -> tuple[str, str | None, dict[str, Any]]:
        """What the site pvlist + ACF give ``account`` at ``host`` (an IP) on client name ``pv``.

        Returns ``(upstream name, asg, {put, rpc, uncached, audit})``; the upstream name is ''
        if the pvlist denies ``pv``.
        """
        usname, asg, asl = self.pvlist.compute(pv.encode(), host)
        if not usname:
            return "", "", {}
        cap = _Capture()
        super().create(cap, asg, account, host, asl, roles)
        return usname, asg, cap.perm


class GuardHandler(GWHandler):
    """p4p's gateway handler that never proxies pvcoord's own service PVs."""

    def __init__(self, acf: GuardEngine, pvlist: PVList, core: GuardCore,
                 banned: tuple[str, ...], read_only: bool,
                 on_audit: Callable[[AuditRecord], None]) -> None:
        super().__init__(acf, pvlist, readOnly=read_only)
        self.core = core
        self.banned = banned
        self.on_audit = on_audit

    @override
    def testChannel(self, pvname, peer):
        assert self.provider is not None  # set by Guard before the server starts
        if pvname.decode(errors="replace").startswith(self.banned):
            return self.provider.BanPV
        usname = self.pvlist.compute(pvname, peer.split(":", 1)[0])[0]
        if usname and usname.startswith(self.banned):  # a pvlist ALIAS onto a service PV
            return self.provider.BanHostPV
        return super().testChannel(pvname, peer)

    @override
    def makeChannel(self, op):
        # p4p's GWHandler.makeChannel, except that the guard is told both names: the channel's
        # ``name`` is the upstream one, so the client's name would otherwise be lost (and a
        # pvlist ALIAS applied twice)
        dsname = op.name.decode(errors="replace")
        if dsname.startswith(self.banned):
            return None
        peer = op.peer.split(":", 1)[0]
        usname, asg, asl = self.pvlist.compute(op.name, peer)
        if not usname or usname.startswith(self.banned):
            return None
        assert self.provider is not None
        if self.provider.testChannel(usname.encode()) != self.provider.Claim:
            return None
        chan = op.create(usname.encode())
        with self.channels_lock:
            self.channels.setdefault(op.peer, []).append(chan)
        try:
            if not self.readOnly:  # p4p's default is read-only
                self.acf.track(chan, dsname, usname, asg, op.account, peer, asl, list(op.roles),
                               op.peer)
            if self.getholdoff is not None:
                chan.access(holdoff=self.getholdoff)
        except Exception:
            # as p4p: the search was answered, so connect read-only rather than fail
            _log.exception("read-only after an error: %s from %s", dsname, op.peer)
        return chan

    def audit(self, msgs):  # noqa: D102 - p4p callback (gateway work queue thread)
        for msg in msgs:
            try:
                line = parse_audit_line(msg)
                if line is None:
                    _log.warning("gateway audit: %s", msg.strip())
                    continue
                rec, trap = self.core.classify(line)
                if trap:
                    _log_gw_audit.info("%s", msg.strip())
                if rec is not None:
                    self.on_audit(rec)
            except Exception:
                _log.exception("cannot audit %r", msg)


class _Counter:
    def __init__(self, pv: SharedPV) -> None:
        self.pv, self.n = pv, 0

    def add(self) -> None:
        self.n += 1
        self.pv.post(self.n, timestamp=time.time())


class Guard:
    """One guard process's gateway: servers, upstream clients, monitors and its own PVs.

    Construct, :meth:`start`, call :meth:`tick` every ~0.1 s, :meth:`close` at the end.

    Args:
        prefix: endstation prefix ``P`` (the coordination IOC's, and the guard's own PVs).
        config: the parsed config file.
        policy: the endstation policy.
        registry_prefix: prefix of the registry IOC (default: ``config.guard.registry_prefix``
            or ``prefix``).

    Raises:
        GuardConfigError: an ACF or pvlist file cannot be read or is not valid.
    """

    def __init__(self, prefix: str, config: GuardConfig, policy: Policy,
                 registry_prefix: str | None = None) -> None:
        self.prefix = prefix
        self.config = config
        self.registry_prefix = registry_prefix or config.guard.registry_prefix or prefix
        self.core = GuardCore(policy, config.guard.stale_after)
        self.banned = service_prefixes(prefix, self.registry_prefix)
        self._servers: list[Server] = []
        self._contexts: list[Context] = []
        self._handlers: list[GuardHandler] = []
        self._engines: list[GuardEngine] = []
        self._audit_rows: deque[AuditRecord] = deque(maxlen=config.guard.audit_tail)
        self._beat = 0
        self.view: LockView | None = None
        """Follows Coord:Locks/Heartbeat and the registry tables (set by :meth:`start`)."""
        self._devices_seen: DeviceMap | None = None
        self._stamp_seen = 0.0
        self._read_only = config.read_only
        self._site: list[tuple[str, str, str]] = []
        self._pvlists: dict[str, PVList] = {}
        for s in config.servers:
            acf = read_site_file(s.access, "ACF")
            pvl = read_site_file(s.pvlist, "pvlist")
            # validate the site files before anything starts
            try:
                self._pvlists[s.name] = PVList(pvl)
            except Exception as e:
                raise GuardConfigError(f"{s.pvlist}: not a valid pvlist: {e}") from None
            try:
                parse_acf(acf or Engine.defaultACF)
            except Exception as e:
                raise GuardConfigError(f"{s.access}: not a valid ACF: {e}") from None
            self._site.append((s.name, acf, pvl))
        self._make_pvs()

    # --- own PVs ------------------------------------------------------------------------------

    def _make_pvs(self) -> None:
        now = time.time()
        p = self.prefix
        self.pv_health = SharedPV(nt=NTScalar("s"), initial="starting", timestamp=now)
        self.pv_ok = SharedPV(nt=NTScalar("i"), initial=0, timestamp=now)
        self.pv_last = SharedPV(nt=NTScalar("s"), initial="", timestamp=now)
        self.pv_refused = SharedPV(nt=NTScalar("i"), initial=0, timestamp=now)
        self.pv_allowed_locked = SharedPV(nt=NTScalar("i"), initial=0, timestamp=now)
        self.pv_channels = SharedPV(nt=NTScalar("i"), initial=0, timestamp=now)
        self.pv_latency = SharedPV(
            nt=NTScalar("d", display=True),
            initial={"value": 0.0, "display.units": GUARD_APPLY_LATENCY.units},
            timestamp=now,
        )
        self.pv_heartbeat = SharedPV(nt=NTScalar("i"), initial=0, timestamp=now)
        self._audit_nt = NTTable(list(AUDIT_COLUMNS))
        self.pv_audit = SharedPV(nt=self._audit_nt, initial=[], timestamp=now)
        self.pv_what_if = SharedPV(nt=NTScalar("s"), initial="RPC only", timestamp=now)
        self.pv_what_if.rpc(self._what_if)
        self.pv_confirm = SharedPV(nt=NTScalar("s"), initial="RPC only", timestamp=now)
        self.pv_confirm.rpc(self._confirm_registry)
        self.refused = _Counter(self.pv_refused)
        self.allowed_locked = _Counter(self.pv_allowed_locked)
        self._pvs = {
            GUARD_HEALTH.name(p): self.pv_health,
            GUARD_LOCK_STATE_OK.name(p): self.pv_ok,
            GUARD_LAST_AUDIT.name(p): self.pv_last,
            GUARD_REFUSED.name(p): self.pv_refused,
            GUARD_ALLOWED_LOCKED.name(p): self.pv_allowed_locked,
            GUARD_CHANNELS.name(p): self.pv_channels,
            GUARD_APPLY_LATENCY.name(p): self.pv_latency,
            GUARD_HEARTBEAT.name(p): self.pv_heartbeat,
            GUARD_AUDIT.name(p): self.pv_audit,
            GUARD_WHAT_IF.name(p): self.pv_what_if,
            GUARD_VERSION.name(p): SharedPV(nt=NTScalar("s"), initial=pvcoord_version(),
                                            timestamp=now),
            GUARD_START_TIME.name(p): SharedPV(nt=NTScalar("d"), initial=STARTED, timestamp=now),
            GUARD_CONFIRM_REGISTRY.name(p): self.pv_confirm,
        }

    # --- start / stop -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect the monitors, then start the gateway servers."""
        conf = self.config
        self.core.on_state.append(self._state_changed)
        g = conf.guard
        # one follower of locks, heartbeat and registry for every front (bridges.lockview): it
        # searches again promptly and renews its client context when a followed IOC restarts
        self.view = LockView(self.prefix, self.registry_prefix,
                             conf=g.coordination.p4p_conf() if g.coordination is not None else None,
                             stale_after=g.stale_after)
        self.view.listeners.append(self._on_view)
        self.view.start()

        clients = {}
        for c in conf.clients:
            ctx = Context("pva", conf=c.p4p_conf(), useenv=False)
            self._contexts.append(ctx)
            clients[c.name] = ctx
        self.stats = GWStats(conf.statsdb)
        gwclients = []
        for s, (_name, acf_text, _pvl) in zip(conf.servers, self._site, strict=True):
            pvlist = self._pvlists[s.name]
            aclient = s.acf_client or (s.clients[0] if s.clients else None)
            engine = GuardEngine(self.core, pvlist, acf_text,
                                 ctxt=clients[aclient] if aclient else None)
            self._engines.append(engine)
            for idx, iface in enumerate(s.interface):
                statusp = StaticProvider(f"gwsts.{s.name}_{idx}")
                for name, pv in self._pvs.items():
                    statusp.add(name, pv)
                providers: list[Any] = [statusp]
                pnames = []
                try:
                    for cname in s.clients:
                        pname = f"gws.{s.name}_{idx}.{cname}"
                        handler = GuardHandler(engine, pvlist, self.core, self.banned,
                                               self._read_only, self._report)
                        handler.getholdoff = s.getholdoff  # pyright: ignore[reportAttributeAccessIssue] - p4p declares it None
                        handler.provider = _gw.Provider(pname, clients[cname], handler)
                        for name in self._pvs:
                            handler.provider.forceBan(usname=name.encode())
                        providers.append((handler.provider, 10))
                        pnames.append(pname)
                        gwclients.append(handler.provider)
                        self._handlers.append(handler)
                        self.stats.handlers.append(handler)
                    if s.statusprefix:
                        self.stats.bindto(statusp, s.statusprefix)
                    server = Server(providers=providers, conf=s.p4p_conf(iface), useenv=False)
                finally:
                    for pname in pnames:
                        removeProvider(pname)
                self._servers.append(server)
                self.stats.servers.append(server._S)  # noqa: SLF001 - as p4p.gw.App does
                self._statusp = statusp
                _log.info("guard server %s_%d: %s", s.name, idx, server.conf())
        # never let a gateway client find the gateway's own servers (loops)
        gws = [srv._S for srv in self._servers]  # noqa: SLF001 - as p4p.gw.App does
        for prov in gwclients:
            prov.ignoreByGUID(gws)
        self._post_health()

    def server_confs(self) -> list[dict[str, str]]:
        """The effective ``EPICS_PVA*`` settings of each client-facing server (ports included)."""
        return [srv.conf() for srv in self._servers]

    def close(self) -> None:
        """Stop servers, monitors and clients (idempotent)."""
        if self.view is not None:
            self.view.close()
        for srv in self._servers:
            srv.stop()
        self._servers.clear()
        for ctx in self._contexts:
            ctx.close()
        self._contexts.clear()

    # --- periodic -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Keep the decision state current (a stopped heartbeat, a new reason; every ~0.1 s)."""
        if self.view is not None:
            self.core.set_state(self._view_state)

    def every_second(self) -> None:
        """Forget closed channels; post the guard's heartbeat and channel count."""
        self.core.sweep()
        now = time.time()
        self._beat += 1
        self.pv_heartbeat.post(self._beat, timestamp=now)
        self.pv_channels.post(self.core.channel_count(), timestamp=now)
        self._post_health()

    def sweep(self, period: float) -> None:
        """Drop unused upstream channels from the cache; update pvagw's statistics PVs.

        pvagw does both every 30 s (``period``); the statistics PVs are served under a server's
        ``statusprefix``.
        """
        try:
            self.stats.sweep()
            self.stats.update_stats(period)
        except Exception:
            _log.exception("periodic sweep failed")

    # --- inputs -------------------------------------------------------------------------------

    def _on_view(self, snap: Snapshot) -> None:
        """The lock view changed (lock state or registry): apply it, post latency and health."""
        if snap.devices is not self._devices_seen:
            self._devices_seen = snap.devices
            self.core.set_devices(snap.devices)
        self.core.set_state(self._view_state)
        stamp = snap.state.stamp
        if snap.state.known and stamp and stamp != self._stamp_seen:
            self._stamp_seen = stamp
            now = time.time()
            self.pv_latency.post((now - stamp) * 1e3, timestamp=now)
        self._post_health()

    def _view_state(self) -> LockState:
        return self.view.state if self.view is not None else LockState()

    def registry_problem(self) -> str:
        """'' when the registry map is known, else why not (tables missing or unreadable)."""
        return self.view.registry_problem() if self.view is not None else "registry not followed"

    def _state_changed(self, state: LockState) -> None:
        self._post_health()

    def _post_health(self) -> None:
        now = time.time()
        state = self.core.state
        problems = []
        if not self.core.devices.known:
            why = self.registry_problem() or self.core.devices.why_unknown
            problems.append(f"{why or 'registry not received'}: device writes refused")
        withheld = self.core.withheld_devices()
        if withheld:
            problems.append(
                f"locked device(s) {', '.join(withheld)} left the registry: their PVs are "
                f"refused until confirmed ({GUARD_CONFIRM_REGISTRY.name(self.prefix)})")
        if not state.known:
            problems.append(f"lock state unknown ({state.why_unknown}): device writes refused")
        text = "; ".join(problems) or "OK"
        ok = int(state.known and self.core.devices.known and not withheld)
        if self.pv_health.current().raw.value != text:
            self.pv_health.post(text, timestamp=now)
        if self.pv_ok.current().raw.value != ok:
            self.pv_ok.post(ok, timestamp=now)

    # --- audit --------------------------------------------------------------------------------

    def _report(self, rec: AuditRecord) -> None:
        line = rec.line()
        if rec.action == "refused":
            _log_audit.warning("%s", line)
            self.refused.add()
        else:
            _log_audit.info("%s", line)
            self.allowed_locked.add()
        self._audit_rows.append(rec)
        now = time.time()
        self.pv_last.post(line, timestamp=now)
        self.pv_audit.post([self._row(r) for r in self._audit_rows], timestamp=now)

    @staticmethod
    def _row(r: AuditRecord) -> dict[str, Any]:
        return {"time": r.time, "action": r.action, "account": r.account, "host": r.host,
                "pv": r.pv, "device": r.device, "holder": r.holder, "value": r.value[:200],
                "message": r.message}

    # --- registry confirmation ---------------------------------------------------------------

    def _confirm_registry(self, pv: SharedPV, op: Any) -> None:
        try:
            args = _uri_args(op.value())
            unknown = sorted(set(args) - set(GUARD_CONFIRM_REGISTRY.args))
            if unknown:
                raise ValueError(f"unknown argument(s) {', '.join(unknown)}; use device=d1,d2")
            done = self.core.confirm_registry(
                op.account(), sorted(self.core.roles(op.account())),
                _split(args.get("device", "")) or None, op.peer().rsplit(":", 1)[0])
        except (PermissionError, ValueError, WhatIfError) as e:
            op.done(error=str(e))
            return
        except Exception as e:
            _log.exception("confirm-registry failed")
            op.done(error=f"confirm-registry failed: {e}")
            return
        self._post_health()
        op.done(CONFIRM_TYPE({"message": f"confirmed: {', '.join(done) or 'nothing withheld'}"}))

    # --- what-if ------------------------------------------------------------------------------

    def _what_if(self, pv: SharedPV, op: Any) -> None:
        try:
            reply = self.what_if(op)
        except WhatIfError as e:
            op.done(error=error_text(ErrorCode.BAD_ARGUMENT, str(e)))
            return
        except Exception as e:
            _log.exception("what-if failed")
            op.done(error=error_text(ErrorCode.INTERNAL, f"what-if failed: {e}"))
            return
        op.done(reply)

    def what_if(self, op: Any) -> Value:
        """Answer ``Guard:WhatIf`` for the NTURI request of ``op``.

        Raises:
            WhatIfError: missing ``pv``, unknown argument, unresolvable host.
        """
        args = _uri_args(op.value())
        unknown = sorted(set(args) - set(GUARD_WHAT_IF.args))
        if unknown:
            raise WhatIfError(
                f"unknown argument(s) {', '.join(unknown)}; use {', '.join(GUARD_WHAT_IF.args)}"
            )
        pv = args.get("pv", "").strip()
        if not pv:
            raise WhatIfError("give pv=NAME (and optionally account=, host=, roles=)")
        account = args.get("account", "").strip()
        if account:
            roles = _split(args.get("roles", ""))
        else:
            account = op.account()
            roles = _split(args["roles"]) if "roles" in args else sorted(self.core.roles(account))
        host = args.get("host", "").strip() or op.peer().rsplit(":", 1)[0]
        try:
            ip = socket.gethostbyname(host)
        except OSError as e:
            raise WhatIfError(f"host {host!r} cannot be resolved: {e}") from None
        return WHAT_IF_TYPE(self.explain(pv, account, ip, roles, host))

    def explain(self, pv: str, account: str, ip: str, roles: list[str], host: str = "") -> dict:
        """The what-if answer as a dict (fields of pvdb ``WHAT_IF_FIELDS``)."""
        base = {"pv": pv, "account": account, "host": host or ip, "device": "", "holder": "",
                "lockType": "", "expires": 0.0}
        if self._read_only:
            return {**base, "allowed": False, "reason": "the gateway is configured read-only"}
        engine = self._engines[0] if self._engines else None
        usname, asg, perm = pv, "", {"put": True}
        if engine is not None:
            # decide on the upstream (IOC) name, as for a channel: a pvlist ALIAS maps it
            usname, asg, perm = engine.acf_grant(pv, account, ip, roles)
            if not usname:
                return {**base, "allowed": False,
                        "reason": f"the site pvlist does not let {ip} reach {pv}"}
        if usname.startswith(self.banned):
            return {**base, "allowed": False,
                    "reason": f"{usname} is a pvcoord service PV: never proxied by the guard"}
        d = self.core.decide(usname, account, roles, ip)
        base.update(device=d.device, holder=d.holder, lockType=d.lock_type, expires=d.expires)
        alias = f" ({pv} is {usname} on the IOC)" if usname != pv else ""
        if not perm.get("put"):
            return {**base, "allowed": False,
                    "reason": f"the site ACF (ASG {asg}) does not grant {account} at {ip} "
                    f"write access{alias}"}
        return {**base, "allowed": d.allowed, "reason": d.reason + alias}


class WhatIfError(ValueError):
    """A what-if request that cannot be answered; the text goes back to the client."""


def _split(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def _uri_args(value: Value) -> dict[str, str]:
    """Arguments of an NTURI request (all strings, like ``pvcall``), or of a plain structure."""
    try:
        query = value["query"]
    except (KeyError, TypeError):
        query = value
    return {k: str(query[k]) for k in query.keys()}
