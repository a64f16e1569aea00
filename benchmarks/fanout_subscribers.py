"""Subscriber process for bench_coordination: N separate PVA client contexts monitor one PV.

Usage: ``python benchmarks/fanout_subscribers.py PV N OUTFILE``. Each update's arrival time
(``time.monotonic()``, comparable across processes on Linux) and state index (an NTEnum) or row
count (an NTTable such as ``Coord:Locks``) are appended per subscriber; on SIGTERM the arrivals
are written to OUTFILE as JSON.

A subscription whose first update does not come within ``RETRY_AFTER`` s is closed and opened
again (up to ``RETRIES`` times): p4p's thread client can drop the first update of a monitor
whose event fires before ``Context.monitor`` has returned ("Lost Subscription update", seen
with 500 subscribers on 2 loaded cores).
"""

import json
import signal
import sys
import threading
import time

from p4p.client.thread import Context

RETRY_AFTER = 5.0
"""s to wait for a subscription's first update before opening it again."""
RETRIES = 3


def _value(v) -> int:
    """State index of an NTEnum, or the number of rows of an NTTable."""
    if "index" in v["value"]:
        return v["value.index"]
    return len(v["value.device"])


def main() -> None:
    name, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    ctxts, subs = [], []

    def subscribe(i: int):
        return ctxts[i].monitor(
            name, lambda v, i=i: arrivals[i].append((time.monotonic(), _value(v))))

    for i in range(n):
        ctxts.append(Context("pva", nt=False))
        subs.append(subscribe(i))
    for attempt in range(RETRIES + 1):
        deadline = time.monotonic() + RETRY_AFTER
        while not all(arrivals) and time.monotonic() < deadline:
            time.sleep(0.01)
        missing = [i for i in range(n) if not arrivals[i]]
        if not missing or attempt == RETRIES:
            break
        for i in missing:
            subs[i].close()
            subs[i] = subscribe(i)
            print(f"subscriber {i}: no first update in {RETRY_AFTER} s, subscribed again",
                  flush=True)
    print("subscribed" if all(arrivals) else "NOT all subscribed", flush=True)
    stop.wait()
    for s in subs:
        s.close()
    for c in ctxts:
        c.close()
    with open(out, "w") as f:
        json.dump(arrivals, f)


if __name__ == "__main__":
    main()
