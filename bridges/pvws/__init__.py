"""PVWS bridge: the PVWS websocket protocol for EPICS web clients, with per-user writes.

``python -m bridges.pvws --prefix P [options]`` serves on one HTTP port (127.0.0.1 by default):

- ``/pvws/pv``: the PVWS websocket (``subscribe``/``monitor``, ``clear``, ``list``, ``write``,
  ``ping``, ``echo``; plus ``device``). Names: ``pva://X``, ``ca://X`` (Channel Access), bare
  ``X`` (default scheme ``--default-type``), ``loc://x(init)``, ``sim://sine``,
  ``sim://flipflop(N)``, ``sim://ramp``, ``sim://noise``;
- ``/pvws/info``, ``/pvws/summary``, ``/pvws/socket[/ID]``, ``/pvws/pool``, ``/pvws/audit``
  (web writes);
- ``/login``, ``/logout``, ``/whoami``, ``/api/lock`` (take/release/renew a MANUAL_OPERATOR
  lock on behalf of the web user through ``P Coord:Acquire``/``Release``/``Renew``);
- the beamline web client (``bridges/pvws/static``) at ``/``.

Beyond PVWS: per-PV coalescing every ``--throttle-ms`` (default 20) that always sends the last
state; NTTable as structured JSON; 1,000 PVs in one message; subscription by device name; every
malformed message answered with an ``error`` (``code``, ``message``) and the socket kept.

Writes are off unless ``--writes``. Then each write is decided for the web user (``--auth
password``: ``POST /login`` against ``--password-file``, argon2 hashes; ``--auth header``: the
user named by a trusted reverse proxy in ``--user-header``) by the guard's may-write decision
(``bridges.guard.decision.decide``, inputs followed over PVA: ``P Coord:Locks``,
``P Coord:Heartbeat``, ``Registry:DevicePVs``, ``Registry:Devices``), refused with an ``error``
naming the holder, audited with the web user, and put to the device IOC on the device network
(``--device-conf``; ``ca://`` names over Channel Access when ``--device-ca-conf`` gives the device
network's ``EPICS_CA_*``, else over PVA). ``readonly`` in updates is per user and flips live when
locks change. Queue calls (``/api/queue/{key}``) go to the queue IOC on behalf of the web user.

Passwords: ``python -m bridges.pvws passwd FILE USER`` (password on stdin, or ``--generate``).
Reads/writes the PVA client configuration from the environment (``EPICS_PVA_*``).

Under systemd: ``python -m bridges.pvws --config ENDSTATION.toml`` (``[web_bridge]`` and the
shared part set the options and ``EPICS_*``; the password file comes from
``$PVCOORD_WEB_PASSWORD_FILE``, the unit's credential, when set; docs/deploy.md).
The web bridge serves websockets and HTTP; its only PVs are its status for ``pvcoord status``,
over PVA (server settings ``EPICS_PVAS_*``; its TCP port is ``[web_bridge] pva_server_port``
under systemd):
"""

from pvdb.catalog import help_text as _help_text

__doc__ = f"{__doc__}\n{_help_text('pvws')}"
