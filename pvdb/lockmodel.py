"""The lock model: every lock rule of pvcoord, in one pure, typed module (no p4p, no I/O).

The coordination IOC (its lock table), the queue IOC, the worker hook and the guard gateway call
these functions; so do the bridges. What lives here:

- the lock types and their priorities (:class:`pvdb.models.LockType`, re-exported), and
  :func:`outranks` / :func:`can_preempt`: a request preempts a holder only with a *strictly*
  higher priority (a lower number); equal or lower is refused;
- :func:`locks_on` and :func:`effective`: the locks that govern a device, a ``beamline`` lock
  included;
- :func:`decide_request`: what an acquire of some devices by an account meets (the blocking
  locks, the ones it would preempt, the account's own);
- :func:`may_write`: whether an account may write a device now (the rule every front enforces);
- :func:`resolve_caller`: who a request is from: the claimed account at its peer host, or the
  user a trusted service names with ``onBehalfOf`` (every IOC that takes ``onBehalfOf`` calls it);
- :class:`ErrorCode` and :func:`error_text` / :func:`parse_error_text`: the machine-readable code
  at the start of every refusal (``[holder-conflict holder=bob@host] m2 is held by ...``);
- :func:`fmt_time`, :func:`fmt_expiry`, :func:`describe`, :func:`conflict_text`: the one text and
  time format of refusals (UTC ISO 8601 with ``Z``, plus ``in N s``).

A lock is anything with the attributes of :class:`LockView` (``pvdb.models.Lock``, a row of
``Coord:Locks`` as the guard or the queue IOC reads it).
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from .models import BEAMLINE, LockType
from .policy import ACCOUNT_RE, Policy

__all__ = [
    "BEAMLINE",
    "ON_BEHALF_ARGS",
    "Caller",
    "CallerError",
    "Decision",
    "ErrorCode",
    "LockType",
    "LockView",
    "ParsedError",
    "RequestDecision",
    "Verdict",
    "can_preempt",
    "conflict_text",
    "decide_request",
    "describe",
    "effective",
    "error_text",
    "fmt_expiry",
    "fmt_time",
    "locks_on",
    "may_write",
    "new_request_id",
    "outranks",
    "parse_error_text",
    "priority_of",
    "request_id_problem",
    "resolve_caller",
]


# --- error codes ------------------------------------------------------------------------------


class ErrorCode(StrEnum):
    """Why a request was refused: the code at the start of every refusal text.

    Clients and tests compare codes (and the named holder), never sentences.
    """

    HOLDER_CONFLICT = "holder-conflict"
    """Another account holds the device at equal or higher priority (acquire), or holds it at
    all (a write)."""
    NOT_ALLOWED = "not-allowed"
    """The policy does not allow this account this action (lock type, force-release,
    on-behalf-of, queue control, a write in strict mode)."""
    BAD_ARGUMENT = "bad-argument"
    """A missing, unknown, malformed or out-of-range argument."""
    UNKNOWN_DEVICE = "unknown-device"
    """A device name the registry does not know."""
    NOT_READY = "not-ready"
    """The service cannot decide yet (device list not received from the registry)."""
    STATE_UNKNOWN = "state-unknown"
    """The lock state is unknown or stale: writes are refused (fail closed)."""
    NOT_LOCKED = "not-locked"
    """Release/renew/force-release of a device that has no lock."""
    NOT_HOLDER = "not-holder"
    """Release/renew of a lock someone else holds (neither the account nor the key match)."""
    UNKNOWN_KEY = "unknown-key"
    """No active lock matches the given key."""
    PREEMPTED = "preempted"
    """The caller's lock was preempted by a stronger one."""
    EXPIRED = "expired"
    """The caller's lock's lease ran out."""
    FORCE_RELEASED = "force-released"
    """The caller's lock was removed by a force-release."""
    RELEASED = "released"
    """The caller's lock was released by someone holding its key."""
    STORE_UNAVAILABLE = "store-unavailable"
    """The lock store failed; nothing changed."""
    OUTCOME_UNKNOWN = "outcome-unknown"
    """The lock store's connection broke after the change may have reached it, and the store
    cannot be asked: the change may or may not stand (check with Renew or ``Coord:Locks``)."""
    REQUEST_ID_REUSED = "request-id-reused"
    """A ``requestId`` the IOC already answered came with another request (another RPC or other
    arguments): the client reused an id; nothing changed."""
    MANAGER_UNAVAILABLE = "manager-unavailable"
    """The RE Manager did not answer."""
    MANAGER_REFUSED = "manager-refused"
    """The RE Manager refused the request."""
    SHUTTING_DOWN = "shutting-down"
    """The service is stopping; the request was not carried out."""
    INTERNAL = "internal"
    """A bug in the service; the text says where."""
    BAD_STORED_ROW = "bad-stored-row"
    """Not an RPC error: a row of the lock store failed validation when the IOC started (an
    ``refused`` event of ``Coord:Events``); it was skipped and deleted."""


_ERROR_RE = re.compile(r"^\[(?P<code>[a-z][a-z-]*)(?: holder=(?P<holder>\S+))?\] ?(?P<text>.*)$",
                       re.DOTALL)


def error_text(code: ErrorCode, message: str, holder: str = "") -> str:
    """The text of an RPC error: ``[code] message`` or ``[code holder=account@host] message``.

    Args:
        code: why.
        message: one sentence for people (names the holder when there is one).
        holder: ``account@host`` of the lock that caused the refusal, or ''.
    """
    head = f"{code.value} holder={holder}" if holder else code.value
    return f"[{head}] {message}"


@dataclass(frozen=True)
class ParsedError:
    """An RPC error text split by :func:`parse_error_text`.

    Attributes:
        code: the code, or ``None`` for a text without one (another server, a gateway).
        holder: ``account@host`` named in the head, or ''.
        message: the text after the head (the whole text when there is no head).
    """

    code: ErrorCode | None
    holder: str
    message: str


def parse_error_text(text: str) -> ParsedError:
    """Split an RPC error text made by :func:`error_text`; any other text has no code."""
    m = _ERROR_RE.match(text)
    if m is None:
        return ParsedError(None, "", text)
    try:
        code = ErrorCode(m.group("code"))
    except ValueError:
        return ParsedError(None, "", text)
    return ParsedError(code, m.group("holder") or "", m.group("text"))


# --- times ------------------------------------------------------------------------------------


def fmt_time(t: float) -> str:
    """Epoch seconds as UTC ISO 8601 with seconds: ``2026-11-21T06:22:21Z``.

    Raises:
        OverflowError, ValueError, OSError: ``t`` is not a representable time (as
            ``time.gmtime``).
    """
    if math.isfinite(t):
        return _fmt_second(math.floor(t))  # gmtime floors: the text depends on the second only
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@functools.lru_cache(maxsize=256)
def _fmt_second(sec: int) -> str:
    """:func:`fmt_time` of a whole second (an op formats the same few seconds several times)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))


def fmt_expiry(expires: float, now: float) -> str:
    """``2026-11-21T06:22:21Z, in 120 s`` (``never`` for 0 or a non-finite time)."""
    if not math.isfinite(expires) or expires <= 0:
        return "never"
    return f"{fmt_time(expires)}, in {max(0.0, expires - now):.0f} s"


# --- locks ------------------------------------------------------------------------------------


class LockView(Protocol):
    """What the rules need of a lock (``pvdb.models.Lock`` and every lock row type have it)."""

    @property
    def device(self) -> str:
        """The locked device, or ``beamline``."""
        ...

    @property
    def account(self) -> str:
        """Account of the holder."""
        ...

    @property
    def holder(self) -> str:
        """``account@host``, as shown everywhere."""
        ...

    @property
    def lock_type(self) -> str:
        """The lock type's name (a :class:`LockType` value)."""
        ...

    @property
    def reason(self) -> str:
        """Why it is held ('' if not given)."""
        ...

    @property
    def expires(self) -> float:
        """Lease end, epoch seconds."""
        ...


L = TypeVar("L", bound=LockView)


def priority_of(lock_type: str) -> int:
    """Priority of a lock type name (0 strongest); an unknown name counts as the strongest.

    (A lock of a type this version does not know is never preempted: fail safe.)
    """
    try:
        return LockType(lock_type).priority
    except ValueError:
        return -1


def outranks(a: str, b: str) -> bool:
    """Whether lock type ``a`` has a strictly higher priority than ``b``."""
    return priority_of(a) < priority_of(b)


def can_preempt(request: str, held: str) -> bool:
    """The preemption rule: whether a ``request`` preempts another account's ``held`` lock.

    Only a strictly higher priority preempts; equal or lower is refused.
    """
    return outranks(request, held)


def locks_on(locks: Mapping[str, L], device: str) -> list[L]:
    """The locks that apply to ``device``: its own, then a ``beamline`` lock, if any."""
    out: list[L] = []
    own = locks.get(device)
    if own is not None:
        out.append(own)
    if device != BEAMLINE:
        bl = locks.get(BEAMLINE)
        if bl is not None:
            out.append(bl)
    return out


def effective(locks: Mapping[str, L], device: str) -> L | None:
    """The lock that governs ``device``: its own, or a strictly stronger ``beamline`` lock."""
    own = locks.get(device)
    bl = locks.get(BEAMLINE) if device != BEAMLINE else None
    if own is None:
        return bl
    if bl is not None and outranks(bl.lock_type, own.lock_type):
        return bl
    return own


@dataclass(frozen=True)
class RequestDecision(Generic[L]):
    """What a lock request meets (see :func:`decide_request`).

    Attributes:
        blocking: other accounts' locks it cannot preempt, strongest first (then by device).
        preempt: other accounts' locks it preempts if granted, by device.
        own: the account's own locks it touches (renewed, retyped, or absorbed by ``beamline``).
    """

    blocking: tuple[L, ...]
    preempt: tuple[L, ...]
    own: tuple[L, ...]

    @property
    def granted(self) -> bool:
        """True when nothing blocks the request."""
        return not self.blocking

    @property
    def blocker(self) -> L | None:
        """The lock a refusal names: the strongest blocking one."""
        return self.blocking[0] if self.blocking else None


def same_holder(lock: LockView, account: str, host: str | None = None) -> bool:
    """Whether ``account`` (seen from peer ``host``) is ``lock``'s holder.

    The account is what the client claimed; the host is the peer address the server saw, so a
    client claiming ``alice`` from another host is not alice's holder (it needs the key). ``host``
    None: the host is not compared (a reader that does not know it). A lock recorded without a
    host (``holder`` equal to the account) matches the account from any host.
    """
    if lock.account != account:
        return False
    return host is None or lock.holder in (account, f"{account}@{host}")


def decide_request(
    locks: Mapping[str, L], devices: Iterable[str], account: str, lock_type: str,
    host: str | None = None,
) -> RequestDecision[L]:
    """Decide a ``lock_type`` request of ``account`` on ``devices`` (all or none).

    A device conflicts with its own lock and a ``beamline`` lock; ``beamline`` conflicts with
    every lock. The requester's own locks (:func:`same_holder`) never block (a repeated request
    renews).

    Args:
        locks: the active locks, device (or ``beamline``) -> lock.
        devices: the requested devices.
        account: the requesting account (the holder-to-be).
        lock_type: the requested type.
        host: the requester's peer host (None: not compared).
    """
    touched: dict[str, L] = {}
    for d in devices:
        if d == BEAMLINE:
            touched.update(locks)
        else:
            touched.update({lk.device: lk for lk in locks_on(locks, d)})
    others = [lk for lk in touched.values() if not same_holder(lk, account, host)]
    blocking = sorted(
        (lk for lk in others if not can_preempt(lock_type, lk.lock_type)),
        key=lambda lk: (priority_of(lk.lock_type), lk.device),
    )
    preempt = sorted((lk for lk in others if can_preempt(lock_type, lk.lock_type)),
                     key=lambda lk: lk.device)
    own = sorted((lk for lk in touched.values() if same_holder(lk, account, host)),
                 key=lambda lk: lk.device)
    return RequestDecision(tuple(blocking), tuple(preempt), tuple(own))


# --- the refusal texts ------------------------------------------------------------------------


def describe(lock: LockView, now: float, device: str | None = None) -> str:
    """A held lock for people: holder, type, reason, expiry (the one format of every refusal).

    ``m2 is held by bob@host (MANUAL_OPERATOR, reason 'scan', expires 2026-11-21T06:22:21Z, in
    120 s)``; with ``device`` given and a ``beamline`` lock: ``m2 is held by bob@host with the
    beamline lock (...)``.
    """
    reason = f", reason {lock.reason!r}" if lock.reason else ""
    what = lock.device
    via = ""
    if device is not None and device != lock.device and lock.device == BEAMLINE:
        what, via = device, " with the beamline lock"
    return (f"{what} is held by {lock.holder}{via} ({lock.lock_type}{reason}, "
            f"expires {fmt_expiry(lock.expires, now)})")


def conflict_text(lock: LockView, request: str, now: float, device: str | None = None) -> str:
    """The refusal of a ``request``-type request that meets ``lock``.

    ``<describe(lock)>; a QUEUE_EXECUTING request cannot preempt it``.
    """
    return f"{describe(lock, now, device)}; a {request} request cannot preempt it"


# --- the may-write decision -------------------------------------------------------------------


class Verdict(StrEnum):
    """Which rule decided a write."""

    HOLDER = "holder"
    UNLOCKED = "unlocked"
    STRICT = "strict"
    HELD_BY_OTHER = "held-by-other"
    UNKNOWN_STATE = "unknown-state"
    EMERGENCY = "emergency"
    NOT_A_DEVICE = "not-a-device"
    FIELD_RULE = "field-rule"
    DELEGATE = "delegate"


_VERDICT_CODE: dict[Verdict, ErrorCode] = {
    Verdict.STRICT: ErrorCode.NOT_ALLOWED,
    Verdict.FIELD_RULE: ErrorCode.NOT_ALLOWED,
    Verdict.HELD_BY_OTHER: ErrorCode.HOLDER_CONFLICT,
    Verdict.UNKNOWN_STATE: ErrorCode.STATE_UNKNOWN,
    Verdict.NOT_A_DEVICE: ErrorCode.NOT_ALLOWED,
}


@dataclass(frozen=True)
class Decision:
    """May this account write (put/RPC) this PV or device now, and why.

    Attributes:
        allowed: the answer.
        verdict: which rule decided.
        reason: one sentence for people (names the holder when refused).
        device: the device, '' if none.
        holder: ``account@host`` of the lock that decided, '' if none.
        lock_type: type of that lock, '' if none.
        expires: its expiry (epoch seconds), 0 if none.
        locked: whether the device is held by anyone (drives the audit of allowed puts).
    """

    allowed: bool
    verdict: Verdict
    reason: str
    device: str = ""
    holder: str = ""
    lock_type: str = ""
    expires: float = 0.0
    locked: bool = False

    @property
    def code(self) -> ErrorCode | None:
        """The :class:`ErrorCode` of a refusal; ``None`` when allowed."""
        return None if self.allowed else _VERDICT_CODE[self.verdict]

    def error(self) -> str:
        """The refusal as an error text (:func:`error_text`); '' when allowed."""
        code = self.code
        return "" if code is None else error_text(code, self.reason, self.holder)


def may_write(
    policy: Policy,
    locks: Mapping[str, LockView] | None,
    device: str,
    account: str,
    roles: Sequence[str] = (),
    why_unknown: str = "lock state not received yet",
    now: float | None = None,
    host: str | None = None,
    last_locks: Mapping[str, LockView] | None = None,
) -> Decision:
    """Whether ``account`` (OS groups ``roles``, seen from peer ``host``) may write ``device`` now.

    Rules: lock state unknown (``locks`` is ``None``) -> refused (fail closed) unless the account
    is one of the policy's ``access.emergency``, and even then not while the last lock table
    received (``last_locks``) has the device held by someone else (an emergency account does not
    override a known lock); device held (its own lock or a ``beamline`` lock) -> only its holder
    (:func:`same_holder`: the account, from the holder's host when ``host`` is given), or a
    delegate service for a holder it may act for (:meth:`Policy.may_delegate_write`); device
    free -> the policy's ``access.unlocked_writable`` (everyone, or in strict mode nobody).

    Args:
        policy: the endstation policy.
        locks: device (or ``beamline``) -> lock, or ``None`` when unknown or stale.
        device: the device written.
        account: the writing account (as the client claimed it).
        roles: its OS groups (from the host's group database).
        why_unknown: why ``locks`` is ``None`` (shown in the reason).
        now: epoch seconds for the "in N s" of a refusal (default: now).
        host: the writer's peer address (None: not compared).
        last_locks: the last lock table received while ``locks`` is ``None``.
    """
    t = time.time() if now is None else now
    if locks is None:
        if policy.is_emergency(account, roles, host):
            known = [lk for lk in locks_on(last_locks or {}, device)
                     if not same_holder(lk, account, host)]
            if known:
                lk = known[0]
                return Decision(
                    False, Verdict.UNKNOWN_STATE,
                    f"lock state unknown ({why_unknown}); {account} is an emergency account, but "
                    f"the last lock table received says {describe(lk, t, device)}: an emergency "
                    "account does not override a known lock",
                    device=device, holder=lk.holder, lock_type=lk.lock_type,
                    expires=lk.expires, locked=True)
            return Decision(True, Verdict.EMERGENCY,
                            f"lock state unknown ({why_unknown}); {account} is an emergency "
                            "account", device=device)
        return Decision(False, Verdict.UNKNOWN_STATE,
                        f"lock state unknown ({why_unknown}): writes to device {device} are "
                        "refused until the coordination IOC is back (fail closed)", device=device)
    held = locks_on(locks, device)
    if not held:
        if policy.access.unlocked_writable:
            return Decision(True, Verdict.UNLOCKED, f"device {device} is not locked", device=device)
        return Decision(False, Verdict.STRICT,
                        f"device {device} is not locked and the policy is strict: acquire its lock "
                        "first", device=device)
    delegated: list[LockView] = []
    for lock in held:
        if same_holder(lock, account, host):
            continue
        if policy.access.delegates and not policy.may_delegate_write(
                account, roles, host, lock.account):
            delegated.append(lock)
            continue
        _, at, lock_host = lock.holder.rpartition("@")
        where = f" from {lock_host}" if at and lock_host else ""
        return Decision(
            False, Verdict.HELD_BY_OTHER,
            f"{describe(lock, t, device)}; only account {lock.account}{where} may write it",
            device=device, holder=lock.holder, lock_type=lock.lock_type,
            expires=lock.expires, locked=True,
        )
    lock = held[0]
    if delegated:
        return Decision(
            True, Verdict.DELEGATE,
            f"{describe(delegated[0], t, device)}; {account} writes as a delegate of "
            f"{delegated[0].account} (policy access.delegates)",
            device=device, holder=lock.holder, lock_type=lock.lock_type,
            expires=lock.expires, locked=True)
    return Decision(True, Verdict.HOLDER, f"{account} holds the lock on device {device}",
                    device=device, holder=lock.holder, lock_type=lock.lock_type,
                    expires=lock.expires, locked=True)


# --- request ids ------------------------------------------------------------------------------

REQUEST_ID_MIN = 16
"""Shortest accepted ``requestId`` (characters): 96 bits if random."""
REQUEST_ID_MAX = 64
"""Longest accepted ``requestId`` (characters)."""
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]+")


def new_request_id() -> str:
    """A fresh ``requestId``: 128 random bits as 22 URL-safe base64 characters.

    It is a secret of the caller: the IOC keeps only a digest of it, and the key of a granted
    acquire is stored encrypted under it (docs/locks.md, "Requests in flight at a crash").
    """
    return secrets.token_urlsafe(16)


def request_id_problem(value: str) -> str | None:
    """What is wrong with a ``requestId`` argument, or ``None`` if it is acceptable.

    Accepted: :data:`REQUEST_ID_MIN` to :data:`REQUEST_ID_MAX` characters of ``A-Z a-z 0-9 _ -``
    (URL-safe base64, what :func:`new_request_id` makes).
    """
    if not REQUEST_ID_MIN <= len(value) <= REQUEST_ID_MAX:
        return (f"requestId is {len(value)} characters long; give {REQUEST_ID_MIN} to "
                f"{REQUEST_ID_MAX} (a random token per call, e.g. 22 URL-safe base64 characters)")
    if not _REQUEST_ID_RE.fullmatch(value):
        return "requestId may contain only A-Z, a-z, 0-9, '_' and '-' (URL-safe base64)"
    return None


# --- who asks ---------------------------------------------------------------------------------

ON_BEHALF_ARGS = ("onBehalfOf", "clientHost")
"""The RPC arguments of a trusted service acting for a user: ``onBehalfOf=USER`` and, optionally,
``clientHost=HOST`` (the user's own host, e.g. the browser's address seen by a web bridge)."""
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}\Z")


class CallerError(ValueError):
    """A request whose identity is refused; ``str(e)`` is the message, nothing was done.

    Attributes:
        code: ``bad-argument`` (a malformed account, ``onBehalfOf`` or ``clientHost``) or
            ``not-allowed`` (the caller is no trusted service, or may not act for that user).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Caller:
    """Who a request is from, as :func:`resolve_caller` decided.

    Attributes:
        account: the account the request acts as (the named user for on-behalf-of requests).
        host: its host: the peer address, or the ``clientHost`` a trusted service gave.
        roles: OS groups of ``account`` on this host (never the client's claim).
        actor: the trusted service account that made an on-behalf-of request, else ``None``.
    """

    account: str
    host: str
    roles: frozenset[str] = frozenset()
    actor: str | None = None


def resolve_caller(
    policy: Policy,
    account: str,
    host: str,
    on_behalf_of: str | None,
    client_host: str | None,
    roles_of: Callable[[str], frozenset[str]],
) -> Caller:
    """Who a request is from: the one identity rule of every pvcoord RPC that takes ``onBehalfOf``.

    The claimed ``account`` must be a plain account name. Without ``on_behalf_of`` the caller is
    ``account`` at peer ``host``. With it, ``account`` (from ``host``) must be a trusted service
    that may act for that user (:meth:`pvdb.policy.Policy.may_act_for`: ``trusted_services``,
    ``access.on_behalf_of``, privileged users only when named); the caller is then the user, at
    ``client_host`` if given (else ``host``), with ``actor`` = the service.

    Args:
        policy: the endstation policy.
        account: the PVA account the client claimed (``anonymous`` when none).
        host: the peer address the server saw (without the port).
        on_behalf_of: the ``onBehalfOf`` argument, ``None`` or '' when absent.
        client_host: the ``clientHost`` argument, ``None`` or '' when absent.
        roles_of: OS groups of an account on this host (:func:`pvdb.policy.host_roles`).

    Raises:
        CallerError: ``bad-argument`` for a malformed account, user or host (or ``clientHost``
            without ``onBehalfOf``); ``not-allowed`` when the policy refuses the delegation.
    """
    if not ACCOUNT_RE.match(account):
        raise CallerError(
            "the client's account name is not accepted (1-64 letters, digits, '.', '_', '-'; "
            "no '@', spaces or control characters)")
    user = on_behalf_of or None
    client = client_host or None
    if user is None and client is not None:
        raise CallerError("clientHost is only accepted together with onBehalfOf")
    if user is not None and not ACCOUNT_RE.match(user):
        raise CallerError(f"onBehalfOf {user[:40]!r} is not a valid account name")
    if client is not None and not _HOST_RE.match(client):
        raise CallerError(f"clientHost {client[:40]!r} is not a valid host name")
    roles = roles_of(account)
    if user is None:
        return Caller(account, host, roles)
    user_roles = roles_of(user)
    why = policy.may_act_for(account, roles, host, user, user_roles)
    if why:
        raise CallerError(why, ErrorCode.NOT_ALLOWED)
    return Caller(user, client or host, user_roles, actor=account)
