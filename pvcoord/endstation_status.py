"""``pvcoord status``: is every process of the endstation up? One table, read over PVA.

For each process (:data:`pvdb.process.PROCESSES`) it reads the heartbeat, health, version and
start-time PVs in one parallel get. A process is **up** when its heartbeat answers and was posted
less than :data:`pvdb.process.HEARTBEAT_STALE` seconds before the status was asked (by the
heartbeat's own time stamp: a hung process whose PVs still answer counts as down). A process
without status PVs (the bridges, until they serve them) is shown as unknown, not as down.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p4p.client.thread import Context

from pvdb.endstation import EndstationConfig
from pvdb.process import HEARTBEAT_STALE, PROCESSES

DEFAULT_PROCESSES = ("registry", "coordination", "queue", "guard")
"""What ``pvcoord status`` checks without ``--config`` (the endstation file lists its own)."""


@dataclass
class ProcessRow:
    """One row of the status table.

    Attributes:
        name: process name.
        up: True (serving), False (down), None (no status PVs to tell).
        health: the health PV's text, ``-`` when the process has none.
        heartbeat_age: seconds since the heartbeat was last posted (None: no answer).
        version: pvcoord version the process runs (``?`` when not answered).
        uptime: seconds since the process started (None: unknown).
        note: why it is down or unknown.
    """

    name: str
    up: bool | None
    health: str = "-"
    heartbeat_age: float | None = None
    version: str = "?"
    uptime: float | None = None
    note: str = ""


def _stamp(v: Any) -> float:
    return float(v["timeStamp.secondsPastEpoch"]) + float(v["timeStamp.nanoseconds"]) * 1e-9


def client_conf(cfg: EndstationConfig) -> dict[str, str]:
    """The PVA client settings of the endstation's client side."""
    c = cfg.network.client
    return {
        "EPICS_PVA_ADDR_LIST": " ".join(c.search),
        "EPICS_PVA_AUTO_ADDR_LIST": "YES" if c.auto_addr_list else "NO",
        "EPICS_PVA_BROADCAST_PORT": str(c.pva_broadcast_port),
    }


def read_status(
    prefix: str,
    processes: Sequence[str] = DEFAULT_PROCESSES,
    conf: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> list[ProcessRow]:
    """Read the status PVs of ``processes`` under ``prefix``.

    Args:
        prefix: endstation prefix.
        processes: names from :data:`pvdb.process.PROCESSES`.
        conf: p4p client configuration (``None``: the ``EPICS_PVA_*`` environment).
        timeout: seconds to wait for the answers (all PVs are read in parallel).

    Returns:
        One row per process, in the order given.

    Raises:
        ValueError: an unknown process name.
    """
    unknown = [p for p in processes if p not in PROCESSES]
    if unknown:
        raise ValueError(f"unknown process(es) {', '.join(unknown)}: one of "
                         f"{', '.join(PROCESSES)}")
    names: list[str] = []
    for p in processes:
        info = PROCESSES[p]
        for spec in (info.heartbeat, info.health, info.version, info.start_time):
            if spec is not None:
                names.append(spec.name(prefix))
    kws: dict[str, Any] = {"conf": dict(conf), "useenv": False} if conf is not None else {}
    if not names:
        return [ProcessRow(p, None, note="no status PVs (not served by this version)")
                for p in processes]
    asked = time.time()  # ages are from when we asked: a dead process delays the whole get
    with Context("pva", nt=False, **kws) as ctxt:
        values: list[Any] = list(ctxt.get(names, timeout=timeout, throw=False) or [])
    got: dict[str, Any] = dict(zip(names, values, strict=True))
    now = time.time()
    rows = []
    for p in processes:
        info = PROCESSES[p]
        if info.heartbeat is None:
            rows.append(ProcessRow(p, None, note="no status PVs (not served by this version)"))
            continue
        hb = got[info.heartbeat.name(prefix)]
        if isinstance(hb, Exception):
            rows.append(ProcessRow(p, False, note=f"no answer from {info.heartbeat.name(prefix)}"))
            continue
        row = ProcessRow(p, True, heartbeat_age=max(0.0, asked - _stamp(hb)))
        if row.heartbeat_age is not None and row.heartbeat_age > HEARTBEAT_STALE:
            row.up = False
            row.note = f"heartbeat stopped {row.heartbeat_age:.0f} s ago"
        if info.health is not None:
            h = got[info.health.name(prefix)]
            row.health = "?" if isinstance(h, Exception) else str(h["value"])
        if info.version is not None:
            v = got[info.version.name(prefix)]
            row.version = "?" if isinstance(v, Exception) else str(v["value"])
        if info.start_time is not None:
            s = got[info.start_time.name(prefix)]
            if not isinstance(s, Exception):
                row.uptime = max(0.0, now - float(s["value"]))
        rows.append(row)
    return rows


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {(s % 3600) // 60} min"
    return f"{s // 86400} d {(s % 86400) // 3600} h"


def status_rows(rows: Sequence[ProcessRow]) -> list[list[str]]:
    """Table cells: PROCESS, STATE, HEALTH, HEARTBEAT, VERSION, UPTIME, NOTE."""
    out = []
    for r in rows:
        state = "unknown" if r.up is None else ("up" if r.up else "DOWN")
        age = "-" if r.heartbeat_age is None else f"{r.heartbeat_age:.1f} s ago"
        out.append([r.name, state, r.health[:60], age, r.version, _duration(r.uptime), r.note])
    return out


STATUS_HEADERS = ("PROCESS", "STATE", "HEALTH", "HEARTBEAT", "VERSION", "UPTIME", "NOTE")
