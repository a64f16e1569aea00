"""Coordination IOC: the lock authority of one endstation, served over PVAccess.

Usage::

    python -m iocs.coordination --prefix BL01: [--policy policy.toml]
        [--store sqlite:///var/lib/pvcoord/BL01.sqlite | redis://127.0.0.1:6379/0]
        [--registry-prefix BL01: | --devices m1,m2,...] [--allow-nondurable-store]

Trusted service accounts (policy ``trusted_services``) may add onBehalfOf=USER [clientHost=HOST]
to any RPC. Lock types, priorities, leases and the policy file are described in docs/locks.md and
docs/policy.md. Keys are secret: they appear only in the Acquire reply.

Retries: Acquire, Release, Renew and ForceRelease take requestId=TOKEN (16-64 URL-safe base64
characters, a new random one per call). A request whose id this IOC (or its store, after a restart)
answered within 600 s gets that answer again and changes nothing, so the PVA client's re-send of
an RPC whose reply was lost is never applied twice.

Durability: a reply is sent only once its change is on stable storage (SQLite: the WAL is fsync'ed,
once for all requests in flight; Redis: only accepted with appendonly yes and appendfsync always,
unless --allow-nondurable-store). Leases run on the monotonic clock. One authority: the IOC refuses
to start when another IOC holds the store (SQLite PATH.authority flock, Redis key) or answers
P Coord:Authority; the message names it. Stored rows are validated on load; bad ones are reported
in Coord:Health and Coord:Events and skipped.
"""

from pvdb.catalog import help_text as _help_text

__doc__ = f"{__doc__}\n{_help_text('coordination')}"  # the PV list, from the one catalogue
