"""Subscriber process for bench_coordination: N separate PVA client contexts monitor one PV.

Usage: ``python benchmarks/fanout_subscribers.py PV N OUTFILE [--stamp callback|event]
[--switch-interval S] [--cpus LIST]``. Each of the N subscribers is its own p4p ``Context`` (its
own pvxs client thread and TCP connection to the server). Each update's arrival time
(``time.monotonic()``, comparable across processes on Linux) and state index (an NTEnum) or row
count (an NTTable such as ``Coord:Locks``) are appended per subscriber; on SIGTERM the arrivals
are written to OUTFILE as JSON.

``--stamp`` says where the arrival time is taken:

- ``callback`` (default): in the monitor callback of ``p4p.client.thread.Context``, i.e. after
  the update has hopped from the context's pvxs thread through p4p's work queue to one of the
  process's four p4p worker threads (what an application's callback sees);
- ``event``: on the context's own pvxs client thread, in the raw event that tells p4p the
  subscription's queue is no longer empty (``p4p.client.raw.Context``), which then pops the
  update there: no work-queue hop, no worker threads.

``--cpus LIST`` runs the process (all its threads) on those CPUs only. ``--switch-interval S``
sets ``sys.setswitchinterval(S)`` (Python's default 0.005 s): how long a thread that wants the
GIL waits before it asks the holder to drop it.

A subscription whose first update does not come within ``RETRY_AFTER`` s is closed and opened
again in a new context (up to ``RETRIES`` times): p4p's thread client can drop the first update
of a monitor whose event fires before ``Context.monitor`` has returned ("Lost Subscription
update", seen with 500 subscribers on 2 loaded cores); and a few of 500 subscriptions once got
no first update through three reopenings on the same context, so the retry uses a new client.
Prints ``READY: ...`` when every subscription has its first update, else ``FAILED: ...``.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

from p4p.client import raw
from p4p.client.thread import Context

RETRY_AFTER = 5.0
"""s to wait for a subscription's first update before opening it again."""
RETRIES = 3


def _value(v) -> int:
    """State index of an NTEnum, or the number of rows of an NTTable."""
    if "index" in v["value"]:
        return v["value.index"]
    return len(v["value.device"])


class _Subscriber:
    """One PVA client context (its own TCP connection) monitoring ``name``; arrivals in ``out``."""

    def __init__(self, name: str, out: list) -> None:
        self.out, self.sub, self.ctxt = out, None, None
        self.open(name)

    def open(self, name: str) -> None:
        """(Re)open context and monitor."""
        raise NotImplementedError


class EventSubscriber(_Subscriber):
    """One raw p4p context and monitor; stamps and pops each update on the pvxs thread."""

    def open(self, name: str) -> None:
        """(Re)open context and monitor; pop what came before the raw Subscription existed."""
        if self.ctxt is not None:
            self.close()
        self.sub = None
        self.ctxt = raw.Context("pva", useenv=True, nt=False)
        sub = self.ctxt.monitor(name, self.event)
        self.sub = sub
        self.event()  # an event that fired before self.sub was set found nothing to pop

    def event(self) -> None:
        """The subscription's queue became non-empty: stamp, pop everything."""
        t = time.monotonic()
        sub = self.sub
        if sub is None:
            return
        while True:
            v = sub.pop()
            if v is None:
                return
            if not isinstance(v, Exception):
                self.out.append((t, _value(v)))

    def close(self) -> None:
        """Close the monitor and the context."""
        sub, self.sub = self.sub, None
        if sub is not None:
            sub.close()
        self.ctxt.close()


class CallbackSubscriber(_Subscriber):
    """One ``p4p.client.thread.Context`` and monitor; stamps in the monitor callback."""

    def open(self, name: str) -> None:
        """(Re)open context and monitor."""
        if self.ctxt is not None:
            self.close()
        self.ctxt = Context("pva", nt=False)
        self.sub = self.ctxt.monitor(
            name, lambda v: self.out.append((time.monotonic(), _value(v))))

    def close(self) -> None:
        """Close the monitor and the context."""
        self.sub.close()
        self.ctxt.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pv")
    ap.add_argument("n", type=int)
    ap.add_argument("out")
    ap.add_argument("--stamp", choices=["callback", "event"], default="callback")
    ap.add_argument("--switch-interval", type=float, default=None)
    ap.add_argument("--cpus", default=None, help="run on these CPUs only (comma list)")
    a = ap.parse_args()
    if a.cpus:  # before any context exists: every pvxs and p4p thread inherits it
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(a.n)]
    kind = EventSubscriber if a.stamp == "event" else CallbackSubscriber
    subs = [kind(a.pv, arrivals[i]) for i in range(a.n)]
    for attempt in range(RETRIES + 1):
        deadline = time.monotonic() + RETRY_AFTER
        while not all(arrivals) and time.monotonic() < deadline:
            time.sleep(0.01)
        missing = [i for i in range(a.n) if not arrivals[i]]
        if not missing or attempt == RETRIES:
            break
        for i in missing:
            subs[i].open(a.pv)
            print(f"subscriber {i}: no first update in {RETRY_AFTER} s, subscribed again",
                  flush=True)
    missing = sum(1 for x in arrivals if not x)
    print(f"READY: all {a.n} subscribed" if not missing else f"FAILED: {missing} of {a.n} "
          "subscriptions had no first update", flush=True)
    stop.wait()
    for s in subs:
        s.close()
    with open(a.out, "w") as f:
        json.dump(arrivals, f)


if __name__ == "__main__":
    main()
