"""Registry IOC: the devices of one endstation, their PV names and connectivity, over PVAccess.

Usage::

    python -m iocs.registry --prefix BL01: --registry registry.yaml [--check-period 2]

Connectivity: every --check-period seconds each device's explicit PVs get a PVA GET; a PV that
does not answer within min(period, 2 s) makes its device disconnected. A device registered by
pv_prefix only, or without any PV (a soft device, locked by name), has nothing to check and
shows connected = false. Changes are published only when a flag changes.

The registry file format (YAML) is described in docs/registry.md; a bad file is refused at start
with the line, device and field that is wrong (exit status 2). Build one from a bluesky profile
collection with ``pvcoord registry import --startup-dir DIR``.
"""

from pvdb.catalog import help_text as _help_text

__doc__ = f"{__doc__}\n{_help_text('registry')}"  # the PV list, from the one catalogue
