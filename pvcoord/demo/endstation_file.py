"""The demo's endstation file: the run's prefix, ports and files as ``endstation.toml``.

Written by :func:`pvcoord.demo.beamline.write_files`; the registry and coordination IOCs are
started with ``--config`` on it, and ``pvcoord status --config`` reads it. The queue and guard
sections are included when those parts of the demo exist (they start their processes with their
own options, from the same ports).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from pvcoord.procs import LOOPBACK
from pvdb.endstation import load_endstation, to_toml


def _part(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def endstation_data(ctx: Any) -> dict[str, Any]:
    """The endstation file's content for a :class:`pvcoord.demo.beamline.DemoContext`."""
    store = Path(ctx.files["store"])
    # the queue service account's worker hook reads the store when its folder lets the group in
    mode = "0640" if store.parent.stat().st_mode & 0o040 else "0600"
    data: dict[str, Any] = {
        "prefix": ctx.prefix,
        "name": "demo",
        "network": {
            "client": {
                "interfaces": [LOOPBACK],
                "pva_broadcast_port": ctx.port("pva-broadcast"),
                "ca_server_port": ctx.port("ca-server"),
                "ca_repeater_port": ctx.port("ca-repeater"),
            },
            "device": {
                "interfaces": [LOOPBACK],
                "pva_broadcast_port": ctx.port("guard-upstream"),
            },
        },
        "files": {"policy": str(ctx.files["policy"]), "registry": str(ctx.files["registry"])},
        "store": {"url": f"sqlite:///{store}?mode={mode}"},
        "coordination": {"pva_server_port": ctx.port("coordination")},
        "registry": {"pva_server_port": ctx.port("registry")},
    }
    if _part("pvcoord.demo.queue_part"):
        data["queue_server"] = {
            "zmq_control": f"tcp://{LOOPBACK}:{ctx.port('zmq-control')}",
            "zmq_info": f"tcp://{LOOPBACK}:{ctx.port('zmq-info')}",
            "redis_url": f"redis://{LOOPBACK}:{ctx.port('redis')}/0",
        }
        data["queue"] = {"pva_server_port": ctx.port("queue")}
    if _part("pvcoord.demo.guard_part"):
        data["guard"] = {"pva_server_port": ctx.port("guard")}
    return data


def write_endstation(ctx: Any, path: Path) -> Path:
    """Write the demo's endstation file to ``path`` (checked by loading it back)."""
    path.write_text("# pvcoord demo endstation (written by pvcoord demo)\n"
                    + to_toml(endstation_data(ctx)))
    load_endstation(path, deep=True)
    return path
