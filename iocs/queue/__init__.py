"""Queue IOC: the bluesky RE Manager as PVAccess PVs, control RPCs and automatic device locks.

Usage::

    python -m iocs.queue --prefix BL01: --zmq-control tcp://127.0.0.1:60615
        --zmq-info tcp://127.0.0.1:60625 [--policy policy.toml] [--redis redis://127.0.0.1:6379/0]
        [--no-locks] [--coord-prefix BL01:] [--registry-prefix BL01:] [--lock-owner USER]

It talks to the RE Manager only through its two 0MQ sockets (bluesky-queueserver-api): status is
pushed on the info socket (QS_Info; start the manager with --zmq-publish-console ON), queue and
history are fetched when their change tokens move; without the push it polls status every 0.25 s.
When nothing is heard for 1.8 s every PV below except Heartbeat and the RPCs has alarm severity
INVALID, until the manager answers again.

Control RPCs take pvcall-style string arguments, are allowed to the policy's
access.queue_control (from the caller's host), return RE Manager refusals verbatim and change
nothing on bad input. A trusted service (the web bridge) may add onBehalfOf=USER [clientHost=HOST]
to act for a user, under the coordination IOC's rule (trusted_services, access.on_behalf_of):
the user is then checked against queue_control and is the user of an added item.

Automatic locks (through P Coord:Acquire/Release/Renew, as this process's account, or on behalf of
--lock-owner when this account is a trusted service): queued items
reserve their devices (QUEUE_QUEUED), the running item holds QUEUE_EXECUTING with planUid = its
item uid, renewed while it runs and released when it leaves the running slot. A refused
QUEUE_EXECUTING (e.g. MAINTENANCE) stops and pauses the queue and fills Queue:StopReason. With
--redis, lock requests of the worker hook (pvcoord.worker_hook) are answered on that redis, and so
are its resolve requests (which registered devices the PVs of an ophyd object are, from the
registry IOC's Registry:DevicePVs and Registry:Devices under --registry-prefix).
"""

from pvdb.catalog import help_text as _help_text

__doc__ = f"{__doc__}\n{_help_text('queue')}"  # the PV list, from the one catalogue
