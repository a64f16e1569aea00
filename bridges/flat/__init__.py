"""CA bridge: device PVs over Channel Access with live per-client write access, and screen PVs.

Usage: python -m bridges.flat --config ENDSTATION.toml   (systemd: [ca_bridge], docs/deploy.md)
       python -m bridges.flat --prefix P [--registry-prefix R] [--policy FILE]
                              [--upstream EPICS_PVA_KEY=VALUE | EPICS_CA_KEY=VALUE ...]
                              [--service EPICS_PVA_KEY=VALUE ...] [--stale-after S]
                              [--put-timeout S]

A caproto CA server (port and interfaces from EPICS_CAS_SERVER_PORT / EPICS_CA_SERVER_PORT and
EPICS_CAS_INTF_ADDR_LIST) for Phoebus and other CA clients, plus a PVA server (EPICS_PVAS_*) for
the bridge's own PVs. It reads the coordination and registry IOCs over PVA (``--service``
settings; default: this process's EPICS_PVA_* environment) and the device IOCs over PVA on the
device network (``--upstream`` settings, e.g. ``--upstream EPICS_PVA_ADDR_LIST=10.0.1.5
--upstream EPICS_PVA_BROADCAST_PORT=5076``; default: the same environment). With the device
network's CA settings too (``--upstream EPICS_CA_ADDR_LIST=10.0.1.5 --upstream
EPICS_CA_AUTO_ADDR_LIST=NO``, optional EPICS_CA_SERVER_PORT), a numeric or enum put is forwarded
over CA (libca's put-callback: one round trip) where the device IOC serves the PV over CA, and
over PVA otherwise (decision 0155).

Device PVs: every PV of every registered device (Registry:DevicePVs), under its own name, and on
first search any other name the registry maps to a device (record fields such as ``.DESC``,
``.DRVH``). Value, alarm, time stamp, units, precision, limits and enum labels pass through;
a put is forwarded upstream and its put-callback completes when the upstream put completes; a
refused or failed put is a CA put failure naming the reason.

Access rights: READ for everyone; WRITE when the guard's decision (bridges.guard.decision.decide)
allows the client's CA user name, with the host taken from the peer address (HOST_NAME is
ignored) and the user name fixed at its first CLIENT_NAME (a later rename is ignored). Rights of
open channels change live (ACCESS_RIGHTS) when a lock or the registry changes; lock state unknown
or stale (coordination IOC gone, heartbeat stopped for 2 s): no WRITE (except the policy's
emergency accounts), exactly as the guard.

Screen PVs over CA (names of the coordination IOC, computed from Coord:Locks):
  P Coord:<dev>:State         enum    Free, Maintenance, QueueExecuting, ManualOperator,
                                      QueueQueued (INVALID while the lock state is unknown)
  P Coord:<dev>:Owner         string  account@host or '' (NAME$ for more than 39 characters)
  P Coord:<dev>:Reason        string  the holder's reason (NAME$ for the full text)
  P Coord:<dev>:Remaining     double  seconds of lease left

Take/Release act through the coordination IOC's Coord:Acquire / Coord:Release with
onBehalfOf=<writer> clientHost=<peer IP>: this process's account must be a trusted service in
the policy (access.trusted_services). CA identity is claimed by the client: see docs/ca.md.
Audit log: logger ``bridges.flat.audit``.
"""

from pvdb.catalog import help_text as _help_text

# the bridge's own PVs (CA and PVA), from the one catalogue
__doc__ = f"{__doc__}\nThe bridge's own PVs (CA and PVA):\n{_help_text('flat')}"

