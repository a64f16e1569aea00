"""CA bridge benchmark: put latency, lock change -> ACCESS_RIGHTS, forwarded monitor updates.

Starts (all on loopback, in this run): the demo softIoc on a device network, the registry and
coordination IOCs, the guard and the CA bridge (both in front of the same softIoc). Then:

1. put latency with completion to a motor's ``Velocity`` (an ao whose put completes at once; a
   setpoint's completion waits for the motion, decision 0130): direct to the softIoc (p4p, PVA,
   the floor),
   through the guard (p4p, PVA), through the bridge (pyepics/libca ``put(wait=True)``, i.e. a CA
   put-callback); and, as the floor of any caproto server, the same CA put to a minimal caproto
   server (one ``pvproperty``, nothing forwarded; ``--floor-server`` mode of this script);
   interleaved in blocks so machine noise hits all paths alike;
2. lock change -> ACCESS_RIGHTS at a libca client: this account acquires a lock on behalf of
   another user (so our channels lose WRITE), then releases; time from sending the RPC to the
   access-rights callback of a watched channel, with 1 and with 50 channels open on the circuit.
   Floor in the same run: the RPC round trip itself;
3. monitor updates forwarded: a p4p client puts to a velocity as fast as it can (16 in flight)
   for a few seconds; S libca subscribers through the bridge count updates, and a p4p monitor
   directly on the softIoc counts the source; the bridge's CPU time (``/proc``) per forwarded
   update gives updates per CPU-second (per core).

Targets (issue 9): ACCESS_RIGHTS p99 < 50 ms; CA put through the bridge median no slower than
the guard's PVA put; >= 5,000 forwarded monitor updates/s on one core.

Usage: python benchmarks/bench_flat.py [--puts 500] [--changes 40] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from p4p.client.asyncio import Context as AsyncContext
from p4p.client.thread import Context
from p4p.nt import NTURI

from pvcoord.demo import devices
from pvcoord.demo.flat_part import bridge_env, start_flat
from pvcoord.demo.guard_part import start_guard
from pvcoord.procs import (
    PYTHON,
    ManagedProcess,
    client_conf,
    exit_on_sigterm,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
)
from pvdb import demo
from pvdb.flat import FLAT_HEALTH
from pvdb.guard import GUARD_HEALTH
from pvdb.names import COORD_ACQUIRE, COORD_LOCKS, COORD_RELEASE, REGISTRY_DEVICE_PVS

REPO = Path(__file__).resolve().parent.parent
P = "BENCH:"
M1, M2, M3 = demo.MOTORS[:3]
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (and its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FLOOR_PV = "BENCHFLOOR:x"


def floor_server() -> int:
    """A minimal caproto server (one pvproperty): the floor of a CA put to any caproto server."""
    from caproto.asyncio.server import Context as CaContext
    from caproto.server import PVGroup, pvproperty

    class Floor(PVGroup):
        x = pvproperty(value=0.0)

    async def run() -> None:
        await CaContext(Floor(prefix=FLOOR_PV[:-1]).pvdb).run()

    asyncio.run(run())
    return 0


def put_latencies(pva: dict[str, Context], ca_pvs: dict, pv: str, n: int,
                  pids: dict[str, int], cpu: dict[str, float]) -> dict[str, list]:
    """Latencies per path; ``cpu[path]`` gets the CPU seconds process ``pids[path]`` spent on
    the timed puts of that path (its blocks only: the paths are interleaved)."""
    out: dict[str, list[float]] = {k: [] for k in [*pva, *ca_pvs]}
    for c in pva.values():
        for i in range(20):
            c.put(pv, float(i % 5), wait=True, get=False, timeout=10)
    for ca_pv in ca_pvs.values():
        for i in range(20):
            ca_pv.put(float(i % 5), wait=True, timeout=10)
    block = 50
    for k in pids:
        cpu[k] = 0.0
    for b in range(max(1, n // block)):
        for k, c in pva.items():
            c0 = cpu_seconds(pids[k]) if k in pids else 0.0
            for i in range(block):
                t0 = time.perf_counter()
                c.put(pv, float((b + i) % 7), wait=True, get=False, timeout=10)
                out[k].append(time.perf_counter() - t0)
            if k in pids:
                cpu[k] += cpu_seconds(pids[k]) - c0
        for k, ca_pv in ca_pvs.items():
            c0 = cpu_seconds(pids[k]) if k in pids else 0.0
            for i in range(block):
                t0 = time.perf_counter()
                if ca_pv.put(float((b + i) % 7), wait=True, timeout=10) is None:
                    raise RuntimeError("CA put did not complete")
                out[k].append(time.perf_counter() - t0)
            if k in pids:
                cpu[k] += cpu_seconds(pids[k]) - c0
    return out


def rights_latency(epics, coord: Context, watched: str, extra: list[str], n: int) -> tuple:
    """(to no-write, to write-again, rpc round trips) over ``n`` lock changes."""
    changed = threading.Event()
    state = {"write": True, "t": 0.0}

    def on_access(read_access, write_access, pv=None):
        state["write"], state["t"] = bool(write_access), time.perf_counter()
        changed.set()

    pv = epics.PV(watched, access_callback=on_access, auto_monitor=False)
    others = [epics.PV(name, auto_monitor=False) for name in extra]
    assert pv.wait_for_connection(10) and all(o.wait_for_connection(10) for o in others)
    lost, back, rtt = [], [], []
    try:
        for _ in range(n):
            for want, spec, args, out in (
                (False, COORD_ACQUIRE, {"device": M3, "type": "MANUAL_OPERATOR",
                                        "timeout": "60", "onBehalfOf": OTHER}, lost),
                (True, COORD_RELEASE, {"device": M3, "onBehalfOf": OTHER}, back),
            ):
                changed.clear()
                t0 = time.perf_counter()
                rpc(coord, spec, **args)
                rtt.append(time.perf_counter() - t0)
                deadline = t0 + 5
                while state["write"] != want:
                    if not changed.wait(max(0.0, deadline - time.perf_counter())):
                        raise TimeoutError("no ACCESS_RIGHTS event within 5 s")
                    changed.clear()
                out.append(state["t"] - t0)
    finally:
        for o in [pv, *others]:
            o.disconnect()
    return lost, back, rtt


async def drive(conf: dict[str, str], pv: str, seconds: float, depth: int = 16) -> int:
    """Put to ``pv`` as fast as possible for ``seconds``; return the number of puts."""
    with AsyncContext("pva", conf=conf, useenv=False) as c:
        await asyncio.wait_for(c.put(pv, 0.0, wait=True, get=False), 10)
        end = time.perf_counter() + seconds
        count = 0

        async def worker(k: int) -> None:
            nonlocal count
            i = 0
            while time.perf_counter() < end:
                i += 1
                await asyncio.wait_for(c.put(pv, float((k * 1000 + i) % 97), wait=True,
                                             get=False), 10)
                count += 1

        await asyncio.gather(*(worker(k) for k in range(depth)))
        return count


def quiet(sample, first: bool = False, still: float = 0.2, deadline: float = 10.0) -> None:
    """Wait until ``sample()`` has not changed for ``still`` s (with ``first``: and every count
    is non-zero), at most ``deadline`` s."""
    end = time.perf_counter() + deadline
    last, since = sample(), time.perf_counter()
    while time.perf_counter() < end:
        time.sleep(0.02)
        now = sample()
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since >= still and (not first or all(now)):
            return
    raise TimeoutError("monitor counts did not settle")


def forwarded(epics, dev_ctx: Context, devs: dict[str, str], pv: str, subscribers: int,
              seconds: float, bridge_pid: int, ioc_pid: int) -> dict[str, float]:
    counts = [0] * subscribers
    subs = []

    def make_cb(i: int):
        def cb(**_kw):
            counts[i] += 1
        return cb

    for i in range(subscribers):
        # one libca context serves all: separate circuits need separate processes; S channels
        # of the same name share one circuit but are separate subscriptions at the bridge
        p = epics.PV(pv, callback=make_cb(i), auto_monitor=True)
        assert p.wait_for_connection(10)
        subs.append(p)
    direct = [0]

    def on_direct(_v):
        direct[0] += 1

    sub = dev_ctx.monitor(pv, on_direct)
    quiet(lambda: (*counts, direct[0]), first=True)  # the connect updates are not counted
    c0 = list(counts)
    d0 = direct[0]
    b0, i0 = cpu_seconds(bridge_pid), cpu_seconds(ioc_pid)
    t0 = time.perf_counter()
    puts = asyncio.run(drive(client_conf(devs), pv, seconds))
    elapsed = time.perf_counter() - t0
    quiet(lambda: (*counts, direct[0]))  # everything in flight has arrived
    b1, i1 = cpu_seconds(bridge_pid), cpu_seconds(ioc_pid)
    sub.close()
    for p in subs:
        p.clear_callbacks()
        p.disconnect()
    got = sum(c - c_0 for c, c_0 in zip(counts, c0, strict=True))
    src = direct[0] - d0
    return {"puts": puts, "source": src, "forwarded": got, "elapsed": elapsed,
            "bridge_cpu": b1 - b0, "ioc_cpu": i1 - i0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=500, help="puts per path (default 500)")
    ap.add_argument("--changes", type=int, default=40, help="lock changes (default 40)")
    ap.add_argument("--seconds", type=float, default=3.0, help="monitor phase length (s)")
    ap.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    exit_on_sigterm()  # a killed run still stops what it started
    if a.floor_server:
        return floor_server()

    tmp = Path(tempfile.mkdtemp(prefix="bench-flat-"))
    clients, devs = loopback_env(), loopback_env()
    ca_env = bridge_env(clients)
    floor_env = bridge_env(clients)
    os.environ.update({k: v for k, v in ca_env.items() if k.startswith("EPICS_CA")})
    # this process's libca searches the bridge and the floor server (different names and ports)
    os.environ["EPICS_CA_ADDR_LIST"] = (f"127.0.0.1:{ca_env['EPICS_CA_SERVER_PORT']} "
                                        f"127.0.0.1:{floor_env['EPICS_CA_SERVER_PORT']}")
    import epics

    devices.write_database(P, tmp / "demo.db")
    devices.write_registry(P, tmp / "registry.yaml")
    (tmp / "policy.toml").write_text(POLICY)
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
            "coordination", python_module(
                "iocs.coordination", "--prefix", P, "--policy", str(tmp / "policy.toml"),
                "--store", f"sqlite:///{tmp}/locks.sqlite", "--registry-prefix", P),
            server_env(clients), cwd=REPO, log_dir=tmp))
        procs.append(ManagedProcess(
            "floor", [PYTHON, str(Path(__file__).resolve()), "--floor-server"],
            floor_env, cwd=REPO, log_dir=tmp))
        sp3 = demo.motor_setpoint(P, M3)  # watched for access rights only
        # puts that complete at once (a setpoint's put waits for the motion)
        sp1, sp2 = (demo.motor_velocity(P, m) for m in (M1, M2))
        wait_for_pv(sp1, devs, procs=procs)
        wait_for_pv(REGISTRY_DEVICE_PVS.name(P), clients, procs=procs)
        wait_for_pv(COORD_LOCKS.name(P), clients, procs=procs)
        procs.append(start_guard(P, clients, devs, tmp / "policy.toml", tmp / "guard"))
        guard_pid = procs[-1].pid
        procs.append(start_flat(P, ca_env, devs, tmp / "policy.toml", tmp / "flat"))
        wait_for_pv(GUARD_HEALTH.name(P), clients, procs=procs, condition=lambda v: v == "OK")
        wait_for_pv(FLAT_HEALTH.name(P), clients, procs=procs, condition=lambda v: v == "OK")
        bridge_pid, ioc_pid = procs[-1].pid, procs[0].pid
        floor_pv = epics.PV(FLOOR_PV, auto_monitor=False)
        assert floor_pv.wait_for_connection(20), "no CA connection to the floor server"

        pva = {"direct softIoc (PVA)": Context("pva", conf=client_conf(devs), useenv=False),
               "guard (PVA)": Context("pva", conf=client_conf(clients), useenv=False)}
        coord = Context("pva", conf=client_conf(clients), useenv=False)
        ca_pv = epics.PV(sp1, auto_monitor=False)
        assert ca_pv.wait_for_connection(10), "no CA connection to the bridge"

        print(f"# CA bridge benchmark, {a.puts} puts per path, {a.changes} lock changes, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print("\n## put latency with completion (sequential, one client)")
        floor_pid = next(p.pid for p in procs if p.name == "floor")
        pids = {"guard (PVA)": guard_pid, "CA bridge (put-callback)": bridge_pid,
                "minimal caproto server (CA)": floor_pid}
        cpu: dict[str, float] = {}
        lat = put_latencies(pva, {"CA bridge (put-callback)": ca_pv,
                                  "minimal caproto server (CA)": floor_pv}, sp1,
                            a.puts, pids, cpu)
        for k, xs in lat.items():
            own = (f"  CPU {cpu[k] / len(xs) * 1e6:5.0f} us/put (that process)" if k in cpu
                   else "")
            print(f"{k:28s} {fmt(xs)}{own}")
        ca_m = statistics.median(lat["CA bridge (put-callback)"])
        g_m = statistics.median(lat["guard (PVA)"])
        d_m = statistics.median(lat["direct softIoc (PVA)"])
        print(f"ratio CA bridge / guard: {ca_m / g_m:.2f} (target <= 1.0: "
              f"{'PASS' if ca_m <= g_m else 'FAIL'}); CA bridge / direct: {ca_m / d_m:.2f}; "
              f"guard / direct: {g_m / d_m:.2f}; CA bridge / minimal caproto server: "
              f"{ca_m / statistics.median(lat['minimal caproto server (CA)']):.2f}")
        ca_pv.disconnect()
        floor_pv.disconnect()

        print("\n## lock change -> ACCESS_RIGHTS at a libca client (RPC sent -> callback)")
        ao = ("DESC", "EGU", "PREC", "DRVH", "DRVL", "HOPR", "LOPR", "HIHI", "LOLO", "HIGH",
              "LOW", "SCAN", "PINI", "OVAL", "FLNK", "MDEL", "ADEL")
        calc = ("VAL", "DESC", "EGU", "PREC", "HOPR", "LOPR", "HIHI", "LOLO", "HIGH", "LOW",
                "SCAN", "CALC", "INPA", "INPB", "FLNK")
        extra = [f"{sp3}.{f}" for f in ao] + [f"{demo.motor_velocity(P, M3)}.{f}" for f in ao]
        extra += [f"{demo.motor_readback(P, M3)}.{f}" for f in calc]
        extra = extra[:49]
        worst = 0.0
        for label, names in (("1 channel", []), (f"{1 + len(extra)} channels", extra)):
            lost, back, rtt = rights_latency(epics, coord, sp3, names, a.changes)
            worst = max(worst, pct(lost, 99), pct(back, 99))
            print(f"{label:12s} lock -> no write  {fmt(lost)}")
            print(f"{label:12s} unlock -> write   {fmt(back)}")
            print(f"{label:12s} floor: RPC round trip {fmt(rtt)}")
        print(f"ACCESS_RIGHTS p99 {worst * 1e3:.2f} ms (target < 50 ms: "
              f"{'PASS' if worst < 0.05 else 'FAIL'})")

        print(f"\n## monitor updates forwarded ({a.seconds:g} s of puts, 16 in flight)")
        dev_ctx = Context("pva", conf=client_conf(devs), useenv=False)
        best = 0.0
        for subscribers in (1, 4):
            r = forwarded(epics, dev_ctx, devs, sp2, subscribers, a.seconds, bridge_pid,
                          ioc_pid)
            per_core = r["forwarded"] / r["bridge_cpu"] if r["bridge_cpu"] else float("inf")
            ioc_per_core = r["source"] / r["ioc_cpu"] if r["ioc_cpu"] else float("inf")
            best = max(best, per_core)
            print(f"{subscribers} CA subscriber(s): source {r['source'] / r['elapsed']:7.0f} "
                  f"updates/s (direct PVA monitor), forwarded {r['forwarded'] / r['elapsed']:7.0f}"
                  f"/s; bridge CPU {r['bridge_cpu'] / max(1, r['forwarded']) * 1e6:6.1f} us per "
                  f"forwarded update = {per_core:7.0f} updates per CPU-second; softIoc CPU "
                  f"{r['ioc_cpu'] / max(1, r['source']) * 1e6:6.1f} us per update "
                  f"({ioc_per_core:7.0f}/CPU-s, includes serving the puts)")
        print(f"forwarded updates per core: {best:.0f} (target >= 5000: "
              f"{'PASS' if best >= 5000 else 'FAIL'})")
        dev_ctx.close()
        for c in [*pva.values(), coord]:
            c.close()
        ok = True
    finally:
        for p in reversed(procs):
            p.stop()
        for p in procs:  # which path the bridge's forwarded puts took (decision 0155)
            if p.name == "flat":
                for line in p.output().splitlines():
                    if "forwarded puts:" in line:
                        print(f"\nbridge: {line.split('forwarded puts:', 1)[1].strip()}")
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"run directory kept: {tmp}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
