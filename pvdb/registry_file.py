"""The device registry file (YAML) and the PV-name -> device lookup, as pure functions.

File format (``docs/registry.md``)::

    version: 1                    # optional; 1 is the only version
    devices:
      - name: m1                  # device name (letter first; letters, digits, _ and -)
        class: SimMotor           # device class (free text, e.g. the ophyd class)
        capabilities: [readable, movable]   # subset of readable, movable, triggerable, flyable
        pv_prefix: "DEMO:m1:"     # every PV starting with this belongs to m1 (optional)
        pvs:                      # explicit PV names (optional; at least one of pvs / pv_prefix)
          - DEMO:m1:Setpoint
          - DEMO:m1:Readback
        ioc: demo-softioc         # owning IOC (free text)
        description: simulated motor m1
        signals:                  # optional: the component hierarchy
          - name: m1.readback     # dotted name, starting with the device name
            kind: hinted          # hinted, normal, config, omitted (optional)
            access: r             # r, rw, w, x
            read_pv: DEMO:m1:Readback   # optional: none for soft / simulated signals
          - {name: m1.setpoint, kind: omitted, access: rw,
             read_pv: DEMO:m1:Setpoint, write_pv: DEMO:m1:Setpoint}

Rules: device names are unique; a PV is listed by one device only; two devices may not share a
``pv_prefix``. A device may have no PV at all (a soft or simulated device: it is locked by name).
Signal names are unique in a device and start with its name; a read-only signal has no
``write_pv``, a write-only or executable one no ``read_pv``; every signal PV belongs to a
registered device (listed, or under a prefix). A bad file raises :class:`RegistryFileError`
naming the file, line, device and field; nothing is loaded.

The registry IOC (``iocs.registry``), the CLI (``pvcoord registry ...``) and the guard use this
module; it imports no p4p.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import ValidationError

from .devicemap import DeviceMap, parse_channel
from .devicemap import DeviceMapError as DeviceMapError  # raised by RegistryIndex
from .models import Device, DeviceSignal

FORMAT_VERSION = 1
"""The registry file format version this module reads and writes."""

PV_NAME_RE = re.compile(r"^[A-Za-z0-9_\-:.;<>\[\]{}$]+\Z")
"""Characters allowed in a registered PV name or prefix (EPICS record-name characters)."""

_TOP_KEYS = {"version", "devices"}
_DEVICE_KEYS = "name, class, capabilities, pv_prefix, pvs, ioc, description, signals"
_SIGNAL_KEYS = "name, kind, access, read_pv, write_pv"


ERROR_CODES: dict[str, str] = {
    "unreadable": "the file cannot be read (missing, permissions, not UTF-8)",
    "yaml": "not valid YAML",
    "structure": "not a mapping with a 'devices' list, an unknown top-level key, an entry that "
    "is not a mapping",
    "version": "a format version this pvcoord does not read",
    "field": "a device or signal field is missing, unknown or has a bad value",
    "pv-name": "a PV name or prefix with characters EPICS does not allow",
    "duplicate": "a device name, PV, prefix, capability or signal listed twice",
    "signal": "a signal that does not start with its device's name, or PVs its access rules out",
    "signal-pv": "a signal PV that belongs to no registered device",
}
"""Machine-readable codes of :class:`RegistryFileError` (``code`` attribute) and their meaning."""


class RegistryFileError(ValueError):
    """A registry file that cannot be loaded; the message names file, line, device and field.

    Attributes:
        code: one of :data:`ERROR_CODES`.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _where(source: str, line: int | None) -> str:
    return f"{source} line {line}" if line else source


_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML was built with it (about 10x faster on a 1,000-device file;
the same YAML 1.1 safe schema), else the pure-Python one."""


class _Lines:
    """Line numbers of the device entries, composed from the text only when an error needs one."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._lines: tuple[list[int], list[dict[str, int]]] | None = None

    def _get(self) -> tuple[list[int], list[dict[str, int]]]:
        if self._lines is None:
            self._lines = _entry_lines(self._text)
        return self._lines

    def entry(self, i: int) -> int | None:
        """The line of device entry ``i`` (0-based), or None."""
        entries = self._get()[0]
        return entries[i] if i < len(entries) else None

    def key(self, i: int, key: str) -> int | None:
        """The line of ``key`` in device entry ``i`` (0-based); else the entry's line, or None."""
        keys = self._get()[1]
        return keys[i].get(key, self.entry(i)) if i < len(keys) else self.entry(i)


def _entry_lines(text: str) -> tuple[list[int], list[dict[str, int]]]:
    """Line numbers (1-based) of each device entry and of each of its keys, from the YAML nodes."""
    try:
        root: Any = yaml.compose(  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            text, Loader=_LOADER)
    except yaml.YAMLError:
        return [], []
    entries: list[int] = []
    keys: list[dict[str, int]] = []
    if not isinstance(root, yaml.MappingNode):
        return entries, keys
    for knode, vnode in root.value:
        if getattr(knode, "value", None) == "devices" and isinstance(vnode, yaml.SequenceNode):
            for item in vnode.value:
                entries.append(item.start_mark.line + 1)
                fields: dict[str, int] = {}
                if isinstance(item, yaml.MappingNode):
                    for k, v in item.value:
                        fields[str(k.value)] = v.start_mark.line + 1
                keys.append(fields)
    return entries, keys


def _pydantic_message(err: ValidationError) -> tuple[str, str]:
    """(field, message) of the first error, with pydantic's field aliases."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = loc[0] if loc else ""
    in_signal = field == "signals" and len(loc) > 2
    msg = first.get("msg", str(err)).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field; allowed: {_SIGNAL_KEYS if in_signal else _DEVICE_KEYS}"
    elif first.get("type") == "missing":
        msg = "required field is missing"
    elif first.get("type") == "enum":
        msg = f"{first.get('input')!r} is not one of readable, movable, triggerable, flyable"
    if len(loc) > 1:
        field = f"{field}[{loc[1]}]"
    if in_signal:
        field = f"{field}.{loc[2]}"
    return field, msg


def parse_registry(text: str, source: str = "<registry>") -> list[Device]:
    """Parse registry file text into devices, in file order.

    Args:
        text: YAML text in the format of the module docstring.
        source: name used in error messages (usually the file path).

    Raises:
        RegistryFileError: naming ``source``, the line, the device and the field that is wrong.
    """
    try:
        data = yaml.load(text, Loader=_LOADER)  # a safe loader: SafeLoader or CSafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise RegistryFileError(
            f"{_where(source, line)}: not valid YAML: {problem}", "yaml"
        ) from None
    if not isinstance(data, dict):
        raise RegistryFileError(
            f"{source}: expected a mapping with a 'devices' list at the top level, got "
            f"{type(data).__name__}", "structure"
        )
    top = cast(dict[Any, Any], data)
    extra = sorted({str(k) for k in top} - _TOP_KEYS)
    if extra:
        raise RegistryFileError(
            f"{source}: unknown top-level key(s) {', '.join(extra)}; allowed: version, devices",
            "structure",
        )
    version: Any = top.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise RegistryFileError(
            f"{source}: version {version!r} is not supported (this pvcoord reads "
            f"{FORMAT_VERSION})", "version",
        )
    raw: Any = top.get("devices")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise RegistryFileError(
            f"{source}: 'devices' must be a list of device entries", "structure"
        )
    entries = cast(list[Any], raw)
    lines = _Lines(text)

    devices: list[Device] = []
    unique = _Unique()
    for i, entry in enumerate(entries):
        label = f"device #{i + 1}"
        if not isinstance(entry, dict):
            raise RegistryFileError(
                f"{_where(source, lines.entry(i))}: {label}: expected a mapping of fields, got "
                f"{type(entry).__name__}", "structure"
            )
        fields = cast(dict[Any, Any], entry)
        if isinstance(fields.get("name"), str):
            label = f"device #{i + 1} ({fields['name']!r})"
        try:
            dev = Device.model_validate(_normalise(fields))
        except ValidationError as e:
            field, msg = _pydantic_message(e)
            fline = lines.key(i, field.split("[")[0])
            raise RegistryFileError(
                f"{_where(source, fline)}: {label}: field {field!r}: {msg}", "field"
            ) from None
        try:
            check_device(dev)
            unique.add(i + 1, dev)
        except ValueError as e:
            fline = lines.key(i, getattr(e, "field", ""))
            raise RegistryFileError(
                f"{_where(source, fline)}: {label}: {e}", getattr(e, "code", "field")
            ) from None
        devices.append(dev)
    try:
        check_signal_pvs(devices)
    except _SignalPVError as e:
        fline = lines.key(e.number - 1, "signals")
        raise RegistryFileError(f"{_where(source, fline)}: {e}", "signal-pv") from None
    return devices


def _normalise(entry: dict[Any, Any]) -> dict[str, Any]:
    """Keys as strings; YAML nulls of optional text fields as empty strings."""
    out = {str(k): v for k, v in entry.items()}
    for key in ("class", "pv_prefix", "ioc", "description"):
        if key in out and out[key] is None:
            out[key] = ""
    for key in ("capabilities", "pvs", "signals"):
        if key in out and out[key] is None:
            out[key] = []
    if isinstance(out.get("signals"), list):
        out["signals"] = [_normalise_signal(s) for s in out["signals"]]
    return out


def _normalise_signal(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    out = {str(k): v for k, v in cast(dict[Any, Any], entry).items()}
    for key in ("kind", "read_pv", "write_pv"):
        if key in out and out[key] is None:
            out[key] = ""
    return out


class _FieldError(ValueError):
    def __init__(self, field: str, message: str, code: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field
        self.code = code


def check_device(dev: Device) -> None:
    """Check one device beyond its model: PV names, prefix, duplicates, its signals.

    Raises:
        ValueError: with a ``field`` attribute naming the field that is wrong and a ``code``
            (:data:`ERROR_CODES`).
    """
    if dev.pv_prefix and not PV_NAME_RE.match(dev.pv_prefix):
        raise _FieldError(
            "pv_prefix", f"{dev.pv_prefix!r} contains characters not allowed", "pv-name"
        )
    seen: set[str] = set()
    for pv in dev.pvs:
        if not pv or not PV_NAME_RE.match(pv):  # a str: the model validated it
            raise _FieldError("pvs", f"{pv!r} is not a valid PV name", "pv-name")
        if pv in seen:
            raise _FieldError("pvs", f"{pv!r} is listed twice", "duplicate")
        seen.add(pv)
    if len(set(dev.capabilities)) != len(dev.capabilities):
        raise _FieldError("capabilities", "a capability is listed twice", "duplicate")
    names: set[str] = set()
    for i, sig in enumerate(dev.signals):
        _check_signal(dev.name, i, sig)
        if sig.name in names:
            raise _FieldError("signals", f"signals[{i}]: {sig.name!r} is listed twice",
                              "duplicate")
        names.add(sig.name)


def _check_signal(device: str, i: int, sig: DeviceSignal) -> None:
    where = f"signals[{i}]"
    if sig.name != device and not sig.name.startswith(device + "."):
        raise _FieldError(
            "signals", f"{where}: {sig.name!r} does not start with the device name {device!r} "
            f"(write {device}.COMPONENT, or {device} for a device that is one signal)", "signal"
        )
    for attr in ("read_pv", "write_pv"):
        pv = getattr(sig, attr)
        if pv and not PV_NAME_RE.match(pv):
            raise _FieldError("signals", f"{where}.{attr}: {pv!r} is not a valid PV name",
                              "pv-name")
    if sig.access == "r" and sig.write_pv:
        raise _FieldError(
            "signals", f"{where}: a read-only signal (access r) has no write_pv ({sig.write_pv!r})",
            "signal",
        )
    if sig.access in ("w", "x") and sig.read_pv:
        raise _FieldError(
            "signals", f"{where}: a signal with access {sig.access} is not read, so it has no "
            f"read_pv ({sig.read_pv!r})", "signal"
        )


class _SignalPVError(ValueError):
    def __init__(self, number: int, message: str) -> None:
        super().__init__(message)
        self.number = number


def check_signal_pvs(devices: Sequence[Device]) -> None:
    """Check that every signal PV belongs to a registered device (so the guard can map it).

    A signal's PV may belong to another device (an alias of a larger device's component).

    Raises:
        ValueError: naming the device (``#n`` and name), the signal and the PV.
    """
    index = RegistryIndex(devices)
    for number, dev in enumerate(devices, start=1):
        for i, sig in enumerate(dev.signals):
            for attr in ("read_pv", "write_pv"):
                pv = getattr(sig, attr)
                if pv and index.lookup(pv) is None:
                    raise _SignalPVError(
                        number, f"device #{number} ({dev.name!r}): field 'signals[{i}].{attr}': "
                        f"PV {pv!r} of signal {sig.name!r} belongs to no device; list it in "
                        "'pvs' (or under a 'pv_prefix') of this device or of another one"
                    )


class _Unique:
    """Incremental check that names, PVs and prefixes each belong to one device."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.pv_owner: dict[str, str] = {}
        self.prefix_owner: dict[str, str] = {}

    def add(self, number: int, dev: Device) -> None:
        if dev.name in self.names:
            raise _FieldError(
                "name", f"{dev.name!r} is already used by device #{self.names[dev.name]}",
                "duplicate",
            )
        for pv in dev.pvs:
            if pv in self.pv_owner:
                raise _FieldError(
                    "pvs", f"PV {pv!r} is already listed by device {self.pv_owner[pv]!r}; a PV "
                    "belongs to one device", "duplicate"
                )
        if dev.pv_prefix and dev.pv_prefix in self.prefix_owner:
            raise _FieldError(
                "pv_prefix", f"{dev.pv_prefix!r} is already used by device "
                f"{self.prefix_owner[dev.pv_prefix]!r}", "duplicate"
            )
        self.names[dev.name] = number
        self.pv_owner.update((pv, dev.name) for pv in dev.pvs)
        if dev.pv_prefix:
            self.prefix_owner[dev.pv_prefix] = dev.name


def check_devices(devices: Sequence[Device]) -> None:
    """Check a whole registry: unique names, each PV and each prefix belongs to one device.

    Raises:
        ValueError: naming both devices involved.
    """
    unique = _Unique()
    for i, dev in enumerate(devices):
        try:
            unique.add(i + 1, dev)
        except ValueError as e:
            raise ValueError(f"device #{i + 1} ({dev.name!r}): {e}") from None
    check_signal_pvs(devices)


def load_registry(path: str | Path) -> list[Device]:
    """Read and parse the registry file at ``path``.

    Raises:
        RegistryFileError: if the file cannot be read or is not valid (see :func:`parse_registry`).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryFileError(f"{p}: cannot read registry file: {e}", "unreadable") from None
    return parse_registry(text, source=str(p))


def device_entry(dev: Device) -> dict[str, Any]:
    """One device as a registry-file mapping (field order as in the docs; empty fields left out)."""
    out: dict[str, Any] = {"name": dev.name}
    if dev.device_class:
        out["class"] = dev.device_class
    out["capabilities"] = [c.value for c in dev.capabilities]
    if dev.pv_prefix:
        out["pv_prefix"] = dev.pv_prefix
    if dev.pvs:
        out["pvs"] = list(dev.pvs)
    if dev.ioc:
        out["ioc"] = dev.ioc
    if dev.description:
        out["description"] = dev.description
    if dev.signals:
        out["signals"] = [signal_entry(s) for s in dev.signals]
    return out


def signal_entry(sig: DeviceSignal) -> dict[str, str]:
    """One signal as a registry-file mapping (empty fields left out)."""
    out = {"name": sig.name}
    if sig.kind:
        out["kind"] = sig.kind
    out["access"] = sig.access
    if sig.read_pv:
        out["read_pv"] = sig.read_pv
    if sig.write_pv:
        out["write_pv"] = sig.write_pv
    return out


def dump_registry(devices: Iterable[Device], comment: str = "") -> str:
    """Registry file text for ``devices`` (round-trips through :func:`parse_registry`).

    Raises:
        ValueError: if the devices break a rule of :func:`check_devices` / :func:`check_device`.
    """
    devs = list(devices)
    for dev in devs:
        check_device(dev)
    check_devices(devs)
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    body = yaml.safe_dump(
        {"version": FORMAT_VERSION, "devices": [device_entry(d) for d in devs]},
        sort_keys=False, default_flow_style=False, width=100,
    )
    return head + body


def save_registry(devices: Iterable[Device], path: str | Path, comment: str = "") -> Path:
    """Write :func:`dump_registry` to ``path``; return the path."""
    p = Path(path)
    p.write_text(dump_registry(devices, comment), encoding="utf-8")
    return p


def record_name(pv: str) -> str:
    """``pv`` without a field or channel-filter suffix: ``DEMO:m1:Setpoint.VAL`` -> ``...Setpoint``.

    The rule is :func:`pvdb.devicemap.parse_channel`'s (a trailing ``.FIELD``, ``$``, array slice
    or JSON filter is removed; braces inside a name are kept).
    """
    return parse_channel(pv).record


@dataclass(frozen=True)
class Match:
    """Result of :meth:`RegistryIndex.lookup`: the device and how the PV matched it.

    ``how`` is ``"pv"`` (an explicit PV of the device), ``"field"`` (a field of one),
    or ``"prefix"`` (the longest ``pv_prefix`` that the PV starts with).
    """

    device: Device
    how: str


class RegistryIndex:
    """PV name -> device, for the lookup RPC: a :class:`pvdb.devicemap.DeviceMap` of the devices.

    Order: the exact PV among explicit ``pvs``; then its record name (field, ``$``, array slice
    and JSON filter removed; ``{`` ``}`` ``[`` ``]`` ``-`` ``.`` inside names are ordinary); then
    the longest ``pv_prefix`` the record name starts with.

    Raises:
        DeviceMapError: a PV or prefix claimed by two devices.
    """

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices: list[Device] = list(devices)
        self.by_name: dict[str, Device] = {d.name: d for d in self.devices}
        self._map = DeviceMap(
            ((pv, d.name) for d in self.devices for pv in d.pvs),
            ((d.name, d.pv_prefix) for d in self.devices),
        )
        self._pvs: dict[str, Device] = {pv: d for d in self.devices for pv in d.pvs}

    def lookup(self, pv: str) -> Match | None:
        """The device ``pv`` belongs to, or None if no device claims it."""
        m = self._map.lookup(pv)
        return None if m is None else Match(self.by_name[m.device], m.how)

    def pv_rows(self) -> list[tuple[str, str]]:
        """(pv, device) for every explicit PV, sorted by PV name."""
        return sorted((pv, d.name) for pv, d in self._pvs.items())
