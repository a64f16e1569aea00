"""Subscriber process for bench_coordination: N separate PVA client contexts monitor one PV.

Usage: ``python benchmarks/fanout_subscribers.py PV N OUTFILE``. Each update's arrival time
(``time.monotonic()``, comparable across processes on Linux) and state index (an NTEnum) or row
count (an NTTable such as ``Coord:Locks``) are appended per subscriber; on SIGTERM the arrivals
are written to OUTFILE as JSON.
"""

import json
import signal
import sys
import threading
import time

from p4p.client.thread import Context


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
    for i in range(n):
        c = Context("pva", nt=False)
        ctxts.append(c)
        subs.append(c.monitor(
            name, lambda v, i=i: arrivals[i].append((time.monotonic(), _value(v)))))
    deadline = time.monotonic() + 120
    while not all(arrivals) and time.monotonic() < deadline:
        time.sleep(0.01)
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
