"""Every PV name pvcoord serves, with its type: the only place a PV string is spelled.

A name is built from a :class:`PVSpec` and the endstation prefix ``P`` (which includes its trailing
colon, e.g. ``"BL01:"``)::

    >>> COORD_LOCKS.name("BL01:")
    'BL01:Coord:Locks'
    >>> COORD_DEVICE_STATE.name("BL01:", device="m1")
    'BL01:Coord:m1:State'

IOCs, bridges, screens, docs and tests import these specs; ``python -m pvdb`` prints the list that
``docs/pvs.md`` is generated from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-:.]*:\Z")
"""A valid endstation prefix: EPICS name characters, ending in ``:``."""


class PVKind(StrEnum):
    """The normative type of a PV, as a client sees it."""

    NTTABLE = "NTTable"
    NTENUM = "NTEnum"
    STRING = "NTScalar string"
    DOUBLE = "NTScalar double"
    INT = "NTScalar int32"
    STRING_ARRAY = "NTScalarArray string"
    DOUBLE_ARRAY = "NTScalarArray double"
    RPC = "RPC (NTURI arguments)"


@dataclass(frozen=True)
class PVSpec:
    """One PV (or one PV per device, when ``suffix`` contains ``{device}``).

    Attributes:
        server: the process that serves it (``coordination``, ``registry``, ``queue``, ...).
        suffix: the name after the prefix; ``{device}`` is replaced by a device name.
        kind: the normative type.
        description: what it means, for docs and for the ``display.description`` field.
        columns: for NTTable, ``(name, p4p type code)`` pairs in order (``s`` string, ``i`` int32,
            ``d`` double, ``?`` bool); for RPC, the argument names it accepts.
        units: engineering units, if any.
        choices: for NTEnum, the labels in index order.
        fields: for NTTable, extra top-level ``(name, p4p type code)`` fields after the
            standard ones (e.g. ``seq`` of ``Coord:Locks``).
    """

    server: str
    suffix: str
    kind: PVKind
    description: str
    columns: tuple[tuple[str, str], ...] = ()
    units: str = ""
    choices: tuple[str, ...] = ()
    args: tuple[str, ...] = field(default=())
    fields: tuple[tuple[str, str], ...] = ()

    def name(self, prefix: str, device: str | None = None) -> str:
        """Return the full PV name for ``prefix`` (and ``device`` for per-device PVs).

        Raises:
            ValueError: if the prefix does not end in ``:`` or a per-device PV gets no device.
        """
        check_prefix(prefix)
        if "{device}" in self.suffix:
            if not device:
                raise ValueError(f"{self.suffix} is a per-device PV: give device=")
            return prefix + self.suffix.format(device=device)
        return prefix + self.suffix

    @property
    def per_device(self) -> bool:
        """Whether there is one such PV per device."""
        return "{device}" in self.suffix


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` unchanged if it is a valid endstation prefix, else raise ``ValueError``."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(
            f"prefix {prefix!r} is not valid: use EPICS name characters and end it with ':'"
            " (e.g. 'BL01:')"
        )
    return prefix


def snake_to_pascal(name: str) -> str:
    """Map an RE Manager snake_case key to a PV suffix: ``items_in_queue`` -> ``ItemsInQueue``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


# --- Coordination IOC -------------------------------------------------------------------------

DEVICE_STATES: tuple[str, ...] = (
    "Free",
    "Maintenance",
    "QueueExecuting",
    "ManualOperator",
    "QueueQueued",
)
"""Labels of ``Coord:<device>:State`` in index order (index 0 = unlocked)."""

LOCKS_COLUMNS = (
    ("device", "s"),
    ("lockType", "s"),
    ("priority", "i"),
    ("owner", "s"),
    ("acquired", "d"),
    ("expires", "d"),
    ("reason", "s"),
    ("planUid", "s"),
)
LOCK_CHANGES_COLUMNS = (*LOCKS_COLUMNS, ("held", "?"))
"""``Coord:LockChanges``: the ``Coord:Locks`` columns plus ``held`` (False: the row was removed)."""
LOCK_SEQ_FIELDS = (("seq", "l"), ("epoch", "l"))
"""Extra fields of ``Coord:Locks`` and ``Coord:LockChanges`` (int64): ``seq`` numbers the lock
changes of one IOC run (1, 2, ...; the table includes every change up to it), ``epoch`` names the
run (the IOC's start, microseconds since 1970). A follower applies change ``seq + 1`` to the
table of ``seq`` of the same ``epoch``; anything else waits for the next table."""
EVENTS_COLUMNS = (
    ("time", "d"),
    ("action", "s"),
    ("device", "s"),
    ("lockType", "s"),
    ("actor", "s"),
    ("holder", "s"),
    ("message", "s"),
)

REQUEST_ID_ARG = "requestId"
"""Optional argument of every mutating coordination RPC: a random token the client makes per call
(:func:`pvdb.lockmodel.new_request_id`, format :func:`pvdb.lockmodel.request_id_problem`). A
retry of a request whose id the IOC knows is answered with the stored outcome, not applied again
(docs/locks.md, "Requests in flight at a crash")."""
ACQUIRE_ARGS = ("device", "type", "timeout", "reason", "planUid", "onBehalfOf", "clientHost",
                REQUEST_ID_ARG)
RELEASE_ARGS = ("device", "key", "onBehalfOf", "clientHost", REQUEST_ID_ARG)
RENEW_ARGS = ("device", "key", "timeout", "onBehalfOf", "clientHost", REQUEST_ID_ARG)
FORCE_RELEASE_ARGS = ("device", "reason", REQUEST_ID_ARG)

COORD_LOCKS = PVSpec(
    "coordination", "Coord:Locks", PVKind.NTTABLE,
    "Active locks, one row per device, sorted by device. Times are epoch seconds. Posted within "
    "50 ms of a change (coalesced: at most 20 posts a second); seq is the last change included.",
    columns=LOCKS_COLUMNS, fields=LOCK_SEQ_FIELDS,
)
COORD_LOCK_CHANGES = PVSpec(
    "coordination", "Coord:LockChanges", PVKind.NTTABLE,
    "The rows of Coord:Locks that change number seq changed (held false: removed); posted "
    "before the reply of the request that made it. Followers (the guard) apply changes in seq "
    "order onto Coord:Locks of the same epoch.",
    columns=LOCK_CHANGES_COLUMNS, fields=LOCK_SEQ_FIELDS,
)
COORD_ACQUIRE = PVSpec(
    "coordination", "Coord:Acquire", PVKind.RPC,
    "Acquire locks. device: comma list (or 'beamline'); type: lock type; timeout: lease in s; "
    "all granted or none. Returns granted, key, devices, preempted, expires, message; a refusal "
    "is an RPC error naming the holder. requestId (every mutating RPC): a random token per call; "
    "a retry with a known one gets the first answer and applies nothing.",
    args=ACQUIRE_ARGS,
)
COORD_RELEASE = PVSpec(
    "coordination", "Coord:Release", PVKind.RPC,
    "Release locks by key, or the caller's own locks on the named devices.",
    args=RELEASE_ARGS,
)
COORD_RENEW = PVSpec(
    "coordination", "Coord:Renew", PVKind.RPC,
    "Extend the lease of locks named by key or device (caller's own) by timeout seconds from now.",
    args=RENEW_ARGS,
)
COORD_FORCE_RELEASE = PVSpec(
    "coordination", "Coord:ForceRelease", PVKind.RPC,
    "Remove a lock whoever holds it; only for accounts the policy lists under force_release.",
    args=FORCE_RELEASE_ARGS,
)
COORD_EVENTS = PVSpec(
    "coordination", "Coord:Events", PVKind.NTTABLE,
    "Audit tail: the last actions (acquired, renewed, released, preempted, expired, refused, "
    "force-released, clock-step), oldest first.",
    columns=EVENTS_COLUMNS,
)
COORD_LAST_EVENT = PVSpec(
    "coordination", "Coord:LastEvent", PVKind.STRING,
    "The newest audit event as one line of text (for screens and PVWS).",
)
COORD_LOCK_COUNT = PVSpec(
    "coordination", "Coord:LockCount", PVKind.INT, "Number of active locks."
)
COORD_HEARTBEAT = PVSpec(
    "coordination", "Coord:Heartbeat", PVKind.INT,
    "Counter incremented every second while the coordination IOC runs; a client that sees it "
    "stop for more than 2 s must treat the lock state as stale.",
)
COORD_HEALTH = PVSpec(
    "coordination", "Coord:Health", PVKind.STRING,
    "'OK', or what is wrong (store failing, registry not connected).",
)
COORD_AUTHORITY = PVSpec(
    "coordination", "Coord:Authority", PVKind.STRING,
    "Which process is the lock authority of this prefix: 'pid PID on HOST for P since TIME'. "
    "A second coordination IOC that finds it refuses to start and names it.",
)
COORD_DEVICES = PVSpec(
    "coordination", "Coord:Devices", PVKind.STRING_ARRAY,
    "Device names the coordination IOC accepts locks for (from the registry), plus 'beamline'.",
)
COORD_DEVICE_STATE = PVSpec(
    "coordination", "Coord:{device}:State", PVKind.NTENUM,
    "Lock state of the device; a 'beamline' lock shows on every device.",
    choices=DEVICE_STATES,
)
COORD_DEVICE_OWNER = PVSpec(
    "coordination", "Coord:{device}:Owner", PVKind.STRING,
    "Holder as account@host, or empty when free.",
)
COORD_DEVICE_REASON = PVSpec(
    "coordination", "Coord:{device}:Reason", PVKind.STRING, "Reason given by the holder."
)
COORD_DEVICE_REMAINING = PVSpec(
    "coordination", "Coord:{device}:Remaining", PVKind.DOUBLE,
    "Seconds until the lease expires (0 when free); updated every second.",
    units="s",
)
COORD_DEVICE_EXPIRES = PVSpec(
    "coordination", "Coord:{device}:Expires", PVKind.DOUBLE,
    "Lease expiry as epoch seconds (0 when free).",
    units="s",
)

# --- Registry IOC -----------------------------------------------------------------------------

DEVICES_COLUMNS = (
    ("name", "s"),
    ("deviceClass", "s"),
    ("capabilities", "s"),
    ("pvPrefix", "s"),
    ("ioc", "s"),
    ("description", "s"),
    ("connected", "?"),
)

REGISTRY_DEVICES = PVSpec(
    "registry", "Registry:Devices", PVKind.NTTABLE,
    "Registered devices. capabilities is a comma list of readable, movable, triggerable, "
    "flyable; connected is true when every PV of the device answered the last check.",
    columns=DEVICES_COLUMNS,
)
REGISTRY_LOOKUP = PVSpec(
    "registry", "Registry:Lookup", PVKind.RPC,
    "PV name -> device: pv=NAME returns device, deviceClass and the device's PV names; "
    "an unknown PV is an RPC error.",
    args=("pv",),
)
REGISTRY_DEVICE_PVS = PVSpec(
    "registry", "Registry:DevicePVs", PVKind.NTTABLE,
    "Every PV of every device: one row per PV, columns pv and device (for gateways).",
    columns=(("pv", "s"), ("device", "s")),
)
REGISTRY_NAMES = PVSpec(
    "registry", "Registry:Names", PVKind.STRING_ARRAY, "Registered device names, sorted."
)
REGISTRY_CONNECTED = PVSpec(
    "registry", "Registry:Connected", PVKind.INT, "Number of devices whose PVs all answer."
)
REGISTRY_HEARTBEAT = PVSpec(
    "registry", "Registry:Heartbeat", PVKind.INT, "Counter incremented every second."
)

SIGNAL_KINDS: tuple[str, ...] = ("hinted", "normal", "config", "omitted")
"""ophyd ``Kind`` of a signal, as the registry writes it (``""``: not known)."""

SIGNAL_ACCESS: tuple[str, ...] = ("r", "rw", "w", "x")
"""Access of a signal: read-only, read-write, write-only, executable (a trigger-only command)."""

SIGNALS_COLUMNS = (
    ("signal", "s"),
    ("kind", "s"),
    ("access", "s"),
    ("readPv", "s"),
    ("writePv", "s"),
)

REGISTRY_DEVICE_SIGNALS = PVSpec(
    "registry", "Registry:{device}:Signals", PVKind.NTTABLE,
    "Signals of one device, sorted by signal: signal (dotted component name starting with the "
    "device name, e.g. m1.readback; the device itself if it is one signal), kind (hinted, normal, "
    "config, omitted, or empty if not known), access (r, rw, w, x), readPv and writePv (the EPICS "
    "PV the signal reads / writes, empty for soft and simulated signals). Served for every "
    "registered device, with no rows for a device without known signals.",
    columns=SIGNALS_COLUMNS,
)

COORDINATION_PVS = (
    COORD_LOCKS, COORD_LOCK_CHANGES, COORD_ACQUIRE, COORD_RELEASE, COORD_RENEW,
    COORD_FORCE_RELEASE, COORD_EVENTS,
    COORD_LAST_EVENT, COORD_LOCK_COUNT, COORD_HEARTBEAT, COORD_HEALTH, COORD_AUTHORITY,
    COORD_DEVICES,
    COORD_DEVICE_STATE, COORD_DEVICE_OWNER, COORD_DEVICE_REASON, COORD_DEVICE_REMAINING,
    COORD_DEVICE_EXPIRES,
)
REGISTRY_PVS = (
    REGISTRY_DEVICES, REGISTRY_LOOKUP, REGISTRY_DEVICE_PVS, REGISTRY_NAMES, REGISTRY_CONNECTED,
    REGISTRY_HEARTBEAT, REGISTRY_DEVICE_SIGNALS,
)

ALL_PVS: tuple[PVSpec, ...] = COORDINATION_PVS + REGISTRY_PVS
"""The coordination and registry IOCs' specs. The catalogue of every process's PVs (queue IOC,
guard, bridges included) is :mod:`pvdb.catalog`."""
