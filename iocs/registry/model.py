"""Pure logic of the registry IOC: table rows, lookup answers, connectivity bookkeeping.

No p4p here: :mod:`iocs.registry.ioc` translates these plain values to and from PVA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pvdb.lockmodel import ErrorCode
from pvdb.models import Device
from pvdb.names import REGISTRY_LOOKUP
from pvdb.registry_file import RegistryIndex

MAX_PV_ARG = 1024
"""Longest PV name the lookup RPC accepts (characters)."""


class RegistryError(Exception):
    """A request the registry refuses; ``str(e)`` is the message for the caller.

    ``code`` is a :class:`pvdb.lockmodel.ErrorCode` (``bad-argument`` unless given).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


LOOKUP_FIELDS: tuple[tuple[str, str], ...] = (
    ("device", "s"),
    ("deviceClass", "s"),
    ("capabilities", "s"),
    ("pvPrefix", "s"),
    ("ioc", "s"),
    ("description", "s"),
    ("connected", "?"),
    ("pvs", "as"),
    ("match", "s"),
)
"""Fields of the ``Registry:Lookup`` reply in order (p4p type codes). ``match`` is ``pv``,
``field`` or ``prefix`` (see :class:`pvdb.registry_file.RegistryIndex`)."""


def capabilities_text(dev: Device) -> str:
    """The ``capabilities`` column: comma list, e.g. ``readable,movable``."""
    return ",".join(c.value for c in dev.capabilities)


def probe_names(dev: Device) -> list[str]:
    """PVs checked for the device's ``connected`` flag: its explicit PVs.

    A device registered by ``pv_prefix`` only has nothing to check and is never connected.
    """
    return list(dev.pvs)


@dataclass
class RegistryState:
    """The registry's devices and their connectivity.

    ``connected[name]`` is True when every explicit PV of the device answered the last check;
    it starts False for every device.
    """

    devices: list[Device]
    index: RegistryIndex = field(init=False)
    connected: dict[str, bool] = field(init=False)

    def __post_init__(self) -> None:
        self.devices = sorted(self.devices, key=lambda d: d.name)
        self.index = RegistryIndex(self.devices)
        self.connected = {d.name: False for d in self.devices}

    # --- connectivity -------------------------------------------------------------------------

    def all_probe_names(self) -> list[str]:
        """Every PV to check, each once, sorted."""
        return sorted({pv for d in self.devices for pv in probe_names(d)})

    def apply_check(self, answered: Mapping[str, bool]) -> set[str]:
        """Record one check (``pv -> answered``); return the names of devices whose flag changed.

        A PV missing from ``answered`` counts as not answering.
        """
        changed: set[str] = set()
        for d in self.devices:
            pvs = probe_names(d)
            ok = bool(pvs) and all(answered.get(pv, False) for pv in pvs)
            if ok != self.connected[d.name]:
                self.connected[d.name] = ok
                changed.add(d.name)
        return changed

    def connected_count(self) -> int:
        """Number of connected devices (``Registry:Connected``)."""
        return sum(self.connected.values())

    # --- tables -------------------------------------------------------------------------------

    def device_rows(self) -> list[tuple[str, str, str, str, str, str, bool]]:
        """Rows of ``Registry:Devices`` in ``pvdb.names.DEVICES_COLUMNS`` order, by name."""
        return [
            (d.name, d.device_class, capabilities_text(d), d.pv_prefix, d.ioc, d.description,
             self.connected[d.name])
            for d in self.devices
        ]

    def pv_rows(self) -> list[tuple[str, str]]:
        """Rows of ``Registry:DevicePVs``: (pv, device) for every explicit PV, by PV name."""
        return self.index.pv_rows()

    def names(self) -> list[str]:
        """Device names, sorted (``Registry:Names``)."""
        return [d.name for d in self.devices]

    def signal_rows(self, name: str) -> list[tuple[str, str, str, str, str]]:
        """Rows of ``Registry:<name>:Signals`` in ``pvdb.names.SIGNALS_COLUMNS`` order, by signal.

        Raises:
            KeyError: ``name`` is not a registered device.
        """
        dev = self.index.by_name[name]
        return [
            (s.name, s.kind, s.access, s.read_pv, s.write_pv)
            for s in sorted(dev.signals, key=lambda s: s.name)
        ]

    # --- lookup -------------------------------------------------------------------------------

    def lookup(self, pv: str) -> dict[str, object]:
        """The ``Registry:Lookup`` reply for ``pv`` (fields of :data:`LOOKUP_FIELDS`).

        Raises:
            RegistryError: no device claims ``pv``.
        """
        m = self.index.lookup(pv)
        if m is None:
            n_pvs = sum(len(d.pvs) for d in self.devices)
            n_prefixes = sum(1 for d in self.devices if d.pv_prefix)
            raise RegistryError(
                f"no registered device has PV {pv!r} (checked {n_pvs} PV names and "
                f"{n_prefixes} prefixes of {len(self.devices)} devices)",
                ErrorCode.UNKNOWN_DEVICE,
            )
        d = m.device
        return {
            "device": d.name,
            "deviceClass": d.device_class,
            "capabilities": capabilities_text(d),
            "pvPrefix": d.pv_prefix,
            "ioc": d.ioc,
            "description": d.description,
            "connected": self.connected[d.name],
            "pvs": list(d.pvs),
            "match": m.how,
        }


def lookup_pv_arg(args: Mapping[str, str]) -> str:
    """The ``pv`` argument of a lookup request, checked.

    Raises:
        RegistryError: missing, empty, too long, or with other arguments.
    """
    allowed: Sequence[str] = REGISTRY_LOOKUP.args
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise RegistryError(
            f"Lookup: unknown argument(s) {', '.join(repr(e[:40]) for e in extra)}; "
            f"accepted: {', '.join(allowed)}"
        )
    pv = args.get("pv")
    if pv is None or not pv.strip():
        raise RegistryError("Lookup: missing argument pv (e.g. pv=BL01:m1:Setpoint)")
    if len(pv) > MAX_PV_ARG:
        raise RegistryError(f"Lookup: pv is {len(pv)} characters; the limit is {MAX_PV_ARG}")
    return pv.strip()

