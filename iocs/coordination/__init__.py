"""Coordination IOC: the lock authority of one endstation, served over PVAccess.

Usage::

    python -m iocs.coordination --prefix BL01: [--policy policy.toml]
        [--store sqlite:///var/lib/pvcoord/BL01.sqlite | redis://127.0.0.1:6379/0]
        [--registry-prefix BL01: | --devices m1,m2,...] [--allow-nondurable-store]

PVs (``P`` is --prefix, with its trailing colon):

  P Coord:Locks            NTTable  active locks: device, lockType, priority, owner (account@host),
                                    acquired, expires (epoch s), reason, planUid
  P Coord:Acquire          RPC      device=m1[,m2|beamline] type=MANUAL_OPERATOR timeout=S
                                    reason=TEXT planUid=UID -> granted, key, devices, preempted,
                                    expires, message; a refusal is an RPC error naming the holder
  P Coord:Release          RPC      device=... and/or key=KEY (the key is optional for the holder)
  P Coord:Renew            RPC      key=KEY or device=..., timeout=S
  P Coord:ForceRelease     RPC      device=... reason=TEXT (accounts in policy force_release)
  P Coord:Events           NTTable  audit tail: time, action, device, lockType, actor, holder,
                                    message
  P Coord:LastEvent        string   newest audit event as text
  P Coord:LockCount        int32    number of active locks
  P Coord:Heartbeat        int32    +1 every second (stale after 2 s without change)
  P Coord:Health           string   OK, or what is wrong (also: stored rows rejected at start)
  P Coord:Authority        string   pid PID on HOST for P since TIME: who holds the authority
  P Coord:Devices          string[] devices accepted (from the registry) plus 'beamline'
  P Coord:<dev>:State      NTEnum   Free, Maintenance, QueueExecuting, ManualOperator, QueueQueued
  P Coord:<dev>:Owner      string   account@host or empty
  P Coord:<dev>:Reason     string   reason given by the holder
  P Coord:<dev>:Remaining  double   seconds of lease left (updated every second)
  P Coord:<dev>:Expires    double   lease expiry, epoch seconds

Trusted service accounts (policy ``trusted_services``) may add onBehalfOf=USER [clientHost=HOST]
to any RPC. Lock types, priorities, leases and the policy file are described in docs/locks.md and
docs/policy.md. Keys are secret: they appear only in the Acquire reply.

Durability: a reply is sent only once its change is on stable storage (SQLite: the WAL is fsync'ed,
once for all requests in flight; Redis: only accepted with appendonly yes and appendfsync always,
unless --allow-nondurable-store). Leases run on the monotonic clock. One authority: the IOC refuses
to start when another IOC holds the store (SQLite PATH.authority flock, Redis key) or answers
P Coord:Authority; the message names it. Stored rows are validated on load; bad ones are reported
in Coord:Health and Coord:Events and skipped.
"""
