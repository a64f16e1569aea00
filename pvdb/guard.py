"""PVs of the guard gateway (``python -m bridges.guard``), served on its client-facing side.

The guard forwards device PVs unchanged (their names belong to the device IOCs and the registry);
these are its own status, counters, audit tail and the what-if RPC::

    >>> GUARD_WHAT_IF.name("BL01:")
    'BL01:Guard:WhatIf'
"""

from __future__ import annotations

from .names import PVKind, PVSpec

AUDIT_COLUMNS = (
    ("time", "d"),
    ("action", "s"),
    ("account", "s"),
    ("host", "s"),
    ("pv", "s"),
    ("device", "s"),
    ("holder", "s"),
    ("value", "s"),
    ("message", "s"),
)
"""Columns of ``Guard:Audit``: epoch seconds, ``refused`` / ``allowed``, the writer's account and
host, the PV as the client named it, its device ('' if none), the lock holder as ``account@host``
('' if none), the value written (text, may be truncated) and the reason."""

WHAT_IF_ARGS = ("pv", "account", "host", "roles")
"""Arguments of ``Guard:WhatIf`` (all strings, like ``pvcall``). ``account`` and ``host`` default
to the caller's; ``roles`` is a comma list of OS groups (default: the caller's when ``account`` is
not given, else none)."""

WHAT_IF_FIELDS = (
    ("allowed", "?"),
    ("pv", "s"),
    ("account", "s"),
    ("host", "s"),
    ("device", "s"),
    ("holder", "s"),
    ("lockType", "s"),
    ("expires", "d"),
    ("reason", "s"),
)
"""Fields of the ``Guard:WhatIf`` reply structure, in order."""

GUARD_HEALTH = PVSpec(
    "guard", "Guard:Health", PVKind.STRING,
    "'OK', or why device writes are being refused: lock state unknown or stale (coordination IOC "
    "disconnected, heartbeat stopped), the registry's PV list never received, or locked devices "
    "that left the registry (until Guard:ConfirmRegistry).",
)
GUARD_LOCK_STATE_OK = PVSpec(
    "guard", "Guard:LockStateOk", PVKind.INT,
    "1 while the guard has fresh lock state (decisions follow the locks), 0 while it fails closed "
    "(only the policy's emergency accounts may write devices).",
)
GUARD_WHAT_IF = PVSpec(
    "guard", "Guard:WhatIf", PVKind.RPC,
    "May account A at host H write PV X now, and why: pv=X [account=A host=H roles=g1,g2]. "
    "Returns allowed, pv, account, host, device, holder, lockType, expires and reason (the holder "
    "and lock when the answer is no). Includes the site's pvlist and ACF.",
    args=WHAT_IF_ARGS,
)
CONFIRM_REGISTRY_ARGS = ("device",)
"""Arguments of ``Guard:ConfirmRegistry``: ``device`` (comma list; default every withheld one)."""

GUARD_CONFIRM_REGISTRY = PVSpec(
    "guard", "Guard:ConfirmRegistry", PVKind.RPC,
    "An operator (policy force_release) confirms that locked devices which left the registry are "
    "gone: [device=d1,d2]. Until then the guard refuses writes to their PVs (by the previous "
    "registry) and Guard:Health names them. Returns message.",
    args=CONFIRM_REGISTRY_ARGS,
)
GUARD_AUDIT = PVSpec(
    "guard", "Guard:Audit", PVKind.NTTABLE,
    "Audit tail, oldest first: every refused put and every allowed put to a locked device.",
    columns=AUDIT_COLUMNS,
)
GUARD_LAST_AUDIT = PVSpec(
    "guard", "Guard:LastAudit", PVKind.STRING,
    "The newest audit record as one line of text (for screens and PVWS).",
)
GUARD_REFUSED = PVSpec(
    "guard", "Guard:Refused", PVKind.INT, "Puts refused since the guard started."
)
GUARD_ALLOWED_LOCKED = PVSpec(
    "guard", "Guard:AllowedLocked", PVKind.INT,
    "Puts allowed to a locked device (by its holder, or an emergency account) since start.",
)
GUARD_CHANNELS = PVSpec(
    "guard", "Guard:Channels", PVKind.INT,
    "Client channels the guard currently enforces permissions on.",
)
GUARD_APPLY_LATENCY = PVSpec(
    "guard", "Guard:ApplyLatency", PVKind.DOUBLE,
    "For the last lock-table change: time from the coordination IOC's timestamp of the update to "
    "the new permissions being set on every open channel.",
    units="ms",
)
GUARD_HEARTBEAT = PVSpec(
    "guard", "Guard:Heartbeat", PVKind.INT, "Counter incremented every second."
)

GUARD_PVS = (
    GUARD_HEALTH, GUARD_LOCK_STATE_OK, GUARD_WHAT_IF, GUARD_CONFIRM_REGISTRY, GUARD_AUDIT,
    GUARD_LAST_AUDIT,
    GUARD_REFUSED, GUARD_ALLOWED_LOCKED, GUARD_CHANNELS, GUARD_APPLY_LATENCY, GUARD_HEARTBEAT,
)
