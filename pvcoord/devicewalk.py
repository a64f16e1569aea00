"""The EPICS PVs of an ophyd or ophyd-async object: one walk for the registry import and the hook.

Nothing connects: ophyd lazy components are created without waiting for a connection, and
ophyd-async sources are read from the signals as they are.

- ophyd: every component signal of a device (lazy ones included) or the signal itself;
  ``pvname`` is the read PV, ``setpoint_pvname`` the write PV of a writable EPICS signal
  (``EpicsSignal``; ``EpicsSignalRO`` writes nothing).
- ophyd-async: every signal of the device tree; read source (``Signal.source``) and write source
  (``ca://X``, ``pva://X``, ``mock+ca://X`` -> ``X``); ``SignalR`` writes nothing. Soft, sim
  and tango signals have no PV.

Used by :mod:`pvcoord.registry_import` (registry entries from a profile collection) and
:mod:`pvcoord.worker_hook` (which registered devices a plan message writes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pvdb.models import DeviceSignal
from pvdb.registry_file import PV_NAME_RE

PV_SCHEMES = ("ca://", "pva://")
"""Signal source schemes that name an EPICS PV."""


def pv_from_source(source: str) -> str | None:
    """``ca://X`` / ``pva://X`` / ``mock+ca://X`` -> ``X``; None for sources that are not PVs."""
    src = source.strip()
    src = src.removeprefix("mock+")
    for scheme in PV_SCHEMES:
        if src.startswith(scheme):
            pv = src[len(scheme):]
            return pv if pv and PV_NAME_RE.match(pv) else None
    return None


def is_ophyd(obj: object) -> bool:
    """Whether ``obj`` is an ophyd (synchronous) object; False when ophyd is not installed."""
    try:
        from ophyd.ophydobj import OphydObject
    except ImportError:
        return False
    return isinstance(obj, OphydObject)


def is_ophyd_async(obj: object) -> bool:
    """Whether ``obj`` is an ophyd-async device or signal; False when it is not installed."""
    try:
        from ophyd_async.core import Device as AsyncDevice
    except ImportError:
        return False
    return isinstance(obj, AsyncDevice)


def ophyd_signals(dev: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(dotted name, signal)`` of every signal of an ophyd device, lazy ones included.

    Lazy components are instantiated without waiting for a connection.
    """
    from ophyd import Device as OphydDevice
    from ophyd.device import do_not_wait_for_lazy_connection

    with do_not_wait_for_lazy_connection(dev):
        for attr in dev.component_names:
            child = getattr(dev, attr)
            if isinstance(child, OphydDevice):
                yield from ophyd_signals(child, f"{path}.{attr}")
            else:
                yield f"{path}.{attr}", child


def _pv_attr(sig: Any, attr: str) -> str:
    pv = getattr(sig, attr, None)
    return pv if isinstance(pv, str) and pv and PV_NAME_RE.match(pv) else ""


def ophyd_access(sig: Any) -> tuple[str, str, str]:
    """``(access, read PV, write PV)`` of one ophyd signal (``access`` ``rw`` or ``r``).

    EPICS signals: from their class; soft and sim signals: their ``write_access``.
    """
    from ophyd.signal import EpicsSignalBase, EpicsSignalRO, SignalRO

    if isinstance(sig, EpicsSignalBase):
        writable = not isinstance(sig, EpicsSignalRO) and hasattr(sig, "setpoint_pvname")
    elif isinstance(sig, SignalRO):
        writable = False
    else:
        try:
            writable = bool(sig.write_access)
        except Exception:
            writable = True
    return ("rw" if writable else "r", _pv_attr(sig, "pvname"),
            _pv_attr(sig, "setpoint_pvname") if writable else "")


def async_write_source(sig: Any) -> str:
    """The write source of an ophyd-async signal, without connecting.

    ophyd-async has no public accessor for it, so it is asked from the signal's backend
    (``SignalBackend.source(name, read=False)``); ``Signal.source`` if that fails.
    """
    connector = getattr(sig, "_connector", None)  # no public accessor (see docstring)
    backend = getattr(connector, "backend", None)
    if backend is not None:
        with contextlib.suppress(Exception):
            src = backend.source(sig.name, read=False)
            if isinstance(src, str):
                return src
    return sig.source


def async_access(sig: Any) -> str:
    """``rw``, ``x``, ``w`` or ``r`` of an ophyd-async signal (its class)."""
    from ophyd_async.core import SignalR, SignalRW, SignalW, SignalX

    if isinstance(sig, SignalRW):
        return "rw"
    if isinstance(sig, SignalX):
        return "x"
    if isinstance(sig, SignalW):
        return "w"
    if isinstance(sig, SignalR):
        return "r"
    return "rw"


def async_tree(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(dotted name, signal)`` of every signal in an ophyd-async device tree."""
    from ophyd_async.core import Signal

    stack = [(path, obj)]
    seen: set[int] = set()
    while stack:
        here, dev = stack.pop()
        if id(dev) in seen:
            continue
        seen.add(id(dev))
        if isinstance(dev, Signal):
            yield here, dev
            continue
        children = list(dev.children())
        stack.extend((f"{here}.{child_name}", child) for child_name, child in reversed(children))


def async_signal(path: str, sig: Any, kind: str = "") -> DeviceSignal:
    """One ophyd-async signal as a :class:`~pvdb.models.DeviceSignal` (its PVs, its access)."""
    access = async_access(sig)
    read_pv = pv_from_source(sig.source) if "r" in access else None
    write_pv = pv_from_source(async_write_source(sig)) if access != "r" else None
    return DeviceSignal(name=path, kind=kind, access=access, read_pv=read_pv or "",
                        write_pv=write_pv or "")


def signals_of(obj: object, name: str = "") -> list[DeviceSignal]:
    """Signals of an ophyd or ophyd-async device or signal, with their PVs (kinds not set).

    Args:
        obj: the device or signal.
        name: the dotted name to give the top (default: the object's ``name``).

    Returns:
        One entry per signal (``name``, ``access``, ``read_pv``, ``write_pv``); empty for other
        objects (ophyd.sim-free plain Python devices, flyers).
    """
    name = name or str(getattr(obj, "name", "") or "device")
    if is_ophyd(obj):
        from ophyd import Device as OphydDevice

        sigs = ophyd_signals(obj, name) if isinstance(obj, OphydDevice) else [(name, obj)]
        out = []
        for path, sig in sigs:
            access, read_pv, write_pv = ophyd_access(sig)
            out.append(DeviceSignal(name=path, access=access, read_pv=read_pv,
                                    write_pv=write_pv))
        return out
    if is_ophyd_async(obj):
        return [async_signal(path, sig) for path, sig in async_tree(obj, name)]
    return []


def written_pvs(obj: object) -> tuple[list[str], bool]:
    """The PVs writes to ``obj`` can reach, and whether ``obj`` has any PV at all.

    Returns:
        ``(write PVs of its writable signals, each once in walk order, has_pvs)``; ``has_pvs``
        is False for an object with no EPICS signal at all (simulated and soft devices), which
        the hook then matches by name.
    """
    sigs = signals_of(obj)
    has_pvs = any(s.read_pv or s.write_pv for s in sigs)
    return list(dict.fromkeys(s.write_pv for s in sigs if s.write_pv)), has_pvs
