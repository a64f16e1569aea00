"""The one PV catalogue: every PV spec of every pvcoord process, and the lists made from it.

Every list of PVs is derived from here: ``docs/pvs.md`` (``python -m pvdb`` prints
:func:`markdown`; a test checks the file is current), the PV lists of each process's ``--help``
(:func:`help_text`), the service prefixes the guard never proxies (:func:`service_specs`), and
the screens' checks. A spec module is listed in :data:`SPEC_MODULES`; every :class:`PVSpec`
found at its top level (alone or inside tuples, lists and dict values) is included once. A new
process (a bridge) adds its ``pvdb`` module there; a test checks that no ``pvdb`` module defines
specs outside the catalogue.
"""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Iterable, Iterator
from typing import cast

from .names import PVKind, PVSpec

SPEC_MODULES: tuple[tuple[str, str], ...] = (
    ("pvdb.names", "Coordination and registry IOCs"),
    ("pvdb.queue", "Queue IOC"),
    ("pvdb.guard", "Guard gateway"),
    ("pvdb.flat", "CA bridge (flat PVs; CA and PVA)"),
    ("pvdb.process", "Process status (every process: version, start time)"),
    ("pvdb.demo", "Demo beamline softIoc (simulated devices; not pvcoord's own PVs)"),
)
"""``(module, title)`` of every spec module, in the order of ``docs/pvs.md``."""

NOT_SERVICES: frozenset[str] = frozenset({"pvdb.demo"})
"""Spec modules whose PVs are not pvcoord services (the demo's device IOC): the guard proxies
them like any device PV."""


def _specs_in(obj: object) -> Iterator[PVSpec]:
    if isinstance(obj, PVSpec):
        yield obj
    elif isinstance(obj, tuple | list):
        for x in cast(Iterable[object], obj):
            if isinstance(x, PVSpec):
                yield x
    elif isinstance(obj, dict):
        for x in cast(dict[object, object], obj).values():
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


def service_specs() -> list[PVSpec]:
    """The specs of pvcoord's own services (every IOC and bridge; not the demo's devices)."""
    out: list[PVSpec] = []
    for module, _ in SPEC_MODULES:
        if module not in NOT_SERVICES:
            out.extend(specs(module))
    return out


def family(spec: PVSpec) -> str:
    """The name segment of a spec's family: ``Coord:``, ``Registry:``, ``Queue:``, ``Guard:``."""
    return spec.suffix.split(":", 1)[0] + ":"


def servers() -> list[str]:
    """Names of the processes that serve catalogue PVs (:attr:`PVSpec.server`), sorted."""
    return sorted({s.server for s in all_specs()})


def help_text(server: str, width: int = 100) -> str:
    """The PV list of one process for its ``--help``: ``P <suffix>  <type>  <description>``.

    Args:
        server: the :attr:`PVSpec.server` of the process (``coordination``, ``queue``, ...).
        width: line width of the text.

    Raises:
        KeyError: no spec has this server.
    """
    chosen = [s for s in all_specs() if s.server == server]
    if not chosen:
        raise KeyError(f"no PV in the catalogue is served by {server!r} (known: {servers()})")
    names = [f"P {s.suffix.replace('{device}', '<dev>')}" for s in chosen]
    kinds = [_short_kind(s) for s in chosen]
    w_name = max(len(n) for n in names) + 2
    w_kind = max(len(k) for k in kinds) + 2
    indent = " " * (2 + w_name + w_kind)
    lines = ["PVs (P is --prefix, with its trailing colon; from pvdb, "
             "python -m pvdb lists them all):", ""]
    for n, k, s in zip(names, kinds, chosen, strict=True):
        head = f"  {n:<{w_name}}{k:<{w_kind}}"
        desc = " ".join(s.description.split())
        if s.kind == PVKind.RPC and s.args:
            desc += f" Arguments: {', '.join(s.args)}."
        elif s.kind == PVKind.NTTABLE and s.columns:
            desc += f" Columns: {', '.join(c for c, _ in s.columns)}."
            if s.fields:
                desc += f" Fields: {', '.join(c for c, _ in s.fields)}."
        lines += textwrap.wrap(desc, width=width, initial_indent=head, subsequent_indent=indent,
                               break_on_hyphens=False) or [head.rstrip()]
    return "\n".join(lines) + "\n"


_SHORT_KIND = {
    PVKind.NTTABLE: "NTTable",
    PVKind.NTENUM: "NTEnum",
    PVKind.STRING: "string",
    PVKind.DOUBLE: "double",
    PVKind.INT: "int32",
    PVKind.STRING_ARRAY: "string[]",
    PVKind.DOUBLE_ARRAY: "double[]",
    PVKind.RPC: "RPC",
}


def _short_kind(s: PVSpec) -> str:
    return _SHORT_KIND[s.kind]


def _type(s: PVSpec) -> str:
    t = s.kind.value
    if s.kind == PVKind.NTTABLE and s.columns:
        t += ": " + ", ".join(c for c, _ in s.columns)
        if s.fields:
            t += "; " + ", ".join(c for c, _ in s.fields)
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
