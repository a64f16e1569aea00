"""The real queue IOC against a real RE Manager, redis, softIoc and coordination IOC.

One set of processes per module (``bench``): the demo softIoc, ``python -m iocs.coordination``
(SQLite store, static device list), redis, ``start-re-manager`` with the project's demo startup
dir (ophyd-async devices, worker hook on) and ``python -m iocs.queue`` (locks held on behalf of
the user ``queue``). The test that kills the manager runs last.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from p4p.client.thread import Context, RemoteError
from p4p.nt import NTURI

from pvcoord.client import Client, LockInfo, RefusedError, table_rows
from pvcoord.demo import devices
from pvcoord.demo.queue_part import (
    QUEUE_LOCK_OWNER,
    QueueStack,
    manager_call,
    queue_ioc_argv,
    start_queue_stack,
    start_re_manager,
    wait_manager,
    zmq_addr,
)
from pvcoord.launch import coordination_argv
from pvcoord.procs import (
    LOOPBACK,
    PYTHON,
    ManagedProcess,
    client_conf,
    free_port,
    loopback_env,
    python_module,
    server_env,
    start_redis,
    wait_for_pv,
    wait_until,
)
from pvdb import demo as demo_pvs
from pvdb import names as pvn
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode
from pvdb.models import EventAction, LockType

from .codes import code_of, holder_of, raises_code
from .conftest import TIMEOUT, other_user_available

pytestmark = pytest.mark.system

P = "TQ:"
POLICY = f"""
[access]
trusted_services = ["root"]
force_release = ["root"]
queue_control = ["root", "alice@127.0.0.1"]  # alice: a web user, through the bridge
[access.on_behalf_of]
root = ["*", "{QUEUE_LOCK_OWNER}"]  # the queue IOC holds its locks for the service account

[lock_types.MAINTENANCE]
allow = ["*"]

[lock_types.QUEUE_EXECUTING]
allow = ["{QUEUE_LOCK_OWNER}"]
default_lease = 60
max_lease = 600

[lock_types.MANUAL_OPERATOR]
allow = ["*"]

[lock_types.QUEUE_QUEUED]
allow = ["{QUEUE_LOCK_OWNER}"]
"""
EXEC_LEASE = 3.0
"""QUEUE_EXECUTING lease of the module's queue IOC (s): short, so a plan outlives it."""
WAIT = 30.0
"""Deadline (s) for things that take a few seconds on two loaded cores (plans, env open)."""


@dataclass
class Bench:
    env: dict[str, str]
    stack: QueueStack
    ctxt: Context
    coord: Client
    procs: list[ManagedProcess]
    dir: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-4000:]}" for p in self.procs)


def _start_base(d: Path, env: dict[str, str]) -> tuple[list[ManagedProcess], str, Path]:
    policy = d / "policy.toml"
    policy.write_text(POLICY)
    db = devices.write_database(P, d / "demo.db")
    store = f"sqlite://{d}/locks.sqlite"
    soft = ManagedProcess("softioc", python_module("pvxslibs.ioc", "-d", str(db)),
                          server_env(env), log_dir=d)
    coord = ManagedProcess(
        "coordination",
        coordination_argv(P, store, policy, devices=demo_pvs.DEVICE_NAMES),
        server_env(env), log_dir=d,
    )
    # the worker hook resolves the ophyd-async devices' PVs through the registry's map
    registry = ManagedProcess(
        "registry", python_module("iocs.registry", "--prefix", P, "--registry",
                                  str(devices.write_registry(P, d / "registry.yaml"))),
        server_env(env), log_dir=d,
    )
    procs = [soft, coord, registry]
    try:
        wait_for_pv(demo_pvs.motor_readback(P, "m1"), env, WAIT, procs=[soft])
        wait_for_pv(pvn.COORD_DEVICES.name(P), env, WAIT, procs=[coord])
        wait_for_pv(pvn.REGISTRY_DEVICE_PVS.name(P), env, WAIT, procs=[registry])
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, store, policy


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp("queue")
    env = loopback_env()
    procs, store, policy = _start_base(d, env)
    try:
        with start_queue_stack(P, env, d, store_url=store, policy=policy,
                               ioc_args=("--exec-lease", str(EXEC_LEASE))) as stack, \
                Context("pva", conf=client_conf(env), useenv=False, nt=False) as ctxt, \
                Client(P, conf=client_conf(env), timeout=TIMEOUT) as coord:
            yield Bench(env, stack, ctxt, coord, [*procs, *stack.procs.values()], d)
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(autouse=True)
def _show_logs_on_failure(request):
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "bench" in request.fixturenames:
        print(request.getfixturevalue("bench").logs())


@pytest.fixture
def clean(bench):
    """An idle manager with an empty queue and no locks at the start of the test."""
    st = bench.stack
    status = st.call("status")
    if status["manager_state"] == "paused":
        st.call("re_stop")
    wait_until(lambda: st.call("status")["manager_state"] == "idle", WAIT, "idle")
    st.call("queue_clear")
    wait_until(lambda: not queue_locks(bench), WAIT, "the queue IOC released its locks")
    for lk in bench.coord.locks():
        with contextlib.suppress(RefusedError):
            bench.coord.force_release([lk.device], reason="test cleanup")
    wait_until(lambda: not bench.coord.locks(), WAIT, "no locks")
    return bench


# --- helpers ----------------------------------------------------------------------------------


def raw(b: Bench, spec: pvn.PVSpec):
    return b.ctxt.get(spec.name(P), timeout=TIMEOUT)


def val(b: Bench, spec: pvn.PVSpec):
    v = raw(b, spec)
    if spec.kind is pvn.PVKind.NTENUM:
        return v["value.choices"][v["value.index"]]
    if spec.kind is pvn.PVKind.NTTABLE:
        return table_rows(v)
    x = v["value"]
    return list(x) if spec.kind is pvn.PVKind.STRING_ARRAY else x


def wait_val(b: Bench, spec: pvn.PVSpec, pred, what: str, timeout: float = WAIT):
    return wait_until(lambda: pred(val(b, spec)), timeout, f"{spec.suffix}: {what}")


def call(b: Bench, spec: pvn.PVSpec, **kws: str):
    name = spec.name(P)
    return b.ctxt.rpc(name, NTURI([(k, "s") for k in kws]).wrap(name, kws=kws), timeout=TIMEOUT)


def mgr_state(b: Bench) -> str:
    return b.stack.call("status")["manager_state"]


def queue_locks(b: Bench) -> list[LockInfo]:
    return [lk for lk in b.coord.locks() if lk.owner.startswith(QUEUE_LOCK_OWNER + "@")]


def wait_idle(b: Bench, timeout: float = WAIT) -> None:
    wait_until(lambda: mgr_state(b) == "idle", timeout, "manager idle")


def collapse(seq: list[str]) -> list[str]:
    out: list[str] = []
    for s in seq:
        if not out or out[-1] != s:
            out.append(s)
    return out


class InfoRecorder:
    """manager_state of every QS_Info message, from our own SUB socket on the info address."""

    def __init__(self, stack: QueueStack) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(zmq_addr(stack.info_port))
        self.sock.subscribe(b"QS_Info")
        self.states: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        wait_until(lambda: self.states, 5.0, "first QS_Info message")

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(200):
                _topic, payload = self.sock.recv_multipart()
                self.states.append(json.loads(payload)["msg"]["status"]["manager_state"])

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()
        self.ctx.term()


# --- status PVs -------------------------------------------------------------------------------


def test_status_pvs_are_served_and_valid(clean):
    b = clean
    st = b.stack.call("status")
    assert val(b, qn.MANAGER_STATE) == "idle"
    assert val(b, qn.WORKER_ENVIRONMENT_EXISTS) == 1
    assert val(b, qn.WORKER_ENVIRONMENT_STATE) == st["worker_environment_state"]
    assert val(b, qn.CONNECTION) == "Push"
    assert val(b, qn.LOCK_HEALTH) == "OK"
    for spec in qn.QUEUE_PVS:
        if spec.kind is not pvn.PVKind.RPC:
            assert raw(b, spec)["alarm.severity"] == 0, spec.suffix
    hb = val(b, qn.HEARTBEAT)
    wait_val(b, qn.HEARTBEAT, lambda v: v > hb, "counts seconds", 5.0)


def test_manager_state_pv_follows_every_transition(clean):
    """Queue run (incl. the few-ms starting_queue), pause/resume, a task (script upload),
    environment close/open and destroy/open: every manager_state but initializing (only while
    the manager process itself starts)."""
    b = clean
    seen: list[str] = []
    choices = list(qn.MANAGER_STATES)
    sub = b.ctxt.monitor(qn.MANAGER_STATE.name(P),
                         lambda v: seen.append(choices[v["value.index"]]))
    rec = InfoRecorder(b.stack)
    try:
        wait_until(lambda: seen, WAIT, "the Queue:ManagerState monitor's first value")
        for _ in range(2):
            call(b, qn.ITEM_ADD, name="wait_a_while", args="[0.2]")
        call(b, qn.QUEUE_START)
        wait_until(lambda: mgr_state(b) == "idle" and val(b, qn.ITEMS_IN_QUEUE) == 0, WAIT,
                   "queue ran")
        call(b, qn.ITEM_ADD, name="wait_a_while", args="[5]")
        call(b, qn.QUEUE_START)
        wait_until(lambda: mgr_state(b) == "executing_queue", WAIT, "running")
        call(b, qn.RE_PAUSE, option="immediate")
        wait_until(lambda: mgr_state(b) == "paused", WAIT, "paused")
        call(b, qn.RE_RESUME)
        wait_idle(b)
        # a foreground task in the worker: executing_task
        b.stack.call("script_upload", script="import time\ntime.sleep(0.3)\n",
                     update_lists=False, run_in_background=False)
        wait_until(lambda: mgr_state(b) == "idle"
                   and "executing_task" in collapse(rec.states), WAIT, "task done")
        call(b, qn.ENVIRONMENT_CLOSE)
        wait_until(lambda: not b.stack.call("status")["worker_environment_exists"],
                   WAIT, "environment closed")
        call(b, qn.ENVIRONMENT_OPEN)
        wait_until(lambda: b.stack.call("status")["worker_environment_exists"]
                   and mgr_state(b) == "idle", WAIT, "environment open")
        b.stack.call("environment_destroy")  # destroying_environment; reopened for later tests
        wait_until(lambda: not b.stack.call("status")["worker_environment_exists"]
                   and mgr_state(b) == "idle", WAIT, "environment destroyed")
        call(b, qn.ENVIRONMENT_OPEN)
        wait_until(lambda: b.stack.call("status")["worker_environment_exists"]
                   and mgr_state(b) == "idle", WAIT, "environment open again")
        wait_until(lambda: collapse(seen)[-1] == collapse(rec.states)[-1] == "idle", 5.0,
                   "both settled")
    finally:
        sub.close()
        rec.close()
    mgr = collapse(rec.states)
    pv = collapse(seen)
    for s in ("starting_queue", "executing_queue", "paused", "executing_task",
              "closing_environment", "creating_environment", "destroying_environment"):
        assert s in mgr, f"manager never reported {s}: {mgr}"
    # the PV shows exactly the manager's sequence (the PV monitor starts one state earlier)
    start = len(pv) - len(mgr)
    assert start >= 0 and pv[start:] == mgr, f"PV {pv} vs manager {mgr}"


def test_tables_match_queue_get_and_history_get(clean):
    b = clean
    call(b, qn.ITEM_ADD, name="count", args='[["det1"]]', kwargs='{"num": 2}')
    call(b, qn.ITEM_ADD, name="mv", args='["m3", 0.5]')
    call(b, qn.ITEM_ADD, name="wait_a_while", args="[0.1]", pos="front")

    def same_queue():
        q = b.stack.call("queue_get")["items"]
        rows = val(b, qn.ITEMS)
        return [i["item_uid"] for i in q] == [r["itemUid"] for r in rows] and len(q) == 3

    wait_until(same_queue, WAIT, "Queue:Items == queue_get")
    q = b.stack.call("queue_get")["items"]
    rows = val(b, qn.ITEMS)
    assert [r["name"] for r in rows] == [i["name"] for i in q] == ["wait_a_while", "count", "mv"]
    assert [r["user"] for r in rows] == ["root"] * 3
    assert rows[1]["devices"] == "det1" and rows[2]["devices"] == "m3"
    assert rows[1]["args"] == "[det1], num=2"
    assert val(b, qn.ITEM_NAMES) == ["wait_a_while", "count", "mv"]
    assert val(b, qn.ITEM_UIDS) == [i["item_uid"] for i in q]
    assert val(b, qn.NEXT_ITEM).startswith("wait_a_while(0.1)")
    wait_until(lambda: set(val(b, qn.QUEUED_DEVICES)) == {"det1", "m3"}, WAIT, "reservations")

    call(b, qn.QUEUE_START)
    wait_until(lambda: mgr_state(b) == "idle" and val(b, qn.ITEMS_IN_QUEUE) == 0, WAIT, "ran")

    def same_history():
        h = b.stack.call("history_get")["items"]
        rows = val(b, qn.HISTORY)
        return [i["item_uid"] for i in h][-len(rows):] == [r["itemUid"] for r in rows]

    wait_until(same_history, WAIT, "Queue:History == history_get")
    h = b.stack.call("history_get")["items"]
    rows = val(b, qn.HISTORY)[-3:]
    assert [r["exitStatus"] for r in rows] == [i["result"]["exit_status"] for i in h[-3:]]
    assert [r["exitStatus"] for r in rows] == ["completed"] * 3
    assert all(r["timeStop"] >= r["timeStart"] > 0 for r in rows)
    assert val(b, qn.LAST_EXIT_STATUS) == "completed"
    assert val(b, qn.HISTORY_EXIT_STATUS)[-3:] == ["completed"] * 3
    assert val(b, qn.ITEMS) == [] and val(b, qn.ITEM_NAMES) == []
    lines = val(b, qn.CONSOLE_LINES_PV)
    assert any("Starting the plan" in line for line in lines), lines[-5:]


# --- control ----------------------------------------------------------------------------------


def test_bad_control_input_is_refused_and_changes_nothing(clean):
    b = clean
    before = b.stack.call("queue_get")["plan_queue_uid"]
    for kws, text in (
        ({"name": "no_such_plan"}, "unknown plan 'no_such_plan'"),
        ({"name": "count", "args": '[["det1"]'}, "args is not valid JSON"),
        ({"name": "count", "args": '{"a": 1}'}, "args must be a JSON list"),
        ({"name": "count", "color": "red"}, "unknown argument 'color'"),
    ):
        with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT) as e:
            call(b, qn.ITEM_ADD, **kws)
        assert text in str(e.value)  # names the argument that was wrong
    with raises_code(RemoteError, ErrorCode.BAD_ARGUMENT):
        call(b, qn.ITEM_REMOVE)
    # the RE Manager's own refusals come back verbatim
    with raises_code(RemoteError, ErrorCode.MANAGER_REFUSED) as e:
        call(b, qn.RE_RESUME)
    assert "RE Manager is not paused" in str(e.value)
    with raises_code(RemoteError, ErrorCode.MANAGER_REFUSED) as e:
        call(b, qn.ITEM_REMOVE, uid="no-such-uid")
    assert "not in the queue" in str(e.value)
    assert b.stack.call("queue_get")["plan_queue_uid"] == before
    assert b.stack.call("status")["items_in_queue"] == 0
    # a good request still works, and ItemRemove removes it again
    uid = call(b, qn.ITEM_ADD, name="count", args='[["det1"]]')["itemUid"]
    assert [i["item_uid"] for i in b.stack.call("queue_get")["items"]] == [uid]
    call(b, qn.ITEM_REMOVE, uid=uid)
    assert b.stack.call("queue_get")["items"] == []


def test_item_move_reorders_the_queue_and_a_bad_move_changes_nothing(clean):
    b = clean
    u1 = call(b, qn.ITEM_ADD, name="count", args='[["det1"]]')["itemUid"]
    u2 = call(b, qn.ITEM_ADD, name="count", args='[["det2"]]')["itemUid"]
    try:
        before = b.stack.call("queue_get")["plan_queue_uid"]
        for kws, text in (
            ({"uid": u2}, "exactly one destination"),
            ({"uid": u2, "posDest": "top"}, "posDest must be front, back or an integer"),
            ({"posDest": "front"}, "give exactly one of uid"),
            ({"uid": "no-such-uid", "posDest": "front"}, "RE Manager refused item_move"),
        ):
            with pytest.raises(RemoteError, match=text):
                call(b, qn.ITEM_MOVE, **kws)
        assert b.stack.call("queue_get")["plan_queue_uid"] == before
        assert call(b, qn.ITEM_MOVE, uid=u2, posDest="front")["itemUid"] == u2
        assert [i["item_uid"] for i in b.stack.call("queue_get")["items"]] == [u2, u1]
        call(b, qn.ITEM_MOVE, uid=u2, afterUid=u1)
        assert [i["item_uid"] for i in b.stack.call("queue_get")["items"]] == [u1, u2]
    finally:
        for uid in (u1, u2):
            call(b, qn.ITEM_REMOVE, uid=uid)


@pytest.mark.identity
def test_an_account_the_policy_does_not_name_is_refused(clean):
    why = other_user_available()
    if why:
        pytest.skip(why)
    b = clean
    before = b.stack.call("queue_get")["plan_queue_uid"]
    argv = ["runuser", "-u", "nobody", "--", PYTHON, "-m", "p4p.client.cli", "-w",
            str(TIMEOUT), "rpc", qn.ITEM_ADD.name(P), "name=count"]
    p = subprocess.run(argv, env=b.env, capture_output=True, text=True, timeout=60, cwd="/")
    out = p.stdout + p.stderr
    assert "account 'nobody' may not control the queue" in out, out
    assert "queue_control: root" in out
    assert b.stack.call("queue_get")["plan_queue_uid"] == before


WEB_USERS = ("alice", "carol", "root")
"""Web users of the bridge: alice may control the queue; carol is a user the bridge may act
for but queue_control does not name; root is privileged and not named in on_behalf_of."""


def _web_post(base: str, path: str, body: object, cookie: str = "") -> tuple[int, dict, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Cookie": cookie} if cookie else {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            got = r.headers.get("Set-Cookie", "") or ""
            return r.status, json.loads(r.read()), got.split(";", 1)[0]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), ""


@contextlib.contextmanager
def _web_bridge(b: Bench):
    """The real PVWS bridge (``python -m bridges.pvws``, writes on, password login, running as
    this account, which the module's policy names as a trusted service); yields
    ``(base URL, user -> session cookie)``; stopped on exit."""
    import urllib.request

    from bridges.pvws.auth import generate_password, set_password

    pw = b.dir / "web-passwd"
    passwords = {u: generate_password() for u in WEB_USERS}
    for user, password in passwords.items():
        set_password(pw, user, password)
    port = free_port()
    proc = ManagedProcess("web", python_module(
        "bridges.pvws", "--prefix", P, "--host", LOOPBACK, "--port", str(port), "--writes",
        "--auth", "password", "--password-file", str(pw), "--policy", str(b.dir / "policy.toml"),
    ), b.env, log_dir=b.dir)
    b.procs.append(proc)  # its log is printed on failure
    base = f"http://{LOOPBACK}:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the bridge exited:\n{proc.output()}")
        try:
            with urllib.request.urlopen(base + "/pvws/info", timeout=1.0):
                return True
        except OSError:
            return False

    try:
        wait_until(up, WAIT, "the bridge answering")
        cookies = {}
        for user, password in passwords.items():
            status, reply, cookie = _web_post(base, "/login", {"user": user,
                                                              "password": password})
            assert status == 200 and cookie, reply
            cookies[user] = cookie
        yield base, cookies
    finally:
        proc.stop()
        b.procs.remove(proc)


@pytest.mark.identity
def test_web_user_adds_items_through_the_bridge_on_behalf_of_herself(clean):
    """Issue 10: an item alice adds in the web client is alice's in the RE Manager and in
    Queue:Items (the bridge passes onBehalfOf); whoever the policy does not allow is refused with
    not-allowed and the queue is unchanged."""
    why = other_user_available()
    if why:
        pytest.skip(why)
    b = clean
    with _web_bridge(b) as (base, cookies):
        status, reply, _ = _web_post(base, "/api/queue/add",
                                     {"name": "count", "args": '[["det1"]]'}, cookies["alice"])
        assert status == 200, reply
        uid = reply["itemUid"]
        assert [(i["item_uid"], i["user"]) for i in b.stack.call("queue_get")["items"]] == [
            (uid, "alice")]
        wait_val(b, qn.ITEMS, lambda rows: [r["itemUid"] for r in rows] == [uid], "alice's item")
        assert [r["user"] for r in val(b, qn.ITEMS)] == ["alice"]
        before = b.stack.call("queue_get")["plan_queue_uid"]

        # a web client cannot name another user: the bridge sets onBehalfOf itself
        status, reply, _ = _web_post(base, "/api/queue/add",
                                     {"name": "count", "onBehalfOf": "root"}, cookies["alice"])
        assert (status, reply["error"]["code"]) == (400, "bad-request"), reply
        # carol: the bridge may act for her, but queue_control does not name her
        status, reply, _ = _web_post(base, "/api/queue/add", {"name": "count"}, cookies["carol"])
        assert (status, reply["error"]["code"], reply["error"]["reason"]) == (
            409, "queue-refused", ErrorCode.NOT_ALLOWED), reply
        assert "'carol'" in reply["error"]["message"]
        # root: a privileged user the bridge's entry in access.on_behalf_of does not name
        status, reply, _ = _web_post(base, "/api/queue/start", {}, cookies["root"])
        assert (status, reply["error"]["code"], reply["error"]["reason"]) == (
            409, "queue-refused", ErrorCode.NOT_ALLOWED), reply
        # an account the policy does not name as a trusted service: its onBehalfOf is refused
        argv = ["runuser", "-u", "nobody", "--", PYTHON, "-m", "p4p.client.cli", "-w",
                str(TIMEOUT), "rpc", qn.ITEM_ADD.name(P), "name=count", "onBehalfOf=alice"]
        p = subprocess.run(argv, env=b.env, capture_output=True, text=True, timeout=60, cwd="/")
        out = p.stdout + p.stderr
        assert "[" in out, out
        assert code_of(out[out.index("["):]) is ErrorCode.NOT_ALLOWED, out
        assert "nobody is not a trusted service" in out
        assert b.stack.call("queue_get")["plan_queue_uid"] == before
        assert b.stack.call("status")["manager_state"] == "idle"

        # alice removes her item through the bridge
        status, reply, _ = _web_post(base, "/api/queue/remove", {"uid": uid}, cookies["alice"])
        assert status == 200 and reply["itemUid"] == uid, reply
        wait_val(b, qn.ITEMS, lambda rows: rows == [], "the queue empty again")


# --- automatic locks --------------------------------------------------------------------------


def test_locks_follow_an_item_that_completes(clean):
    b = clean
    # 50 x 0.2 s = 10 s: outlives EXEC_LEASE + 1 s with room for a late detection
    uid = call(b, qn.ITEM_ADD, name="count", args='[["det1"]]',
               kwargs='{"num": 50, "delay": 0.2}')["itemUid"]
    wait_until(lambda: {(lk.device, lk.lock_type) for lk in queue_locks(b)}
               == {("det1", LockType.QUEUE_QUEUED)}, WAIT, "det1 reserved")
    call(b, qn.QUEUE_START)
    running = wait_until(
        lambda: [lk for lk in queue_locks(b) if lk.lock_type is LockType.QUEUE_EXECUTING],
        WAIT, "QUEUE_EXECUTING while running")
    assert [(lk.device, lk.plan_uid) for lk in running] == [("det1", uid)]
    # the manager names the running item while still starting_queue; the lock may come first
    wait_until(lambda: mgr_state(b) == "executing_queue", WAIT, "executing_queue")
    # the queue IOC posts its own PVs after the coordination IOC granted the lock
    wait_until(lambda: val(b, qn.EXECUTING_DEVICES) == ["det1"], WAIT, "Queue:ExecutingDevices")
    assert val(b, qn.RUNNING_ITEM_UID) == uid and val(b, qn.RUNNING_ITEM_NAME) == "count"
    assert val(b, qn.RUNNING_ITEM_DEVICES) == ["det1"]
    # the lease is shorter than the plan: the IOC renews it while the item runs
    first_expiry = running[0].expires
    time.sleep(EXEC_LEASE + 1.0)  # not a readiness wait: the plan must outlive the first lease
    assert mgr_state(b) == "executing_queue", "the plan should still run"
    held = [lk for lk in queue_locks(b) if lk.lock_type is LockType.QUEUE_EXECUTING]
    assert [lk.device for lk in held] == ["det1"] and held[0].expires > first_expiry
    wait_idle(b)
    wait_until(lambda: not queue_locks(b), WAIT, "released after completion")
    assert b.stack.call("history_get")["items"][-1]["result"]["exit_status"] == "completed"


def test_locks_follow_an_item_that_fails(clean):
    b = clean
    uid = call(b, qn.ITEM_ADD, name="mv", args='["m4", 1000]')["itemUid"]  # beyond the limit
    call(b, qn.QUEUE_START)
    wait_idle(b)
    h = b.stack.call("history_get")["items"][-1]
    assert (h["item_uid"], h["result"]["exit_status"]) == (uid, "failed")
    q = b.stack.call("queue_get")["items"]
    assert len(q) == 1 and q[0]["item_uid"] != uid  # back in the queue with a new uid
    # the executing lock is gone; the item in the queue reserves m4 again
    wait_until(lambda: [(lk.device, lk.lock_type, lk.plan_uid) for lk in queue_locks(b)]
               == [("m4", LockType.QUEUE_QUEUED, q[0]["item_uid"])], WAIT, "re-reserved")
    wait_until(lambda: any(e.action is EventAction.ACQUIRED and e.device == "m4"
                           and e.lock_type is LockType.QUEUE_EXECUTING and uid in e.message
                           for e in b.coord.events()), WAIT, "the executing grant's event")
    call(b, qn.ITEM_REMOVE, pos="front")
    wait_until(lambda: not queue_locks(b), WAIT, "released after removal")


def test_locks_follow_an_item_that_is_stopped(clean):
    b = clean
    call(b, qn.ITEM_ADD, name="count", args='[["det2"]]', kwargs='{"num": 50, "delay": 0.2}')
    call(b, qn.QUEUE_START)
    wait_until(lambda: [lk.device for lk in queue_locks(b)
                        if lk.lock_type is LockType.QUEUE_EXECUTING] == ["det2"], WAIT, "held")
    # the lock is taken when the item starts; the RunEngine may pause only once it runs the plan
    wait_until(lambda: b.stack.call("status")["re_state"] == "running", WAIT, "plan running")
    call(b, qn.RE_PAUSE, option="immediate")
    wait_until(lambda: mgr_state(b) == "paused", WAIT, "paused")
    assert [lk.device for lk in queue_locks(b)] == ["det2"]  # still held while paused
    call(b, qn.RE_STOP)
    wait_idle(b)
    assert b.stack.call("history_get")["items"][-1]["result"]["exit_status"] == "stopped"
    wait_until(lambda: not queue_locks(b), WAIT, "released after stop")


def test_a_maintenance_lock_taken_just_before_the_start_refuses_it(clean):
    """The hole: QueueStart decided from the queue IOC's monitor of Coord:Locks, posted up to
    50 ms after a change, so a start right after a MAINTENANCE acquire began the plan (the worker
    hook then failed it at its first set). Now the start reads the current table first."""
    b = clean
    before = b.ctxt.get(demo_pvs.motor_setpoint(P, "m2"), timeout=TIMEOUT)["value"]
    call(b, qn.ITEM_ADD, name="scan", args=f'[["det1"], "m2", {before + 1}, {before + 2}]',
         kwargs='{"num": 3}')
    wait_until(lambda: "m2" in val(b, qn.QUEUED_DEVICES), WAIT, "m2 reserved by the item")
    try:
        for _ in range(3):  # the race was lost most times: three tries all refused
            g = b.coord.acquire(["m2"], LockType.MAINTENANCE, 300, "realign m2",
                                on_behalf_of="max")
            with raises_code(RemoteError, ErrorCode.HOLDER_CONFLICT):
                call(b, qn.QUEUE_START)
            assert mgr_state(b) == "idle"
            b.coord.release(key=g.key)
            wait_until(lambda: "m2" in val(b, qn.QUEUED_DEVICES), WAIT, "m2 reserved again")
    finally:
        b.stack.call("queue_clear")


def test_maintenance_lock_stops_the_queue_before_the_plan_touches_the_device(clean):
    b = clean
    setpoint = demo_pvs.motor_setpoint(P, "m2")
    before = b.ctxt.get(setpoint, timeout=TIMEOUT)["value"]
    b.coord.acquire(["m2"], LockType.MAINTENANCE, 300, "realign m2", on_behalf_of="max")
    uid = call(b, qn.ITEM_ADD, name="scan", args=f'[["det1"], "m2", {before + 1}, '
               f'{before + 2}]', kwargs='{"num": 3}')["itemUid"]
    # 1. the IOC refuses to start a queue whose next item needs m2; the refusal is audited by
    #    the coordination IOC and shown in Queue:StopReason
    t0 = time.time()
    with raises_code(RemoteError, ErrorCode.HOLDER_CONFLICT) as e:
        call(b, qn.QUEUE_START)
    assert holder_of(str(e.value)).startswith("max@"), e.value
    assert mgr_state(b) == "idle"
    refused = wait_until(lambda: [
        e for e in b.coord.events() if e.time >= t0 - 1 and e.action is EventAction.REFUSED
        and "m2" in e.device.split(",") and e.lock_type is LockType.QUEUE_EXECUTING],
        5.0, "the refusal in Coord:Events (posted coalesced)")
    assert "MAINTENANCE" in refused[-1].message, refused
    assert "realign m2" in refused[-1].message
    reason = val(b, qn.STOP_REASON)
    assert reason.startswith("queue not started") and uid in reason, reason
    assert "m2 is held by max@" in reason and "MAINTENANCE" in reason and "realign m2" in reason
    # 2. started behind the IOC's back: the acquire is refused (audited), the queue is stopped
    #    and paused, the worker hook refuses to act on m2; m2 never moves
    b.stack.call("queue_start")
    wait_val(b, qn.STOP_REASON, lambda s: "m2" in s and "MAINTENANCE" in s, "reason shown")
    wait_until(lambda: mgr_state(b) in ("idle", "paused"), WAIT, "queue stopped or paused")
    reason = val(b, qn.STOP_REASON)
    assert uid in reason and "max@" in reason and "realign m2" in reason, reason
    if mgr_state(b) == "paused":
        call(b, qn.RE_ABORT)
        wait_idle(b)
    assert b.ctxt.get(setpoint, timeout=TIMEOUT)["value"] == before
    events = b.coord.events()
    assert any(e.action is EventAction.REFUSED and "m2" in e.device
               and e.lock_type is LockType.QUEUE_EXECUTING for e in events), events[-5:]
    assert not [lk for lk in queue_locks(b) if lk.lock_type is LockType.QUEUE_EXECUTING]
    b.coord.force_release(["m2"], reason="test done")


# --- without console publishing ---------------------------------------------------------------


def test_polls_status_when_the_manager_publishes_nothing(bench, tmp_path):
    redis, rport = start_redis(log_dir=tmp_path / "redis")
    ctl, info = free_port(), free_port()
    try:
        mgr = start_re_manager(bench.stack.manager_env, rport, ctl, info, tmp_path,
                               publish=False, name="re-manager-quiet")
        prefix = "TQP:"
        ioc = ManagedProcess("queue-ioc-poll", queue_ioc_argv(prefix, ctl, info, locks=False),
                             server_env(bench.env), log_dir=tmp_path)
        try:
            wait_for_pv(qn.CONNECTION.name(prefix), bench.env, WAIT, procs=[ioc],
                        condition=lambda v: int(v) == 2)  # Polling
            st = bench.ctxt.get(qn.MANAGER_STATE.name(prefix), timeout=TIMEOUT)
            assert st["value.choices"][st["value.index"]] == "idle"
            assert st["alarm.severity"] == 0
            # the RE Manager's own lock flags reach the PVs while polling too
            manager_call(ctl, "lock", lock_key="test-key", environment=True, note="test",
                         user="tester")
            wait_until(lambda: bench.ctxt.get(qn.LOCK_ENVIRONMENT.name(prefix),
                                              timeout=TIMEOUT)["value"] == 1,
                       WAIT, "LockEnvironment = 1")
            assert bench.ctxt.get(qn.LOCK_QUEUE.name(prefix), timeout=TIMEOUT)["value"] == 0
            manager_call(ctl, "unlock", lock_key="test-key")
            wait_until(lambda: bench.ctxt.get(qn.LOCK_ENVIRONMENT.name(prefix),
                                              timeout=TIMEOUT)["value"] == 0,
                       WAIT, "LockEnvironment = 0")
        finally:
            ioc.stop()
            mgr.stop()
    finally:
        redis.stop()


# --- last: kill the manager -------------------------------------------------------------------


def test_killing_the_manager_makes_every_pv_invalid_and_a_restart_recovers(clean):
    b = clean
    specs = [s for s in qn.QUEUE_PVS if s not in qn.NEVER_INVALID]
    # per PV: (alarm severity, server time stamp of the post that changed it). The 2 s
    # deadlines are checked on the IOC's own time stamps (when it decided), so a slow client on
    # a loaded machine cannot make the test flaky; the waits themselves are generous. Only a
    # change of severity is kept: while the manager is down the IOC reposts every PV each 0.1 s
    # (the alarm text counts the seconds), and a late reader would see a later stamp.
    sev: dict[str, tuple[int, float]] = {}

    def seen(v, n):
        if n not in sev or sev[n][0] != v["alarm.severity"]:
            sev[n] = (v["alarm.severity"],
                      v["timeStamp.secondsPastEpoch"] + v["timeStamp.nanoseconds"] * 1e-9)

    subs = [b.ctxt.monitor(s.name(P), lambda v, n=s.suffix: seen(v, n)) for s in specs]
    try:
        wait_until(lambda: len(sev) == len(specs) and not any(x[0] for x in sev.values()), 5.0,
                   "all valid")
        t_kill = time.time()
        b.stack.procs["re-manager"].kill9()
        wait_until(lambda: all(sev.get(s.suffix, (0, 0))[0] == 3 for s in specs), 10.0,
                   "every PV INVALID after kill -9")
        # the promise of docs/queue.md: INVALID within 2 s of the kill
        t_invalid = max(sev[s.suffix][1] for s in specs) - t_kill
        assert t_invalid < 2.0, f"INVALID posted {t_invalid:.2f} s after the kill"
        assert val(b, qn.CONNECTION) == "Disconnected"
        assert raw(b, qn.HEARTBEAT)["alarm.severity"] == 0  # the IOC itself is alive
        with raises_code(RemoteError, ErrorCode.MANAGER_UNAVAILABLE):
            call(b, qn.QUEUE_START)
        first_log = b.stack.procs["re-manager"].log_path
        proc = b.stack.restart_manager(kill=False)
        b.procs.append(proc)
        assert proc.log_path != first_log and "RE Manager" in first_log.read_text(
            errors="replace"), "the first manager's log must survive the restart"
        wait_manager(b.stack.control_port, WAIT, proc)
        t_answer = time.time()
        wait_until(lambda: not any(sev.get(s.suffix, (0, 0))[0] for s in specs), 10.0,
                   "every PV valid after the restarted manager answered")
        # and valid again within 2 s of the manager answering again
        t_recover = max(sev[s.suffix][1] for s in specs) - t_answer
        assert t_recover < 2.0, f"valid again {t_recover:.2f} s after the manager answered"
    finally:
        for s in subs:
            s.close()
    print(f"INVALID {t_invalid:.2f} s after kill -9; valid {t_recover:.2f} s after the "
          "manager answered again")
    wait_val(b, qn.MANAGER_STATE, lambda v: v == "idle", "idle after restart")
    wait_val(b, qn.CONNECTION, lambda v: v == "Push", "push again")
