"""The guard's configuration file: a pvagw (``p4p.gw``) JSON config plus a ``guard`` section.

A site that already runs ``pvagw`` keeps its file (``clients``, ``servers``, their ``access`` ACF
and ``pvlist`` files) and adds::

    "guard": {
        "policy": "policy.toml",          /* pvcoord policy: unlocked_writable, emergency */
        "coordination": {                 /* where Coord:* and Registry:* are (client side) */
            "addrlist": "10.0.0.255", "autoaddrlist": false, "bcastport": 5076
        },
        "registry_prefix": "BL01:",       /* default: the guard's --prefix */
        "stale_after": 2.0,               /* s without Coord:Heartbeat -> fail closed */
        "audit_tail": 100                 /* rows in Guard:Audit */
    }

Without ``guard.coordination`` the guard finds the coordination and registry IOCs with its own
process environment (``EPICS_PVA_*``). C-style comments are allowed, as in pvagw. Relative file
names are relative to the config file. :func:`load_config` rejects a bad file with
``GuardConfigError("FILE: where: reason")``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .decision import STALE_AFTER


class GuardConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, the key and the reason."""


def _check_passthrough(model: BaseModel) -> None:
    for key in model.model_extra or {}:
        if not key.startswith("EPICS_PVA"):
            raise ValueError(f"unknown setting {key!r}")


class ClientConf(BaseModel):
    """How the guard searches for PVs on one side (pvagw ``clients`` entry keys)."""

    model_config = ConfigDict(extra="allow")

    provider: str = "pva"
    addrlist: str = ""
    autoaddrlist: bool = True
    bcastport: int | None = None
    serverport: int | None = None

    @model_validator(mode="after")
    def _extras(self) -> ClientConf:
        _check_passthrough(self)
        if self.provider != "pva":
            raise ValueError(f"provider {self.provider!r} is not supported: use 'pva'")
        return self

    def p4p_conf(self) -> dict[str, str]:
        """The ``Context(conf=...)`` dict, exactly as pvagw builds it."""
        conf = {
            "EPICS_PVA_ADDR_LIST": self.addrlist,
            "EPICS_PVA_AUTO_ADDR_LIST": "YES" if self.autoaddrlist else "NO",
        }
        if self.bcastport is not None:
            conf["EPICS_PVA_BROADCAST_PORT"] = str(self.bcastport)
        if self.serverport is not None:
            conf["EPICS_PVA_SERVER_PORT"] = str(self.serverport)
        for k, v in (self.model_extra or {}).items():
            conf[k] = str(v)
        return conf


class GatewayClient(ClientConf):
    """A pvagw ``clients`` entry: the device side."""

    name: str


class GatewayServer(BaseModel):
    """A pvagw ``servers`` entry: the client-facing side."""

    model_config = ConfigDict(extra="allow")

    name: str
    clients: list[str]
    interface: list[str] = Field(default_factory=lambda: ["0.0.0.0"])
    addrlist: str = ""
    autoaddrlist: bool = True
    ignoreaddr: str = ""
    bcastport: int | None = None
    serverport: int | None = None
    access: str = ""
    pvlist: str = ""
    acf_client: str | None = None
    getholdoff: float | None = None
    statusprefix: str | None = None

    @field_validator("interface", mode="before")
    @classmethod
    def _iface(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _extras(self) -> GatewayServer:
        _check_passthrough(self)
        return self

    def p4p_conf(self, interface: str) -> dict[str, str]:
        """The ``Server(conf=...)`` dict for one interface, exactly as pvagw builds it."""
        conf = {
            "EPICS_PVAS_INTF_ADDR_LIST": interface,
            "EPICS_PVAS_BEACON_ADDR_LIST": self.addrlist,
            "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "YES" if self.autoaddrlist else "NO",
            "EPICS_PVAS_IGNORE_ADDR_LIST": self.ignoreaddr,
        }
        if self.bcastport is not None:
            conf["EPICS_PVAS_BROADCAST_PORT"] = str(self.bcastport)
        if self.serverport is not None:
            conf["EPICS_PVAS_SERVER_PORT"] = str(self.serverport)
        for k, v in (self.model_extra or {}).items():
            conf[k] = str(v)
        return conf


class GuardSection(BaseModel):
    """The ``guard`` section: how the guard decides."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None
    coordination: ClientConf | None = None
    registry_prefix: str | None = None
    stale_after: float = Field(default=STALE_AFTER, gt=0, le=60)
    audit_tail: int = Field(default=100, ge=1, le=10000)


class GuardConfig(BaseModel):
    """A whole guard configuration file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    version: int = 2
    read_only: bool = Field(default=False, alias="readOnly")
    statsdb: str | None = None
    clients: list[GatewayClient]
    servers: list[GatewayServer]
    guard: GuardSection = Field(default_factory=GuardSection)

    def coordination_exposure(self) -> str:
        """'' when the lock/registry PVs are searched for only where the config says, else why not.

        PVA does not authenticate servers: whoever answers the guard's search for
        ``Coord:Locks`` / ``Registry:DevicePVs`` decides what it enforces. Without
        ``guard.coordination``, or with ``autoaddrlist`` on, the guard searches every broadcast
        address of the host (or whatever the process environment says).
        """
        c = self.guard.coordination
        if c is None:
            return ("guard.coordination is not set: the lock state and the registry are read "
                    "from whoever answers on the networks of the process's EPICS_PVA_* "
                    "environment (PVA does not authenticate servers)")
        if c.autoaddrlist:
            return ("guard.coordination.autoaddrlist is true: the lock state and the registry "
                    "are read from whoever answers on any broadcast network of this host (PVA "
                    "does not authenticate servers); name the IOCs' hosts in addrlist and set "
                    "autoaddrlist false")
        return ""

    @model_validator(mode="after")
    def _consistent(self) -> GuardConfig:
        names = [c.name for c in self.clients]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate client names: {names}")
        snames = [s.name for s in self.servers]
        if len(snames) != len(set(snames)):
            raise ValueError(f"duplicate server names: {snames}")
        if not self.servers:
            raise ValueError("servers: at least one server (the client-facing side) is needed")
        for s in self.servers:
            for c in s.clients:
                if c not in names:
                    raise ValueError(f"server {s.name!r} names unknown client {c!r}")
            if s.acf_client is not None and s.acf_client not in names:
                raise ValueError(f"server {s.name!r}: acf_client {s.acf_client!r} is not a client")
        return self


def _strip_comments(raw: str) -> str:
    """Replace C-style comments with whitespace (keeps line numbers), as pvagw does."""
    return re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), raw, flags=re.DOTALL)


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> GuardConfig:
    """Parse guard config ``text``; relative file names are resolved against ``base``.

    Raises:
        GuardConfigError: JSON syntax error (with line), unknown key, missing key, bad value.
    """
    try:
        data = json.loads(_strip_comments(text))
    except json.JSONDecodeError as e:
        raise GuardConfigError(f"{source}:{e.lineno}: JSON syntax error: {e.msg}") from None
    if not isinstance(data, dict):
        raise GuardConfigError(f"{source}: the top level must be a JSON object")
    try:
        conf = GuardConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(k) for k in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        raise GuardConfigError(f"{source}: {where}: {msg}") from None
    if conf.version not in (1, 2):
        raise GuardConfigError(f"{source}: version: {conf.version} is not 1 or 2")
    if base is not None:
        for s in conf.servers:
            s.access = _resolve(base, s.access)
            s.pvlist = _resolve(base, s.pvlist)
        if conf.guard.policy:
            conf.guard.policy = _resolve(base, conf.guard.policy)
    return conf


def _resolve(base: Path, name: str) -> str:
    if not name:
        return name
    p = Path(name)
    return str(p if p.is_absolute() else base / p)


def load_config(path: str | Path) -> GuardConfig:
    """Load the guard config file at ``path``.

    Raises:
        GuardConfigError: the file cannot be read or is not valid (see :func:`parse_config`).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise GuardConfigError(f"{p}: cannot read guard config: {e.strerror}") from None
    return parse_config(text, str(p), p.parent)


def read_site_file(path: str, what: str) -> str:
    """Text of the ACF or pvlist file ``path`` ('' for none).

    Raises:
        GuardConfigError: the file cannot be read.
    """
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise GuardConfigError(f"{path}: cannot read {what} file: {e.strerror}") from None


def load_guard_config(path: str | Path) -> GuardConfig:
    """Load ``path``: a pvagw JSON guard config, or an endstation TOML file (``*.toml``).

    From an endstation file the config is ``guard.gateway_config`` when set, else the one
    :func:`pvdb.endstation.guard_gateway` generates from its ``[network]`` and ``[guard]``.

    Raises:
        GuardConfigError: the file cannot be read or is not valid (every endstation error is in
            the message, with its line).
    """
    if not str(path).endswith(".toml"):
        return load_config(path)
    from pvdb.endstation import EndstationError, guard_gateway, load_endstation

    try:
        cfg = load_endstation(path)
        if cfg.guard is not None and cfg.guard.gateway_config:
            return load_config(cfg.guard.gateway_config)
        data = guard_gateway(cfg)
    except EndstationError as e:
        raise GuardConfigError(f"endstation file rejected:\n{e}") from None
    except ValueError as e:
        raise GuardConfigError(f"{path}: {e}") from None
    return parse_config(json.dumps(data), f"{path} (generated guard config)")
