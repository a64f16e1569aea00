"""Every PV spec of pvcoord, gathered from the pvdb modules, and the generated PV list.

``python -m pvdb`` prints :func:`markdown`, which is committed as ``docs/pvs.md``; a test checks
the file is current. A spec module is listed in :data:`SPEC_MODULES`; every :class:`PVSpec` found
at its top level (alone or inside tuples, lists and dict values) is included once.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

from .names import PVKind, PVSpec

SPEC_MODULES: tuple[tuple[str, str], ...] = (
    ("pvdb.names", "Coordination and registry IOCs"),
    ("pvdb.queue", "Queue IOC"),
    ("pvdb.guard", "Guard gateway"),
    ("pvdb.flat", "CA bridge (flat PVs; CA and PVA)"),
    ("pvdb.process", "Process status (every process: version, start time)"),
    ("pvdb.demo", "Demo beamline softIoc (simulated devices; not pvcoord's own PVs)"),
)


def _specs_in(obj: object) -> Iterator[PVSpec]:
    if isinstance(obj, PVSpec):
        yield obj
    elif isinstance(obj, tuple | list):
        for x in obj:
            if isinstance(x, PVSpec):
                yield x
    elif isinstance(obj, dict):
        for x in obj.values():
            if isinstance(x, PVSpec):
                yield x


def specs(module: str) -> list[PVSpec]:
    """PV specs of one pvdb module, in definition order, without duplicates."""
    mod = importlib.import_module(module)
    seen: dict[tuple[str, str], PVSpec] = {}
    for name, obj in vars(mod).items():
        if name.startswith("_"):
            continue
        for s in _specs_in(obj):
            seen.setdefault((s.server, s.suffix), s)
    return list(seen.values())


def all_specs() -> list[PVSpec]:
    """Every pvcoord PV spec (the demo softIoc's included)."""
    out: list[PVSpec] = []
    for module, _ in SPEC_MODULES:
        out.extend(specs(module))
    return out


def _type(s: PVSpec) -> str:
    t = s.kind.value
    if s.kind == PVKind.NTTABLE and s.columns:
        t += ": " + ", ".join(c for c, _ in s.columns)
    elif s.kind == PVKind.NTENUM and s.choices:
        t += ": " + ", ".join(s.choices)
    elif s.kind == PVKind.RPC and s.args:
        t += ": " + ", ".join(s.args)
    if s.units:
        t += f" [{s.units}]"
    return t


def markdown() -> str:
    """The PV list as Markdown (``docs/pvs.md``)."""
    lines = [
        "# PV list",
        "",
        "Generated from `pvdb/` by `python -m pvdb > docs/pvs.md`; do not edit by hand.",
        "`P` is the endstation prefix with its trailing colon (e.g. `BL01:`); `<device>` is a",
        "registered device name (or `beamline` for the coordination PVs).",
        "",
    ]
    for module, title in SPEC_MODULES:
        lines += [f"## {title}", "", f"From `{module}`.", "",
                  "| PV | type | meaning |", "| --- | --- | --- |"]
        for s in specs(module):
            suffix = s.suffix.replace("{device}", "<device>")
            desc = " ".join(s.description.split()).replace("|", "\\|")
            lines.append(f"| `$(P){suffix}` | {_type(s).replace('|', '/')} | {desc} |")
        lines.append("")
    return "\n".join(lines)
