"""Registry IOC: the devices of one endstation, their PV names and connectivity, over PVAccess.

Usage::

    python -m iocs.registry --prefix BL01: --registry registry.yaml [--check-period 2]

PVs (``P`` is --prefix, with its trailing colon):

  P Registry:Devices     NTTable  one row per device, sorted by name: name, deviceClass,
                                  capabilities (comma list of readable, movable, triggerable,
                                  flyable), pvPrefix, ioc, description, connected (true when
                                  every explicit PV of the device answered the last check)
  P Registry:Lookup      RPC      pv=NAME -> device, deviceClass, capabilities, pvPrefix, ioc,
                                  description, connected, pvs (the device's PV names), match
                                  (pv, field or prefix); an unknown PV is an RPC error.
                                  Order: exact PV, then the record of a field PV
                                  (NAME.VAL -> NAME), then the longest pvPrefix
  P Registry:DevicePVs   NTTable  every explicit PV: pv, device (for gateways)
  P Registry:Names       string[] device names, sorted
  P Registry:Connected   int32    number of connected devices
  P Registry:Heartbeat   int32    +1 every second
  P Registry:<device>:Signals
                         NTTable  one per device: its signals, sorted: signal (dotted name,
                                  m1.readback), kind (hinted, normal, config, omitted, or
                                  empty), access (r, rw, w, x), readPv, writePv (empty for
                                  soft/simulated signals); no rows if none are known

Connectivity: every --check-period seconds each device's explicit PVs get a PVA GET; a PV that
does not answer within min(period, 2 s) makes its device disconnected. A device registered by
pv_prefix only, or without any PV (a soft device, locked by name), has nothing to check and
shows connected = false. Changes are published only when a flag changes.

The registry file format (YAML) is described in docs/registry.md; a bad file is refused at start
with the line, device and field that is wrong (exit status 2). Build one from a bluesky profile
collection with ``pvcoord registry import --startup-dir DIR``.
"""
