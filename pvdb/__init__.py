"""pvdb: the single source of pvcoord's PV names, PV types and domain models.

Imports nothing from ``iocs``, ``bridges`` or p4p, so anything can depend on it.
"""

from .models import BEAMLINE, Capability, Device, EventAction, Lock, LockEvent, LockType
from .names import ALL_PVS, PVKind, PVSpec, check_prefix, snake_to_pascal
from .policy import Policy, PolicyError, load_policy

__all__ = [
    "ALL_PVS", "BEAMLINE", "Capability", "Device", "EventAction", "Lock", "LockEvent", "LockType",
    "PVKind", "PVSpec", "Policy", "PolicyError", "check_prefix", "load_policy", "snake_to_pascal",
]
