"""Coordination IOC: the lock authority of one endstation, served over PVAccess.

Usage::

    python -m iocs.coordination --prefix BL01: [--policy policy.toml]
        [--store sqlite:///var/lib/pvcoord/BL01.sqlite | redis://127.0.0.1:6379/0]
        [--registry-prefix BL01: | --devices m1,m2,...]

Trusted service accounts (policy ``trusted_services``) may add onBehalfOf=USER [clientHost=HOST]
to any RPC. Lock types, priorities, leases and the policy file are described in docs/locks.md and
docs/policy.md. Keys are secret: they appear only in the Acquire reply.
"""

from pvdb.catalog import help_text as _help_text

__doc__ = f"{__doc__}\n{_help_text('coordination')}"  # the PV list, from the one catalogue
