"""Domain models of pvcoord: lock types, locks, audit events and devices (pydantic)."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .names import DEVICE_STATES, SIGNAL_ACCESS, SIGNAL_KINDS

BEAMLINE = "beamline"
"""Pseudo-device: a lock on it is a lock on every device."""

DEVICE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}\Z")
"""A device name: usable as a PV name segment (letter first, then letters, digits, _ and -)."""


class LockType(StrEnum):
    """Lock types. Lower :attr:`priority` wins; a request preempts only a strictly lower one."""

    MAINTENANCE = "MAINTENANCE"
    QUEUE_EXECUTING = "QUEUE_EXECUTING"
    MANUAL_OPERATOR = "MANUAL_OPERATOR"
    QUEUE_QUEUED = "QUEUE_QUEUED"

    @property
    def priority(self) -> int:
        """0 (MAINTENANCE, strongest) to 3 (QUEUE_QUEUED, weakest)."""
        return _PRIORITY[self]

    @property
    def state_index(self) -> int:
        """Index of this type in :data:`pvdb.names.DEVICE_STATES` (0 is ``Free``)."""
        return self.priority + 1

    @property
    def state_label(self) -> str:
        """Label of ``Coord:<device>:State`` for a device held with this type."""
        return DEVICE_STATES[self.state_index]


_PRIORITY = {
    LockType.MAINTENANCE: 0,
    LockType.QUEUE_EXECUTING: 1,
    LockType.MANUAL_OPERATOR: 2,
    LockType.QUEUE_QUEUED: 3,
}


class EventAction(StrEnum):
    """What an audit event records."""

    ACQUIRED = "acquired"
    RENEWED = "renewed"
    RELEASED = "released"
    PREEMPTED = "preempted"
    EXPIRED = "expired"
    REFUSED = "refused"
    FORCE_RELEASED = "force-released"
    CLOCK_STEP = "clock-step"
    """The wall clock stepped while the IOC ran: the locks' wall-clock times were shifted."""


class Lock(BaseModel):
    """One active lock on one device (or on ``beamline``).

    ``key_hashes`` are SHA-256 hex digests of the secret keys that may release or renew it; the
    keys themselves are never stored, published or logged.
    """

    model_config = ConfigDict(frozen=True)

    device: str
    lock_type: LockType
    owner: str = Field(description="account of the holder (the user, for on-behalf-of requests)")
    host: str = Field(description="host the holder's request came from")
    actor: str = Field(description="account that made the request (a trusted service, or owner)")
    acquired: float = Field(description="epoch seconds")
    expires: float = Field(description="epoch seconds")
    reason: str = ""
    plan_uid: str = ""
    key_hashes: tuple[str, ...] = Field(default=(), repr=False)

    @property
    def holder(self) -> str:
        """The holder as shown everywhere: ``account@host``."""
        return f"{self.owner}@{self.host}"

    @property
    def account(self) -> str:
        """The holder's account (``owner``)."""
        return self.owner

    @property
    def priority(self) -> int:
        """Priority of the lock's type (lower wins)."""
        return self.lock_type.priority


class LockEvent(BaseModel):
    """One audit record. Never contains a key."""

    model_config = ConfigDict(frozen=True)

    time: float
    action: EventAction
    device: str
    lock_type: LockType | None = None
    actor: str = ""
    holder: str = ""
    message: str = ""

    def line(self) -> str:
        """One line of text for logs and the ``Coord:LastEvent`` PV."""
        lt = self.lock_type.value if self.lock_type else "-"
        return (
            f"{self.action.value} {self.device} {lt} actor={self.actor or '-'} "
            f"holder={self.holder or '-'}: {self.message}"
        )


class Capability(StrEnum):
    """What a device can do (mirrors bluesky's protocols)."""

    READABLE = "readable"
    MOVABLE = "movable"
    TRIGGERABLE = "triggerable"
    FLYABLE = "flyable"


SIGNAL_PATH_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}(\.[A-Za-z0-9_]{1,64}){0,15}\Z")
"""A signal's dotted component name: the device name (which may contain ``-``), then up to 15
attribute names (or DeviceVector indices) separated by dots: ``sim_bundle_A.mtrs.x.setpoint``."""


class DeviceSignal(BaseModel):
    """One signal of a device: its dotted component name, ophyd kind, access and EPICS PVs.

    ``read_pv`` / ``write_pv`` are PV names without a scheme, empty for soft and simulated
    signals (and ``write_pv`` for read-only ones, ``read_pv`` for write-only/executable ones).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="dotted name starting with the device name: m1.readback")
    kind: str = Field(default="", description="hinted, normal, config, omitted; '' not known")
    access: str = Field(description="r, rw, w or x")
    read_pv: str = ""
    write_pv: str = ""

    @field_validator("name")
    @classmethod
    def _valid_path(cls, value: str) -> str:
        if not SIGNAL_PATH_RE.match(value):
            raise ValueError(
                f"signal name {value!r} is not a dotted component name (e.g. 'm1.readback')"
            )
        return value

    @field_validator("kind")
    @classmethod
    def _valid_kind(cls, value: str) -> str:
        if value and value not in SIGNAL_KINDS:
            raise ValueError(f"{value!r} is not one of {', '.join(SIGNAL_KINDS)} (or empty)")
        return value

    @field_validator("access")
    @classmethod
    def _valid_access(cls, value: str) -> str:
        if value not in SIGNAL_ACCESS:
            raise ValueError(f"{value!r} is not one of {', '.join(SIGNAL_ACCESS)}")
        return value

    @property
    def pvs(self) -> list[str]:
        """The signal's PV names (read, then write if different), each once."""
        return list(dict.fromkeys(pv for pv in (self.read_pv, self.write_pv) if pv))


class Device(BaseModel):
    """A registered device: what a beamline scientist calls ``m1``, and the PVs behind it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    device_class: str = Field(default="", alias="class")
    capabilities: list[Capability] = Field(default_factory=list[Capability])
    pv_prefix: str = ""
    pvs: list[str] = Field(default_factory=list, description="explicit PV names")
    ioc: str = ""
    description: str = ""
    signals: list[DeviceSignal] = Field(
        default_factory=list[DeviceSignal],
        description="the device's signals (component hierarchy), by name",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if value == BEAMLINE:
            raise ValueError(f"'{BEAMLINE}' is reserved for the whole-beamline lock")
        if not DEVICE_NAME_RE.match(value):
            raise ValueError(
                f"device name {value!r} is not valid: start with a letter, then letters, digits,"
                " '_' or '-', at most 64 characters"
            )
        return value
