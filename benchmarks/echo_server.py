"""A bare p4p RPC echo server: the floor pvcoord's RPCs are compared with.

Usage: ``python benchmarks/echo_server.py NAME``; serves RPC ``NAME`` (returns its argument) in a
p4p thread server, like the coordination IOC, until SIGTERM.
"""

import signal
import sys
import threading

from p4p.server import Server
from p4p.server.thread import SharedPV


class Echo:
    """Reply with the request."""

    def rpc(self, pv, op):
        op.done(op.value())


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pv = SharedPV(handler=Echo(), nt=None, initial=None)
    with Server(providers=[{sys.argv[1]: pv}]):
        print("echo ready", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
