"""The endstation file: one TOML file that configures every pvcoord process of one endstation.

Every process takes ``--config FILE`` and reads its own section plus the shared part (prefix,
network sides, files, store); ``pvcoord config check FILE`` validates the whole file and names
the line, a machine-readable code and the reason of each error. Reference: ``docs/deploy.md``.
A minimal file::

    prefix = "BL01:"

    [network.client]                 # where users' clients, Phoebus and the bridges are
    interfaces = ["10.0.1.5"]
    addr_list = ["10.0.1.255"]

    [network.device]                 # where the device IOCs are (only the guard reaches it)
    interfaces = ["10.0.2.5"]
    addr_list = ["10.0.2.255"]

    [files]
    policy = "policy.toml"           # relative names are relative to this file
    registry = "registry.yaml"

    [store]
    url = "sqlite:////var/lib/pvcoord/bl01/locks.sqlite"

Optional sections (a missing one means the process is not part of the endstation):
``[queue_server]`` + ``[queue]`` (queue IOC), ``[guard]``, ``[ca_bridge]``, ``[web_bridge]``,
``[tls]``. ``[coordination]`` and ``[registry]`` always run (defaults apply).

Secrets are never in this file: a redis password comes from ``$PVCOORD_REDIS_URL`` (systemd
``LoadCredential``/``EnvironmentFile``), the web bridge's users from ``password_file``.

Pure: no p4p, nothing of ours but :mod:`pvdb`; :func:`process_args` and :func:`process_env` give
what a process needs, its ``__main__`` applies them.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, LiteralString

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .names import check_prefix
from .policy import Policy, PolicyError, load_policy, matches
from .registry_file import RegistryFileError, load_registry

# --- errors -----------------------------------------------------------------------------------

CODES = {
    "syntax": "the file is not valid TOML",
    "unknown_key": "a key the endstation file does not have (typo?)",
    "missing": "a required key is missing",
    "bad_type": "a value of the wrong type",
    "bad_value": "a value out of range or not one of the accepted ones",
    "bad_prefix": "not a valid endstation prefix (EPICS characters, ending in ':')",
    "bad_address": "not an IP address / tcp://HOST:PORT",
    "bad_port": "not a port number 1..65535",
    "port_clash": "two processes would listen on the same port of the same side",
    "bad_store_url": "not sqlite:///PATH or redis://HOST:PORT/DB",
    "secret_in_file": "a password in the file (use the credential / environment instead)",
    "missing_file": "a file the endstation names does not exist or cannot be read",
    "bad_policy": "the policy file is not valid",
    "bad_registry": "the registry file is not valid",
    "needs_section": "a section another section depends on is missing",
    "not_delegate": "the web bridge writes through the guard but the policy does not name its "
                    "account a delegate (access.delegates) from the bridge's host",
}
"""Machine-readable codes of :class:`ConfigIssue`, with what they mean."""


@dataclass(frozen=True)
class ConfigIssue:
    """One error in an endstation file.

    Attributes:
        line: 1-based line of the key (or of its table header when the key is missing).
        path: dotted key path, e.g. ``network.client.interfaces``.
        code: one of :data:`CODES`.
        message: the reason, naming the offending value.
    """

    line: int
    path: str
    code: str
    message: str

    def format(self, source: str) -> str:
        """``FILE:LINE: path: message [code]``."""
        return f"{source}:{self.line}: {self.path or '(top level)'}: {self.message} [{self.code}]"


class EndstationError(ValueError):
    """An endstation file that cannot be used; ``issues`` lists every error found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__("\n".join(i.format(source) for i in issues))


def _err(code: LiteralString, message: LiteralString, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(code, message, ctx or None)


# --- field checks -----------------------------------------------------------------------------


def _port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise _err("bad_port", "{v} is not a port number 1..65535", v=v)
    return v


def _addresses(values: list[str]) -> list[str]:
    for v in values:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise _err("bad_address", "'{v}' is not an IP address", v=v) from None
    return values


_ZMQ_RE = re.compile(r"^tcp://([^:/*]+):(\d{1,5})\Z")


def _zmq(v: str) -> str:
    m = _ZMQ_RE.match(v)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise _err("bad_address", "'{v}' is not tcp://HOST:PORT (never '*')", v=v)
    return v


def _opt_addresses(values: list[str] | None) -> list[str] | None:
    return values if values is None else _addresses(values)


def _opt_port(v: int | None) -> int | None:
    return v if v is None else _port(v)


def _address(v: str) -> str:
    return _addresses([v])[0]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


Port = int


class Side(_Section):
    """One network side (``[network.client]`` or ``[network.device]``).

    Attributes:
        interfaces: addresses pvcoord's servers on this side bind to.
        addr_list: where clients on this side search (default: ``interfaces``).
        auto_addr_list: also search every broadcast address of the host (off: explicit only).
        pva_broadcast_port: PVA UDP search port of this side.
        ca_server_port: Channel Access server port (the CA bridge, client side).
        ca_repeater_port: Channel Access repeater port.
    """

    interfaces: list[str] = Field(default_factory=lambda: ["127.0.0.1"], min_length=1)
    addr_list: list[str] | None = None
    auto_addr_list: bool = False
    pva_broadcast_port: Port = 5076
    ca_server_port: Port = 5064
    ca_repeater_port: Port = 5065

    _v_addr = field_validator("interfaces", "addr_list")(_opt_addresses)
    _v_port = field_validator("pva_broadcast_port", "ca_server_port", "ca_repeater_port")(_port)

    @property
    def search(self) -> list[str]:
        """Where clients on this side search."""
        return self.addr_list if self.addr_list is not None else self.interfaces


class Network(_Section):
    """``[network]``: the client side (users, bridges, pvcoord's IOCs) and the device side."""

    client: Side = Field(default_factory=Side)
    device: Side = Field(default_factory=Side)


class Files(_Section):
    """``[files]``: the policy (``None``: built-in policy) and the registry file."""

    policy: str | None = None
    registry: str


class Store(_Section):
    """``[store]``: where the coordination IOC keeps locks and audit (``pvcoord.store``)."""

    url: str = "sqlite:///pvcoord.sqlite"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v.startswith("sqlite:///") and len(v) > len("sqlite:///"):
            return v
        m = re.match(r"^redis://(?:([^@/]*)@)?[^@/:]+(?::\d+)?(?:/\d+)?$", v)
        if not m:
            raise _err("bad_store_url", "'{v}' is not sqlite:///PATH or redis://HOST:PORT/DB", v=v)
        if m.group(1) and ":" in m.group(1):
            raise _err("secret_in_file", "the store URL has a password: set it in "
                       "$PVCOORD_STORE_URL (credential) instead")
        return v


class QueueServer(_Section):
    """``[queue_server]``: how to reach the RE Manager (0MQ) and its redis.

    Attributes:
        zmq_control: control socket, ``tcp://HOST:PORT``.
        zmq_info: info (publish) socket, ``tcp://HOST:PORT``.
        public_key_file: file with the RE Manager's control-socket public key (encryption on);
            passed to bluesky-queueserver-api as ``QSERVER_ZMQ_PUBLIC_KEY``.
        redis_url: redis of the worker hook, without password (``$PVCOORD_REDIS_URL`` wins).
    """

    zmq_control: str
    zmq_info: str
    public_key_file: str | None = None
    redis_url: str | None = None

    _v_zmq = field_validator("zmq_control", "zmq_info")(_zmq)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.match(r"^redis://(?:([^@/]*)@)?[^@/:]+(?::\d+)?(?:/\d+)?$", v)
        if not m:
            raise _err("bad_store_url", "'{v}' is not redis://HOST:PORT/DB", v=v)
        if m.group(1):
            raise _err("secret_in_file", "the redis URL has a password: set $PVCOORD_REDIS_URL "
                       "(credential) instead")
        return v


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Coordination(_Section):
    """``[coordination]``: the coordination IOC (client side)."""

    pva_server_port: Port = 5075
    events_tail: int = Field(default=50, ge=1, le=1000)
    log_level: LogLevel | None = None

    _v_port = field_validator("pva_server_port")(_port)


class Registry(_Section):
    """``[registry]``: the registry IOC (client side)."""

    pva_server_port: Port = 5077
    check_period: float = Field(default=5.0, ge=0.05, le=3600)
    log_level: LogLevel | None = None

    _v_port = field_validator("pva_server_port")(_port)


class Queue(_Section):
    """``[queue]``: the queue IOC (client side; needs ``[queue_server]``)."""

    pva_server_port: Port = 5078
    locks: bool = True
    lock_owner: str | None = None
    exec_lease: float = Field(default=60.0, gt=0, le=86400)
    queued_lease: float = Field(default=600.0, gt=0, le=86400)
    log_level: LogLevel | None = None

    _v_port = field_validator("pva_server_port")(_port)


class Guard(_Section):
    """``[guard]``: the guard gateway (serves the client side, reaches the device side).

    Attributes:
        pva_server_port: the guard's PVA TCP port on the client side.
        gateway_config: a site pvagw JSON (with a ``guard`` section) used instead of the one
            generated from ``[network]`` (``docs/guard.md``).
        access: site ACF file; pvlist: site pvlist file (for the generated config).
        stale_after: seconds without the coordination heartbeat before failing closed.
        audit_tail: rows of ``Guard:Audit``.
    """

    pva_server_port: Port = 5079
    gateway_config: str | None = None
    access: str | None = None
    pvlist: str | None = None
    stale_after: float = Field(default=2.0, gt=0, le=60)
    audit_tail: int = Field(default=100, ge=1, le=10000)

    _v_port = field_validator("pva_server_port")(_port)


class CABridge(_Section):
    """``[ca_bridge]``: the flat-PV Channel Access bridge (``python -m bridges.flat``).

    Serves CA on the client side (``network.client.interfaces``, ``ca_server_port``) and reads the
    lock/registry/queue PVs and device PVs over PVA from ``upstream`` (through the guard).

    Attributes:
        interfaces: addresses the CA server binds (default: ``network.client.interfaces``).
        ca_server_port: CA server port (default: ``network.client.ca_server_port``).
        upstream: which side's PVA the bridge reads (``client``: through the guard).
        pva_server_port: TCP port of the bridge's own PVA server (``Flat:*`` PVs), client side.
        stale_after: seconds without ``Coord:Heartbeat`` before device writes are refused.
        put_timeout: seconds a forwarded put may take upstream.
    """

    interfaces: list[str] | None = None
    ca_server_port: Port | None = None
    upstream: Literal["client"] = "client"
    pva_server_port: Port = 5080
    stale_after: float = Field(default=2.0, gt=0, le=60)
    put_timeout: float = Field(default=300.0, gt=0, le=86400)
    log_level: LogLevel | None = None

    _v_port = field_validator("ca_server_port")(_opt_port)
    _v_pva_port = field_validator("pva_server_port")(_port)
    _v_addr = field_validator("interfaces")(_opt_addresses)


class WebBridge(_Section):
    """``[web_bridge]``: the PVWS web bridge (``python -m bridges.pvws``) behind nginx.

    Attributes:
        listen_host: address the bridge binds (nginx in front: 127.0.0.1).
        listen_port: its HTTP/websocket port.
        upstream: which side's PVA the bridge reads (``client``: through the guard).
        writes: allow writes at all (false: read-only web clients).
        auth: ``header`` (nginx authenticates, the bridge reads ``trusted_proxy_header`` from
            ``trusted_proxies``), ``password`` (the bridge logs users in against
            ``password_file``) or ``none`` (read-only, anonymous).
        password_file: argon2 user file for ``auth = "password"`` (systemd: the credential
            ``$PVCOORD_WEB_PASSWORD_FILE`` wins).
        trusted_proxy_header: header carrying the user name nginx authenticated.
        trusted_proxies: peers whose ``trusted_proxy_header`` is believed (nginx's address).
        server_name: public host name nginx serves (``server_name``).
        https_port: nginx's TLS port.
        admins: web users who may close other users' sockets.
        throttle_ms: per-PV coalescing period of updates to one socket, ms (the last state is
            always sent).
        default_type: scheme of PV names without one (``pva``; PVWS clients expect ``ca``).
        ca_via: how ``ca://`` names are read: ``ca`` (Channel Access on the client side, e.g.
            the CA bridge) or ``pva`` (PVA under the same name).
        max_pvs: most PVs one socket may subscribe.
        max_channels: most distinct channels open for all sockets together.
        max_sockets: most websockets open at once.
        pva_server_port: TCP port of the bridge's PVA server (only its status PVs,
            ``Web:Heartbeat``, ``Web:Version``, ``Web:StartTime``), client side.
    """

    listen_host: str = "127.0.0.1"
    listen_port: Port = 8080
    upstream: Literal["client"] = "client"
    writes: bool = True
    auth: Literal["header", "password", "none"] = "header"
    password_file: str | None = None
    trusted_proxy_header: str = Field(default="X-Remote-User", pattern=r"^[A-Za-z0-9-]{1,64}$")
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    server_name: str = "localhost"
    https_port: Port = 443
    admins: list[str] = Field(default_factory=list[str])
    throttle_ms: float = Field(default=20.0, ge=0, le=10000)
    default_type: Literal["pva", "ca"] = "pva"
    ca_via: Literal["ca", "pva"] = "ca"
    max_pvs: int = Field(default=5000, ge=1, le=1_000_000)
    max_channels: int = Field(default=20000, ge=1, le=10_000_000)
    max_sockets: int = Field(default=1000, ge=1, le=100_000)
    pva_server_port: Port = 5081
    log_level: LogLevel | None = None

    _v_port = field_validator("listen_port", "https_port", "pva_server_port")(_port)
    _v_addr = field_validator("trusted_proxies")(_addresses)
    _v_host = field_validator("listen_host")(_address)


class TLS(_Section):
    """``[tls]``: certificate and key nginx terminates TLS with (PEM files)."""

    certificate: str
    key: str


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")


class EndstationConfig(_Section):
    """A whole endstation file (see the module docstring and ``docs/deploy.md``)."""

    prefix: str
    name: str | None = None
    log_level: LogLevel = "INFO"
    network: Network = Field(default_factory=Network)
    files: Files
    store: Store = Field(default_factory=Store)
    coordination: Coordination = Field(default_factory=Coordination)
    registry: Registry = Field(default_factory=Registry)
    queue_server: QueueServer | None = None
    queue: Queue | None = None
    guard: Guard | None = None
    ca_bridge: CABridge | None = None
    web_bridge: WebBridge | None = None
    tls: TLS | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        try:
            return check_prefix(v)
        except ValueError as e:
            raise _err("bad_prefix", "{reason}", reason=str(e)) from None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise _err("bad_value", "'{v}' is not a systemd instance name (a-z, 0-9, _ and -, "
                       "at most 32)", v=v)
        return v

    @property
    def instance(self) -> str:
        """The systemd instance name: ``name``, else the prefix lower-cased without colons."""
        return self.name or re.sub(r"[^a-z0-9_-]", "-", self.prefix.rstrip(":").lower())

    def processes(self) -> list[str]:
        """Names of the processes this endstation runs, in start order."""
        out = ["registry", "coordination"]
        if self.queue is not None:
            out.append("queue")
        if self.guard is not None:
            out.append("guard")
        if self.ca_bridge is not None:
            out.append("flat")
        if self.web_bridge is not None:
            out.append("pvws")
        return out


# --- where each key is ------------------------------------------------------------------------

_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                     r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split_key(key: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return tuple(p.strip("\"'") for p in parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table and key path of TOML ``text`` to its 1-based line.

    ``tomllib`` gives no positions for values; this index is what error messages use. Keys in
    multi-line strings are not keys (skipped); keys of an inline table map to the line of its key.
    """
    out: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        m = _HEADER_RE.match(line)
        if m:
            table = _split_key(m.group(1))
            out.setdefault(table, n)
            continue
        m = _KEY_RE.match(line)
        if m:
            out.setdefault(table + _split_key(m.group(1)), n)
            rest = line[m.end():]
            for q in ('"""', "'''"):
                if rest.count(q) % 2 == 1:
                    in_string = q
    return out


def _line_of(index: dict[tuple[str, ...], int], path: Iterable[object]) -> int:
    p = tuple(str(x) for x in path)
    while p:
        if p in index:
            return index[p]
        p = p[:-1]
    return 1


# --- loading ----------------------------------------------------------------------------------

_PYDANTIC_CODES = {
    "extra_forbidden": "unknown_key",
    "missing": "missing",
    "literal_error": "bad_value",
    "string_pattern_mismatch": "bad_value",
    "too_short": "bad_value",
}


def _issue_from(err: Any, index: dict[tuple[str, ...], int]) -> ConfigIssue:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind in CODES:
        code = kind
    elif kind in _PYDANTIC_CODES:
        code = _PYDANTIC_CODES[kind]
    elif kind.endswith(("_type", "_parsing")):
        code = "bad_type"
    else:
        code = "bad_value"
    msg = err["msg"].removeprefix("Value error, ")
    if code == "unknown_key":
        msg = f"unknown key {loc[-1]!r}"
    elif code == "missing":
        msg = f"required key {loc[-1]!r} is missing"
    elif code in ("bad_type", "bad_value") and "input" in err:
        msg = f"{msg} (got {err['input']!r})"
    return ConfigIssue(_line_of(index, loc), ".".join(str(x) for x in loc), code, msg)


def _resolve(base: Path, name: str | None) -> str | None:
    if not name:
        return name
    p = Path(name)
    return str(p if p.is_absolute() else base / p)


def _check_files(cfg: EndstationConfig, base: Path,
                 index: dict[tuple[str, ...], int], deep: bool) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def issue(path: tuple[str, ...], code: str, msg: str) -> None:
        issues.append(ConfigIssue(_line_of(index, path), ".".join(path), code, msg))

    named: list[tuple[tuple[str, ...], str | None]] = [
        (("files", "policy"), cfg.files.policy), (("files", "registry"), cfg.files.registry),
    ]
    if cfg.queue_server is not None:
        named.append((("queue_server", "public_key_file"), cfg.queue_server.public_key_file))
    if cfg.guard is not None:
        named += [(("guard", k), getattr(cfg.guard, k))
                  for k in ("gateway_config", "access", "pvlist")]
    if cfg.tls is not None:
        named += [(("tls", "certificate"), cfg.tls.certificate), (("tls", "key"), cfg.tls.key)]
    for path, name in named:
        full = _resolve(base, name)
        if full and not Path(full).is_file():
            issue(path, "missing_file", f"{full} does not exist or is not a file")
    if not deep:
        return issues
    pol = _resolve(base, cfg.files.policy)
    if pol and Path(pol).is_file():
        try:
            policy = load_policy(pol)
        except PolicyError as e:
            issue(("files", "policy"), "bad_policy", str(e))
        else:
            issues += _check_web_delegate(cfg, policy, pol, index)
    elif not pol:
        issues += _check_web_delegate(cfg, Policy(), "(built-in policy)", index)
    reg = _resolve(base, cfg.files.registry)
    if reg and Path(reg).is_file():
        try:
            load_registry(reg)
        except RegistryFileError as e:
            issue(("files", "registry"), "bad_registry", str(e))
    return issues


WEB_BRIDGE_ACCOUNT = "pvcoord-web"
"""The web bridge's OS account (``User=`` of ``systemd/pvcoord-pvws@.service``): the PVA account
its puts reach the guard with."""


def _check_web_delegate(cfg: EndstationConfig, policy: Policy, source: str,
                        index: dict[tuple[str, ...], int]) -> list[ConfigIssue]:
    """``not_delegate`` when the web bridge writes through the guard as a non-delegate.

    The bridge (``[web_bridge]``, ``writes``, an ``auth`` with users) reads and writes on the
    client side, i.e. through the ``[guard]``; every put carries :data:`WEB_BRIDGE_ACCOUNT` from
    the endstation host (one of ``network.client.interfaces``, the address the guard sees). Unless
    the policy names that account in ``access.delegates`` from one of those addresses, the guard
    refuses the bridge's puts to every device a web user holds. Role principals are not
    considered (the account's groups on the target host are not known here).
    """
    w = cfg.web_bridge
    if w is None or not w.writes or w.auth == "none" or cfg.guard is None:
        return []
    hosts = cfg.network.client.interfaces
    if any(matches(policy.access.delegates, WEB_BRIDGE_ACCOUNT, (), h, policy.hosts)
           for h in hosts):
        return []
    who = f"{WEB_BRIDGE_ACCOUNT}@{hosts[0]}"
    return [ConfigIssue(
        _line_of(index, ("web_bridge", "writes")), "web_bridge.writes", "not_delegate",
        f"the web bridge writes through the guard as {WEB_BRIDGE_ACCOUNT} from {hosts[0]}, but "
        f"the policy {source} does not name it in access.delegates "
        f"({', '.join(policy.access.delegates) or 'none'}): the guard would refuse its puts to "
        f"every device a web user holds. Add to the policy's [access]: delegates = [\"{who}\"] "
        f"(also in trusted_services), and [access.on_behalf_of] {WEB_BRIDGE_ACCOUNT} = [the web "
        "users]; or set web_bridge.writes = false")]


def _check_consistency(cfg: EndstationConfig,
                       index: dict[tuple[str, ...], int]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def issue(path: tuple[str, ...], code: str, msg: str) -> None:
        issues.append(ConfigIssue(_line_of(index, path), ".".join(path), code, msg))

    if cfg.queue is not None and cfg.queue_server is None:
        issue(("queue",), "needs_section", "[queue] needs [queue_server] (the RE Manager)")
    if cfg.queue_server is not None and cfg.queue is None:
        issue(("queue_server",), "needs_section",
              "[queue_server] is set but there is no [queue] section (the queue IOC)")
    if cfg.web_bridge is not None and cfg.tls is None:
        issue(("web_bridge",), "needs_section", "[web_bridge] needs [tls] (nginx terminates TLS)")
    # TCP ports of the client side: each listener once
    c = cfg.network.client
    tcp: list[tuple[tuple[str, ...], int]] = [
        (("coordination", "pva_server_port"), cfg.coordination.pva_server_port),
        (("registry", "pva_server_port"), cfg.registry.pva_server_port),
    ]
    if cfg.queue is not None:
        tcp.append((("queue", "pva_server_port"), cfg.queue.pva_server_port))
    if cfg.guard is not None:
        tcp.append((("guard", "pva_server_port"), cfg.guard.pva_server_port))
    if cfg.ca_bridge is not None:
        tcp.append((("ca_bridge", "ca_server_port"), cfg.ca_bridge.ca_server_port
                    or c.ca_server_port))
        tcp.append((("ca_bridge", "pva_server_port"), cfg.ca_bridge.pva_server_port))
    if cfg.web_bridge is not None:
        tcp.append((("web_bridge", "pva_server_port"), cfg.web_bridge.pva_server_port))
    if cfg.web_bridge is not None and cfg.web_bridge.listen_host in c.interfaces + ["0.0.0.0"]:
        tcp.append((("web_bridge", "listen_port"), cfg.web_bridge.listen_port))
    seen: dict[int, tuple[str, ...]] = {}
    for path, port in tcp:
        if port in seen:
            issue(path, "port_clash",
                  f"port {port} is already used by {'.'.join(seen[port])}")
        else:
            seen[port] = path
    return issues


def parse_endstation(text: str, source: str = "<endstation>", base: Path | None = None,
                     deep: bool = True) -> EndstationConfig:
    """Parse and check endstation ``text``; relative file names are resolved against ``base``.

    Args:
        text: the TOML text.
        source: file name for messages.
        base: directory of the file (``None``: file names are not checked or resolved).
        deep: also load the policy and registry files it names (what ``config check`` does).

    Returns:
        The configuration, with file names made absolute.

    Raises:
        EndstationError: every error found (syntax, keys, values, files), each with its line.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise EndstationError(source, [ConfigIssue(
            int(m.group(1)) if m else 1, "", "syntax", str(e))]) from None
    index = key_lines(text)
    try:
        cfg = EndstationConfig.model_validate(data)
    except ValidationError as e:
        issues = sorted((_issue_from(err, index) for err in e.errors()),
                        key=lambda i: i.line)
        raise EndstationError(source, issues) from None
    issues = _check_consistency(cfg, index)
    if base is not None:
        issues += _check_files(cfg, base, index, deep)
        cfg.files.policy = _resolve(base, cfg.files.policy)
        cfg.files.registry = _resolve(base, cfg.files.registry) or cfg.files.registry
        if cfg.queue_server is not None:
            cfg.queue_server.public_key_file = _resolve(base, cfg.queue_server.public_key_file)
        if cfg.guard is not None:
            for k in ("gateway_config", "access", "pvlist"):
                setattr(cfg.guard, k, _resolve(base, getattr(cfg.guard, k)))
        if cfg.web_bridge is not None:
            cfg.web_bridge.password_file = _resolve(base, cfg.web_bridge.password_file)
        if cfg.tls is not None:
            cfg.tls.certificate = _resolve(base, cfg.tls.certificate) or ""
            cfg.tls.key = _resolve(base, cfg.tls.key) or ""
    if issues:
        raise EndstationError(source, sorted(issues, key=lambda i: i.line))
    return cfg


def load_endstation(path: str | Path, deep: bool = False) -> EndstationConfig:
    """Load the endstation file at ``path`` (see :func:`parse_endstation`).

    Raises:
        EndstationError: the file cannot be read or has errors.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        issue = ConfigIssue(0, "", "missing_file", f"cannot read the endstation file: {e}")
        raise EndstationError(str(p), [issue]) from None
    return parse_endstation(text, str(p), p.resolve().parent, deep=deep)


# --- what each process gets -------------------------------------------------------------------

PROCESS_NAMES = ("coordination", "registry", "queue", "guard", "flat", "pvws")
"""Processes an endstation file configures (``flat``: CA bridge, ``pvws``: web bridge)."""


def _yes(b: bool) -> str:
    return "YES" if b else "NO"


def process_env(cfg: EndstationConfig, process: str) -> dict[str, str]:
    """The ``EPICS_*`` environment of ``process`` (one of :data:`PROCESS_NAMES`).

    Every process is a PVA client and server on the client side; its server binds the client
    interfaces on its own TCP port. The CA bridge also serves Channel Access there.

    Raises:
        ValueError: unknown process, or its section is missing.
    """
    if process not in PROCESS_NAMES:
        raise ValueError(f"unknown process {process!r}: one of {', '.join(PROCESS_NAMES)}")
    c = cfg.network.client
    env = {
        "EPICS_PVA_ADDR_LIST": " ".join(c.search),
        "EPICS_PVA_AUTO_ADDR_LIST": _yes(c.auto_addr_list),
        "EPICS_PVA_BROADCAST_PORT": str(c.pva_broadcast_port),
        "EPICS_PVAS_INTF_ADDR_LIST": " ".join(c.interfaces),
        "EPICS_PVAS_BEACON_ADDR_LIST": " ".join(c.search),
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": _yes(c.auto_addr_list),
        "EPICS_PVAS_BROADCAST_PORT": str(c.pva_broadcast_port),
    }
    section = {"coordination": cfg.coordination, "registry": cfg.registry, "queue": cfg.queue,
               "guard": cfg.guard}.get(process)
    if process in ("queue", "guard") and section is None:
        raise ValueError(f"the endstation file has no [{process}] section")
    section = {"flat": cfg.ca_bridge, "pvws": cfg.web_bridge}.get(process, section)
    port = getattr(section, "pva_server_port", None)
    if port is not None:
        env["EPICS_PVA_SERVER_PORT"] = env["EPICS_PVAS_SERVER_PORT"] = str(port)
    if process == "flat":
        if cfg.ca_bridge is None:
            raise ValueError("the endstation file has no [ca_bridge] section")
        env.update(
            EPICS_CA_ADDR_LIST=" ".join(c.search), EPICS_CA_AUTO_ADDR_LIST=_yes(c.auto_addr_list),
            EPICS_CA_SERVER_PORT=str(cfg.ca_bridge.ca_server_port or c.ca_server_port),
            EPICS_CA_REPEATER_PORT=str(c.ca_repeater_port),
            EPICS_CAS_INTF_ADDR_LIST=" ".join(cfg.ca_bridge.interfaces or c.interfaces),
            EPICS_CAS_BEACON_ADDR_LIST=" ".join(c.search),
            EPICS_CAS_AUTO_BEACON_ADDR_LIST=_yes(c.auto_addr_list),
            EPICS_CAS_SERVER_PORT=str(cfg.ca_bridge.ca_server_port or c.ca_server_port),
        )
    if process == "pvws":
        if cfg.web_bridge is None:
            raise ValueError("the endstation file has no [web_bridge] section")
        # ca:// names are read with Channel Access on the client side (where the CA bridge is)
        ca_port = (cfg.ca_bridge.ca_server_port if cfg.ca_bridge is not None else None)
        env.update(
            EPICS_CA_ADDR_LIST=" ".join(c.search), EPICS_CA_AUTO_ADDR_LIST=_yes(c.auto_addr_list),
            EPICS_CA_SERVER_PORT=str(ca_port or c.ca_server_port),
            EPICS_CA_REPEATER_PORT=str(c.ca_repeater_port),
        )
    return env


def process_args(cfg: EndstationConfig, process: str) -> list[str]:
    """Command-line options of ``process`` as the endstation file sets them.

    The options are those of each process's ``--help`` (coordination, registry, queue, guard,
    ``bridges.flat`` and ``bridges.pvws``). Options given on the command line after these
    override them.

    Raises:
        ValueError: unknown process, or its section is missing.
    """
    p = ["--prefix", cfg.prefix]
    pol = ["--policy", cfg.files.policy] if cfg.files.policy else []
    if process == "coordination":
        s = cfg.coordination
        return [*p, *pol, "--store", cfg.store.url, "--registry-prefix", cfg.prefix,
                "--events-tail", str(s.events_tail), "--log-level", s.log_level or cfg.log_level]
    if process == "registry":
        s2 = cfg.registry
        return [*p, "--registry", cfg.files.registry, "--check-period", repr(s2.check_period),
                "--log-level", s2.log_level or cfg.log_level]
    if process == "queue":
        if cfg.queue is None or cfg.queue_server is None:
            raise ValueError("the endstation file has no [queue] and [queue_server] sections")
        q, qs = cfg.queue, cfg.queue_server
        out = [*p, *pol, "--zmq-control", qs.zmq_control, "--zmq-info", qs.zmq_info,
               "--exec-lease", repr(q.exec_lease), "--queued-lease", repr(q.queued_lease),
               "--log-level", q.log_level or cfg.log_level]
        if not q.locks:
            out.append("--no-locks")
        if q.lock_owner:
            out += ["--lock-owner", q.lock_owner]
        return out
    if process == "guard":
        if cfg.guard is None:
            raise ValueError("the endstation file has no [guard] section")
        return [*p, *pol]
    if process == "flat":
        if cfg.ca_bridge is None:
            raise ValueError("the endstation file has no [ca_bridge] section")
        client = [f"{k}={v}" for k, v in process_env(cfg, "flat").items()
                  if k.startswith("EPICS_PVA_") and k != "EPICS_PVA_SERVER_PORT"]
        b = cfg.ca_bridge
        out = [*p, "--registry-prefix", cfg.prefix, *pol, "--stale-after", repr(b.stale_after),
               "--put-timeout", repr(b.put_timeout)]
        for kv in client:  # device PVs through the guard, and pvcoord's services: client side
            out += ["--upstream", kv, "--service", kv]
        if (cfg.ca_bridge.log_level or cfg.log_level) == "DEBUG":
            out.append("-v")
        return out
    if process == "pvws":
        w = cfg.web_bridge
        if w is None:
            raise ValueError("the endstation file has no [web_bridge] section")
        out = [*p, "--registry-prefix", cfg.prefix, *pol, "--host", w.listen_host,
               "--port", str(w.listen_port), "--auth", w.auth, "--user-header",
               w.trusted_proxy_header, "--log-level", w.log_level or cfg.log_level,
               "--throttle-ms", repr(w.throttle_ms), "--default-type", w.default_type,
               "--ca-via", w.ca_via, "--max-pvs", str(w.max_pvs),
               "--max-channels", str(w.max_channels), "--max-sockets", str(w.max_sockets)]
        for proxy in w.trusted_proxies:
            out += ["--trusted-proxy", proxy]
        for admin in w.admins:
            out += ["--admin", admin]
        if w.writes:
            out.append("--writes")
        if w.password_file:
            out += ["--password-file", w.password_file]
        if cfg.tls is not None:
            out.append("--secure-cookies")  # users reach it through nginx's https
        return out
    raise ValueError(f"no command-line options for process {process!r}")


def guard_gateway(cfg: EndstationConfig) -> dict[str, Any]:
    """The guard's pvagw configuration (JSON object) generated from ``[network]`` and ``[guard]``.

    Serves the client side on ``guard.pva_server_port``, reaches the device side, and reads the
    lock state and registry only from the client side's search list (never autoaddrlist unless the
    file says so).

    Raises:
        ValueError: no ``[guard]`` section.
    """
    if cfg.guard is None:
        raise ValueError("the endstation file has no [guard] section")
    c, d, g = cfg.network.client, cfg.network.device, cfg.guard
    server: dict[str, Any] = {
        "name": "clients", "clients": ["devices"], "interface": list(c.interfaces),
        "addrlist": " ".join(c.search), "autoaddrlist": c.auto_addr_list,
        "bcastport": c.pva_broadcast_port, "serverport": g.pva_server_port,
    }
    if g.access:
        server["access"] = g.access
    if g.pvlist:
        server["pvlist"] = g.pvlist
    guard: dict[str, Any] = {
        "coordination": {"addrlist": " ".join(c.search), "autoaddrlist": c.auto_addr_list,
                         "bcastport": c.pva_broadcast_port},
        "registry_prefix": cfg.prefix, "stale_after": g.stale_after, "audit_tail": g.audit_tail,
    }
    if cfg.files.policy:
        guard["policy"] = cfg.files.policy
    return {
        "version": 2,
        "clients": [{"name": "devices", "provider": "pva", "addrlist": " ".join(d.search),
                     "autoaddrlist": d.auto_addr_list, "bcastport": d.pva_broadcast_port}],
        "servers": [server],
        "guard": guard,
    }


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for endstation files (tables of scalars, lists and sub-tables).

    Raises:
        TypeError: a value TOML cannot hold here (``None`` keys are skipped).
    """

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            items: list[Any] = list(v)  # pyright: ignore[reportUnknownArgumentType]
            return "[" + ", ".join(val(x) for x in items) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []

    def table(path: list[str], d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict)}
        subs: dict[str, dict[str, Any]] = {k: v for k, v in d.items() if isinstance(v, dict)}
        if path and (scalars or not subs):
            lines.extend(["", f"[{'.'.join(path)}]"])
        lines.extend(f"{k} = {val(v)}" for k, v in scalars.items())
        for k, v in subs.items():
            table([*path, k], v)

    table([], data)
    return "\n".join(lines).lstrip("\n") + "\n"


UNIT_OF = {"coordination": "pvcoord-coordination", "registry": "pvcoord-registry",
           "queue": "pvcoord-queue", "guard": "pvcoord-guard", "flat": "pvcoord-flat",
           "pvws": "pvcoord-pvws"}
"""systemd unit template (``NAME@.service``) of each process."""


def install_facts(path: str | Path) -> dict[str, Any]:
    """What installing the endstation file at ``path`` involves (``pvcoord config show``).

    Returns:
        ``instance``, ``prefix``, ``processes``, ``units`` (``pvcoord-X@INSTANCE.service``),
        ``deliver`` (files the file names by a relative path: delivered next to it), ``web``
        (nginx settings, or ``None`` without ``[web_bridge]``).

    Raises:
        EndstationError: the file is not valid (as :func:`load_endstation`).
    """
    cfg = load_endstation(path, deep=True)
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    rel: list[str] = []
    for section, keys in (("files", ("policy", "registry")),
                          ("queue_server", ("public_key_file",)),
                          ("guard", ("gateway_config", "access", "pvlist"))):
        for k in keys:
            v = raw.get(section, {}).get(k)
            if isinstance(v, str) and v and not Path(v).is_absolute():
                rel.append(v)
    web = None
    if cfg.web_bridge is not None and cfg.tls is not None:
        w = cfg.web_bridge
        web = {"upstream": f"{w.listen_host}:{w.listen_port}", "server_name": w.server_name,
               "https_port": w.https_port, "user_header": w.trusted_proxy_header,
               "tls_certificate": cfg.tls.certificate, "tls_key": cfg.tls.key}
    return {
        "instance": cfg.instance, "prefix": cfg.prefix, "processes": cfg.processes(),
        "units": [f"{UNIT_OF[p]}@{cfg.instance}.service" for p in cfg.processes()],
        "templates": [f"{UNIT_OF[p]}@.service" for p in cfg.processes()],
        "deliver": sorted(set(rel)), "web": web,
    }
