"""The endstation policy: who may take which lock, leases, trusted services, strict mode.

One TOML file per endstation (format in ``docs/policy.md``)::

    [access]
    unlocked_writable = true            # false: strict, only a lock holder may write a device
    trusted_services = ["pvcoord-web"]  # may act on behalf of a named user
    force_release = ["role/staff"]      # may remove anyone's lock
    emergency = ["root"]                # guard: may write when the lock state is unknown
    queue_control = ["role/staff", "role/users"]  # queue IOC control RPCs

    [lock_types.MANUAL_OPERATOR]
    allow = ["*"]                       # account names, "role/<group>" or "*"
    default_lease = 300                 # seconds
    max_lease = 3600                    # seconds

:func:`load_policy` rejects a bad file with ``PolicyError("FILE:LINE: reason")``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .models import LockType

ANYONE = "*"
ROLE_PREFIX = "role/"
HAG_PREFIX = "hag/"
ANONYMOUS = "anonymous"
"""The account of a client that sent no identity (PVA ``anonymous`` authentication)."""
_NAME = r"[A-Za-z0-9_.\-]+"
_HOSTSPEC = r"[A-Za-z0-9_.:/\-\[\]]+"
_PRINCIPAL_RE = re.compile(
    r"^(?P<who>\*|role/" + _NAME + r"|" + _NAME + r")(?:@(?P<host>" + _HOSTSPEC + r"))?$")
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")
"""An account name pvcoord accepts from a client (no ``@``, no control or bidi characters)."""


DEFAULT_QUEUE_CONTROL = ("root", "role/staff", "role/users")
"""Who may use the queue IOC's control RPCs when the policy does not say: root, the beamline
staff and its users group (OS groups ``staff`` and ``users`` of the IOC host), not everyone: a
queue item takes QUEUE_EXECUTING locks, which preempt manual locks."""


class PolicyError(ValueError):
    """A policy file that cannot be used; the message starts with ``FILE:LINE:``."""


def _check_hostspec(spec: str) -> None:
    if spec.startswith(HAG_PREFIX):
        if not re.fullmatch(_NAME, spec[len(HAG_PREFIX):]):
            raise ValueError(f"{spec!r} is not a host group name")
        return
    try:
        ipaddress.ip_network(spec.strip("[]"), strict=False)
    except ValueError:
        raise ValueError(
            f"host {spec!r} is not an IP address, a subnet (10.2.0.0/24) or hag/<group>"
        ) from None


def _check_principals(values: list[str]) -> list[str]:
    for v in values:
        m = _PRINCIPAL_RE.match(v)
        if not m:
            raise ValueError(
                f"{v!r} is not an account name, 'role/<group>' or '*' (optionally @HOST, "
                "@SUBNET or @hag/<group>)")
        if m.group("host"):
            _check_hostspec(m.group("host"))
    return values


def _host_in(spec: str, host: str, hosts: Mapping[str, Sequence[str]]) -> bool:
    """Whether peer address ``host`` is in ``spec`` (address, subnet or ``hag/<group>``)."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # not an address (an unknown peer): a host-bound principal never matches
    specs = hosts.get(spec[len(HAG_PREFIX):], ()) if spec.startswith(HAG_PREFIX) else (spec,)
    for sp in specs:
        try:
            if addr in ipaddress.ip_network(sp.strip("[]"), strict=False):
                return True
        except ValueError:
            continue
    return False


def matches(
    principals: Iterable[str],
    account: str,
    roles: Iterable[str],
    host: str | None = None,
    hosts: Mapping[str, Sequence[str]] | None = None,
) -> bool:
    """Whether ``account`` (with OS groups ``roles``, at peer address ``host``) is named.

    A principal is ``*`` (anyone), an account name, or ``role/<group>``, optionally bound to
    hosts like an ACF ``UAG`` + ``HAG`` rule: ``alice@10.2.0.31``, ``role/staff@10.2.0.0/24``,
    ``*@hag/consoles`` (``hosts`` maps group names to addresses and subnets). A host-bound
    principal matches only when ``host`` (the peer address the server saw, never a name the client
    sent) is given and inside it.
    """
    roles = set(roles)
    for p in principals:
        m = _PRINCIPAL_RE.match(p)
        if m is None:
            continue
        who, where = m.group("who"), m.group("host")
        if where is not None and (host is None or not _host_in(where, host, hosts or {})):
            continue
        if who == ANYONE or who == account:
            return True
        if who.startswith(ROLE_PREFIX) and who[len(ROLE_PREFIX):] in roles:
            return True
    return False


def host_roles(account: str) -> frozenset[str]:
    """OS groups of ``account`` in this host's group database; empty if the account is unknown.

    What a client claims (PVA ``op.roles()`` gives an unknown account a group of its own name,
    so a client claiming ``staff`` would satisfy ``role/staff``) is never used for roles.
    """
    import grp
    import os
    import pwd

    if not ACCOUNT_RE.match(account) or account == ANONYMOUS:
        return frozenset()
    try:
        pw = pwd.getpwnam(account)
        return frozenset(grp.getgrgid(g).gr_name for g in os.getgrouplist(account, pw.pw_gid))
    except (KeyError, OSError):
        return frozenset()


ROLES_TTL = 1.0
"""Seconds :class:`HostRolesCache` keeps an account's groups (a group change counts after it)."""


class HostRolesCache:
    """:func:`host_roles` remembered per account for ``ttl`` seconds (monotonic clock).

    The group database is read once per account and second instead of on every request (two
    or more NSS look-ups, 50-200 us on the project VM, on every RPC). A change of an account's
    groups takes effect within ``ttl`` s. At most ``size`` accounts are kept (the oldest entry
    is dropped first). Thread-safe (one dict, replaced entries only).

    Args:
        ttl: seconds an answer is reused.
        size: accounts kept.
        lookup: the group look-up (default :func:`host_roles`).
        clock: monotonic seconds (tests pass a fake clock).
    """

    def __init__(self, ttl: float = ROLES_TTL, size: int = 1024,
                 lookup: Callable[[str], frozenset[str]] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.ttl, self.size = ttl, size
        self._lookup = lookup or host_roles
        self._clock = clock or time.monotonic
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def __call__(self, account: str) -> frozenset[str]:
        """The OS groups of ``account`` (:func:`host_roles`), at most ``ttl`` s old."""
        now = self._clock()
        hit = self._cache.get(account)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        roles = self._lookup(account)
        if len(self._cache) >= self.size and account not in self._cache:
            try:
                self._cache.pop(next(iter(self._cache)))
            except (StopIteration, KeyError, RuntimeError):  # emptied by another thread
                pass
        self._cache[account] = (now, roles)
        return roles


class LockTypePolicy(BaseModel):
    """Who may take one lock type, and its lease limits (seconds)."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=lambda: [ANYONE])
    default_lease: float = 300.0
    max_lease: float = 3600.0

    _v_allow = field_validator("allow")(_check_principals)

    @model_validator(mode="after")
    def _leases(self) -> LockTypePolicy:
        for name in ("default_lease", "max_lease"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {v}")
        if self.default_lease > self.max_lease:
            raise ValueError(
                f"default_lease ({self.default_lease}) is longer than max_lease ({self.max_lease})"
            )
        return self


def _default_lock_types() -> dict[LockType, LockTypePolicy]:
    return {
        LockType.MAINTENANCE: LockTypePolicy(
            allow=["root", "role/staff"], default_lease=3600, max_lease=7 * 86400
        ),
        LockType.QUEUE_EXECUTING: LockTypePolicy(allow=["root"], default_lease=120, max_lease=600),
        LockType.MANUAL_OPERATOR: LockTypePolicy(default_lease=300, max_lease=8 * 3600),
        LockType.QUEUE_QUEUED: LockTypePolicy(allow=["root"], default_lease=600, max_lease=86400),
    }


class AccessPolicy(BaseModel):
    """Endstation-wide access settings."""

    model_config = ConfigDict(extra="forbid")

    unlocked_writable: bool = True
    trusted_services: list[str] = Field(default_factory=list)
    force_release: list[str] = Field(default_factory=lambda: ["root"])
    emergency: list[str] = Field(default_factory=list)
    queue_control: list[str] = Field(default_factory=lambda: list(DEFAULT_QUEUE_CONTROL))
    on_behalf_of: dict[str, list[str]] = Field(default_factory=dict)
    """Trusted service account -> the users it may act for (principals)."""
    anonymous_locks: bool = False
    """Whether an anonymous client (no identity) may take locks; default: read only."""
    delegates: list[str] = Field(default_factory=list)
    """Trusted services whose *device writes* the guard lets through for a device held by a user
    they may act for (:meth:`Policy.may_delegate_write`): e.g. the web bridge, whose puts reach
    the guard under the bridge's account. Each must also match ``trusted_services``."""
    refusal_audit_per_minute: int = Field(default=120, ge=1, le=100_000)
    """Refused requests of one client (account and host) stored as audit events per minute; the
    rest are counted, and the next stored one says how many."""

    _v = field_validator(
        "trusted_services", "force_release", "emergency", "queue_control", "delegates"
    )(_check_principals)

    @model_validator(mode="after")
    def _delegates_are_trusted(self) -> AccessPolicy:
        def who(principal: str) -> str:
            m = _PRINCIPAL_RE.match(principal)
            return m.group("who") if m else principal

        trusted = {who(t) for t in self.trusted_services}
        untrusted = [d for d in self.delegates if who(d) not in trusted]
        if untrusted:
            raise ValueError(
                f"delegates {', '.join(untrusted)} must also be listed in trusted_services (a "
                "delegate writes for the users it may act for, which only a trusted service may)")
        return self

    @field_validator("on_behalf_of")
    @classmethod
    def _v_obo(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for service, users in v.items():
            if not ACCOUNT_RE.match(service):
                raise ValueError(f"{service!r} is not a service account name")
            _check_principals(users)
        return v


LINK_FIELDS: frozenset[str] = frozenset({
    "OUT", "INP", "DOL", "FLNK", "SDIS", "SELL", "TSEL", "SIML", "SIOL", "SIMS", "NVL", "OCAL",
    "CALC", "RDBL", "RLNK", "DOLN", "OMSL", "DISV", "DISS", "ASG",
})
"""Fields that redirect a record (links, their modes and expressions, disable and security
settings): staff only, on every device class. ``INPA``..``INPU``, ``OUTA``.., ``LNK0``..,
``DOL0``.. and ``DLY0``.. are links too (:func:`is_link_field`)."""
_LINK_FIELD_RE = re.compile(r"^(?:INP|OUT|LNK|DOL|DLY)[0-9A-Z]\Z")


def is_link_field(field: str) -> bool:
    """Whether record field ``field`` (upper case) redirects where a record reads or writes."""
    return field in LINK_FIELDS or bool(_LINK_FIELD_RE.match(field))


class FieldRules(BaseModel):
    """Who may write which record fields (like EPICS access security levels ASL0/ASL1).

    Operators (anyone the lock decision lets write a device) may write the value fields of the
    device's class; every other field and every link field only ``staff``. PVs of no registered
    device behind the guard follow ``unregistered``.
    """

    model_config = ConfigDict(extra="forbid")

    staff: list[str] = Field(default_factory=lambda: ["root", "role/staff"])
    operator_fields: list[str] = Field(default_factory=lambda: ["VAL"])
    """Fields operators may write on any device class (no field named means VAL)."""
    classes: dict[str, list[str]] = Field(default_factory=dict)
    """Device class -> the fields operators may write on it (replaces ``operator_fields``)."""
    unregistered: str = "staff"
    """PVs of no device behind the guard: ``staff`` (default), ``everyone`` or ``nobody``."""

    _v_staff = field_validator("staff")(_check_principals)

    @field_validator("operator_fields")
    @classmethod
    def _v_fields(cls, v: list[str]) -> list[str]:
        return _check_fields(v)

    @field_validator("classes")
    @classmethod
    def _v_classes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for fields in v.values():
            _check_fields(fields)
        return v

    @field_validator("unregistered")
    @classmethod
    def _v_unregistered(cls, v: str) -> str:
        if v not in ("staff", "everyone", "nobody"):
            raise ValueError(f"{v!r}: use 'staff', 'everyone' or 'nobody'")
        return v


def _check_fields(fields: list[str]) -> list[str]:
    for f in fields:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,7}", f):
            raise ValueError(f"{f!r} is not a record field name (upper case, e.g. VAL)")
        if is_link_field(f):
            raise ValueError(f"{f} is a link field: only staff may write it, never operators")
    return fields


class Policy(BaseModel):
    """A whole policy file. Lock types missing from the file get the built-in defaults."""

    model_config = ConfigDict(extra="forbid")

    access: AccessPolicy = Field(default_factory=AccessPolicy)
    lock_types: dict[LockType, LockTypePolicy] = Field(default_factory=_default_lock_types)
    fields: FieldRules = Field(default_factory=FieldRules)
    hosts: dict[str, list[str]] = Field(default_factory=dict)
    """Host groups (like ACF ``HAG``): name -> addresses and subnets, used as ``@hag/<name>``."""

    @field_validator("hosts")
    @classmethod
    def _v_hosts(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, specs in v.items():
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"{name!r} is not a host group name")
            for spec in specs:
                if spec.startswith(HAG_PREFIX):
                    raise ValueError(f"hosts.{name}: {spec!r}: a group cannot name a group")
                _check_hostspec(spec)
        return v

    def _m(self, principals: Iterable[str], account: str, roles: Iterable[str],
           host: str | None) -> bool:
        return matches(principals, account, roles, host, self.hosts)

    @model_validator(mode="after")
    def _fill_types(self) -> Policy:
        defaults = _default_lock_types()
        for lt in LockType:
            self.lock_types.setdefault(lt, defaults[lt])
        return self

    def may_take(
        self, lock_type: LockType, account: str, roles: Iterable[str], host: str | None = None
    ) -> bool:
        """Whether ``account`` (at peer ``host``) may request ``lock_type``.

        An anonymous client takes no lock unless ``access.anonymous_locks`` says so.
        """
        if account == ANONYMOUS and not self.access.anonymous_locks:
            return False
        return self._m(self.lock_types[lock_type].allow, account, roles, host)

    def is_trusted_service(
        self, account: str, roles: Iterable[str], host: str | None = None
    ) -> bool:
        """Whether ``account`` may act on behalf of a named user."""
        return self._m(self.access.trusted_services, account, roles, host)

    def is_privileged(self, account: str, roles: Iterable[str]) -> bool:
        """Whether ``account`` is root, a service, emergency, force-release or staff account.

        Staff: named by a non-``*`` principal of MAINTENANCE or a queue lock type. Host parts
        are ignored here: a privilege anywhere is a privilege.
        """
        if account == "root":
            return True
        lists = [self.access.trusted_services, self.access.emergency, self.access.force_release,
                 *(self.lock_types[lt].allow for lt in (
                     LockType.MAINTENANCE, LockType.QUEUE_EXECUTING, LockType.QUEUE_QUEUED))]
        roles = set(roles)
        for principals in lists:
            for p in principals:
                m = _PRINCIPAL_RE.match(p)
                who = m.group("who") if m else p
                if who == ANYONE:
                    continue
                if who == account or (
                        who.startswith(ROLE_PREFIX) and who[len(ROLE_PREFIX):] in roles):
                    return True
        return False

    def may_act_for(
        self,
        service: str,
        service_roles: Iterable[str],
        service_host: str | None,
        user: str,
        user_roles: Iterable[str],
    ) -> str:
        """Why ``service`` may not act on behalf of ``user``, or ``""`` if it may.

        The service must be a trusted service (from its peer host, when the principal is
        host-bound). ``access.on_behalf_of[service]`` lists the users it may act for; without an
        entry it may act for any user who is not privileged (:meth:`is_privileged`). A
        privileged user (root, staff, a service or emergency account) is allowed only when
        named by account in that service's entry.
        """
        if not self.is_trusted_service(service, service_roles, service_host):
            trusted = ", ".join(self.access.trusted_services) or "none"
            return (f"{service} is not a trusted service account: onBehalfOf is refused "
                    f"(policy trusted_services: {trusted})")
        allowed = self.access.on_behalf_of.get(service)
        privileged = self.is_privileged(user, user_roles) or user == ANONYMOUS
        if allowed is not None:
            named = user in {m.group("who") for p in allowed
                             if (m := _PRINCIPAL_RE.match(p)) and not m.group("host")}
            if privileged and not named:
                return (f"{service} may not act on behalf of {user}: a privileged account "
                        "must be named by account in access.on_behalf_of")
            if not matches(allowed, user, user_roles, None, self.hosts) and not named:
                return (f"{service} may not act on behalf of {user} (policy "
                        f"on_behalf_of.{service}: {', '.join(allowed) or 'nobody'})")
            return ""
        if privileged:
            return (f"{service} may not act on behalf of {user}: root, staff, service and "
                    "emergency accounts only when access.on_behalf_of names them")
        return ""

    def may_delegate_write(
        self, service: str, service_roles: Iterable[str], service_host: str | None, holder: str
    ) -> str:
        """Why ``service`` may not write a device ``holder`` holds as its delegate, or ``""``.

        Allowed when ``service`` (from ``service_host``) is one of ``access.delegates`` and may act
        on behalf of ``holder`` (:meth:`may_act_for`, with the holder's roles from this host's group
        database). The trust this adds is none beyond ``onBehalfOf``: such a service could
        already release ``holder``'s lock on its behalf and then write the free device. What it
        keeps: locks of users the service may not act for (root, staff, the queue's service
        account unless named) stay closed to it at the guard.
        """
        if not self._m(self.access.delegates, service, service_roles, service_host):
            return (f"{service} is not a delegate (policy access.delegates: "
                    f"{', '.join(self.access.delegates) or 'none'})")
        return self.may_act_for(service, service_roles, service_host, holder,
                                host_roles(holder))

    def may_force_release(
        self, account: str, roles: Iterable[str], host: str | None = None
    ) -> bool:
        """Whether ``account`` may remove another holder's lock."""
        return self._m(self.access.force_release, account, roles, host)

    def is_emergency(self, account: str, roles: Iterable[str], host: str | None = None) -> bool:
        """Whether ``account`` may write through the guard while the lock state is unknown."""
        return self._m(self.access.emergency, account, roles, host)

    def is_staff(self, account: str, roles: Iterable[str], host: str | None = None) -> bool:
        """Whether ``account`` may write every field (``fields.staff``)."""
        return account != ANONYMOUS and self._m(self.fields.staff, account, roles, host)

    def unregistered_refusal(
        self, account: str, roles: Iterable[str], host: str | None = None
    ) -> str:
        """Why ``account`` may not write a PV of no registered device, or ``""`` if it may.

        The rule is ``fields.unregistered`` (``staff``: only ``fields.staff``; ``everyone``;
        ``nobody``); in strict mode (``access.unlocked_writable = false``) nobody. The worker
        hook asks it for the queue's account (``docs/queue.md``).
        """
        rule = self.fields.unregistered if self.access.unlocked_writable else "nobody"
        if rule == "everyone" or (rule == "staff" and self.is_staff(account, roles, host)):
            return ""
        if rule == "staff":
            return (f"it belongs to no registered device: only staff "
                    f"({', '.join(self.fields.staff)}) may write it (policy "
                    "fields.unregistered = 'staff')")
        return ("it belongs to no registered device and the policy lets nobody write it "
                "(fields.unregistered, or strict: unlocked_writable = false)")

    def field_refusal(
        self, device_class: str, field: str, account: str, roles: Iterable[str],
        host: str | None = None,
    ) -> str:
        """Why ``account`` may not write ``field`` of a device of ``device_class``, or ``""``.

        ``field`` ``""`` (none named) is ``VAL``. Operators: the class's fields (``fields.classes``)
        or ``fields.operator_fields``; staff: every field.
        """
        f = field or "VAL"
        allowed = self.fields.classes.get(device_class, self.fields.operator_fields)
        if f in allowed and not is_link_field(f):
            return ""
        if self.is_staff(account, roles, host):
            return ""
        kind = "a link field" if is_link_field(f) else "not a value field"
        of = f" of class {device_class}" if device_class else ""
        return (f"field {f} is {kind}{of}: only staff ({', '.join(self.fields.staff)}) may "
                f"write it; operators may write {', '.join(allowed) or 'no field'}")

    def may_control_queue(
        self, account: str, roles: Iterable[str], host: str | None = None
    ) -> bool:
        """Whether ``account`` may use the queue IOC's control RPCs."""
        if account == ANONYMOUS:
            return False
        return self._m(self.access.queue_control, account, roles, host)


def _line_of(text: str, loc: tuple[object, ...]) -> int:
    """Best-effort line number of the table/key at ``loc`` in TOML ``text`` (1-based)."""
    lines = text.splitlines()
    keys = [str(k) for k in loc if not isinstance(k, int)]
    line = 1
    start = 0
    for depth, key in enumerate(keys):
        pat_table = re.compile(
            r"^\s*\[\s*" + r"\s*\.\s*".join(re.escape(k) for k in keys[: depth + 1]) + r"\s*\]"
        )
        pat_key = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        for i in range(start, len(lines)):
            if pat_table.match(lines[i]) or pat_key.match(lines[i]):
                line, start = i + 1, i + 1
                break
    return line


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy TOML ``text``; ``source`` names it in errors.

    Raises:
        PolicyError: ``"SOURCE:LINE: reason"`` for a TOML syntax error, an unknown key or lock
            type, a bad principal or a bad lease.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise PolicyError(f"{source}:{m.group(1) if m else 1}: {e}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(k for k in err["loc"] if k != "[key]")
        where = ".".join(str(k) for k in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "enum":
            msg = f"unknown lock type; use one of {', '.join(t.value for t in LockType)}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown setting"
        raise PolicyError(f"{source}:{_line_of(text, loc)}: {where}: {msg}") from None


def load_policy(path: str | Path | None) -> Policy:
    """Load the policy file at ``path``, or the built-in default policy for ``None``.

    Raises:
        PolicyError: the file cannot be read or is not a valid policy (with line and reason).
    """
    if path is None:
        return Policy()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PolicyError(f"{p}:0: cannot read policy file: {e.strerror}") from None
    return parse_policy(text, str(p))
