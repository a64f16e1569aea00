"""Pure logic of the queue IOC: RE Manager replies -> PV values, devices of items, lock plans.

No network and no p4p here: everything is plain typed Python tested without a manager.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pvdb import lockmodel
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode
from pvdb.models import BEAMLINE, LockType


class BadRequestError(ValueError):
    """Control input that is wrong (or not allowed); ``str(e)`` is the message for the caller.

    Nothing changed. ``code`` is a :class:`pvdb.lockmodel.ErrorCode` (``bad-argument`` unless
    given).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code
        self.holder = ""


# --- status -----------------------------------------------------------------------------------


def enum_index(choices: Sequence[str], value: object) -> int:
    """Index of ``value`` in ``choices``: ``None`` -> ``'none'`` if present, unknown -> 0."""
    text = "none" if value is None else str(value)
    try:
        return choices.index(text)
    except ValueError:
        return 0


def status_values(status: Mapping[str, Any]) -> dict[str, object]:
    """PV suffix -> value for the status PVs, from one RE Manager ``status`` dict.

    Enums become indices (see :data:`pvdb.queue.MANAGER_STATES` ...), flags 0/1, a missing
    running item the empty string. Missing keys are left out (the PV keeps its value).
    """
    out: dict[str, object] = {}
    enums = {
        "manager_state": qn.MANAGER_STATES,
        "re_state": qn.RE_STATES,
        "worker_environment_state": qn.WORKER_ENVIRONMENT_STATES,
    }
    for key, spec in qn.STATUS_SPECS.items():
        if key not in status:
            continue
        v = status[key]
        if key in enums:
            out[spec.suffix] = enum_index(enums[key], v)
        elif key == "running_item_uid":
            out[spec.suffix] = v or ""
        else:
            out[spec.suffix] = int(bool(v)) if isinstance(v, bool) or v is None else int(v)
    lock = status.get("lock")
    if isinstance(lock, Mapping):
        out[qn.LOCK_ENVIRONMENT.suffix] = int(bool(lock.get("environment")))
        out[qn.LOCK_QUEUE.suffix] = int(bool(lock.get("queue")))
    return out


# --- items ------------------------------------------------------------------------------------


def _root(name: str) -> str:
    return name.split(".", 1)[0]


def item_devices(item: Mapping[str, Any], devices_allowed: Iterable[str]) -> tuple[str, ...]:
    """Root devices an item names, sorted, without duplicates.

    They are the strings in ``args``/``kwargs`` (walked recursively) that are device names of
    the RE Manager's ``devices_allowed`` or dotted components of one
    (``m1.velocity`` -> ``m1``).

    A plan that reaches a device through a module global names none here: the worker hook
    catches those (docs/queue.md).
    """
    allowed = set(devices_allowed)
    found: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, str):
            root = _root(x)
            if root in allowed:
                found.add(root)
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list | tuple | set):
            for v in x:
                walk(v)

    walk(item.get("args", []))
    walk(item.get("kwargs", {}))
    return tuple(sorted(found))


def _short(x: object, devices: set[str]) -> str:
    if isinstance(x, str):
        return x if _root(x) in devices else json.dumps(x)
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_short(v, devices) for v in x) + "]"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_short(v, devices)}" for k, v in x.items()) + "}"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return repr(x)
    return json.dumps(x) if x is None or isinstance(x, bool) else str(x)


def args_summary(
    item: Mapping[str, Any], devices_allowed: Iterable[str] = (),
    limit: int = qn.ARGS_SUMMARY_LENGTH,
) -> str:
    """The item's arguments as one readable line: ``[det1], m1, -1, 1, num=5``.

    Device names are shown bare, other strings quoted; longer than ``limit`` characters is cut
    with ``...``.
    """
    devs = set(devices_allowed)
    parts = [_short(a, devs) for a in item.get("args", []) or []]
    parts += [f"{k}={_short(v, devs)}" for k, v in (item.get("kwargs", {}) or {}).items()]
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def item_summary(item: Mapping[str, Any], devices_allowed: Iterable[str] = ()) -> str:
    """``name(args) [user]`` for the flat PVs."""
    s = f"{item.get('name', '?')}({args_summary(item, devices_allowed)})"
    user = item.get("user")
    return f"{s} [{user}]" if user else s


@dataclass(frozen=True)
class RunningItem:
    """What the running-item PVs show."""

    uid: str = ""
    name: str = ""
    args: str = ""
    user: str = ""
    start: float = 0.0
    devices: tuple[str, ...] = ()


def running_item(item: Mapping[str, Any] | None, devices_allowed: Iterable[str]) -> RunningItem:
    """The running item of a ``queue_get`` reply (``{}`` or ``None`` when nothing runs)."""
    if not item:
        return RunningItem()
    props = item.get("properties") or {}
    start = props.get("time_start") or 0.0
    return RunningItem(
        uid=str(item.get("item_uid", "")),
        name=str(item.get("name", "")),
        args=args_summary(item, devices_allowed),
        user=str(item.get("user", "")),
        start=float(start) if isinstance(start, int | float) and math.isfinite(start) else 0.0,
        devices=item_devices(item, devices_allowed),
    )


def item_rows(items: Sequence[Mapping[str, Any]], devices_allowed: Iterable[str]) -> list[tuple]:
    """Rows of ``Queue:Items`` (column order :data:`pvdb.queue.ITEMS_COLUMNS`)."""
    devs = list(devices_allowed)
    return [
        (
            i, str(it.get("item_uid", "")), str(it.get("item_type", "")),
            str(it.get("name", "")), args_summary(it, devs), str(it.get("user", "")),
            str(it.get("user_group", "")), ",".join(item_devices(it, devs)),
        )
        for i, it in enumerate(items)
    ]


def _num(x: object) -> float:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else 0.0


def history_rows(
    items: Sequence[Mapping[str, Any]], devices_allowed: Iterable[str],
    rows: int = qn.HISTORY_ROWS,
) -> list[tuple]:
    """Rows of ``Queue:History``: the newest ``rows`` items, oldest first."""
    devs = list(devices_allowed)
    out = []
    for it in list(items)[-rows:] if rows > 0 else []:
        res = it.get("result") or {}
        out.append((
            str(it.get("item_uid", "")), str(it.get("item_type", "")), str(it.get("name", "")),
            args_summary(it, devs), str(it.get("user", "")),
            str(res.get("exit_status", "unknown")), _num(res.get("time_start")),
            _num(res.get("time_stop")), str(res.get("msg", ""))[:1000],
            ",".join(str(u) for u in res.get("run_uids", []) or []),
        ))
    return out


# --- control input ----------------------------------------------------------------------------


def check_args(args: Mapping[str, str], allowed: tuple[str, ...], rpc: str) -> None:
    """Refuse unknown argument names of RPC ``rpc``."""
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise BadRequestError(
            f"{rpc}: unknown argument {', '.join(repr(u) for u in unknown)} (accepted: {accepted})"
        )


def parse_position(text: str | None, what: str) -> int | str | None:
    """``front``/``back``/integer -> the RE Manager's ``pos``; empty -> ``None``."""
    if text is None or text.strip() == "":
        return None
    t = text.strip()
    if t in ("front", "back"):
        return t
    try:
        return int(t)
    except ValueError:
        raise BadRequestError(f"{what}: pos must be front, back or an integer, not {t!r}") from None


@dataclass(frozen=True)
class NewItem:
    """A validated ``Queue:ItemAdd`` request."""

    item: dict[str, Any]
    pos: int | str | None = None


def parse_item_add(args: Mapping[str, str], plans_allowed: Iterable[str] | None) -> NewItem:
    """Validate ``Queue:ItemAdd`` arguments.

    Args:
        args: ``name`` (plan name, required), ``args`` (JSON list), ``kwargs`` (JSON object),
            ``pos`` (front, back or an integer), ``itemType`` (``plan``, the default).
        plans_allowed: plan names the RE Manager allows, or ``None`` if not known yet (the
            manager then decides).

    Raises:
        BadRequestError: naming the bad argument: unknown plan, malformed JSON, wrong JSON type.
    """
    check_args(args, qn.ITEM_ADD_ARGS, "ItemAdd")
    name = (args.get("name") or "").strip()
    if not name:
        raise BadRequestError("ItemAdd: give name=PLAN (the plan's name)")
    item_type = (args.get("itemType") or "plan").strip()
    if item_type != "plan":
        raise BadRequestError(f"ItemAdd: itemType must be 'plan', not {item_type!r}")
    if plans_allowed is not None:
        allowed = sorted(plans_allowed)
        if name not in allowed:
            shown = ", ".join(allowed[:30]) + (", ..." if len(allowed) > 30 else "")
            raise BadRequestError(
                f"ItemAdd: unknown plan {name!r}: not in the RE Manager's allowed plans "
                f"({shown or 'none'})"
            )
    item: dict[str, Any] = {"item_type": "plan", "name": name}
    for key, kind, label in (("args", list, "a JSON list"), ("kwargs", dict, "a JSON object")):
        text = args.get(key)
        if text is None or text.strip() == "":
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRequestError(
                f"ItemAdd: {key} is not valid JSON ({e.msg} at character {e.pos}): {text[:80]!r}"
            ) from None
        if not isinstance(value, kind):
            raise BadRequestError(f"ItemAdd: {key} must be {label}, got {type(value).__name__}")
        if value:
            item[key] = value
    return NewItem(item, parse_position(args.get("pos"), "ItemAdd"))


def parse_item_remove(args: Mapping[str, str]) -> dict[str, Any]:
    """Validate ``Queue:ItemRemove``: exactly one of ``uid`` and ``pos``; returns API kwargs."""
    check_args(args, qn.ITEM_REMOVE_ARGS, "ItemRemove")
    uid = (args.get("uid") or "").strip()
    pos = parse_position(args.get("pos"), "ItemRemove")
    if bool(uid) == (pos is not None):
        raise BadRequestError("ItemRemove: give exactly one of uid=ITEM_UID or pos=front|back|N")
    return {"uid": uid} if uid else {"pos": pos}


def parse_item_move(args: Mapping[str, str]) -> dict[str, Any]:
    """Validate ``Queue:ItemMove``; return the RE Manager API's kwargs.

    One source (``uid`` or ``pos``) and one destination (``posDest``, ``beforeUid`` or
    ``afterUid``).

    Raises:
        BadRequestError: naming the missing, doubled or malformed argument.
    """
    check_args(args, qn.ITEM_MOVE_ARGS, "ItemMove")
    uid = (args.get("uid") or "").strip()
    pos = parse_position(args.get("pos"), "ItemMove")
    if bool(uid) == (pos is not None):
        raise BadRequestError("ItemMove: give exactly one of uid=ITEM_UID or pos=front|back|N")
    try:
        dest = parse_position(args.get("posDest"), "ItemMove")
    except BadRequestError:
        raise BadRequestError(
            f"ItemMove: posDest must be front, back or an integer, not {args.get('posDest')!r}"
        ) from None
    before = (args.get("beforeUid") or "").strip()
    after = (args.get("afterUid") or "").strip()
    given = [name for name, v in (("posDest", dest), ("beforeUid", before), ("afterUid", after))
             if v not in (None, "")]
    if len(given) != 1:
        raise BadRequestError(
            "ItemMove: give exactly one destination: posDest=front|back|N, beforeUid=ITEM_UID or "
            f"afterUid=ITEM_UID (got {', '.join(given) or 'none'})"
        )
    out: dict[str, Any] = {"uid": uid} if uid else {"pos": pos}
    if dest is not None:
        out["pos_dest"] = dest
    elif before:
        out["before_uid"] = before
    else:
        out["after_uid"] = after
    return out


def parse_pause(args: Mapping[str, str]) -> str:
    """Validate ``Queue:RePause``: ``option`` deferred (default) or immediate."""
    check_args(args, qn.RE_PAUSE_ARGS, "RePause")
    option = (args.get("option") or "deferred").strip()
    if option not in qn.PAUSE_OPTIONS:
        raise BadRequestError(f"RePause: option must be one of {', '.join(qn.PAUSE_OPTIONS)}")
    return option


# --- automatic locks --------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldBy:
    """A lock as the queue IOC sees it in ``Coord:Locks``."""

    device: str
    lock_type: LockType
    owner: str
    reason: str = ""
    plan_uid: str = ""
    expires: float = 0.0

    @property
    def account(self) -> str:
        """The holder's account."""
        return owner_account(self.owner)

    @property
    def holder(self) -> str:
        """``account@host``."""
        return self.owner

    def describe(self, now: float | None = None) -> str:
        """The lock in the one refusal format (:func:`pvdb.lockmodel.describe`)."""
        return lockmodel.describe(self, time.time() if now is None else now)


def owner_account(owner: str) -> str:
    """``account@host`` -> ``account``."""
    return owner.rsplit("@", 1)[0]


def effective(locks: Mapping[str, HeldBy], device: str) -> HeldBy | None:
    """The lock governing ``device`` (:func:`pvdb.lockmodel.effective`)."""
    return lockmodel.effective(locks, device)


def blockers(
    devices: Iterable[str], locks: Mapping[str, HeldBy], account: str,
    lock_type: LockType = LockType.QUEUE_EXECUTING,
) -> list[HeldBy]:
    """Locks that a ``lock_type`` request of ``account`` on ``devices`` cannot preempt.

    The coordination IOC's rule (:func:`pvdb.lockmodel.decide_request`): another account's lock
    of equal or higher priority blocks, the device's own or a ``beamline`` lock; the account's
    own locks never do. Strongest first.
    """
    return list(lockmodel.decide_request(locks, devices, account, lock_type).blocking)


@dataclass
class LockPlan:
    """What the queue IOC should hold, per device.

    Attributes:
        executing: devices of the running item (static + reported by the worker hook).
        queued: devices of queued items that are not executing.
        running_uid: planUid of the QUEUE_EXECUTING locks.
    """

    executing: frozenset[str] = frozenset()
    queued: frozenset[str] = frozenset()
    running_uid: str = ""
    first_user: dict[str, str] = field(default_factory=dict)


def plan_locks(
    running_uid: str,
    running_devices: Iterable[str],
    hook_devices: Iterable[str],
    queued_items: Sequence[tuple[str, Sequence[str]]],
    coordinated: Iterable[str] | None,
) -> LockPlan:
    """The locks wanted now.

    Args:
        running_uid: uid of the running item, empty when none.
        running_devices: devices the running item names.
        hook_devices: devices the worker hook reported for the running item.
        queued_items: ``(item_uid, devices)`` of the queued items in order.
        coordinated: device names the coordination IOC accepts (``None``: unknown, nothing is
            planned since every request would be refused).
    """
    if coordinated is None:
        return LockPlan(running_uid=running_uid)
    known = set(coordinated) - {BEAMLINE}
    executing = frozenset(
        (set(running_devices) | set(hook_devices)) & known if running_uid else set()
    )
    queued: set[str] = set()
    first: dict[str, str] = {}
    for uid, devs in queued_items:
        for d in devs:
            if d in known and d not in executing:
                queued.add(d)
                first.setdefault(d, uid)
    return LockPlan(executing, frozenset(queued), running_uid, first)
