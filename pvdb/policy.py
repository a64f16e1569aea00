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

import math
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .models import LockType

ANYONE = "*"
ROLE_PREFIX = "role/"
_PRINCIPAL_RE = re.compile(r"^(\*|role/[A-Za-z0-9_.\-]+|[A-Za-z0-9_.\-@]+)$")


DEFAULT_QUEUE_CONTROL = ("root", "role/staff", "role/users")
"""Who may use the queue IOC's control RPCs when the policy does not say: root, the beamline
staff and its users group (OS groups ``staff`` and ``users`` of the IOC host), not everyone: a
queue item takes QUEUE_EXECUTING locks, which preempt manual locks."""


class PolicyError(ValueError):
    """A policy file that cannot be used; the message starts with ``FILE:LINE:``."""


def _check_principals(values: list[str]) -> list[str]:
    for v in values:
        if not _PRINCIPAL_RE.match(v):
            raise ValueError(f"{v!r} is not an account name, 'role/<group>' or '*'")
    return values


def matches(principals: Iterable[str], account: str, roles: Iterable[str]) -> bool:
    """Whether ``account`` (with OS groups ``roles``) is named by ``principals``.

    A principal is ``*`` (anyone), an account name, or ``role/<group>``.
    """
    roles = set(roles)
    for p in principals:
        if p == ANYONE or p == account:
            return True
        if p.startswith(ROLE_PREFIX) and p[len(ROLE_PREFIX):] in roles:
            return True
    return False


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

    _v = field_validator(
        "trusted_services", "force_release", "emergency", "queue_control"
    )(_check_principals)


class Policy(BaseModel):
    """A whole policy file. Lock types missing from the file get the built-in defaults."""

    model_config = ConfigDict(extra="forbid")

    access: AccessPolicy = Field(default_factory=AccessPolicy)
    lock_types: dict[LockType, LockTypePolicy] = Field(default_factory=_default_lock_types)

    @model_validator(mode="after")
    def _fill_types(self) -> Policy:
        defaults = _default_lock_types()
        for lt in LockType:
            self.lock_types.setdefault(lt, defaults[lt])
        return self

    def may_take(self, lock_type: LockType, account: str, roles: Iterable[str]) -> bool:
        """Whether ``account`` may request ``lock_type``."""
        return matches(self.lock_types[lock_type].allow, account, roles)

    def is_trusted_service(self, account: str, roles: Iterable[str]) -> bool:
        """Whether ``account`` may act on behalf of a named user."""
        return matches(self.access.trusted_services, account, roles)

    def may_force_release(self, account: str, roles: Iterable[str]) -> bool:
        """Whether ``account`` may remove another holder's lock."""
        return matches(self.access.force_release, account, roles)

    def is_emergency(self, account: str, roles: Iterable[str]) -> bool:
        """Whether ``account`` may write through the guard while the lock state is unknown."""
        return matches(self.access.emergency, account, roles)

    def may_control_queue(self, account: str, roles: Iterable[str]) -> bool:
        """Whether ``account`` may use the queue IOC's control RPCs."""
        return matches(self.access.queue_control, account, roles)


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
