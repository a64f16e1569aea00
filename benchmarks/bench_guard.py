"""Guard gateway benchmark: put latency and rate, and lock-change-to-permission time.

Starts (all on loopback, in this run): the demo softIoc on a network of its own, the registry and
coordination IOCs, the guard, and a plain ``pvagw`` (``python -m p4p.gw``, no policy) in front of
the same softIoc on a third network. Then, from one p4p client:

1. put latency (``put(wait=True, get=False)`` to a motor's ``Velocity``, an ao whose put
   completes at once: a setpoint's completion waits for the motion, decision 0130) directly to
   the softIoc,
   through the plain pvagw, and through the guard (device unlocked; and device locked by us, where
   every put is also audited), interleaved in blocks so machine noise hits all paths alike;
2. put rate: sequential, and with 16 puts in flight (p4p asyncio client);
3. lock change -> permission: a trusted service (this account, root) acquires the motor on behalf
   of another user, then puts on an already open channel until one is refused; the time from the
   Acquire reply to that first refusal (and from Release to the first success). Also the guard's
   own figure ``Guard:ApplyLatency`` (coordination IOC timestamp -> permissions applied).

Targets (docs/benchmarks.md): median guard put <= 1.3 x plain pvagw; lock change effective
within 50 ms p99.

Usage: python benchmarks/bench_guard.py [--puts 2000] [--changes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from p4p.client.asyncio import Context as AsyncContext
from p4p.client.thread import Context, RemoteError
from p4p.nt import NTURI

from pvcoord.demo import devices
from pvcoord.demo.guard_part import guard_config, start_guard
from pvcoord.launch import coordination_argv
from pvcoord.procs import (
    ManagedProcess,
    client_conf,
    exit_on_sigterm,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
    wait_until,
)
from pvdb import demo
from pvdb.guard import GUARD_APPLY_LATENCY, GUARD_HEALTH, GUARD_WHAT_IF
from pvdb.names import COORD_ACQUIRE, COORD_LOCKS, COORD_RELEASE, REGISTRY_DEVICE_PVS

REPO = Path(__file__).resolve().parent.parent
P = "BENCH:"
M1, M2 = demo.MOTORS[:2]
OTHER = "benchuser"  # the lock holder in the lock-change test (an account we are not)
POLICY = """
[access]
trusted_services = ["root"]
force_release = ["root"]
emergency = []
[lock_types.MANUAL_OPERATOR]
allow = ["*"]
"""


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def fmt(xs: list[float]) -> str:
    ms = [x * 1e3 for x in xs]
    return (f"median {statistics.median(ms):6.3f} ms  p90 {pct(ms, 90):6.3f}  "
            f"p99 {pct(ms, 99):6.3f}  (n={len(ms)})")


def rpc(ctxt: Context, spec, **args: str):
    name = spec.name(P)
    return ctxt.rpc(name, NTURI([(k, "s") for k in args]).wrap(name, kws=args), timeout=10)


def put_latencies(ctxts: dict[str, Context], pvs: dict[str, str], n: int) -> dict[str, list]:
    out: dict[str, list[float]] = {k: [] for k in ctxts}
    block = 50
    for k, c in ctxts.items():  # warm up: connect channels
        for i in range(20):
            c.put(pvs[k], float(i % 5), wait=True, get=False, timeout=10)
    for b in range(n // block):
        for k, c in ctxts.items():
            pv = pvs[k]
            for i in range(block):
                t0 = time.perf_counter()
                c.put(pv, float((b + i) % 7), wait=True, get=False, timeout=10)
                out[k].append(time.perf_counter() - t0)
    return out


async def pipelined_rate(conf: dict[str, str], pv: str, n: int, depth: int = 16) -> float:
    with AsyncContext("pva", conf=conf, useenv=False) as c:
        await asyncio.wait_for(c.put(pv, 0.0, wait=True, get=False), 10)
        sem = asyncio.Semaphore(depth)

        async def one(i: int) -> None:
            async with sem:
                await asyncio.wait_for(c.put(pv, float(i % 7), wait=True, get=False), 10)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)


def first_change(ctxt: Context, pv: str, want_refused: bool, deadline: float = 5.0) -> float:
    """Put on the open channel until the outcome is the wanted one; return when it was."""
    end = time.perf_counter() + deadline
    while time.perf_counter() < end:
        try:
            ctxt.put(pv, 1.0, wait=True, get=False, timeout=5)
            refused = False
        except RemoteError:
            refused = True
        if refused == want_refused:
            return time.perf_counter()
    raise TimeoutError(f"permission on {pv} did not change within {deadline} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=2000, help="puts per path (default 2000)")
    ap.add_argument("--changes", type=int, default=100, help="lock changes (default 100)")
    a = ap.parse_args()
    exit_on_sigterm()  # a killed run still stops what it started

    tmp = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    clients, clients_gw, devs = loopback_env(), loopback_env(), loopback_env()
    devices.write_database(P, tmp / "demo.db")
    devices.write_registry(P, tmp / "registry.yaml")
    (tmp / "policy.toml").write_text(POLICY)
    plain = guard_config(clients_gw, devs)
    del plain["guard"]
    (tmp / "pvagw.json").write_text(json.dumps(plain, indent=1))
    procs: list[ManagedProcess] = []
    ok = False
    try:
        procs.append(ManagedProcess(
            "softioc", python_module("pvxslibs.ioc", "-d", str(tmp / "demo.db")),
            server_env(devs), log_dir=tmp))
        procs.append(ManagedProcess(
            "registry", python_module("iocs.registry", "--prefix", P, "--registry",
                                      str(tmp / "registry.yaml")),
            server_env(clients), cwd=REPO, log_dir=tmp))
        procs.append(ManagedProcess(
            "coordination", coordination_argv(
                P, f"sqlite:///{tmp}/locks.sqlite", tmp / "policy.toml", registry_prefix=P),
            server_env(clients), cwd=REPO, log_dir=tmp))
        procs.append(ManagedProcess(
            "pvagw", python_module("p4p.gw", str(tmp / "pvagw.json")), clients_gw, log_dir=tmp))
        # puts that complete at once (a setpoint's put waits for the motion)
        sp1, sp2 = demo.motor_velocity(P, M1), demo.motor_velocity(P, M2)
        wait_for_pv(sp1, devs, procs=procs)
        wait_for_pv(REGISTRY_DEVICE_PVS.name(P), clients, procs=procs)
        wait_for_pv(COORD_LOCKS.name(P), clients, procs=procs)
        wait_for_pv(sp1, clients_gw, procs=procs)
        procs.append(start_guard(P, clients, devs, tmp / "policy.toml", tmp / "guard"))
        wait_for_pv(GUARD_HEALTH.name(P), clients, procs=procs, condition=lambda v: v == "OK")

        ctx = {
            "direct softIoc": Context("pva", conf=client_conf(devs), useenv=False),
            "plain pvagw": Context("pva", conf=client_conf(clients_gw), useenv=False),
            "guard, unlocked": Context("pva", conf=client_conf(clients), useenv=False),
            "guard, locked by us (audited)": Context("pva", conf=client_conf(clients),
                                                    useenv=False),
        }
        pvs = dict.fromkeys(ctx, sp1)
        pvs["guard, locked by us (audited)"] = sp2
        coord = Context("pva", conf=client_conf(clients), useenv=False)
        rpc(coord, COORD_ACQUIRE, device=M2, type="MANUAL_OPERATOR", timeout="3600")
        wait_until(lambda: rpc(coord, GUARD_WHAT_IF, pv=sp2, account=getpass.getuser()).holder,
                   10.0, f"the guard applies our lock on {M2}")

        print(f"# guard benchmark, {a.puts} puts per path, machine: {sys.platform}")
        print("\n## put latency (p4p put wait=True get=False, one client, sequential)")
        lat = put_latencies(ctx, pvs, a.puts)
        for k, xs in lat.items():
            print(f"{k:32s} {fmt(xs)}  rate {1 / statistics.mean(xs):7.0f} puts/s")
        base = statistics.median(lat["plain pvagw"])
        direct = statistics.median(lat["direct softIoc"])
        for k in ("guard, unlocked", "guard, locked by us (audited)"):
            r = statistics.median(lat[k]) / base
            print(f"ratio {k} / plain pvagw: {r:.2f}  (target <= 1.3: "
                  f"{'PASS' if r <= 1.3 else 'FAIL'});  / direct: "
                  f"{statistics.median(lat[k]) / direct:.2f}")
        print(f"ratio plain pvagw / direct: {base / direct:.2f}")

        print("\n## put rate, 16 puts in flight (p4p asyncio client)")
        n = max(500, a.puts)
        for k, conf, pv in (("direct softIoc", devs, sp1), ("plain pvagw", clients_gw, sp1),
                            ("guard, unlocked", clients, sp1)):
            rate = asyncio.run(pipelined_rate(client_conf(conf), pv, n))
            print(f"{k:32s} {rate:7.0f} puts/s")

        print("\n## lock change -> permission on an open channel (through the guard)")
        rpc(coord, COORD_RELEASE, device=M2)
        putter = ctx["guard, unlocked"]
        putter.put(sp1, 0.0, wait=True, get=False, timeout=10)
        to_refused, to_allowed, to_refused_req = [], [], []
        applied: list[float] = []
        sub = coord.monitor(GUARD_APPLY_LATENCY.name(P),
                            lambda v: applied.append(float(v.value if hasattr(v, "value") else v)))
        for _ in range(a.changes):
            t_req = time.perf_counter()
            rpc(coord, COORD_ACQUIRE, device=M1, type="MANUAL_OPERATOR", timeout="60",
                onBehalfOf=OTHER)
            t_rep = time.perf_counter()
            t = first_change(putter, sp1, want_refused=True)
            to_refused.append(t - t_rep)
            to_refused_req.append(t - t_req)
            rpc(coord, COORD_RELEASE, device=M1, onBehalfOf=OTHER)
            t_rel = time.perf_counter()
            to_allowed.append(first_change(putter, sp1, want_refused=False) - t_rel)
        sub.close()
        print(f"Acquire reply -> first refused put:  {fmt(to_refused)}")
        print(f"Acquire request -> first refused put: {fmt(to_refused_req)}")
        print(f"Release reply -> first allowed put:  {fmt(to_allowed)}")
        both = to_refused + to_allowed
        p99 = pct(both, 99) * 1e3
        print(f"p99 of both: {p99:.2f} ms (target <= 50 ms: {'PASS' if p99 <= 50 else 'FAIL'})")
        if applied:
            ms = [x for x in applied[1:] if x > 0]
            if ms:
                print(f"guard's own Guard:ApplyLatency (IOC post -> applied): median "
                      f"{statistics.median(ms):.2f} ms  p99 {pct(ms, 99):.2f} ms (n={len(ms)})")
        for c in (*ctx.values(), coord):
            c.close()
        ok = True
    finally:
        for p in reversed(procs):
            p.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
