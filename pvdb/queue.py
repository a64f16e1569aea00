"""PV names of the queue IOC (``python -m iocs.queue``): the RE Manager as PVs, control RPCs.

Status PVs mirror the RE Manager's ``status`` keys, named with :func:`pvdb.names.snake_to_pascal`
(``items_in_queue`` -> ``Queue:ItemsInQueue``)::

    >>> MANAGER_STATE.name("BL01:")
    'BL01:Queue:ManagerState'
    >>> status_spec("items_in_queue").name("BL01:")
    'BL01:Queue:ItemsInQueue'
    >>> QUEUE_START.name("BL01:")
    'BL01:Queue:QueueStart'

Every PV except the RPCs and ``Queue:Heartbeat`` carries alarm severity INVALID (3) while the
RE Manager is unreachable (no message for :data:`UNREACHABLE_AFTER` seconds).
Control RPCs are named after the RE Manager API call they make (``queue_start`` ->
``Queue:QueueStart``); their arguments are pvcall-style strings (:data:`ITEM_ADD_ARGS`, ...).
Every control RPC also takes ``onBehalfOf=USER [clientHost=HOST]``
(:data:`pvdb.lockmodel.ON_BEHALF_ARGS`): a trusted service (a web bridge) acts for a user, under
the coordination IOC's rule (:func:`pvdb.lockmodel.resolve_caller`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, cast

from .lockmodel import ON_BEHALF_ARGS
from .names import PVKind, PVSpec, snake_to_pascal
from .redact import redact_url as redact_url  # re-exported: callers use qn.redact_url

SERVER = "queue"

UNREACHABLE_AFTER = 1.8
"""Seconds without any message (push or poll reply) after which the RE Manager is unreachable.

The queue IOC promises INVALID within 2 s of the manager going away; the manager pushes at least
once a second (and the IOC polls after 1.2 s without a push), so 1.8 s is above the heartbeat and
leaves 0.2 s for the IOC to post and the client to receive."""

MANAGER_STATES: tuple[str, ...] = (
    "unknown",
    "initializing",
    "idle",
    "paused",
    "creating_environment",
    "starting_queue",
    "executing_queue",
    "executing_task",
    "closing_environment",
    "destroying_environment",
)
"""Choices of ``Queue:ManagerState``: ``unknown`` (never heard from the manager), then the RE
Manager's ``MState`` values (bluesky-queueserver 0.0.25 ``manager.py``)."""

RE_STATES: tuple[str, ...] = (
    "unknown",
    "none",
    "idle",
    "running",
    "pausing",
    "paused",
    "halting",
    "stopping",
    "aborting",
    "suspending",
    "panicked",
)
"""Choices of ``Queue:ReState``: ``none`` when no worker environment exists (``re_state`` null),
then bluesky's ``RunEngineStateMachine`` states."""

WORKER_ENVIRONMENT_STATES: tuple[str, ...] = (
    "unknown",
    "closed",
    "initializing",
    "idle",
    "executing_plan",
    "executing_task",
    "closing",
    "failed",
    "reserved",
)
"""Choices of ``Queue:WorkerEnvironmentState`` (the worker's ``EState`` values)."""

CONNECTION_STATES: tuple[str, ...] = ("Disconnected", "Push", "Polling")
"""Choices of ``Queue:Connection``: no message for 1.8 s; status pushed on the info socket
(``QS_Info``); status polled because the manager publishes nothing."""

EXIT_STATUSES: tuple[str, ...] = (
    "completed", "failed", "stopped", "aborted", "halted", "unknown",
)
"""Values of the ``exitStatus`` column of ``Queue:History`` (from the RE Manager)."""

PAUSE_OPTIONS: tuple[str, ...] = ("deferred", "immediate")
"""Accepted ``option`` of ``Queue:RePause`` (default ``deferred``)."""

ITEMS_COLUMNS = (
    ("position", "i"),
    ("itemUid", "s"),
    ("itemType", "s"),
    ("name", "s"),
    ("args", "s"),
    ("user", "s"),
    ("userGroup", "s"),
    ("devices", "s"),
)
HISTORY_COLUMNS = (
    ("itemUid", "s"),
    ("itemType", "s"),
    ("name", "s"),
    ("args", "s"),
    ("user", "s"),
    ("exitStatus", "s"),
    ("timeStart", "d"),
    ("timeStop", "d"),
    ("msg", "s"),
    ("runUids", "s"),
)

ITEM_ADD_ARGS = ("name", "args", "kwargs", "pos", "itemType")
ITEM_REMOVE_ARGS = ("uid", "pos")
ITEM_MOVE_ARGS = ("uid", "pos", "posDest", "beforeUid", "afterUid")
RE_PAUSE_ARGS = ("option",)
NO_ARGS: tuple[str, ...] = ()

ARGS_SUMMARY_LENGTH = 200
"""Longest ``args`` summary (characters) in the tables and ``Queue:RunningItemArgs``."""
CONSOLE_LINES = 50
"""Lines kept in ``Queue:ConsoleLines`` / ``Queue:Console``."""
HISTORY_ROWS = 100
"""Newest history items shown in ``Queue:History`` and the flat history arrays."""


def _q(suffix: str, kind: PVKind, description: str, **kws: Any) -> PVSpec:
    return PVSpec(SERVER, "Queue:" + suffix, kind, description, **kws)


def _status(key: str, kind: PVKind, description: str, **kws: Any) -> PVSpec:
    return _q(snake_to_pascal(key), kind, f"RE Manager status '{key}': {description}", **kws)


# --- status, from the QS_Info push (or status polls) ------------------------------------------

MANAGER_STATE = _status(
    "manager_state", PVKind.NTENUM,
    "what the manager is doing; 'unknown' before the first message.", choices=MANAGER_STATES,
)
RE_STATE = _status(
    "re_state", PVKind.NTENUM,
    "RunEngine state in the worker ('none' without environment); reaches the manager on a "
    "0.5 s poll, so a short plan may never show 'running'.", choices=RE_STATES,
)
WORKER_ENVIRONMENT_STATE = _status(
    "worker_environment_state", PVKind.NTENUM, "state of the RE worker process.",
    choices=WORKER_ENVIRONMENT_STATES,
)
WORKER_ENVIRONMENT_EXISTS = _status(
    "worker_environment_exists", PVKind.INT, "1 if the worker environment is open."
)
ITEMS_IN_QUEUE = _status("items_in_queue", PVKind.INT, "number of queued items.")
ITEMS_IN_HISTORY = _status("items_in_history", PVKind.INT, "number of items in the history.")
RUNNING_ITEM_UID = _status(
    "running_item_uid", PVKind.STRING, "item_uid of the running item, empty when none."
)
QUEUE_STOP_PENDING = _status(
    "queue_stop_pending", PVKind.INT, "1 if the queue stops after the running item."
)
PAUSE_PENDING = _status("pause_pending", PVKind.INT, "1 if a pause was requested.")
QUEUE_AUTOSTART_ENABLED = _status(
    "queue_autostart_enabled", PVKind.INT, "1 if the queue starts when an item is added."
)
LOCK_ENVIRONMENT = _q(
    "LockEnvironment", PVKind.INT,
    "RE Manager lock flag 'lock.environment': 1 if environment and queue-run calls need the "
    "RE Manager lock key (qserver lock).",
)
LOCK_QUEUE = _q(
    "LockQueue", PVKind.INT,
    "RE Manager lock flag 'lock.queue': 1 if editing the queue needs the RE Manager lock key.",
)
STATUS_TIME = _q(
    "StatusTime", PVKind.DOUBLE,
    "Time the manager sent the last status (its own clock, epoch s; the 'time' of QS_Info, or "
    "the reply time of a poll).", units="s",
)

STATUS_SPECS: dict[str, PVSpec] = {
    "manager_state": MANAGER_STATE,
    "re_state": RE_STATE,
    "worker_environment_state": WORKER_ENVIRONMENT_STATE,
    "worker_environment_exists": WORKER_ENVIRONMENT_EXISTS,
    "items_in_queue": ITEMS_IN_QUEUE,
    "items_in_history": ITEMS_IN_HISTORY,
    "running_item_uid": RUNNING_ITEM_UID,
    "queue_stop_pending": QUEUE_STOP_PENDING,
    "pause_pending": PAUSE_PENDING,
    "queue_autostart_enabled": QUEUE_AUTOSTART_ENABLED,
}
"""RE Manager status key -> PV spec, for the keys served one to one."""


def status_spec(key: str) -> PVSpec:
    """The PV of RE Manager status key ``key`` (``items_in_queue`` -> ``Queue:ItemsInQueue``).

    Raises:
        KeyError: the key is not served as its own PV (the list is :data:`STATUS_SPECS`).
    """
    try:
        return STATUS_SPECS[key]
    except KeyError:
        raise KeyError(
            f"status key {key!r} has no PV; served keys: {', '.join(STATUS_SPECS)}"
        ) from None


# --- running item, from queue_get ------------------------------------------------------------

RUNNING_ITEM_NAME = _q("RunningItemName", PVKind.STRING, "Plan name of the running item.")
RUNNING_ITEM_ARGS = _q(
    "RunningItemArgs", PVKind.STRING,
    "The running item's arguments as one readable line, e.g. '[det1], m1, -1, 1, num=5'.",
)
RUNNING_ITEM_USER = _q("RunningItemUser", PVKind.STRING, "Who added the running item.")
RUNNING_ITEM_START = _q(
    "RunningItemStart", PVKind.DOUBLE, "When the running item started (epoch s, 0 when none).",
    units="s",
)
RUNNING_ITEM_DEVICES = _q(
    "RunningItemDevices", PVKind.STRING_ARRAY,
    "Devices the running item names in its arguments (from the RE Manager's devices_allowed).",
)

# --- queue and history ------------------------------------------------------------------------

ITEMS = _q(
    "Items", PVKind.NTTABLE,
    "Queued items in execution order (from queue_get); args is a readable summary; devices "
    "is a comma list of the devices the item names.",
    columns=ITEMS_COLUMNS,
)
HISTORY = _q(
    "History", PVKind.NTTABLE,
    f"Newest {HISTORY_ROWS} finished items, oldest first (from history_get); times are epoch s.",
    columns=HISTORY_COLUMNS,
)
ITEM_NAMES = _q("ItemNames", PVKind.STRING_ARRAY, "Plan names of the queued items, in order.")
ITEM_SUMMARIES = _q(
    "ItemSummaries", PVKind.STRING_ARRAY,
    "One line per queued item, in order: 'name(args) [user]'.",
)
ITEM_UIDS = _q("ItemUids", PVKind.STRING_ARRAY, "item_uid of the queued items, in order.")
NEXT_ITEM = _q(
    "NextItem", PVKind.STRING, "Summary of the item that runs next, empty if the queue is empty."
)
HISTORY_SUMMARIES = _q(
    "HistorySummaries", PVKind.STRING_ARRAY,
    "One line per history item (as Queue:History, oldest first): 'name(args) -> exit status'.",
)
HISTORY_EXIT_STATUS = _q(
    "HistoryExitStatus", PVKind.STRING_ARRAY, "Exit status of each history item, oldest first."
)
LAST_EXIT_STATUS = _q(
    "LastExitStatus", PVKind.STRING, "Exit status of the newest history item, empty if none."
)
LAST_ITEM_MSG = _q(
    "LastItemMsg", PVKind.STRING, "Error message of the newest history item, empty if none."
)

# --- console, connection, locks ---------------------------------------------------------------

CONSOLE = _q(
    "Console", PVKind.STRING,
    f"The last {CONSOLE_LINES} lines of the RE Manager console (QS_Console), newline-separated.",
)
CONSOLE_LINES_PV = _q(
    "ConsoleLines", PVKind.STRING_ARRAY,
    f"The last {CONSOLE_LINES} console lines, oldest first.",
)
CONNECTION = _q(
    "Connection", PVKind.NTENUM,
    "How the IOC hears from the RE Manager: Disconnected (nothing for 1.8 s), Push (QS_Info), "
    "Polling (the manager publishes nothing; status polled).",
    choices=CONNECTION_STATES,
)
HEARTBEAT = _q(
    "Heartbeat", PVKind.INT,
    "Counter incremented every second while the queue IOC runs (never INVALID).",
)
EXECUTING_DEVICES = _q(
    "ExecutingDevices", PVKind.STRING_ARRAY,
    "Devices the queue IOC holds QUEUE_EXECUTING for the running item.",
)
QUEUED_DEVICES = _q(
    "QueuedDevices", PVKind.STRING_ARRAY,
    "Devices the queue IOC reserves (QUEUE_QUEUED) for queued items.",
)
STOP_REASON = _q(
    "StopReason", PVKind.STRING,
    "Why pvcoord paused or stopped the queue (a device held at higher priority), empty "
    "otherwise; cleared when the queue starts again.",
)
LOCK_HEALTH = _q(
    "LockHealth", PVKind.STRING,
    "'OK', 'disabled', or what keeps the automatic locks from working (coordination IOC not "
    "reachable, refused reservations, the worker hook's channel or PV lookups failing).",
)

# --- control RPCs -----------------------------------------------------------------------------


def _rpc(method: str, description: str, args: tuple[str, ...] = NO_ARGS) -> PVSpec:
    # every control RPC may be called on behalf of a user by a trusted service
    return _q(snake_to_pascal(method), PVKind.RPC, description, args=(*args, *ON_BEHALF_ARGS))


QUEUE_START = _rpc(
    "queue_start",
    "Start the queue. Refused with the reason if the next item needs a device held at higher "
    "priority.",
)
QUEUE_STOP = _rpc("queue_stop", "Stop the queue after the running item.")
QUEUE_STOP_CANCEL = _rpc("queue_stop_cancel", "Cancel a pending queue stop.")
RE_PAUSE = _rpc(
    "re_pause", "Pause the running plan; option=deferred (next checkpoint, default) or immediate.",
    RE_PAUSE_ARGS,
)
RE_RESUME = _rpc("re_resume", "Resume the paused plan.")
RE_STOP = _rpc("re_stop", "Stop the paused plan (exit status 'stopped', goes to history).")
RE_ABORT = _rpc(
    "re_abort", "Abort the paused plan (exit status 'aborted'; the item returns to the queue).",
)
RE_HALT = _rpc("re_halt", "Halt the paused plan (no cleanup; the item returns to the queue).")
ENVIRONMENT_OPEN = _rpc("environment_open", "Open the RE worker environment.")
ENVIRONMENT_CLOSE = _rpc("environment_close", "Close the RE worker environment.")
ITEM_ADD = _rpc(
    "item_add",
    "Add a plan: name=PLAN, args=JSON list, kwargs=JSON object, pos=front|back|N (default back). "
    "The item's user is the caller's account, or the onBehalfOf user of a trusted service. "
    "Returns the new itemUid.",
    ITEM_ADD_ARGS,
)
ITEM_REMOVE = _rpc(
    "item_remove", "Remove a queued item: uid=ITEM_UID or pos=front|back|N.", ITEM_REMOVE_ARGS,
)

ITEM_MOVE = _rpc(
    "item_move",
    "Move a queued item (uid=ITEM_UID or pos=front|back|N) to posDest=front|back|N, or before "
    "beforeUid / after afterUid (exactly one destination). Returns the item's itemUid.",
    ITEM_MOVE_ARGS,
)

CONTROL_RPCS: tuple[PVSpec, ...] = (
    QUEUE_START, QUEUE_STOP, QUEUE_STOP_CANCEL, RE_PAUSE, RE_RESUME, RE_STOP, RE_ABORT, RE_HALT,
    ENVIRONMENT_OPEN, ENVIRONMENT_CLOSE, ITEM_ADD, ITEM_REMOVE, ITEM_MOVE,
)

STATUS_PVS: tuple[PVSpec, ...] = (
    *STATUS_SPECS.values(), LOCK_ENVIRONMENT, LOCK_QUEUE, STATUS_TIME,
)
RUNNING_PVS: tuple[PVSpec, ...] = (
    RUNNING_ITEM_NAME, RUNNING_ITEM_ARGS, RUNNING_ITEM_USER, RUNNING_ITEM_START,
    RUNNING_ITEM_DEVICES,
)
TABLE_PVS: tuple[PVSpec, ...] = (
    ITEMS, HISTORY, ITEM_NAMES, ITEM_SUMMARIES, ITEM_UIDS, NEXT_ITEM, HISTORY_SUMMARIES,
    HISTORY_EXIT_STATUS, LAST_EXIT_STATUS, LAST_ITEM_MSG,
)
OTHER_PVS: tuple[PVSpec, ...] = (
    CONSOLE, CONSOLE_LINES_PV, CONNECTION, HEARTBEAT, EXECUTING_DEVICES, QUEUED_DEVICES,
    STOP_REASON, LOCK_HEALTH,
)

QUEUE_PVS: tuple[PVSpec, ...] = STATUS_PVS + RUNNING_PVS + TABLE_PVS + OTHER_PVS + CONTROL_RPCS
"""Every PV of the queue IOC, in the order of the docs."""

NEVER_INVALID: tuple[PVSpec, ...] = (HEARTBEAT, *CONTROL_RPCS)
"""PVs that do not go INVALID when the RE Manager is unreachable."""

# --- the worker hook's channel (redis, not EPICS) ----------------------------------------------


def hook_request_key(prefix: str) -> str:
    """Redis list the worker hook pushes lock requests to (``pvcoord:P:queue:requests``)."""
    return f"pvcoord:{prefix}queue:requests"


def hook_reply_key(prefix: str, request_id: str) -> str:
    """Redis list the queue IOC pushes the answer of request ``request_id`` to."""
    return f"pvcoord:{prefix}queue:reply:{request_id}"


def hook_pending_key(prefix: str, request_id: str) -> str:
    """Redis key that exists while the hook still waits for request ``request_id``.

    The hook sets it with its wait as the key's time to live (``SET ... PX``) in the same
    transaction as the request; the queue IOC answers a request that says ``"pending": true``
    only while the key exists. The redis server times the key on its own clock, so the hook's
    and the IOC's wall clocks (which may be on two hosts) are never compared (decision 0023).
    """
    return f"pvcoord:{prefix}queue:pending:{request_id}"


HOOK_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
"""A request id: ``uuid.uuid4().hex`` (also the tail of its reply key)."""
HOOK_MAX_DEVICE = 128
"""Longest device name in a hook request (characters)."""
HOOK_MAX_TEXT = 1024
"""Longest ``refusing`` reason in a hook request (characters)."""
HOOK_MAX_PV = 256
"""Longest PV name in a resolve request (characters)."""
HOOK_MAX_PVS = 500
"""Most PV names in one resolve request (the hook sends a larger device in several)."""
HOOK_MAX_BYTES = 160 * 1024
"""Largest hook request accepted (bytes of JSON): room for :data:`HOOK_MAX_PVS` long names."""
_HOOK_FIELDS = {"id", "device", "pvs", "time", "pid", "refusing", "pending"}


class HookRequestError(ValueError):
    """A malformed worker-hook request.

    Attributes:
        code: machine-readable reason (``not_json``, ``not_object``, ``too_large``,
            ``bad_id``, ``bad_device``, ``bad_pvs``, ``bad_time``, ``bad_pid``,
            ``bad_refusing``, ``bad_pending``, ``unknown_field``).
        request_id: the request's id when it was valid (so the sender can be answered), else
            ``None``.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.request_id = code, request_id


@dataclass(frozen=True)
class HookRequest:
    """One validated request of the worker hook (see :func:`parse_hook_request`).

    A *lock request* names ``device`` (``pvs`` empty); a *resolve request* names ``pvs`` (the
    PVs an ophyd object writes; ``device`` empty) and asks which registered devices they are.
    ``pending``: the hook set :func:`hook_pending_key` (answer only while it exists); without it
    (an older hook) the request is stale when ``time`` (the hook's wall clock) is old.
    """

    id: str
    device: str
    time: float
    pid: int | None = None
    refusing: str | None = None
    pvs: tuple[str, ...] = ()
    pending: bool = False


def _printable(text: str, limit: int) -> bool:
    return 0 < len(text) <= limit and text.isprintable()


def _name(value: object, limit: int) -> bool:
    return isinstance(value, str) and _printable(value, limit) and " " not in value


def parse_hook_request(raw: bytes | str) -> HookRequest:
    """Validate one message of the hook's request list.

    The format: a JSON object ``{"id": 32 hex, "device": NAME, "time": epoch s[, "pid": int]
    [, "refusing": reason][, "pending": true]}`` (a lock request) or ``{"id", "pvs": [PV, ...],
    "time"[, "pid"][, "pending"]}`` (a resolve request: 1 to :data:`HOOK_MAX_PVS` names of at
    most :data:`HOOK_MAX_PV` printable characters without spaces); nothing else.

    Raises:
        HookRequestError: with a code and the id if that much was valid.
    """
    if len(raw) > HOOK_MAX_BYTES:
        raise HookRequestError("too_large", f"{len(raw)} bytes; the limit is {HOOK_MAX_BYTES}")
    try:
        parsed: object = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HookRequestError("not_json", f"not JSON ({type(e).__name__})") from None
    if not isinstance(parsed, dict):
        raise HookRequestError("not_object", f"a JSON {type(parsed).__name__}, not an object")
    data = cast(dict[str, object], parsed)  # JSON object keys are always text
    rid = data.get("id")
    rid = rid if isinstance(rid, str) and HOOK_ID_RE.match(rid) else None
    if rid is None:
        raise HookRequestError("bad_id", "'id' must be 32 lower-case hex digits")
    unknown = sorted(str(k)[:32] for k in set(data) - _HOOK_FIELDS)
    if unknown:
        raise HookRequestError("unknown_field", f"unknown field(s) {unknown}", rid)
    pvs: tuple[str, ...] = ()
    device = data.get("device")
    if "pvs" in data:
        given = data.get("pvs")
        raw_pvs = cast(list[object], given) if isinstance(given, list) else []
        if (device is not None or "refusing" in data or not raw_pvs
                or len(raw_pvs) > HOOK_MAX_PVS
                or not all(_name(pv, HOOK_MAX_PV) for pv in raw_pvs)):
            raise HookRequestError(
                "bad_pvs", f"'pvs' must be a list of 1-{HOOK_MAX_PVS} PV names of 1-"
                f"{HOOK_MAX_PV} printable characters without spaces, without 'device' or "
                "'refusing'", rid)
        pvs, device = tuple(cast(list[str], raw_pvs)), ""
    elif not _name(device, HOOK_MAX_DEVICE):
        raise HookRequestError(
            "bad_device", f"'device' must be a name of 1-{HOOK_MAX_DEVICE} printable characters "
            "without spaces", rid)
    t = data.get("time")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise HookRequestError("bad_time", "'time' must be a number (epoch seconds)", rid)
    pid = data.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise HookRequestError("bad_pid", "'pid' must be an integer", rid)
    refusing = data.get("refusing")
    if refusing is not None and (
        not isinstance(refusing, str) or len(refusing) > HOOK_MAX_TEXT
    ):
        raise HookRequestError(
            "bad_refusing", f"'refusing' must be a text of at most {HOOK_MAX_TEXT} characters",
            rid)
    pending = data.get("pending", False)
    if not isinstance(pending, bool):
        raise HookRequestError("bad_pending", "'pending' must be true or false", rid)
    return HookRequest(rid, cast(str, device), float(t), pid, refusing, pvs, pending)


def pv_table() -> str:
    """The queue PVs as a Markdown table (the generated part of ``docs/queue.md``)."""
    lines = ["| PV | type | meaning |", "| --- | --- | --- |"]
    for s in QUEUE_PVS:
        kind = s.kind.value
        if s.kind is PVKind.NTENUM:
            kind += ": " + ", ".join(s.choices)
        elif s.kind is PVKind.NTTABLE:
            kind += ": " + ", ".join(c for c, _ in s.columns)
        elif s.kind is PVKind.RPC and s.args:
            kind += ": " + ", ".join(s.args)
        if s.units:
            kind += f" [{s.units}]"
        desc = " ".join(s.description.split()).replace("|", "\\|")
        lines.append(f"| `$(P){s.suffix}` | {kind} | {desc} |")
    return "\n".join(lines)
