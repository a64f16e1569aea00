"""Text output of the CLI and the demo: exit codes, times, lease remainders, tables.

Shared by :mod:`pvcoord.cli` and :mod:`pvcoord.demo` (the walkthrough prints what ``pvcoord
status`` prints and checks ``pvcoord``'s exit codes), so the demo never imports the CLI (which
imports the demo for ``pvcoord demo``): no import cycle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .client import LockInfo, RegistryDevice

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_ANSWER = 3


def fmt_time(t: float) -> str:
    """Epoch seconds as local ``YYYY-mm-dd HH:MM:SS`` (``-`` for 0)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def fmt_remaining(seconds: float) -> str:
    """``42 s``, ``5 min 3 s``, ``2 h 10 min`` (seconds rounded down)."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with left-aligned columns separated by two spaces."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [headers, *rows]]
    return "\n".join(lines)


def locks_table(locks: Sequence[LockInfo], now: float | None = None) -> str:
    """The ``status`` table of ``locks``."""
    now = time.time() if now is None else now
    rows = [
        [
            lk.device, lk.lock_type.value, lk.owner, fmt_remaining(lk.remaining(now)),
            fmt_time(lk.expires), lk.reason, lk.plan_uid,
        ]
        for lk in locks
    ]
    return table(["DEVICE", "TYPE", "OWNER", "REMAINING", "EXPIRES", "REASON", "PLAN"], rows)


def registry_table(devices: Sequence[RegistryDevice]) -> str:
    """The ``registry show`` table."""
    rows = [
        [d.name, d.device_class, ",".join(d.capabilities), d.pv_prefix, d.ioc,
         "yes" if d.connected else "no", d.description]
        for d in devices
    ]
    return table(["NAME", "CLASS", "CAPABILITIES", "PV PREFIX", "IOC", "CONNECTED",
                  "DESCRIPTION"], rows)
