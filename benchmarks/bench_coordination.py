"""Benchmark of the coordination IOC against a bare p4p RPC echo measured in the same run.

Usage: ``.venv/bin/python benchmarks/bench_coordination.py [--pairs 500] [--store sqlite|redis]``

Prints:
- median / p99 of a bare p4p RPC echo (separate process, thread server: the floor);
- median / p99 of an acquire+release pair on the real IOC process with a durable store
  (SQLite WAL synchronous=NORMAL by default; --store sqlite-full / redis), and the ratios: each
  RPC to one echo, the pair to two echos (a pair is two round trips) and to one echo;
- sustained acquire+release rate with 1 and 4 client threads;
- time from a lock change (RPC sent) to its arrival at 1 and 50 monitor subscribers
  (separate process, one PVA context each), p50 / p99 / max.

Every figure comes from this run on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from pvcoord.launch import coordination_argv  # noqa: E402
from pvcoord.procs import (  # noqa: E402
    ManagedProcess,
    client_conf,
    loopback_env,
    server_env,
    start_redis,
    wait_for_pv,
    wait_until,
)
from pvdb import names as pvn  # noqa: E402

PREFIX = "BENCH:"
DEVICES = [f"m{i}" for i in range(60)]
ECHO = "BENCH:Echo"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--store", choices=["sqlite", "sqlite-full", "redis"], default="sqlite",
                    help="sqlite: WAL synchronous=NORMAL (default store); sqlite-full: fsync "
                    "per change; redis: redis-server with appendfsync always")
    ap.add_argument("--changes", type=int, default=100)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pvcoord-bench-"))
    env = loopback_env()
    os.environ.update({k: v for k, v in env.items() if k.startswith("EPICS_")})
    (tmp / "policy.toml").write_text(POLICY)
    procs: list[ManagedProcess] = []
    try:
        store = f"sqlite:///{tmp}/locks.sqlite"
        if a.store == "sqlite-full":
            store += "?sync=full"
        if a.store == "redis":
            r, port = start_redis(data_dir=tmp / "redis")
            procs.append(r)
            store = f"redis://127.0.0.1:{port}/0"
        echo = ManagedProcess("echo", [sys.executable, str(REPO / "benchmarks/echo_server.py"),
                                       ECHO], server_env(env), log_dir=tmp)
        procs.append(echo)
        coord = ManagedProcess(
            "coordination",
            coordination_argv(PREFIX, store, tmp / "policy.toml", devices=DEVICES,
                              log_level="WARNING"),
            server_env(env), cwd=REPO, log_dir=tmp)
        procs.append(coord)
        wait_for_pv(pvn.COORD_LOCKS.name(PREFIX), env, procs=[coord])
        acq, rel = pvn.COORD_ACQUIRE.name(PREFIX), pvn.COORD_RELEASE.name(PREFIX)

        with Context("pva", conf=client_conf(env), useenv=False) as c:
            wait_until(lambda: c.rpc(ECHO, uri(ECHO, x="1"), timeout=2, throw=False) is not None,
                       20, "echo server")
            echo_req = uri(ECHO, device="m0", type="MANUAL_OPERATOR", timeout="60")
            for _ in range(100):
                c.rpc(ECHO, echo_req, timeout=5)
                k = c.rpc(acq, uri(acq, device="m0", type="MANUAL_OPERATOR", timeout="60"),
                          timeout=5).key
                c.rpc(rel, uri(rel, key=k), timeout=5)
            echo_t, pair_t, acq_t, rel_t = [], [], [], []
            for _ in range(a.pairs):
                t0 = time.perf_counter()
                c.rpc(ECHO, echo_req, timeout=5)
                t1 = time.perf_counter()
                k = c.rpc(acq, uri(acq, device="m0", type="MANUAL_OPERATOR", timeout="60"),
                          timeout=5).key
                t2 = time.perf_counter()
                c.rpc(rel, uri(rel, key=k), timeout=5)
                t3 = time.perf_counter()
                echo_t.append(t1 - t0)
                acq_t.append(t2 - t1)
                rel_t.append(t3 - t2)
                pair_t.append(t3 - t1)

        def rate(threads: int, seconds: float = 3.0) -> float:
            counts = [0] * threads

            def worker(i: int) -> None:
                with Context("pva", conf=client_conf(env), useenv=False) as cc:
                    dev = f"m{i + 1}"
                    end = time.perf_counter() + seconds
                    while time.perf_counter() < end:
                        k = cc.rpc(acq, uri(acq, device=dev, type="MANUAL_OPERATOR",
                                            timeout="60"), timeout=5).key
                        cc.rpc(rel, uri(rel, key=k), timeout=5)
                        counts[i] += 1

            ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return sum(counts) / seconds

        rate1, rate4 = rate(1), rate(4)

        fan: dict[int, list[float]] = {}
        state_pv = pvn.COORD_DEVICE_STATE.name(PREFIX, "m0")
        for n in (1, 50):
            out = tmp / f"fan{n}.json"
            sub = ManagedProcess(f"subs{n}", [sys.executable,
                                              str(REPO / "benchmarks/fanout_subscribers.py"),
                                              state_pv, str(n), str(out)], env, log_dir=tmp)
            procs.append(sub)
            wait_until(lambda s=sub: "subscribed" in s.output(), 60, f"{n} subscribers")
            if "NOT" in sub.output():
                raise RuntimeError(sub.output())
            t0s: list[float] = []
            with Context("pva", conf=client_conf(env), useenv=False) as c:
                key = None
                for i in range(a.changes):
                    t0s.append(time.monotonic())
                    if i % 2 == 0:
                        key = c.rpc(acq, uri(acq, device="m0", type="MANUAL_OPERATOR",
                                             timeout="60"), timeout=5).key
                    else:
                        c.rpc(rel, uri(rel, key=key), timeout=5)
                    time.sleep(0.02)
                if key and a.changes % 2:
                    c.rpc(rel, uri(rel, key=key), timeout=5)
            time.sleep(0.5)  # let the last updates arrive before the subscribers write out
            sub.stop()
            arrivals = json.loads(out.read_text())
            lat = []
            for per_sub in arrivals:
                updates = per_sub[1:]  # the first is the initial value
                for t0, (t_arr, _idx) in zip(t0s, updates, strict=False):
                    lat.append(t_arr - t0)
                missing = a.changes - len(updates)
                if missing > 0:
                    print(f"WARNING: a subscriber missed {missing} updates")
            fan[n] = lat
    finally:
        for p in reversed(procs):
            p.stop()

    e_med = statistics.median(echo_t)
    p_med = statistics.median(pair_t)
    print(f"# pvcoord coordination benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, store {a.store}")
    print(f"bare p4p RPC echo:       median {ms(e_med)}  p99 {ms(pct(echo_t, .99))}")
    print(f"acquire:                 median {ms(statistics.median(acq_t))}  "
          f"p99 {ms(pct(acq_t, .99))}")
    print(f"release:                 median {ms(statistics.median(rel_t))}  "
          f"p99 {ms(pct(rel_t, .99))}")
    print(f"acquire+release pair:    median {ms(p_med)}  p99 {ms(pct(pair_t, .99))}")
    print(f"ratio acquire / echo:    {statistics.median(acq_t) / e_med:.2f}x")
    print(f"ratio release / echo:    {statistics.median(rel_t) / e_med:.2f}x")
    print(f"ratio pair / two echos:  {p_med / (2 * e_med):.2f}x   (target <= 2x)")
    print(f"ratio pair / one echo:   {p_med / e_med:.2f}x")
    print(f"sustained pairs/s:       1 client {rate1:.0f}/s, 4 clients {rate4:.0f}/s")
    for n, lat in fan.items():
        print(f"lock change -> {n:2d} subscriber(s): p50 {ms(pct(lat, .5))}  "
              f"p99 {ms(pct(lat, .99))}  max {ms(max(lat))}  ({len(lat)} arrivals)"
              + ("   (target p99 < 20 ms)" if n == 50 else ""))


if __name__ == "__main__":
    main()
