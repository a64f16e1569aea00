"""The one lock model (pvdb.lockmodel): preemption, effective lock, may-write, codes and texts.

Pure unit tests; the same rules are exercised against the real coordination IOC, guard and queue
IOC in their own test files.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pvdb import lockmodel as lm
from pvdb.lockmodel import BEAMLINE, ErrorCode, LockType, Verdict
from pvdb.models import Lock
from pvdb.policy import parse_policy

NOW = 1_800_000_000.0
POLICY = parse_policy('[access]\nemergency = ["root"]\n')
STRICT = parse_policy("[access]\nunlocked_writable = false\n")


@dataclass(frozen=True)
class Row:
    """A lock row as a bridge might hold it (not pvdb.models.Lock): the model takes any."""

    device: str
    account: str
    lock_type: str
    host: str = "h"
    reason: str = ""
    expires: float = NOW + 120

    @property
    def holder(self) -> str:
        return f"{self.account}@{self.host}"


def table(*rows: Row) -> dict[str, Row]:
    return {r.device: r for r in rows}


def test_priorities_and_the_strict_preemption_rule():
    order = [LockType.MAINTENANCE, LockType.QUEUE_EXECUTING, LockType.MANUAL_OPERATOR,
             LockType.QUEUE_QUEUED]
    assert [t.priority for t in order] == [0, 1, 2, 3]
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            assert lm.can_preempt(a, b) is (i < j), (a, b)  # equal never preempts
    assert not lm.can_preempt(LockType.MAINTENANCE, "FUTURE_TYPE")  # unknown: never preempted


def test_effective_lock_includes_a_stronger_beamline_lock():
    own = Row("m1", "anna", LockType.MANUAL_OPERATOR)
    weak_bl = Row(BEAMLINE, "bob", LockType.QUEUE_QUEUED)
    strong_bl = Row(BEAMLINE, "max", LockType.MAINTENANCE)
    assert lm.effective(table(own), "m1") is own
    assert lm.effective(table(own, weak_bl), "m1") is own
    assert lm.effective(table(own, strong_bl), "m1") is strong_bl
    assert lm.effective(table(strong_bl), "m2") is strong_bl
    assert lm.effective({}, "m1") is None
    assert lm.locks_on(table(own, weak_bl), "m1") == [own, weak_bl]


def test_decide_request_blocks_preempts_and_ignores_own_locks():
    locks = table(
        Row("m1", "anna", LockType.MANUAL_OPERATOR),
        Row("m2", "max", LockType.MAINTENANCE),
        Row("m3", "queue", LockType.QUEUE_EXECUTING),
        Row("m4", "other", LockType.QUEUE_EXECUTING),
    )
    d = lm.decide_request(locks, ["m1", "m2", "m3", "m4"], "queue", LockType.QUEUE_EXECUTING)
    assert [lk.device for lk in d.blocking] == ["m2", "m4"]  # strongest first
    assert d.blocker is locks["m2"] and not d.granted
    assert [lk.device for lk in d.preempt] == ["m1"]
    assert [lk.device for lk in d.own] == ["m3"]
    # beamline meets every lock; a device meets a beamline lock
    bl = lm.decide_request(locks, [BEAMLINE], "root", LockType.MAINTENANCE)
    assert {lk.device for lk in bl.blocking} == {"m2"}
    under = lm.decide_request(table(Row(BEAMLINE, "anna", LockType.QUEUE_QUEUED)), ["m9"],
                              "bob", LockType.QUEUE_QUEUED)
    assert under.blocker is not None and under.blocker.device == BEAMLINE


def test_works_with_the_stored_lock_model():
    lk = Lock(device="m1", lock_type=LockType.MANUAL_OPERATOR, owner="anna", host="h",
              actor="anna", acquired=NOW, expires=NOW + 60)
    assert lk.account == "anna"
    d = lm.decide_request({"m1": lk}, ["m1"], "bob", LockType.MANUAL_OPERATOR)
    assert d.blocker is lk


def test_one_refusal_format_utc_z_and_in_n_s():
    lk = Row("m2", "bob", LockType.MANUAL_OPERATOR, reason="scan", expires=NOW + 120)
    assert lm.fmt_time(NOW) == "2027-01-15T08:00:00Z"
    assert lm.describe(lk, NOW) == (
        "m2 is held by bob@h (MANUAL_OPERATOR, reason 'scan', expires 2027-01-15T08:02:00Z, "
        "in 120 s)")
    bl = Row(BEAMLINE, "max", LockType.MAINTENANCE, expires=NOW + 5)
    assert lm.describe(bl, NOW, "m1").startswith("m1 is held by max@h with the beamline lock (")
    assert lm.conflict_text(lk, LockType.MANUAL_OPERATOR, NOW).endswith(
        "; a MANUAL_OPERATOR request cannot preempt it")
    assert lm.fmt_expiry(0.0, NOW) == "never"


@pytest.mark.parametrize("holder", ["", "bob@10.0.0.2"])
def test_error_text_round_trip(holder):
    text = lm.error_text(ErrorCode.HOLDER_CONFLICT, "m2 is held by bob; [x] y", holder)
    p = lm.parse_error_text(text)
    assert (p.code, p.holder, p.message) == (ErrorCode.HOLDER_CONFLICT, holder,
                                             "m2 is held by bob; [x] y")


def test_texts_without_a_code_are_left_whole():
    for text in ("Put permission denied by gateway", "[no-such-code] x", "[holder-conflict"):
        p = lm.parse_error_text(text)
        assert (p.code, p.holder, p.message) == (None, "", text)


def test_may_write():
    held = table(Row("m1", "anna", LockType.MANUAL_OPERATOR, host="10.0.0.5", reason="scan"))
    d = lm.may_write(POLICY, held, "m1", "bob", now=NOW)
    assert (d.allowed, d.verdict, d.code, d.holder) == (
        False, Verdict.HELD_BY_OTHER, ErrorCode.HOLDER_CONFLICT, "anna@10.0.0.5")
    assert lm.parse_error_text(d.error()).holder == "anna@10.0.0.5"
    ok = lm.may_write(POLICY, held, "m1", "anna")
    assert (ok.allowed, ok.verdict, ok.code, ok.error()) == (True, Verdict.HOLDER, None, "")
    assert lm.may_write(POLICY, {}, "m1", "bob").verdict is Verdict.UNLOCKED
    strict = lm.may_write(STRICT, {}, "m1", "bob")
    assert (strict.allowed, strict.code) == (False, ErrorCode.NOT_ALLOWED)
    unknown = lm.may_write(POLICY, None, "m1", "bob", why_unknown="IOC gone")
    assert (unknown.allowed, unknown.code) == (False, ErrorCode.STATE_UNKNOWN)
    assert lm.may_write(POLICY, None, "m1", "root").verdict is Verdict.EMERGENCY
    bl = table(Row(BEAMLINE, "max", LockType.MAINTENANCE))
    assert lm.may_write(POLICY, bl, "m7", "bob").holder == "max@h"
    assert lm.may_write(POLICY, bl, "m7", "max").allowed


GUARD_DELEGATES = parse_policy("""
[access]
trusted_services = ["webbridge@10.0.0.5", "queuesvc"]
delegates = ["webbridge@10.0.0.5"]
on_behalf_of = { webbridge = ["alice", "bob"] }
""")


def test_a_delegate_writes_for_the_users_it_may_act_for_and_only_there():
    alice = table(Row("m1", "alice", LockType.MANUAL_OPERATOR, host="192.168.1.9"))
    d = lm.may_write(GUARD_DELEGATES, alice, "m1", "webbridge", host="10.0.0.5", now=NOW)
    assert d.allowed and d.verdict is Verdict.DELEGATE and d.holder == "alice@192.168.1.9"
    # from another host the same claimed account is no delegate
    d = lm.may_write(GUARD_DELEGATES, alice, "m1", "webbridge", host="10.0.0.6", now=NOW)
    assert not d.allowed and d.code is ErrorCode.HOLDER_CONFLICT and d.holder.startswith("alice@")
    # a holder it may not act for (not in on_behalf_of, or privileged) stays closed to it
    for holder in ("carol", "root", "queuesvc"):
        locks = table(Row("m1", holder, LockType.MANUAL_OPERATOR))
        d = lm.may_write(GUARD_DELEGATES, locks, "m1", "webbridge", host="10.0.0.5", now=NOW)
        assert not d.allowed and d.code is ErrorCode.HOLDER_CONFLICT, holder
        assert d.holder == f"{holder}@h"
    # a trusted service that is not a delegate is refused as before
    d = lm.may_write(GUARD_DELEGATES, alice, "m1", "queuesvc", now=NOW)
    assert not d.allowed and d.code is ErrorCode.HOLDER_CONFLICT
    # a beamline lock of a holder it may not act for closes the device too
    both = table(Row("m1", "alice", LockType.MANUAL_OPERATOR),
                 Row(BEAMLINE, "root", LockType.MAINTENANCE))
    d = lm.may_write(GUARD_DELEGATES, both, "m1", "webbridge", host="10.0.0.5", now=NOW)
    assert not d.allowed and d.holder == "root@h"
    # without delegates in the policy nothing changes
    d = lm.may_write(POLICY, alice, "m1", "webbridge", host="10.0.0.5", now=NOW)
    assert not d.allowed and d.code is ErrorCode.HOLDER_CONFLICT


def test_a_delegate_must_be_a_trusted_service():
    from pvdb.policy import PolicyError

    with pytest.raises(PolicyError, match="delegates"):
        parse_policy('[access]\ndelegates = ["webbridge"]\n')


# --- who asks: resolve_caller (the coordination IOC and the queue IOC call it) ------------------

DELEGATING = parse_policy("""
[access]
trusted_services = ["websvc@127.0.0.1"]
force_release = ["root"]

[access.on_behalf_of]
websvc = ["role/users", "alice"]
""")
ROLES = {"websvc": frozenset({"svc"}), "dave": frozenset({"users"}), "root": frozenset()}


def roles_of(account: str) -> frozenset[str]:
    return ROLES.get(account, frozenset())


def _resolve(account: str, host: str = "127.0.0.1", user: str | None = None,
             client: str | None = None) -> lm.Caller:
    return lm.resolve_caller(DELEGATING, account, host, user, client, roles_of)


def test_resolve_caller_without_on_behalf_is_the_account_at_its_peer():
    c = _resolve("bob", "10.0.0.7")
    assert (c.account, c.host, c.actor, c.roles) == ("bob", "10.0.0.7", None, frozenset())
    assert _resolve("dave").roles == {"users"}  # roles from roles_of, never from the client


def test_resolve_caller_on_behalf_names_the_user_and_the_service_as_actor():
    c = _resolve("websvc", user="alice", client="192.168.1.9")
    assert (c.account, c.host, c.actor) == ("alice", "192.168.1.9", "websvc")
    c = _resolve("websvc", user="dave")  # by role/users; no clientHost: the service's peer
    assert (c.account, c.host, c.actor, c.roles) == ("dave", "127.0.0.1", "websvc", {"users"})


@pytest.mark.parametrize(("account", "host", "user", "client", "code"), [
    ("bob", "127.0.0.1", "alice", None, ErrorCode.NOT_ALLOWED),  # not a trusted service
    ("websvc", "10.9.9.9", "alice", None, ErrorCode.NOT_ALLOWED),  # trusted from 127.0.0.1 only
    ("websvc", "127.0.0.1", "erin", None, ErrorCode.NOT_ALLOWED),  # not in on_behalf_of
    ("websvc", "127.0.0.1", "root", None, ErrorCode.NOT_ALLOWED),  # privileged, not named
    ("websvc", "127.0.0.1", "al ice", None, ErrorCode.BAD_ARGUMENT),
    ("websvc", "127.0.0.1", "alice", "host\nx", ErrorCode.BAD_ARGUMENT),
    ("websvc", "127.0.0.1", None, "192.168.1.9", ErrorCode.BAD_ARGUMENT),  # clientHost alone
    ("bad@account", "127.0.0.1", None, None, ErrorCode.BAD_ARGUMENT),
    # a final newline: a regex's $ matches before it; such a lock was refused at the next start
    ("eve\n", "127.0.0.1", None, None, ErrorCode.BAD_ARGUMENT),
    ("websvc", "127.0.0.1", "bob\n", None, ErrorCode.BAD_ARGUMENT),
    ("websvc", "127.0.0.1", "alice", "10.0.0.9\n", ErrorCode.BAD_ARGUMENT),
])
def test_resolve_caller_refuses_with_a_code(account, host, user, client, code):
    with pytest.raises(lm.CallerError) as e:
        _resolve(account, host, user, client)
    assert e.value.code is code, e.value
