"""PV name -> device: the one map used by the registry's Lookup, the guard and the bridges.

A channel name as a client writes it is ``RECORD[.FIELD][$][[slice]][{json filter}]`` (the forms
QSRV2 / pvxs and RSRV accept for one record). :func:`parse_channel` splits it; ``{``, ``}``,
``[``, ``]``, ``-`` and ``.`` inside a record name are ordinary characters, so NSLS-II names
such as ``XF:31ID1-OP:1{CMM:1-Ax:X}Mtr`` keep their braces. Only a trailing JSON filter (it
starts with ``{"`` or is ``{}``), a trailing array slice (``[0]``, ``[1:5]``, ``[::2]``), a
trailing ``$`` and a trailing ``.FIELD`` (upper case) are decorations.

:class:`DeviceMap` then answers, in this order: the channel name itself among the devices'
explicit PVs; its record name among them (``how="field"``); the longest registered ``pvPrefix``
the record name starts with. A PV listed by two devices, or a prefix registered by two, is a
:class:`DeviceMapError` when the map is built (the registry is wrong: refuse to guess).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SLICE_RE = re.compile(r"\[-?\d*(?::-?\d*){0,2}\]$")
_FIELD_RE = re.compile(r"\.([A-Z][A-Z0-9_]*)$")
_JSON_START_RE = re.compile(r"\{(?:\"|\})")


class DeviceMapError(ValueError):
    """The registry gives one PV or prefix to two devices.

    Attributes:
        code: ``pv_claimed_twice`` or ``prefix_claimed_twice``.
        name: the PV or prefix.
        devices: the two devices, in registry order.
    """

    def __init__(self, code: str, name: str, devices: tuple[str, str]) -> None:
        what = "PV" if code == "pv_claimed_twice" else "PV prefix"
        super().__init__(
            f"{code}: {what} {name!r} is claimed by devices {devices[0]!r} and {devices[1]!r}; "
            "a PV belongs to one device")
        self.code, self.name, self.devices = code, name, devices


@dataclass(frozen=True)
class Channel:
    """A channel name split into its record and field.

    Attributes:
        name: the name as given.
        record: the record name (decorations removed).
        field: the field in upper case, ``""`` when none is named (the value field).
    """

    name: str
    record: str
    field: str


def parse_channel(name: str) -> Channel:
    """Split ``name`` into record and field (see the module docstring for the forms).

    ``m1:Setpoint.VAL{"ts":{}}`` -> (``m1:Setpoint``, ``VAL``); ``rec.VAL[0]`` -> (``rec``,
    ``VAL``); ``rec$`` -> (``rec``, ``""``); ``XF:1{Ax:X}Mtr.RBV`` -> (``XF:1{Ax:X}Mtr``, ``RBV``).
    """
    rest, before = name, None
    while rest != before:  # a filter and a slice may follow each other: rec.VAL{...}[0]
        before = rest
        rest = _SLICE_RE.sub("", rest, count=1)
        m = _JSON_START_RE.search(rest)
        if m is not None and rest.endswith("}"):
            rest = rest[: m.start()]
    rest = rest.removesuffix(".")  # rec.{json} / rec.[slice]
    rest = rest.removesuffix("$")
    field = ""
    fm = _FIELD_RE.search(rest)
    if fm is not None and fm.start() > 0:
        field, rest = fm.group(1), rest[: fm.start()]
    return Channel(name, rest or name, field)


@dataclass(frozen=True)
class DeviceMatch:
    """The device a channel belongs to and how it matched.

    Attributes:
        device: registry name of the device.
        how: ``"pv"`` (an explicit PV), ``"field"`` (a field or decorated form of one) or
            ``"prefix"`` (the longest ``pvPrefix``).
        channel: the parsed channel name.
    """

    device: str
    how: str
    channel: Channel


class DeviceMap:
    """PV name -> device, built from explicit PV lists and prefixes (pure, no network).

    Args:
        pvs: ``(pv, device)`` for every explicit PV of every device.
        prefixes: ``(device, pvPrefix)``; empty prefixes are skipped.

    Raises:
        DeviceMapError: a PV or a prefix claimed by two devices.
    """

    def __init__(
        self, pvs: Iterable[tuple[str, str]] = (), prefixes: Iterable[tuple[str, str]] = ()
    ) -> None:
        self._pvs: dict[str, str] = {}
        for pv, device in pvs:
            if not pv or not device:
                continue
            other = self._pvs.setdefault(pv, device)
            if other != device:
                raise DeviceMapError("pv_claimed_twice", pv, (other, device))
        owner: dict[str, str] = {}
        for device, prefix in prefixes:
            if not prefix or not device:
                continue
            other = owner.setdefault(prefix, device)
            if other != device:
                raise DeviceMapError("prefix_claimed_twice", prefix, (other, device))
        self._prefixes = sorted(owner.items(), key=lambda pd: -len(pd[0]))

    def devices(self) -> set[str]:
        """Every device that has an explicit PV or a prefix in this map."""
        return set(self._pvs.values()) | {d for _, d in self._prefixes}

    def restricted(self, devices: Iterable[str]) -> DeviceMap:
        """A map of only ``devices``' PVs and prefixes (what a shrunken registry lost)."""
        keep = set(devices)
        return DeviceMap(
            ((pv, d) for pv, d in self._pvs.items() if d in keep),
            ((d, p) for p, d in self._prefixes if d in keep),
        )

    def without(self, other: DeviceMap) -> DeviceMap:
        """The entries (PVs and prefixes) of this map that ``other`` lacks for the same device."""
        mine = dict(self._prefixes)
        theirs = dict(other._prefixes)
        return DeviceMap(
            ((pv, d) for pv, d in self._pvs.items() if other._pvs.get(pv) != d),
            ((d, p) for p, d in mine.items() if theirs.get(p) != d),
        )

    def merged(self, other: DeviceMap) -> DeviceMap:
        """This map plus ``other``'s entries (``other`` wins for a PV or prefix in both)."""
        pvs = {**self._pvs, **other._pvs}
        prefixes = {**dict(self._prefixes), **dict(other._prefixes)}
        return DeviceMap(pvs.items(), ((d, p) for p, d in prefixes.items()))

    def lookup(self, name: str) -> DeviceMatch | None:
        """The device channel ``name`` belongs to, or None when no device claims it."""
        ch = parse_channel(name)
        dev = self._pvs.get(name)
        if dev is not None:
            return DeviceMatch(dev, "pv", ch)
        dev = self._pvs.get(ch.record)
        if dev is not None:
            return DeviceMatch(dev, "field", ch)
        for prefix, device in self._prefixes:
            if ch.record.startswith(prefix):
                return DeviceMatch(device, "prefix", ch)
        return None

    def device_of(self, name: str) -> str | None:
        """Just the device name of :meth:`lookup` (None when no device claims ``name``)."""
        m = self.lookup(name)
        return m.device if m is not None else None

    def group(self, names: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
        """Channel ``names`` grouped by device, and those no device claims.

        Returns ``({device: [name, ...]}, [unregistered name, ...])``, each name once, in the
        order given (devices in the order of their first name).
        """
        devices: dict[str, list[str]] = {}
        unregistered: list[str] = []
        for name in dict.fromkeys(names):
            device = self.device_of(name)
            if device is None:
                unregistered.append(name)
            else:
                devices.setdefault(device, []).append(name)
        return devices, unregistered

    def pv_rows(self) -> list[tuple[str, str]]:
        """``(pv, device)`` for every explicit PV, sorted by PV name."""
        return sorted(self._pvs.items())

    def __len__(self) -> int:
        return len(self._pvs)
