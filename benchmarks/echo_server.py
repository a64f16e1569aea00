"""A bare p4p RPC echo server: the floor pvcoord's RPCs (and their fan-out) are compared with.

Usage: ``python benchmarks/echo_server.py NAME [STATE FLIP]``; serves RPC ``NAME`` (returns its
argument) in a p4p thread server, like the coordination IOC, until SIGTERM. With ``STATE`` and
``FLIP``: also an NTEnum PV ``STATE`` (choices ``0``/``1``) and an RPC ``FLIP`` that posts the
other index to ``STATE`` and then replies, as the coordination IOC posts ``Coord:<dev>:State``
before it answers a lock change: the floor of the lock change -> subscriber fan-out.
"""

import signal
import sys
import threading

from p4p.nt import NTEnum
from p4p.server import Server
from p4p.server.thread import SharedPV


class Echo:
    """Reply with the request."""

    def rpc(self, pv, op):
        op.done(op.value())


class Flip:
    """Post the other index of ``state`` (an NTEnum SharedPV), then reply with the request."""

    def __init__(self, state: SharedPV) -> None:
        self.state, self.index = state, 0

    def rpc(self, pv, op):
        self.index = 1 - self.index
        self.state.post({"index": self.index})
        op.done(op.value())


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pvs = {sys.argv[1]: SharedPV(handler=Echo(), nt=None, initial=None)}
    if len(sys.argv) > 3:
        state = SharedPV(nt=NTEnum(), initial={"index": 0, "choices": ["0", "1"]})
        pvs[sys.argv[2]] = state
        pvs[sys.argv[3]] = SharedPV(handler=Flip(state), nt=None, initial=None)
    with Server(providers=[pvs]):
        print("echo ready", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
