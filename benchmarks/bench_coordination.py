"""Benchmark of the coordination IOC against a bare p4p RPC echo measured in the same run.

Usage::

    .venv/bin/python benchmarks/bench_coordination.py [--pairs 500] [--store sqlite|redis]
        [--sizes 10,1000] [--subscribers 1,50,500] [--changes 100] [--gap 0.02]
        [--fanout-floor] [--wire] [--pin] [--stamp callback|event] [--per-process 50]
        [--switch-interval S] [--request-ids]

    # the 500-subscriber target (issue 12; decision 0175), as root:
    .venv/bin/python benchmarks/bench_coordination.py --pairs 20 --changes 30 --sizes 1000 \
        --subscribers 500 --fanout-floor --gap 0.1 --wire --pin

Prints, for each size N in ``--sizes`` (N devices, all but the five measured ones locked):
- startup: process start to ``Coord:Locks`` answering and to the last ``Coord:<dev>:State``;
- median / p99 of a bare p4p RPC echo (separate process, thread server: the floor);
- median / p99 of an acquire+release pair on the real IOC process with the default durable store
  (SQLite WAL, fsync before the reply; ``--store sqlite-normal`` without fsync; ``redis`` with
  appendfsync always), and the ratios: each RPC to one echo, the pair to two echos; with
  ``--request-ids`` every acquire and release carries a fresh ``requestId`` as the client library,
  the CLI and the bridges send (decision 0160: one more stored row per change);
- CPU time (user + system, all threads, from ``/proc``) of the IOC process per pair and of the
  echo server per echo during the interleaved pairs, and their ratio: the IOC's own work
  against the floor's, much less sensitive to other load on the machine than the latencies;
- sustained acquire+release rate with 1 and 4 client threads (4 shows the group commit);
- time from a lock change (RPC sent) to its arrival at each count of ``--subscribers`` of
  ``Coord:m0:State`` and at one subscriber of ``Coord:LockChanges`` and of ``Coord:Locks``
  (coalesced: its changes at least 0.1 s apart), p50 / p99 / max, one change every ``--gap`` s
  after the previous reply; arrival is the subscriber's monitor callback (``--stamp``)
  (processes of ``--per-process`` PVA contexts, each context its own TCP connection), with the
  subscriber processes' CPU per update, the server's CPU per change and the change RPC's time;
- with ``--fanout-floor``: the same subscriber processes, at the same pace, on an NTEnum of the
  bare p4p server that an RPC flips (post, then reply: the IOC's order), the floor of the fan-out
  on this machine;
- with ``--wire`` (needs ``CAP_NET_RAW``): when the kernel delivered each update into each
  subscriber's socket (``wire_capture.py``), which does not wait for the subscriber processes
  to be scheduled: the server's own fan-out; with ``--pin`` the server runs on the first CPU and
  the subscribers and this client on the others, so the subscribers' own work (about 0.1-0.2 ms
  of CPU per update each, i.e. 50-100 ms of CPU per change for 500) does not run on the
  server's core, as on a real IOC host whose subscribers are elsewhere (decision 0175);
- the op cost at the largest size against the smallest.

Every figure comes from this run on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from p4p.client.thread import Context  # noqa: E402
from p4p.nt import NTURI  # noqa: E402
from wire_capture import WireCapture  # noqa: E402  (benchmarks/, this script's directory)

from pvcoord.launch import coordination_argv  # noqa: E402
from pvcoord.procs import (  # noqa: E402
    PYTHON,
    ManagedProcess,
    client_conf,
    exit_on_sigterm,
    loopback_env,
    server_env,
    start_redis,
    wait_for_pv,
    wait_until,
)
from pvcoord.rpc import current_locks  # noqa: E402
from pvdb import names as pvn  # noqa: E402
from pvdb.lockmodel import new_request_id  # noqa: E402

PREFIX = "BENCH:"
ECHO = "BENCH:Echo"
FLOOR_STATE, FLOOR_FLIP = "BENCH:Floor:State", "BENCH:Floor:Flip"
"""The bare server's NTEnum and the RPC that flips it (the fan-out floor)."""
PER_PROCESS = 50
"""Subscriber contexts per fan-out process."""
POLICY = '[access]\nforce_release = ["root"]\n[lock_types.MANUAL_OPERATOR]\nallow = ["*"]\n'


def pct(xs: list[float], q: float) -> float:
    """q-quantile (0..1) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float) -> str:
    """Seconds as milliseconds text."""
    return f"{x * 1e3:.3f} ms"


def uri(name: str, **kws: str):
    """NTURI with string args, as pvcall sends."""
    return NTURI([(k, "s") for k in kws]).wrap(name, kws=kws)


def fsync_floor(directory: Path, n: int = 200, overwrite: bool = False) -> list[float]:
    """Seconds of one 4 KiB write + fsync in ``directory`` (the store's disk), ``n`` times.

    ``overwrite=False``: each write appends (the file grows: ext4 also commits the new size and
    blocks to its journal). ``overwrite=True``: the writes go over blocks written and fsync'ed
    before, as the store's preallocated WAL is written (decision 0180): the disk's flush only.
    """
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    out = []
    try:
        if overwrite:
            os.write(fd, b"\0" * 4096 * n)
            os.fsync(fd)
        for i in range(n):
            os.pwrite(fd, b"\1" * 4096, 4096 * i)
            t0 = time.perf_counter()
            os.fsync(fd)
            out.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rpc_pairs(env, acq: str, rel: str, pairs: int, request_ids: bool = False
              ) -> tuple[list, list, list, list]:
    """Interleaved echo, acquire, release of m0: (echo, acquire, release, pair) times in s.

    With ``request_ids`` each acquire and release sends a fresh ``requestId`` (made before the
    clock starts).
    """
    echo_t, pair_t, acq_t, rel_t = [], [], [], []
    ids: tuple[dict[str, str], dict[str, str]] = ({}, {})
    with Context("pva", conf=client_conf(env), useenv=False) as c:
        echo_req = uri(ECHO, device="m0", type="MANUAL_OPERATOR", timeout="60")
        for i in range(100 + pairs):
            if request_ids:
                ids = ({pvn.REQUEST_ID_ARG: new_request_id()},
                       {pvn.REQUEST_ID_ARG: new_request_id()})
            t0 = time.perf_counter()
            c.rpc(ECHO, echo_req, timeout=5)
            t1 = time.perf_counter()
            k = c.rpc(acq, uri(acq, device="m0", type="MANUAL_OPERATOR", timeout="60", **ids[0]),
                      timeout=5).key
            t2 = time.perf_counter()
            c.rpc(rel, uri(rel, key=k, **ids[1]), timeout=5)
            t3 = time.perf_counter()
            if i >= 100:  # the first 100 are warm-up
                echo_t.append(t1 - t0)
                acq_t.append(t2 - t1)
                rel_t.append(t3 - t2)
                pair_t.append(t3 - t1)
    return echo_t, acq_t, rel_t, pair_t


def rate(env, acq: str, rel: str, threads: int, seconds: float = 3.0) -> float:
    """Acquire+release pairs per second with ``threads`` clients on devices m1..m4."""
    counts = [0] * threads

    def worker(i: int) -> None:
        with Context("pva", conf=client_conf(env), useenv=False) as cc:
            dev = f"m{i + 1}"
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                k = cc.rpc(acq, uri(acq, device=dev, type="MANUAL_OPERATOR", timeout="60"),
                           timeout=5).key
                cc.rpc(rel, uri(rel, key=k), timeout=5)
                counts[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def fanout(env, tmp: Path, procs: list, pv: str, n: int, changes: int, acq: str, rel: str,
           tag: str, gap: float = 0.02, server_pid: int | None = None,
           sub_opts: tuple = (), per_process: int = PER_PROCESS,
           wire_port: int | None = None, server_cpus: set[int] | None = None) -> dict:
    """Latencies (s) from sending a lock change of m0 to its arrival at ``n`` subscribers.

    One change every ``gap`` s after the previous reply. With ``acq`` empty the change is a
    call of the bare server's ``FLOOR_FLIP`` (``pv`` is then ``FLOOR_STATE``): the floor.
    With ``server_cpus`` the server runs on those CPUs only during the changes and the changes'
    client on the others (the subscribers' CPUs are set by ``sub_opts``).

    Returns:
        ``{"lat": [s, ...], "cpu_sub": s, "cpu_srv": s, "updates": int, "wire": [s, ...],
        "wire_last": [s, ...], "rtt": [s, ...]}``: the latencies to the subscribers'
        callbacks; the CPU seconds (all threads, ``/proc``) the subscriber processes and the
        server (``server_pid``) spent from the first change to the last arrival; the number of
        updates that reached the callbacks; with ``wire_port`` (the server's PVA TCP port) the
        latencies to the kernel's delivery of each update into each subscriber's socket
        (:class:`wire_capture.WireCapture`) and, per change, to its delivery into the last of
        the ``n`` connections (empty lists without ``wire_port``); the round-trip times of the
        changes' RPCs.
    """
    outs, subs = [], []
    for j in range(0, n, per_process):
        out = tmp / f"fan-{tag}-{n}-{j}.json"
        sub = ManagedProcess(f"subs-{tag}-{n}-{j}", [
            PYTHON, str(REPO / "benchmarks/fanout_subscribers.py"), pv,
            str(min(per_process, n - j)), str(out), *sub_opts], env, log_dir=tmp)
        procs.append(sub)
        outs.append(out)
        subs.append(sub)
    for sub in subs:
        wait_until(lambda s=sub: "READY" in s.output() or "FAILED" in s.output(), 120,
                   f"{n} subscribers")
        if "FAILED" in sub.output():
            raise RuntimeError(sub.output())
    t0s: list[float] = []
    wall0s: list[float] = []
    rtts: list[float] = []
    pids = [s.pid for s in subs]
    all_cpus = os.sched_getaffinity(0)
    if server_cpus and server_pid:
        pin(server_pid, server_cpus)
        os.sched_setaffinity(0, all_cpus - server_cpus)  # the client's threads start below
    cpu0 = sum(cpu_seconds(p) for p in pids), cpu_seconds(server_pid) if server_pid else 0.0
    cap = WireCapture(wire_port) if wire_port else contextlib.nullcontext()
    with cap, Context("pva", conf=client_conf(env), useenv=False) as c:
        key = None
        for i in range(changes):
            t0s.append(time.monotonic())
            wall0s.append(time.time())
            if not acq:
                c.rpc(FLOOR_FLIP, uri(FLOOR_FLIP, x=str(i)), timeout=5)
            elif i % 2 == 0:
                key = c.rpc(acq, uri(acq, device="m0", type="MANUAL_OPERATOR", timeout="60"),
                            timeout=5).key
            else:
                c.rpc(rel, uri(rel, key=key), timeout=5)
            rtts.append(time.monotonic() - t0s[-1])
            time.sleep(gap)
        if key and changes % 2:
            c.rpc(rel, uri(rel, key=key), timeout=5)
        time.sleep(0.5)  # let the last updates arrive before the subscribers write out
    if server_cpus and server_pid:  # the other figures are measured unpinned
        pin(server_pid, all_cpus)
        os.sched_setaffinity(0, all_cpus)
    cpu_sub = sum(cpu_seconds(p) for p in pids) - cpu0[0]
    cpu_srv = (cpu_seconds(server_pid) - cpu0[1]) if server_pid else 0.0
    lat, missed, behind, updates = [], 0, 0, 0
    for sub, out in zip(subs, outs, strict=True):
        sub.stop()
        for per_sub in json.loads(out.read_text()):
            got = per_sub[1:]  # the first is the initial value
            updates += len(got)
            for t0, (t_arr, _v) in zip(t0s, got, strict=False):
                lat.append(t_arr - t0)
            if changes - len(got) > 0:
                missed += changes - len(got)
                behind += 1
    if missed:  # p4p squashes the updates of a subscriber that falls behind into one
        print(f"WARNING: {behind} of {n} subscribers missed {missed} updates in all "
              f"(fell behind: a longer --gap measures latency, not saturation)")
    wire, wire_last = [], []
    if wire_port:
        by_conn = list(cap.updates().values())
        short = sum(1 for st in by_conn if len(st) < changes)
        if len(by_conn) != n or short or cap.drops:
            print(f"WARNING: wire capture saw {len(by_conn)} of {n} connections, {short} with "
                  f"fewer than {changes} updates, {cap.drops} packets dropped")
        for st in by_conn:
            wire.extend(t - t0 for t0, t in zip(wall0s, st, strict=False))
        for i, t0 in enumerate(wall0s):
            wire_last.append(max(st[i] for st in by_conn if len(st) > i) - t0)
    return {"lat": lat, "cpu_sub": cpu_sub, "cpu_srv": cpu_srv, "updates": updates,
            "wire": wire, "wire_last": wire_last, "rtt": rtts}


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process ``pid`` on ``cpus`` only (threads it starts later inherit)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def fan_line(head: str, fan: dict, n: int) -> str:
    """One printed line of a fan-out result of :func:`fanout` for ``n`` subscribers."""
    lat, k = fan["lat"], max(1, fan["updates"])
    per_update = fan["cpu_sub"] / k
    return (f"{head} p50 {ms(pct(lat, .5))}  p99 {ms(pct(lat, .99))}  max {ms(max(lat))}  "
            f"({len(lat)} arrivals); subscriber CPU per update {per_update * 1e6:.0f} us "
            f"(x {n} / {os.cpu_count()} cores = {ms(per_update * n / (os.cpu_count() or 1))}); "
            f"server CPU per change {ms(fan['cpu_srv'] * n / k)}; the change's RPC median "
            f"{ms(statistics.median(fan['rtt']))}"
            + (f"\n    delivered into the subscribers' sockets (kernel time): p50 "
               f"{ms(pct(fan['wire'], .5))}  p99 {ms(pct(fan['wire'], .99))}  max "
               f"{ms(max(fan['wire']))}; to the last of the {n} per change: median "
               f"{ms(statistics.median(fan['wire_last']))}  max {ms(max(fan['wire_last']))}"
               if fan["wire"] else ""))


def run_size(a, env, tmp: Path, store: str, n_dev: int, procs: list,
             echo: ManagedProcess, echo_port: int) -> dict:
    """Start the IOC with ``n_dev`` devices, lock all but m0..m4, measure; return the figures."""
    devices = [f"m{i}" for i in range(max(n_dev, 5))]
    t_start = time.monotonic()
    coord_env = server_env(env)
    coord = ManagedProcess(
        f"coordination-{n_dev}",
        coordination_argv(PREFIX, store, tmp / "policy.toml", devices=devices,
                          log_level="WARNING"),
        coord_env, cwd=REPO, log_dir=tmp)
    procs.append(coord)
    wait_for_pv(pvn.COORD_LOCKS.name(PREFIX), env, procs=[coord], timeout=60)
    t_locks = time.monotonic() - t_start
    wait_for_pv(pvn.COORD_DEVICE_STATE.name(PREFIX, devices[-1]), env, procs=[coord], timeout=60)
    t_last = time.monotonic() - t_start
    acq, rel = pvn.COORD_ACQUIRE.name(PREFIX), pvn.COORD_RELEASE.name(PREFIX)
    others = devices[5:]
    with Context("pva", conf=client_conf(env), useenv=False) as c:
        for j in range(0, len(others), 250):
            c.rpc(acq, uri(acq, device=",".join(others[j:j + 250]), type="MANUAL_OPERATOR",
                           timeout="3600"), timeout=30)
        held = len(current_locks(c, PREFIX, 10).value.device)
    cpu0 = (cpu_seconds(coord.pid), cpu_seconds(echo.pid))
    echo_t, acq_t, rel_t, pair_t = rpc_pairs(env, acq, rel, a.pairs, a.request_ids)
    n_calls = a.pairs + 100  # the warm-up pairs and echos ran too
    cpu_pair = (cpu_seconds(coord.pid) - cpu0[0]) / n_calls
    cpu_echo = (cpu_seconds(echo.pid) - cpu0[1]) / n_calls
    fs, fs_over = fsync_floor(tmp), fsync_floor(tmp, overwrite=True)
    r1, r4 = rate(env, acq, rel, 1), rate(env, acq, rel, 4)
    fan_kw = {"gap": a.gap, "sub_opts": a.sub_opts, "per_process": a.per_process,
              "server_cpus": a.server_cpus}
    fan = {n: fanout(env, tmp, procs, pvn.COORD_DEVICE_STATE.name(PREFIX, "m0"), n, a.changes,
                     acq, rel, f"{n_dev}", server_pid=coord.pid,
                     wire_port=int(coord_env["EPICS_PVA_SERVER_PORT"]) if a.wire else None,
                     **fan_kw)
           for n in a.subscribers}
    floor = {n: fanout(env, tmp, procs, FLOOR_STATE, n, a.changes, "", "", f"{n_dev}-floor",
                       server_pid=echo.pid, wire_port=echo_port if a.wire else None,
                       **fan_kw)
             for n in a.subscribers} if a.fanout_floor else {}
    # Coord:Locks is coalesced (decision 0165: a post at most every 50 ms), so its changes are
    # spaced by more than that, else one post covers two changes and arrivals pair wrongly
    fan_locks = fanout(env, tmp, procs, pvn.COORD_LOCKS.name(PREFIX), 1, a.changes, acq, rel,
                       f"{n_dev}-locks", gap=max(a.gap, 0.1))["lat"]
    fan_changes = fanout(env, tmp, procs, pvn.COORD_LOCK_CHANGES.name(PREFIX), 1, a.changes,
                         acq, rel, f"{n_dev}-changes", gap=a.gap)["lat"]
    coord.stop()
    return {"n": n_dev, "held": held, "t_locks": t_locks, "t_last": t_last, "echo": echo_t,
            "acq": acq_t, "rel": rel_t, "pair": pair_t, "fsync": fs, "fsync_over": fs_over,
            "rate1": r1, "rate4": r4,
            "cpu_pair": cpu_pair, "cpu_echo": cpu_echo,
            "fan": fan, "fan_locks": fan_locks, "fan_changes": fan_changes, "floor": floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--store", choices=["sqlite", "sqlite-normal", "redis"], default="sqlite",
                    help="sqlite: WAL, fsync before the reply (the default store); "
                    "sqlite-normal: no fsync; redis: redis-server with appendfsync always")
    ap.add_argument("--sizes", default="10,1000", help="device counts, comma list")
    ap.add_argument("--subscribers", default="1,50", help="subscriber counts, comma list")
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--gap", type=float, default=0.02,
                    help="s between a lock change's reply and the next change (fan-out)")
    ap.add_argument("--request-ids", action="store_true",
                    help="send a fresh requestId with every measured acquire and release")
    ap.add_argument("--fanout-floor", action="store_true",
                    help="also measure the fan-out of the bare p4p server (same subscribers)")
    ap.add_argument("--per-process", type=int, default=PER_PROCESS,
                    help="subscriber contexts per subscriber process")
    ap.add_argument("--stamp", choices=["callback", "event"], default="callback",
                    help="where a subscriber takes the arrival time (fanout_subscribers.py)")
    ap.add_argument("--wire", action="store_true",
                    help="also time each update's delivery into each subscriber's socket "
                    "(kernel timestamps from a loopback packet socket; needs CAP_NET_RAW)")
    ap.add_argument("--pin", action="store_true",
                    help="fan-out with the server on the first CPU and the subscriber processes "
                    "and the changes' client on the others (the server has its own core, as "
                    "on a real IOC host)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in the subscriber processes (s)")
    a = ap.parse_args()
    exit_on_sigterm()  # a killed run still stops what it started
    a.subscribers = [int(x) for x in a.subscribers.split(",")]
    a.sub_opts = ("--stamp", a.stamp) + (
        ("--switch-interval", str(a.switch_interval)) if a.switch_interval is not None else ())
    if a.wire:  # fail now, not after the first IOC and 500 subscribers have started
        try:
            with WireCapture(1):
                pass
        except PermissionError as e:
            ap.error(f"--wire needs CAP_NET_RAW (a packet socket; run as root): {e}")
    a.server_cpus = None
    if a.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs at least 2 CPUs")
        a.server_cpus = {cpus[0]}
        a.sub_opts += ("--cpus", ",".join(map(str, cpus[1:])))

    tmp = Path(tempfile.mkdtemp(prefix="pvcoord-bench-"))
    env = loopback_env()
    os.environ.update({k: v for k, v in env.items() if k.startswith("EPICS_")})
    (tmp / "policy.toml").write_text(POLICY)
    procs: list[ManagedProcess] = []
    results = []
    try:
        echo_env = server_env(env)
        echo = ManagedProcess("echo", [PYTHON, str(REPO / "benchmarks/echo_server.py"),
                                       ECHO, FLOOR_STATE, FLOOR_FLIP], echo_env, log_dir=tmp)
        procs.append(echo)
        with Context("pva", conf=client_conf(env), useenv=False) as c:
            wait_until(lambda: c.rpc(ECHO, uri(ECHO, x="1"), timeout=2, throw=False)
                       is not None, 20, "echo server")
        for n_dev in (int(x) for x in a.sizes.split(",")):
            store = f"sqlite:///{tmp}/locks-{n_dev}.sqlite"
            if a.store == "sqlite-normal":
                store += "?sync=normal"
            if a.store == "redis":
                r, port = start_redis(data_dir=tmp / f"redis-{n_dev}")
                procs.append(r)
                store = f"redis://127.0.0.1:{port}/0"
            results.append(run_size(a, env, tmp, store, n_dev, procs, echo,
                                    int(echo_env["EPICS_PVA_SERVER_PORT"])))
    finally:
        for p in reversed(procs):
            p.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # kept (with the logs) only when the run failed

    print(f"# pvcoord coordination benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, store {a.store}"
          f"{', requestId on every measured call' if a.request_ids else ''}")
    for res in results:
        e_med = statistics.median(res["echo"])
        p_med = statistics.median(res["pair"])
        acq_t, rel_t, pair_t = res["acq"], res["rel"], res["pair"]
        print(f"\n## {res['n']} devices, {res['held']} locked")
        print(f"startup: Coord:Locks after {res['t_locks']:.2f} s, last device State after "
              f"{res['t_last']:.2f} s")
        print(f"bare p4p RPC echo:       median {ms(e_med)}  p99 {ms(pct(res['echo'], .99))}")
        print(f"acquire:                 median {ms(statistics.median(acq_t))}  "
              f"p99 {ms(pct(acq_t, .99))}")
        print(f"release:                 median {ms(statistics.median(rel_t))}  "
              f"p99 {ms(pct(rel_t, .99))}")
        print(f"acquire+release pair:    median {ms(p_med)}  p99 {ms(pct(pair_t, .99))}")
        print(f"ratio acquire / echo:    {statistics.median(acq_t) / e_med:.2f}x")
        print(f"ratio release / echo:    {statistics.median(rel_t) / e_med:.2f}x")
        print(f"ratio pair / two echos:  {p_med / (2 * e_med):.2f}x   (target <= 1.3x)")
        f_med = statistics.median(res["fsync"])
        o_med = statistics.median(res["fsync_over"])
        print(f"fsync floor (4 KiB append + fsync on the store's disk): median {ms(f_med)}  "
              f"p99 {ms(pct(res['fsync'], .99))}")
        print(f"fsync floor (4 KiB overwrite + fsync, as the preallocated WAL): median "
              f"{ms(o_med)}  p99 {ms(pct(res['fsync_over'], .99))}")
        if a.store == "sqlite":
            print(f"ratio pair / (two echos + two overwrite fsyncs): "
                  f"{p_med / (2 * e_med + 2 * o_med):.2f}x")
        print(f"CPU per pair (IOC process): {ms(res['cpu_pair'])}; per echo (echo server): "
              f"{ms(res['cpu_echo'])}; pair / two echos: "
              f"{res['cpu_pair'] / (2 * res['cpu_echo']):.2f}x")
        print(f"sustained pairs/s:       1 client {res['rate1']:.0f}/s, "
              f"4 clients {res['rate4']:.0f}/s")
        for n, fan in res["fan"].items():
            print(fan_line(f"lock change -> {n:3d} State subscriber(s):", fan, n))
            fl = res["floor"].get(n)
            if fl:
                print(fan_line(f"  floor, bare p4p server flip -> {n:3d} subscriber(s):", fl, n))
                print(f"  IOC p99 / floor p99 {pct(fan['lat'], .99) / pct(fl['lat'], .99):.2f}x"
                      + (f"; in the sockets {pct(fan['wire'], .99) / pct(fl['wire'], .99):.2f}x"
                         if fan["wire"] and fl["wire"] else ""))
        for what, key in (("LockChanges", "fan_changes"), ("Locks (coalesced)", "fan_locks")):
            lat = res[key]
            print(f"lock change -> Coord:{what} subscriber: p50 {ms(pct(lat, .5))}  "
                  f"p99 {ms(pct(lat, .99))}  max {ms(max(lat))}")
    if len(results) > 1:
        small, big = results[0], results[-1]
        rel_small = statistics.median(small["pair"]) / (2 * statistics.median(small["echo"]))
        rel_big = statistics.median(big["pair"]) / (2 * statistics.median(big["echo"]))
        print(f"IOC CPU per pair at {big['n']} against {small['n']} devices: "
              f"{big['cpu_pair'] / small['cpu_pair']:.2f}x")
        print(f"\nop cost at {big['n']} against {small['n']} devices (pair/two echos): "
              f"{rel_big / rel_small:.2f}x   (target <= 1.1x); raw pair medians "
              f"{statistics.median(big['pair']) / statistics.median(small['pair']):.2f}x")


if __name__ == "__main__":
    main()
