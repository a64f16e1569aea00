"""PVs of the CA bridge (``python -m bridges.flat``): screen and command PVs, over CA and PVA.

The bridge also serves, over Channel Access only, the coordination IOC's per-device screen PVs
under their own names (:data:`CA_COORD_PVS`: ``Coord:<device>:State``, ``Owner``, ``Reason``,
``Remaining``, computed from ``Coord:Locks``), and every PV of every registered device under its
own name (proxied from the device IOCs). Over PVA those names are the coordination IOC's and the
guard's; the PVs below are the bridge's own, on both protocols.
"""

from __future__ import annotations

from . import names as _names
from .names import PVKind, PVSpec

SERVER = "flat"

TAKE_CHOICES = ("Idle", "Take")
"""Labels of ``Flat:<device>:Take`` (a put of 1 / ``Take`` takes the lock)."""
RELEASE_CHOICES = ("Idle", "Release")
"""Labels of ``Flat:<device>:Release`` (a put of 1 / ``Release`` releases it)."""
YES_NO = ("No", "Yes")

MESSAGE_MAX = 512
"""Bytes of a message PV over CA (a CHAR array, read as a long string: ``NAME$`` or
``as_string``)."""

FLAT_TAKE = PVSpec(
    SERVER, "Flat:{device}:Take", PVKind.NTENUM,
    "Put 1 (Take) to take a MANUAL_OPERATOR lock on the device for the account that wrote it "
    "(the bridge asks the coordination IOC on behalf of that account). The outcome is in "
    "Flat:<device>:Message. Reads 0.",
    choices=TAKE_CHOICES,
)
FLAT_RELEASE = PVSpec(
    SERVER, "Flat:{device}:Release", PVKind.NTENUM,
    "Put 1 (Release) to release the writing account's lock on the device. The outcome is in "
    "Flat:<device>:Message. Reads 0.",
    choices=RELEASE_CHOICES,
)
FLAT_MESSAGE = PVSpec(
    SERVER, "Flat:{device}:Message", PVKind.STRING,
    "What the last Take/Release on this device did: 'granted to ... until ...', 'released', "
    "'refused: held by ...', or what was wrong with the put.",
)
FLAT_CONNECTED = PVSpec(
    SERVER, "Flat:{device}:Connected", PVKind.NTENUM,
    "Whether the registry sees every PV of the device answer (Registry:Devices connected).",
    choices=YES_NO,
)
FLAT_DESCRIPTION = PVSpec(
    SERVER, "Flat:{device}:Description", PVKind.STRING, "The registry's description of the device."
)
FLAT_DEVICE_CLASS = PVSpec(
    SERVER, "Flat:{device}:DeviceClass", PVKind.STRING, "The registry's class of the device."
)
FLAT_TAKE_DEVICE = PVSpec(
    SERVER, "Flat:Take", PVKind.STRING,
    "Put a device name (or a comma list: all or none) to take MANUAL_OPERATOR locks for the "
    "writing account; the outcome is in Flat:Message.",
)
FLAT_RELEASE_DEVICE = PVSpec(
    SERVER, "Flat:Release", PVKind.STRING,
    "Put a device name (or a comma list) to release the writing account's locks; the outcome "
    "is in Flat:Message.",
)
FLAT_MESSAGE_ALL = PVSpec(
    SERVER, "Flat:Message", PVKind.STRING, "What the last put to Flat:Take / Flat:Release did."
)
FLAT_DEVICES = PVSpec(
    SERVER, "Flat:Devices", PVKind.STRING_ARRAY, "Registered device names, in registry order."
)
FLAT_LOCK_COUNT = PVSpec(
    SERVER, "Flat:LockCount", PVKind.INT, "Number of active locks (rows of Coord:Locks)."
)
FLAT_HEALTH = PVSpec(
    SERVER, "Flat:Health", PVKind.STRING,
    "'OK', or why device writes are refused (lock state unknown or stale, registry missing).",
)
FLAT_HEARTBEAT = PVSpec(
    SERVER, "Flat:Heartbeat", PVKind.INT, "Counter incremented every second by the bridge."
)

FLAT_DEVICE_PVS = (
    FLAT_TAKE, FLAT_RELEASE, FLAT_MESSAGE, FLAT_CONNECTED, FLAT_DESCRIPTION,
    FLAT_DEVICE_CLASS,
)
FLAT_GLOBAL_PVS = (
    FLAT_TAKE_DEVICE, FLAT_RELEASE_DEVICE, FLAT_MESSAGE_ALL, FLAT_DEVICES, FLAT_LOCK_COUNT,
    FLAT_HEALTH, FLAT_HEARTBEAT,
)
FLAT_PVS = FLAT_DEVICE_PVS + FLAT_GLOBAL_PVS
"""The bridge's own PVs (CA and PVA)."""
FLAT_COMMAND_PVS = (FLAT_TAKE, FLAT_RELEASE, FLAT_TAKE_DEVICE, FLAT_RELEASE_DEVICE)
"""The writable ones."""



def ca_coord_pvs() -> tuple[PVSpec, ...]:
    """Coordination IOC PVs the bridge also serves over CA (same names; specs in pvdb.names).

    A function, so that :mod:`pvdb.catalog` lists them once, under the coordination IOC.
    """
    return (_names.COORD_DEVICE_STATE, _names.COORD_DEVICE_OWNER, _names.COORD_DEVICE_REASON,
            _names.COORD_DEVICE_REMAINING)
