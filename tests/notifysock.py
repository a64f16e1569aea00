"""A systemd notify socket for tests, drained by a thread as systemd drains it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from pvcoord.procs import ManagedProcess

TIMEOUT = 30.0


class Notify:
    """A notify socket (what systemd listens on) drained by a thread, as systemd drains it.

    A notify socket nobody reads fills up (``net.unix.max_dgram_qlen``) and then blocks the
    sender's event loop, so the messages are read all the time and kept in :attr:`got`.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name=f"notify {path.name}",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.got.append(msg)
                self._cond.notify_all()

    def until(self, want: str, proc: ManagedProcess, timeout: float = TIMEOUT,
              since: int | None = None) -> list[str]:
        """Messages from index ``since`` (default: from now) until one has the line ``want``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            start = len(self.got) if since is None else since
            while True:
                new = self.got[start:]
                for i, m in enumerate(new):
                    if want in m.splitlines():
                        return new[:i + 1]
                left = deadline - time.monotonic()
                if left <= 0 or not proc.alive():
                    break
                self._cond.wait(min(left, 0.5))
        raise AssertionError(f"no {want} in {self.got[start:]}; output:\n{proc.output()}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.sock.close()
