"""Queue IOC: the bluesky RE Manager as PVAccess PVs, control RPCs and automatic device locks.

Usage::

    python -m iocs.queue --prefix BL01: --zmq-control tcp://127.0.0.1:60615
        --zmq-info tcp://127.0.0.1:60625 [--policy policy.toml] [--redis redis://127.0.0.1:6379/0]
        [--no-locks] [--coord-prefix BL01:] [--lock-owner USER]

It talks to the RE Manager only through its two 0MQ sockets (bluesky-queueserver-api): status is
pushed on the info socket (QS_Info; start the manager with --zmq-publish-console ON), queue and
history are fetched when their change tokens move; without the push it polls status every 0.25 s.
When nothing is heard for 1.8 s every PV below except Heartbeat and the RPCs has alarm severity
INVALID, until the manager answers again.

PVs (P is --prefix, with its trailing colon):

  P Queue:ManagerState            NTEnum   unknown, initializing, idle, paused,
                                           creating_environment, starting_queue, executing_queue,
                                           executing_task, closing_environment,
                                           destroying_environment
  P Queue:ReState                 NTEnum   RunEngine state (none without environment)
  P Queue:WorkerEnvironmentState  NTEnum   closed, initializing, idle, executing_plan, ...
  P Queue:WorkerEnvironmentExists int32    1 if the worker environment is open
  P Queue:ItemsInQueue            int32    queued items
  P Queue:ItemsInHistory          int32    items in the history
  P Queue:RunningItemUid          string   uid of the running item, empty when none
  P Queue:QueueStopPending        int32    1 if the queue stops after the running item
  P Queue:PausePending            int32    1 if a pause was requested
  P Queue:QueueAutostartEnabled   int32    1 if autostart is on
  P Queue:LockEnvironment         int32    RE Manager lock flag 'environment'
  P Queue:LockQueue               int32    RE Manager lock flag 'queue'
  P Queue:StatusTime              double   manager's time of the last status (epoch s)
  P Queue:RunningItemName         string   plan name of the running item
  P Queue:RunningItemArgs         string   its arguments as one readable line
  P Queue:RunningItemUser         string   who added it
  P Queue:RunningItemStart        double   when it started (epoch s)
  P Queue:RunningItemDevices      string[] devices it names
  P Queue:Items                   NTTable  position, itemUid, itemType, name, args, user, userGroup,
                                           devices
  P Queue:History                 NTTable  itemUid, itemType, name, args, user, exitStatus,
                                           timeStart, timeStop, msg, runUids (newest 100)
  P Queue:ItemNames               string[] plan names of the queued items
  P Queue:ItemSummaries           string[] 'name(args) [user]' per queued item
  P Queue:ItemUids                string[] uids of the queued items
  P Queue:NextItem                string   summary of the item that runs next
  P Queue:HistorySummaries        string[] 'name(args) [user] -> exit status' per history item
  P Queue:HistoryExitStatus       string[] exit status per history item
  P Queue:LastExitStatus          string   exit status of the newest history item
  P Queue:LastItemMsg             string   its error message
  P Queue:Console                 string   last 50 console lines (QS_Console)
  P Queue:ConsoleLines            string[] the same, one element per line
  P Queue:Connection              NTEnum   Disconnected, Push, Polling
  P Queue:Heartbeat               int32    +1 every second while this IOC runs
  P Queue:ExecutingDevices        string[] devices held QUEUE_EXECUTING for the running item
  P Queue:QueuedDevices           string[] devices reserved QUEUE_QUEUED for queued items
  P Queue:StopReason              string   why pvcoord paused/stopped the queue, empty otherwise
  P Queue:LockHealth              string   OK, disabled, or what keeps the locks from working

Control RPCs (pvcall-style string arguments; allowed to the policy's access.queue_control; RE
Manager refusals are returned verbatim; bad input changes nothing):

  P Queue:QueueStart        (refused if the next item needs a device held at higher priority)
  P Queue:QueueStop  P Queue:QueueStopCancel
  P Queue:RePause           option=deferred|immediate
  P Queue:ReResume  P Queue:ReStop  P Queue:ReAbort  P Queue:ReHalt
  P Queue:EnvironmentOpen  P Queue:EnvironmentClose
  P Queue:ItemAdd           name=PLAN args=JSON-list kwargs=JSON-object [pos=front|back|N]
  P Queue:ItemRemove        uid=ITEM_UID | pos=front|back|N
  P Queue:ItemMove          uid=ITEM_UID | pos=N, then posDest=front|back|N | beforeUid= | afterUid=

Automatic locks (through P Coord:Acquire/Release/Renew, as this process's account, or on behalf of
--lock-owner when this account is a trusted service): queued items
reserve their devices (QUEUE_QUEUED), the running item holds QUEUE_EXECUTING with planUid = its
item uid, renewed while it runs and released when it leaves the running slot. A refused
QUEUE_EXECUTING (e.g. MAINTENANCE) stops and pauses the queue and fills Queue:StopReason. With
--redis, lock requests of the worker hook (pvcoord.worker_hook) are answered on that redis.
"""
