"""Demo profile collection, part 2: the plans users may queue.

``count``, ``scan``, ``rel_scan``, ``list_scan`` and ``mv`` come from bluesky; the two demo plans
below use a device that is *not* one of their arguments (a module global), which the queue IOC's
static analysis of an item cannot see: the worker hook catches it and the device still shows as
QueueExecuting.
"""

from collections.abc import Sequence

import bluesky.plan_stubs as bps
from bluesky.plan_stubs import mv  # noqa: F401 - queueable plan
from bluesky.plans import count, list_scan, rel_scan, scan  # noqa: F401 - queueable plans
from bluesky.protocols import Movable, Readable


def scan_with_shutter(
    detectors: Sequence[Readable], motor: Movable, start: float, stop: float, num: int = 5
):
    """Open the shutter (a global), scan ``motor``, close the shutter."""
    yield from bps.mv(shutter, "Open")  # noqa: F821 - defined in 00_devices.py
    try:
        yield from scan(detectors, motor, start, stop, num)
    finally:
        yield from bps.mv(shutter, "Close")  # noqa: F821


def park_m2(position: float = 0.0):
    """Move m2 (a global, not an argument) to ``position``."""
    yield from bps.mv(m2, position)  # noqa: F821 - defined in 00_devices.py


def wait_a_while(delay: float = 1.0):
    """Touch no device: just wait ``delay`` seconds (for queue tests)."""
    yield from bps.sleep(delay)
