"""Benchmark of the queue IOC against a real RE Manager (and floors measured in the same run).

Usage: ``.venv/bin/python benchmarks/bench_queue.py [--runs 10] [--items 12]``

Starts the demo softIoc, the coordination IOC, redis, the RE Manager (demo startup dir, worker
hook on) and the queue IOC on loopback, then prints:

1. ``Queue:ManagerState`` staleness: for every ``manager_state`` transition (>= 20: each run of a
   two-item queue gives idle -> starting_queue -> executing_queue -> idle), the time a PVA
   monitor client receives the new state minus the ``time`` stamped on the QS_Info message that
   first carried it (the manager's own status time; same host clock). Floor: the same message
   received on our own 0MQ SUB socket (the push itself). Target: median < 5 ms.
2. Item start -> QUEUE_EXECUTING visible: for each item, the time a ``Coord:Locks`` monitor
   client sees a QUEUE_EXECUTING lock with ``planUid`` = the item uid, minus the time of the
   QS_Info message whose ``running_item_uid`` first names it. Floor: one ``Coord:Acquire``
   round trip of a client in this process. Target: < 50 ms.
3. Manager kill -9 -> every queue PV INVALID, and restart -> every PV valid again (``--kills``
   times; target: within 2 s of each). Kill -> INVALID is measured from the kill; its floor is
   ``UNREACHABLE_AFTER`` minus the age of the manager's last QS_Info message at the kill (the
   earliest the IOC may decide). Restart -> valid is measured from the first ``status`` answer of
   the new manager to our own client; its floor is that answer's round trip.

Every figure comes from this run on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402
from p4p.client.thread import Context  # noqa: E402

from pvcoord.client import Client, parse_locks  # noqa: E402
from pvcoord.demo import devices  # noqa: E402
from pvcoord.demo.queue_part import (  # noqa: E402
    QUEUE_LOCK_OWNER,
    ManagerClient,
    start_queue_stack,
    zmq_addr,
)
from pvcoord.launch import coordination_argv  # noqa: E402
from pvcoord.procs import (  # noqa: E402
    ManagedProcess,
    client_conf,
    exit_on_sigterm,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo as demo_pvs  # noqa: E402
from pvdb import names as pvn  # noqa: E402
from pvdb import queue as qn  # noqa: E402

PREFIX = "BQ:"
POLICY = f"""
[access]
trusted_services = ["root"]
force_release = ["root"]
queue_control = ["*"]
[access.on_behalf_of]
root = ["*", "{QUEUE_LOCK_OWNER}"]  # the queue IOC holds its locks for the service account
[lock_types.MAINTENANCE]
allow = ["*"]
[lock_types.QUEUE_EXECUTING]
allow = ["{QUEUE_LOCK_OWNER}"]
[lock_types.MANUAL_OPERATOR]
allow = ["*"]
[lock_types.QUEUE_QUEUED]
allow = ["{QUEUE_LOCK_OWNER}"]
"""


class InfoTap:
    """Every QS_Info message on our own SUB socket: (receive time, message time, status)."""

    def __init__(self, info_port: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(zmq_addr(info_port))
        self.sock.subscribe(b"QS_Info")
        self.msgs: list[tuple[float, float, dict]] = []
        self._halt = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        wait_until(lambda: self.msgs, 5.0, "first QS_Info")

    def _run(self) -> None:
        while not self._halt.is_set():
            if self.sock.poll(100):
                _topic, payload = self.sock.recv_multipart()
                now = time.time()
                m = json.loads(payload)
                self.msgs.append((now, float(m["time"]), m["msg"]["status"]))

    def close(self) -> None:
        self._halt.set()
        self._t.join(5)
        self.sock.close()
        self.ctx.term()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def fmt(xs: list[float]) -> str:
    ms = [x * 1e3 for x in xs]
    return (f"n={len(ms):3d}  median {statistics.median(ms):7.2f} ms  p90 {pct(ms, 0.9):7.2f} ms"
            f"  max {max(ms):7.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="queue runs for the staleness figure")
    ap.add_argument("--items", type=int, default=12, help="items for the lock-visibility figure")
    ap.add_argument("--kills", type=int, default=3, help="manager kill/restart cycles")
    a = ap.parse_args()
    exit_on_sigterm()  # a killed run still stops what it started
    if not (1 <= a.runs <= 200 and 1 <= a.items <= 200 and 0 <= a.kills <= 20):
        ap.error("--runs and --items must be between 1 and 200, --kills between 0 and 20")

    d = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    env = loopback_env()
    (d / "policy.toml").write_text(POLICY)
    db = devices.write_database(PREFIX, d / "demo.db")
    store = f"sqlite://{d}/locks.sqlite"
    soft = ManagedProcess("softioc", python_module("pvxslibs.ioc", "-d", str(db)),
                          server_env(env), log_dir=d)
    coord = ManagedProcess(
        "coordination",
        coordination_argv(PREFIX, store, d / "policy.toml", devices=demo_pvs.DEVICE_NAMES),
        server_env(env), log_dir=d,
    )
    # the worker hook resolves the devices' PVs through the registry's map (decision 0125)
    registry = ManagedProcess(
        "registry", python_module("iocs.registry", "--prefix", PREFIX, "--registry",
                                  str(devices.write_registry(PREFIX, d / "registry.yaml"))),
        server_env(env), log_dir=d,
    )
    print(f"bench_queue: {platform.node()} {platform.machine()} python {platform.python_version()}"
          f", logs in {d}")
    try:
        wait_for_pv(demo_pvs.motor_readback(PREFIX, "m1"), env, 30, procs=[soft])
        wait_for_pv(pvn.COORD_DEVICES.name(PREFIX), env, 30, procs=[coord])
        wait_for_pv(pvn.REGISTRY_DEVICE_PVS.name(PREFIX), env, 30, procs=[registry])
        with start_queue_stack(PREFIX, env, d, store_url=store, policy=d / "policy.toml") as st, \
                Context("pva", conf=client_conf(env), useenv=False, nt=False) as ctxt, \
                Client(PREFIX, conf=client_conf(env)) as coord_client:
            tap = InfoTap(st.info_port)
            try:
                staleness(st, ctxt, tap, a.runs)
                lock_visibility(st, ctxt, tap, coord_client, a.items)
                if a.kills:
                    kill_and_restart(st, ctxt, tap, a.kills)
            finally:
                tap.close()
    finally:
        registry.stop()
        coord.stop()
        soft.stop()
    return 0


def _item(name: str, *args, **kwargs) -> dict:
    return {"item_type": "plan", "name": name, "args": list(args), "kwargs": kwargs}


def _run_queue(st, items: list[dict], timeout: float = 60.0) -> list[str]:
    uids = [st.call("queue_item_add", item=i, user="bench", user_group="primary")["item"][
        "item_uid"] for i in items]
    st.call("queue_start")
    wait_until(lambda: st.call("status")["manager_state"] == "idle"
               and not st.call("status")["items_in_queue"], timeout, "queue ran", 0.05)
    return uids


def staleness(st, ctxt, tap: InfoTap, runs: int) -> None:
    choices = list(qn.MANAGER_STATES)
    seen: list[tuple[float, str]] = []
    sub = ctxt.monitor(qn.MANAGER_STATE.name(PREFIX),
                       lambda v: seen.append((time.time(), choices[v["value.index"]])))
    # the monitor's first update (the current value) is not a transition
    wait_until(lambda: seen, 10.0, "first Queue:ManagerState monitor update", 0.005)
    first = len(tap.msgs)
    before = seen[-1][1] if seen else None
    seen.clear()
    try:
        for _ in range(runs):
            _run_queue(st, [_item("wait_a_while", 0.05), _item("wait_a_while", 0.05)])
            time.sleep(0.2)
    finally:
        time.sleep(0.3)
        sub.close()
    # the manager's transitions: first message carrying each new state
    msgs = tap.msgs[first:]
    transitions: list[tuple[float, float, str]] = []  # (our receive, manager time, state)
    prev = tap.msgs[first - 1][2]["manager_state"] if first else None
    for recv, mtime, status in msgs:
        s = status["manager_state"]
        if s != prev:
            transitions.append((recv, mtime, s))
            prev = s
    pv_changes: list[tuple[float, str]] = []
    prev = before
    for t, s in seen:
        if s != prev:
            pv_changes.append((t, s))
            prev = s
    stale, floor = [], []
    j = 0
    for recv, mtime, s in transitions:
        while j < len(pv_changes) and pv_changes[j][1] != s:
            j += 1
        if j == len(pv_changes):
            break
        stale.append(pv_changes[j][0] - mtime)
        floor.append(recv - mtime)
        j += 1
    states = [s for _, _, s in transitions]
    print(f"\n1. Queue:ManagerState staleness over {len(stale)} transitions "
          f"({states.count('starting_queue')} of them to starting_queue)")
    print(f"   PVA monitor client - manager status time : {fmt(stale)}")
    print(f"   floor: raw QS_Info on our SUB socket     : {fmt(floor)}")
    print(f"   target median < 5 ms: {'met' if statistics.median(stale) < 0.005 else 'NOT met'}")
    missing = len(transitions) - len(stale)
    if missing:
        print(f"   {missing} manager transitions had no matching PV update")


def lock_visibility(st, ctxt, tap: InfoTap, coord: Client, items: int) -> None:
    seen: dict[str, float] = {}

    def on_locks(v) -> None:
        now = time.time()
        for lk in parse_locks(v):
            if lk.lock_type.value == "QUEUE_EXECUTING" and lk.plan_uid:
                seen.setdefault(lk.plan_uid, now)

    sub = ctxt.monitor(pvn.COORD_LOCKS.name(PREFIX), on_locks)
    first = len(tap.msgs)
    try:
        uids = []
        for _ in range(items):
            uids += _run_queue(st, [_item("count", ["det1"], num=1)])
            time.sleep(0.1)
    finally:
        time.sleep(0.3)
        sub.close()
    started: dict[str, float] = {}
    for _recv, mtime, status in tap.msgs[first:]:
        uid = status.get("running_item_uid")
        if uid and uid not in started:
            started[uid] = mtime
    lat = [seen[u] - started[u] for u in uids if u in seen and u in started]
    # floor: one Coord:Acquire round trip (+ release) from this process
    rtt = []
    for _ in range(20):
        t0 = time.perf_counter()
        coord.acquire(["m4"], "MANUAL_OPERATOR", 30, "bench floor")
        rtt.append(time.perf_counter() - t0)
        coord.release(["m4"])
    print(f"\n2. item start (QS_Info running_item_uid) -> QUEUE_EXECUTING visible in Coord:Locks,"
          f" {len(lat)} of {len(uids)} items")
    print(f"   latency                                  : {fmt(lat)}")
    print(f"   floor: one Coord:Acquire round trip      : {fmt(rtt)}")
    print(f"   target < 50 ms: {'met' if lat and max(lat) < 0.05 else 'NOT met'} (max), "
          f"{'met' if lat and statistics.median(lat) < 0.05 else 'NOT met'} (median)")


def kill_and_restart(st, ctxt, tap: InfoTap, kills: int) -> None:
    specs = [s for s in qn.QUEUE_PVS if s not in qn.NEVER_INVALID]
    sev: dict[str, int] = {}
    subs = [ctxt.monitor(s.name(PREFIX), lambda v, n=s.suffix: sev.__setitem__(
        n, v["alarm.severity"])) for s in specs]
    invalid, invalid_floor, valid, valid_floor = [], [], [], []
    try:
        for _ in range(kills):
            wait_until(lambda: len(sev) == len(specs) and not any(sev.values()), 30.0,
                       "every PV valid", 0.01)
            last_msg = tap.msgs[-1][0]  # our receive time of the newest QS_Info (wall clock)
            t_kill = time.time()
            t0 = time.monotonic()
            st.procs["re-manager"].kill9()
            wait_until(lambda: all(sev.get(s.suffix) == 3 for s in specs), 30.0, "INVALID",
                       0.002)
            invalid.append(time.monotonic() - t0)
            invalid_floor.append(max(0.0, qn.UNREACHABLE_AFTER - (t_kill - last_msg)))
            proc = st.restart_manager(kill=False)
            with ManagerClient(st.control_port, 0.2) as mc:
                def answered(mc=mc, proc=proc):
                    if not proc.alive():
                        raise RuntimeError(f"RE Manager exited:\n{proc.output()}")
                    t = time.monotonic()
                    try:
                        mc.request("status")
                    except TimeoutError:
                        return None
                    return t, time.monotonic()
                sent, t1 = wait_until(answered, 60.0, "restarted RE Manager answers", 0.01)
            wait_until(lambda: not any(sev.get(s.suffix) for s in specs), 30.0, "valid", 0.002)
            valid.append(time.monotonic() - t1)
            valid_floor.append(t1 - sent)
    finally:
        for sub in subs:
            sub.close()
    print(f"\n3. RE Manager kill -9 / restart, {len(invalid)} cycles "
          f"(UNREACHABLE_AFTER = {qn.UNREACHABLE_AFTER:g} s)")
    print(f"   kill -9 -> every PV INVALID              : {fmt(invalid)}")
    print(f"   floor: UNREACHABLE_AFTER - last msg age  : {fmt(invalid_floor)}")
    print(f"   first answer -> every PV valid again     : {fmt(valid)}")
    print(f"   floor: that status round trip            : {fmt(valid_floor)}")
    print(f"   target within 2 s: {'met' if invalid and max(invalid) < 2.0 else 'NOT met'} "
          f"(INVALID, max), {'met' if valid and max(valid) < 2.0 else 'NOT met'} (valid, max)")


if __name__ == "__main__":
    sys.exit(main())
