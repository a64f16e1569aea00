"""A fake pair of clocks for simulating a wall-clock step in-process (never the system clock).

``FakeTime`` has the ``time()`` and ``monotonic()`` of the :mod:`time` module: pass its methods
as a ``clock`` / ``monotonic``, or put it in place of a module's ``time`` name with
``monkeypatch.setattr(module, "time", fake)`` (so code that reads ``time.time()`` sees the step).
"""

from __future__ import annotations

import time


class FakeTime:
    """Wall clock and monotonic clock that move only when told (start: the given values, else
    the real ones)."""

    def __init__(self, wall: float | None = None, mono: float | None = None) -> None:
        self.wall = time.time() if wall is None else wall
        self.mono = time.monotonic() if mono is None else mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks move."""
        self.wall += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        """The wall clock is stepped (NTP, an operator's ``date``); the monotonic one is not."""
        self.wall += seconds
