"""PVWS bridge benchmark: delivered updates/s and bridge CPU, post -> websocket latency next to a
direct p4p monitor, and lock change -> ``readonly`` at the client next to a direct monitor.

Starts (loopback, this run): a real softIoc with the demo devices and ``--pvs`` calc records
counting at ``--hz`` (SCAN), the registry and coordination IOCs, and ``python -m bridges.pvws``
(writes on, password login). Then:

1. load: ``--clients`` websocket clients (in a separate process, so their CPU is not the
   bridge's and does not disturb the latency clients) each subscribe all ``--pvs`` PVs; the
   updates they receive per second over ``--seconds``, and the bridge's CPU (utime+stime from
   /proc) over the same window, in cores. Run at two levels: every client on all PVs (the
   issue's 100 x 100 x 10 Hz = 100,000 offered/s) and every client on a tenth of them
   (10,000 offered/s);
2. latency during the 10,000/s load: this process serves a PV (p4p ``SharedPV``) posting its own
   ``time.time()`` at 10 Hz for twice ``--seconds``; receipt - value at one websocket client
   through the bridge and at a direct p4p monitor (the floor), p50 / p99;
3. lock change -> readonly: web user bob watches ``m1``'s setpoint; this process (a trusted
   service) acquires / releases ``m1`` for alice via ``Coord:Acquire onBehalfOf``; the time from
   the call to bob's ``readonly`` flip, next to a direct p4p monitor of ``Coord:LockChanges``
   (the floor).

Targets (issue 10): >= 10,000 updates/s to 100 clients at under one core; post -> websocket p99
< 20 ms at that load; lock change -> readonly p99 < 100 ms.

Usage: python benchmarks/bench_pvws.py [--clients 100] [--pvs 100] [--hz 10] [--seconds 5]
       [--changes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
from p4p.client.thread import Context
from p4p.nt import NTURI, NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from pvcoord.demo import devices
from pvcoord.procs import (
    LOOPBACK,
    PYTHON,
    ManagedProcess,
    client_conf,
    exit_on_sigterm,
    free_port,
    loopback_env,
    python_module,
    server_env,
    wait_for_pv,
)
from pvdb import demo
from pvdb.names import (
    COORD_ACQUIRE,
    COORD_LOCK_CHANGES,
    COORD_LOCKS,
    COORD_RELEASE,
    REGISTRY_DEVICE_PVS,
)

REPO = Path(__file__).resolve().parent.parent
P = "BENCH:"
M1 = demo.MOTORS[0]
POLICY = """
[access]
trusted_services = ["root"]
force_release = ["root"]

[lock_types.MANUAL_OPERATOR]
allow = ["*"]
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def load_db(n: int, hz: float) -> str:
    scan = {10: ".1 second", 5: ".2 second", 2: ".5 second", 1: "1 second"}[int(hz)]
    return "".join(
        f'record(calc, "{P}load:{i}") {{ field(SCAN, "{scan}") field(CALC, "A+1")'
        f' field(INPA, "{P}load:{i} NPP") }}\n' for i in range(n))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- load process -------------------------------------------------------------------------------


async def _load(url: str, clients: int, pvs: list[str], seconds: float) -> dict:
    counts = [0] * clients
    counting = asyncio.Event()
    stop = asyncio.Event()
    first = [0] * clients

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(json.dumps({"type": "subscribe", "pvs": pvs}))
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                if counting.is_set():
                    counts[i] += 1
                else:
                    first[i] += 1
                if stop.is_set():
                    break

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(clients)]
        deadline = time.monotonic() + 60
        while min(first) < len(pvs) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # progress poll of the warm-up, not a readiness check
        print(json.dumps({"counting": True}), flush=True)
        counting.set()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)  # the measuring window
        total = sum(counts)
        dt = time.monotonic() - t0
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"received": total, "seconds": dt, "warm": min(first) >= len(pvs)}


def load_main(a: argparse.Namespace) -> int:
    pvs = [f"pva://{P}load:{i}" for i in range(a.pvs_from, a.pvs_from + a.pvs)]
    res = asyncio.run(_load(a.load, a.clients, pvs, a.seconds))
    print(json.dumps(res), flush=True)
    return 0


def run_load(url: str, clients: int, pvs: int, seconds: float, bridge_pid: int,
             env: dict[str, str], processes: int = 2) -> dict:
    """Run ``clients`` load clients in ``processes`` child processes; delivered rate and the
    bridge's CPU (cores) over their common counting window."""
    share = [clients // processes + (1 if i < clients % processes else 0)
             for i in range(processes)]
    children = []
    try:
        for n in share:
            argv = [PYTHON, str(Path(__file__).resolve()), "--load", url, "--clients",
                    str(n), "--pvs", str(pvs), "--seconds", str(seconds)]
            children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env,
                                             cwd=REPO))
        for c in children:
            assert c.stdout is not None
            json.loads(c.stdout.readline())  # warm: counting starts
        c0, t0 = cpu_seconds(bridge_pid), time.monotonic()
        results = [json.loads(c.stdout.readline()) for c in children if c.stdout]
        c1, t1 = cpu_seconds(bridge_pid), time.monotonic()
        for c in children:
            c.wait(timeout=30)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    rate = sum(r["received"] / r["seconds"] for r in results)
    return {"rate": rate, "cores": (c1 - c0) / (t1 - t0),
            "warm": all(r["warm"] for r in results)}


# --- latency ------------------------------------------------------------------------------------


class Ticker:
    """A SharedPV posting time.time() at ``hz``, and a direct p4p monitor measuring the floor.

    ``hz`` stays below 1 / throttle (50 Hz at the default 20 ms), so the websocket figure is the
    bridge's delay, not its coalescing period.
    """

    def __init__(self, env: dict[str, str], hz: float = 10.0) -> None:
        self.period = 1.0 / hz
        self.pv = SharedPV(nt=NTScalar("d"), initial=time.time())
        conf = {k: v for k, v in server_env(env).items() if k.startswith("EPICS_PVA")}
        self.server = Server(providers=[{f"{P}tick": self.pv}], conf=conf, useenv=False)
        self.ctx = Context("pva", conf=client_conf(env), useenv=False)
        self.direct: list[float] = []
        self.measure = False
        self._stop = threading.Event()
        self._sub = self.ctx.monitor(f"{P}tick", self._on)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on(self, v) -> None:
        now = time.time()
        if self.measure:
            self.direct.append(now - float(v))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = time.time()
            self.pv.post(now, timestamp=now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sub.close()
        self.ctx.close()
        self.server.stop()


async def ws_latency(url: str, seconds: float, ticker: Ticker) -> list[float]:
    out: list[float] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "subscribe", "pvs": [f"pva://{P}tick"]}))
        await ws.receive()
        ticker.measure = True
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = await ws.receive(timeout=5)
            now = time.time()
            m = json.loads(msg.data)
            if isinstance(m.get("value"), float):
                out.append(now - m["value"])
        ticker.measure = False
    return out


# --- lock change -> readonly --------------------------------------------------------------------


def login(base: str, user: str, password: str) -> str:
    req = urllib.request.Request(base + "/login", json.dumps(
        {"user": user, "password": password}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        for v in r.headers.get_all("Set-Cookie") or []:
            if v.startswith("pvcoord_session="):
                return v.split(";", 1)[0]
    raise RuntimeError("no session cookie")


async def lock_to_readonly(base: str, cookie: str, env: dict[str, str], changes: int
                           ) -> tuple[list[float], list[float]]:
    sp = f"pva://{demo.motor_setpoint(P, M1)}"
    ws_times: list[float] = []
    direct_times: list[float] = []
    ctx = Context("pva", conf=client_conf(env), useenv=False)
    watch = Context("pva", conf=client_conf(env), useenv=False, nt=False)
    seen = threading.Event()
    want: list[bool] = [False]
    seen_at = [0.0]

    def on_change(v) -> None:
        rows = dict(zip(v["value.device"], v["value.held"], strict=True))
        if not seen.is_set() and rows.get(M1) == want[0]:
            seen_at[0] = time.monotonic()
            seen.set()

    sub = watch.monitor(COORD_LOCK_CHANGES.name(P), on_change)
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(
                base.replace("http", "ws") + "/pvws/pv", headers={"Cookie": cookie}) as ws:
            await ws.send_str(json.dumps({"type": "subscribe", "pvs": [sp]}))
            first = json.loads((await ws.receive(timeout=10)).data)
            assert first.get("readonly") is False, first
            for i in range(2 * changes):
                take = i % 2 == 0
                want[0] = take
                seen.clear()
                spec = COORD_ACQUIRE if take else COORD_RELEASE
                args = {"device": M1, "onBehalfOf": "alice", "clientHost": "bench"}
                if take:
                    args.update(type="MANUAL_OPERATOR", timeout="60")
                uri = NTURI([(k, "s") for k in args]).wrap(spec.name(P), kws=args)
                t0 = time.monotonic()
                call = loop.run_in_executor(None, lambda u=uri, sp_=spec: ctx.rpc(
                    sp_.name(P), u, timeout=10))
                while True:
                    m = json.loads((await ws.receive(timeout=10)).data)
                    if m.get("pv") == sp and m.get("readonly") is take:
                        ws_times.append(time.monotonic() - t0)
                        break
                await call
                if not await loop.run_in_executor(None, seen.wait, 10):
                    raise TimeoutError("Coord:LockChanges did not show the change")
                direct_times.append(seen_at[0] - t0)
    finally:
        sub.close()
        watch.close()
        ctx.close()
    return ws_times, direct_times


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--pvs", type=int, default=100)
    ap.add_argument("--hz", type=float, default=10)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--load", default="", help=argparse.SUPPRESS)
    ap.add_argument("--pvs-from", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    exit_on_sigterm()  # a killed run still stops what it started
    if a.load:
        return load_main(a)

    tmp = Path(tempfile.mkdtemp(prefix="bench-pvws-"))
    env = loopback_env()
    procs: list[ManagedProcess] = []
    ok = False
    try:
        (tmp / "p.toml").write_text(POLICY)
        devices.write_database(P, tmp / "demo.db")
        (tmp / "load.db").write_text(load_db(a.pvs, a.hz))
        devices.write_registry(P, tmp / "registry.yaml")
        pw = tmp / "users"
        passwords = {}
        for user in ("alice", "bob"):
            r = subprocess.run(python_module("bridges.pvws", "passwd", str(pw), user,
                                             "--generate"), capture_output=True, text=True,
                               check=True, cwd=REPO)
            passwords[user] = r.stdout.strip()
        procs.append(ManagedProcess("softioc", python_module(
            "pvxslibs.ioc", "-d", str(tmp / "demo.db"), "-d", str(tmp / "load.db")),
            server_env(env), log_dir=tmp))
        wait_for_pv(f"{P}load:0", env, procs=procs)
        procs.append(ManagedProcess("registry", python_module(
            "iocs.registry", "--prefix", P, "--registry", str(tmp / "registry.yaml")),
            server_env(env), cwd=REPO, log_dir=tmp))
        wait_for_pv(REGISTRY_DEVICE_PVS.name(P), env, procs=procs)
        procs.append(ManagedProcess("coordination", python_module(
            "iocs.coordination", "--prefix", P, "--policy", str(tmp / "p.toml"), "--store",
            f"sqlite:///{tmp}/locks.sqlite", "--registry-prefix", P),
            server_env(env), cwd=REPO, log_dir=tmp))
        wait_for_pv(COORD_LOCKS.name(P), env, procs=procs)
        port = free_port()
        bridge = ManagedProcess("bridge", python_module(
            "bridges.pvws", "--prefix", P, "--port", str(port), "--writes", "--auth",
            "password", "--password-file", str(pw), "--policy", str(tmp / "p.toml"),
            "--log-level", "WARNING"), env, cwd=REPO, log_dir=tmp)
        procs.append(bridge)
        base = f"http://{LOOPBACK}:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/pvws/info", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not bridge.alive():
                    raise RuntimeError(bridge.output()) from None
                time.sleep(0.05)
        ws_url = base.replace("http", "ws") + "/pvws/pv"

        print(f"PVWS bridge benchmark: {a.clients} clients, {a.pvs} PVs at {a.hz:g} Hz, "
              f"{a.seconds:g} s windows, {os.cpu_count()} CPUs")
        levels = [(a.pvs, "all PVs per client"), (max(1, a.pvs // 10), "a tenth per client")]
        results = []
        for npv, label in levels:
            offered = a.clients * npv * a.hz
            r = run_load(ws_url, a.clients, npv, a.seconds, bridge.pid, dict(os.environ))
            results.append((label, npv, offered, r))
            print(f"  load {label:>20}: offered {offered:8.0f}/s  delivered {r['rate']:8.0f}/s "
                  f"({r['rate'] / offered:5.1%})  bridge CPU {r['cores']:.2f} cores")

        ticker = Ticker(env)
        try:
            lat_env = dict(os.environ)
            npv10 = max(1, a.pvs // 10)
            holder: dict = {}

            def bg() -> None:
                holder["r"] = run_load(ws_url, a.clients, npv10, 2 * a.seconds + 2, bridge.pid,
                                       lat_env)

            t = threading.Thread(target=bg)
            t.start()
            time.sleep(1.5)  # let the background load warm up before measuring latency
            ws_lat = asyncio.run(ws_latency(ws_url, 2 * a.seconds, ticker))
            t.join()
            direct = list(ticker.direct)
        finally:
            ticker.close()
        r = holder.get("r", {})
        print(f"  post -> receipt at {r.get('rate', 0):.0f} updates/s load: websocket p50 "
              f"{pct(ws_lat, .5) * 1e3:.2f} ms p99 {pct(ws_lat, .99) * 1e3:.2f} ms "
              f"(n={len(ws_lat)}); direct p4p monitor p50 {pct(direct, .5) * 1e3:.2f} ms p99 "
              f"{pct(direct, .99) * 1e3:.2f} ms (n={len(direct)}); p99 ratio "
              f"{pct(ws_lat, .99) / max(pct(direct, .99), 1e-6):.1f}x")

        cookie = login(base, "bob", passwords["bob"])
        ws_t, direct_t = asyncio.run(lock_to_readonly(base, cookie, env, a.changes))
        print(f"  lock change -> readonly at the web client: p50 {pct(ws_t, .5) * 1e3:.2f} ms "
              f"p99 {pct(ws_t, .99) * 1e3:.2f} ms (n={len(ws_t)}); Coord:LockChanges on a direct "
              f"monitor p50 {pct(direct_t, .5) * 1e3:.2f} ms p99 {pct(direct_t, .99) * 1e3:.2f} "
              f"ms")
        rate_ok = any(r["rate"] >= 10000 and r["cores"] < 1 for *_, r in results)
        print("targets: >= 10,000 updates/s under one core: "
              f"{'met' if rate_ok else 'NOT met'}; "
              f"post -> websocket p99 < 20 ms: {'met' if pct(ws_lat, .99) < 0.02 else 'NOT met'}"
              f"; lock -> readonly p99 < 100 ms: {'met' if pct(ws_t, .99) < 0.1 else 'NOT met'}")
        ok = True
    finally:
        for p in reversed(procs):
            p.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"run directory kept: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
