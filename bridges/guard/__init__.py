"""Guard gateway: PVA gateway before the device IOCs; only a device's lock holder may write it.

Usage: python -m bridges.guard --prefix P --config FILE [--policy FILE] [--registry-prefix P]

Built on p4p's gateway engine (the one behind ``pvagw``). Clients reach the device IOCs through
it; reads (get, monitor) always pass. A put or RPC on a PV of device D by account A passes iff

* D is held (its own lock or a ``beamline`` lock) and A is the holder's account, or
* D is free and the policy's ``access.unlocked_writable`` is true (the default; false = strict).

While the lock state is unknown or stale (``Coord:Locks`` / ``Coord:Heartbeat`` disconnected, or
the heartbeat not advancing for ``stale_after`` = 2 s), device writes are refused (fail closed)
except for the policy's ``access.emergency`` accounts. A PV the registry does not map to a device
gets the policy default (``unlocked_writable``). Permissions of open channels change live (no
reconnect) when a lock changes. The site's ACF and pvlist files (``access``/``pvlist`` of each
server, as in pvagw) still apply on top. A refused put gets "Put permission denied by gateway"
(the holder is in ``Guard:LastAudit``, ``Coord:<device>:Owner`` and ``Guard:WhatIf``).

The config file is a pvagw JSON config plus a ``guard`` section (see docs/guard.md):
``policy``, ``coordination`` (how to reach the coordination and registry IOCs; default: this
process's EPICS_PVA_* environment), ``registry_prefix``, ``stale_after``, ``audit_tail``.

Reads (client side):  P Coord:Locks, P Coord:Heartbeat, R Registry:DevicePVs, R Registry:Devices
                      (R = --registry-prefix, default P)

Audit log: logger ``bridges.guard.audit`` (refused: WARNING, allowed to a locked device: INFO).
"""

from pvdb.catalog import help_text as _help_text

__doc__ = f"{__doc__}\n{_help_text('guard')}"  # the PV list, from the one catalogue
