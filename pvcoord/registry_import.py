"""Build registry entries from a bluesky profile collection (``pvcoord registry import``).

The startup directory is loaded the way the RE worker loads it, with bluesky-queueserver's own
``profile_ops.load_worker_startup_code`` and ``profile_ops.devices_from_nspace`` (unchanged), in a
child process (``python -m pvcoord.registry_import``) so a profile's side effects (a RunEngine,
event loops, ``sys.path`` changes) stay out of the caller and a hanging profile is stopped after
``timeout`` seconds. Every device the queue server would offer becomes one entry (soft and
simulated devices too: they are locked by name), with its signals:

- signals: ophyd components by attribute path (``m1.readback``; lazy components included), a
  top-level signal as the device's one signal; ophyd-async signals of the device tree. Each with
  its ``kind`` (ophyd ``Kind``; for ophyd-async from the device's ``hints`` / ``describe()`` /
  ``describe_configuration()``), ``access`` (``r``, ``rw``, ``w``, ``x``) and its PVs: ophyd
  ``pvname`` / ``setpoint_pvname``, ophyd-async read and write sources (``ca://X``, ``pva://X``,
  ``mock+ca://X`` -> ``X``). Soft, sim and tango signals have no PV. Other objects (flyers) have
  no signals. The device's PVs are its signals' PVs.
- capabilities: bluesky protocols (``Readable``, ``Movable``, ``Triggerable``, ``Flyable``); an
  ophyd device is triggerable only if its class overrides ``trigger`` (every ophyd device has the
  default no-op ``trigger``).
- ``class``: the device's class (``module.Class``); ``pv_prefix``: an ophyd device's ``prefix``,
  else the longest common ``:``-terminated prefix of its PVs; a prefix shared by two devices is
  dropped from both. A PV claimed by two devices (a component also named at top level) goes to the
  device with more PVs; the other keeps the signal, whose PV is then the larger device's.

Nothing connects: ophyd signals are created without waiting, and by default the ophyd-async
``init_devices()`` context of the profile connects in mock mode (``mock_connect=True``), so the
PVs need not be reachable. A profile that connects explicitly otherwise (``wait_for_connection``)
still does so.

Usage from Python::

    devices = import_registry("~/.ipython/profile_collection/startup")
    save_registry(devices, "registry.yaml")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvcoord.devicewalk import async_signal, ophyd_access
from pvcoord.devicewalk import async_tree as _async_tree
from pvcoord.devicewalk import is_ophyd as _is_ophyd
from pvcoord.devicewalk import is_ophyd_async as _is_ophyd_async
from pvcoord.devicewalk import ophyd_signals as _ophyd_signals
from pvcoord.procs import PYTHON
from pvdb.models import DEVICE_NAME_RE, Capability, Device, DeviceSignal
from pvdb.registry_file import PV_NAME_RE, check_device, check_devices

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
"""Seconds the profile collection may take to load before the import is abandoned."""


class RegistryImportError(RuntimeError):
    """The profile collection could not be loaded or walked; the message says why."""


# --- walking devices (runs in the process that loaded the profile) ----------------------------


def _ophyd_kind(sig: Any) -> str:
    """Ophyd ``Kind`` flag -> ``hinted``, ``normal``, ``config`` or ``omitted``."""
    from ophyd import Kind  # noqa: PLC0415

    kind = getattr(sig, "kind", None)
    if not isinstance(kind, Kind):
        return ""
    if kind & Kind.hinted == Kind.hinted:
        return "hinted"
    if kind & Kind.normal:
        return "normal"
    if kind & Kind.config:
        return "config"
    return "omitted"


def _ophyd_signal(name: str, sig: Any) -> DeviceSignal:
    """One ophyd signal: access from its class (EPICS) or its ``write_access`` (soft/sim)."""
    access, read_pv, write_pv = ophyd_access(sig)
    return DeviceSignal(name=name, kind=_ophyd_kind(sig), access=access, read_pv=read_pv,
                        write_pv=write_pv)


def _ophyd_device_signals(name: str, obj: Any) -> list[DeviceSignal]:
    """Signals of an ophyd device (dotted component names) or of a top-level ophyd signal."""
    from ophyd import Device as OphydDevice  # noqa: PLC0415

    if isinstance(obj, OphydDevice):
        return [_ophyd_signal(path, sig) for path, sig in _ophyd_signals(obj, name)]
    return [_ophyd_signal(name, obj)]


def _async_kinds(
    obj: Any, mock_connect: bool, timeout: float, notes: list[str]
) -> dict[str, str]:
    """Signal name -> kind of an ophyd-async device, from its public bluesky interface.

    ``hints`` names the hinted signals, ``describe()`` the read (``normal``) ones and
    ``describe_configuration()`` the ``config`` ones; every other signal is ``omitted``. The
    describes run in the bluesky event loop and need a connection: with ``mock_connect`` the
    device is first connected in mock mode (a no-op for a device ``init_devices()`` already
    mock-connected). Empty when that fails (the kinds are then not known); ``notes`` gets why.
    """
    from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: PLC0415

    async def describe() -> tuple[dict, dict]:
        if mock_connect:
            await obj.connect(mock=True)
        read = await obj.describe() if hasattr(obj, "describe") else {}
        conf = (
            await obj.describe_configuration() if hasattr(obj, "describe_configuration") else {}
        )
        return read, conf

    try:
        read, conf = call_in_bluesky_event_loop(describe(), timeout=timeout)
        hints = getattr(obj, "hints", None) or {}
    except Exception as e:  # noqa: BLE001 - kinds are optional: say why they are missing
        notes.append(f"{obj.name}: signal kinds not known: describing it failed: "
                     f"{type(e).__name__}: {e}")
        return {}
    kinds = dict.fromkeys(conf, "config")
    kinds.update(dict.fromkeys(read, "normal"))
    kinds.update({key: "hinted" for key in hints.get("fields", ()) if key in kinds})
    return kinds


def _ophyd_async_device_signals(
    name: str, obj: Any, mock_connect: bool, notes: list[str], timeout: float = 10.0
) -> list[DeviceSignal]:
    """Signals of an ophyd-async device tree (or of a top-level ophyd-async signal)."""
    if not obj.name:
        obj.set_name(name)  # the describe keys are signal names; this process is disposable
    kinds = _async_kinds(obj, mock_connect, timeout, notes)
    out = []
    for path, sig in _async_tree(obj, name):
        kind = kinds.get(sig.name, "omitted") if kinds else ""
        out.append(async_signal(path, sig, kind))
    return out


def device_signals(
    name: str, obj: object, mock_connect: bool = True, notes: list[str] | None = None
) -> list[DeviceSignal]:
    """The signals of device ``name`` (an ophyd or ophyd-async device or signal), by name.

    Other objects (flyers, plain Python devices) have none. What could not be found out (the
    kinds of an ophyd-async device that cannot be described) is appended to ``notes``.
    """
    if _is_ophyd(obj):
        sigs = _ophyd_device_signals(name, obj)
    elif _is_ophyd_async(obj):
        sigs = _ophyd_async_device_signals(name, obj, mock_connect,
                                           notes if notes is not None else [])
    else:
        sigs = []
    return sorted(sigs, key=lambda s: s.name)


def signal_pvs(signals: list[DeviceSignal]) -> list[str]:
    """PV names of ``signals`` (read, then write), each once, in order."""
    return list(dict.fromkeys(pv for sig in signals for pv in sig.pvs))


def capabilities(obj: object) -> list[Capability]:
    """Capabilities from the bluesky protocols the object implements."""
    from bluesky.protocols import Flyable, Movable, Readable, Triggerable  # noqa: PLC0415

    caps = []
    if isinstance(obj, Readable):
        caps.append(Capability.READABLE)
    if isinstance(obj, Movable) and not _read_only_ophyd_signal(obj):
        caps.append(Capability.MOVABLE)
    if isinstance(obj, Triggerable) and not _default_ophyd_trigger(obj):
        caps.append(Capability.TRIGGERABLE)
    if isinstance(obj, Flyable):
        caps.append(Capability.FLYABLE)
    return caps


def _read_only_ophyd_signal(obj: object) -> bool:
    """Whether ``obj`` is a read-only ophyd signal (it has ``set``, which always refuses)."""
    if not _is_ophyd(obj):
        return False
    from ophyd.signal import EpicsSignalRO, SignalRO  # noqa: PLC0415

    return isinstance(obj, EpicsSignalRO | SignalRO)


def _default_ophyd_trigger(obj: object) -> bool:
    """Whether ``obj`` is an ophyd object whose ``trigger`` does nothing.

    That is ophyd's base ``trigger`` (signals, ``BlueskyInterface``), or ``Device.trigger`` on a
    device without a component declared with ``trigger_value``.
    """
    if not _is_ophyd(obj):
        return False
    from ophyd import Device as OphydDevice  # noqa: PLC0415
    from ophyd.device import BlueskyInterface, do_not_wait_for_lazy_connection  # noqa: PLC0415
    from ophyd.signal import Signal as OphydSignal  # noqa: PLC0415

    trigger = getattr(type(obj), "trigger", None)
    if trigger in (BlueskyInterface.trigger, OphydSignal.trigger):
        return True
    if trigger is OphydDevice.trigger and isinstance(obj, OphydDevice):
        with do_not_wait_for_lazy_connection(obj):
            return not obj.trigger_signals
    return False


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def class_name(obj: object) -> str:
    """``module.Class`` of ``obj`` (just ``Class`` for classes defined in a startup file)."""
    cls = type(obj)
    if cls.__module__ in ("__main__", "builtins", None):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def common_prefix(pvs: list[str]) -> str:
    """Longest prefix of every PV in ``pvs`` that ends in ``:`` or ``.`` (``""`` if none)."""
    if not pvs:
        return ""
    prefix = os.path.commonprefix(pvs)
    cut = max(prefix.rfind(":"), prefix.rfind("."))
    return prefix[: cut + 1] if cut >= 0 else ""


def pick_prefix(device_prefix: str, pvs: list[str]) -> str:
    """The ``pv_prefix`` of an imported device, or ``""``.

    An ophyd ``prefix`` is used when every PV starts with it (extended by the ``:`` or ``.``
    every PV has next: ``X:m1`` -> ``X:m1.`` for an EpicsMotor), so it cannot claim ``X:m10``.
    Otherwise, for two or more PVs, their common ``:``/``.``-terminated prefix if it has at least
    two segments (``BL01:`` alone would claim a whole endstation). A lone signal gets none.
    """
    if not pvs:
        return ""
    if device_prefix and PV_NAME_RE.match(device_prefix):
        candidates = [device_prefix] if device_prefix[-1] in ":." else [
            device_prefix + sep for sep in ":."]
        for cand in candidates:
            if all(pv.startswith(cand) for pv in pvs):
                return cand
    if len(pvs) < 2:
        return ""
    cand = common_prefix(pvs)
    segments = [s for s in re.split(r"[:.]", cand) if s]
    return cand if len(segments) >= 2 else ""


@dataclass
class Walked:
    """Devices found in a namespace, what was left out (with why), and what is incomplete."""

    devices: list[Device] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def devices_from_objects(
    objects: Mapping[str, object], ioc: str = "", mock_connect: bool = True
) -> Walked:
    """Registry entries for ``name -> device object`` (e.g. ``profile_ops.devices_from_nspace``).

    Rules (module docstring): every device is kept, with its signals (none for objects that are
    neither ophyd nor ophyd-async); its PVs come from the signals; capabilities from the bluesky
    protocols; a PV claimed twice goes to the device with more PVs (the other keeps the signal,
    whose PV then belongs to the larger device); a shared prefix is dropped. Only names that
    cannot be device names are skipped. The result passes
    :func:`pvdb.registry_file.check_devices`.
    """
    out = Walked()
    found: list[tuple[str, object, list[DeviceSignal], list[str], str]] = []
    for name in sorted(objects):
        obj = objects[name]
        if name.startswith("_"):
            continue
        if not DEVICE_NAME_RE.match(name):
            out.skipped.append(f"{name}: not a valid device name")
            continue
        try:
            signals = device_signals(name, obj, mock_connect, out.notes)
        except Exception as e:  # noqa: BLE001 - a broken device must not stop the import
            out.notes.append(f"{name}: kept without signals: walking its signals failed: "
                             f"{type(e).__name__}: {e}")
            signals = []
        pvs = signal_pvs(signals)
        given = getattr(obj, "prefix", "") if _is_ophyd(obj) else ""
        prefix = pick_prefix(given if isinstance(given, str) else "", pvs)
        found.append((name, obj, signals, pvs, prefix))

    # a PV belongs to one device: the one with the most PVs (then the first by name)
    owner: dict[str, str] = {}
    size = {name: len(pvs) for name, _, _, pvs, _ in found}
    for name, _, _, pvs, _ in found:
        for pv in pvs:
            other = owner.get(pv)
            if other is None or size[name] > size[other]:
                owner[pv] = name
    prefix_count: dict[str, int] = {}
    for *_, prefix in found:
        if prefix:
            prefix_count[prefix] = prefix_count.get(prefix, 0) + 1

    for name, obj, signals, pvs, prefix in found:
        mine = [pv for pv in pvs if owner[pv] == name]
        others = sorted({owner[pv] for pv in pvs if owner[pv] != name})
        if prefix_count.get(prefix, 0) > 1 or not mine:
            prefix = ""
        text = f"imported from profile collection: {_count(len(signals), 'signal')}, "
        text += _count(len(mine), "PV")
        if others:
            text += f" (and {_count(len(pvs) - len(mine), 'PV')} of {', '.join(others)})"
        dev = Device.model_validate({  # by its alias: a type checker knows no "device_class"
            "name": name, "class": class_name(obj), "capabilities": capabilities(obj),
            "pv_prefix": prefix, "pvs": mine, "ioc": ioc, "description": text, "signals": signals,
        })
        check_device(dev)
        out.devices.append(dev)
    check_devices(out.devices)
    return out


def load_and_walk(startup_dir: str | Path, ioc: str = "", mock_connect: bool = True) -> Walked:
    """Load the profile collection in THIS process and walk its devices.

    Use :func:`import_registry` instead unless this process is disposable (it runs the profile's
    code here).

    Raises:
        RegistryImportError: the directory cannot be loaded (with the startup file's error).
    """
    from bluesky_queueserver.manager import profile_ops  # noqa: PLC0415 - heavy, optional

    path = Path(startup_dir).expanduser()
    if not path.is_dir():
        raise RegistryImportError(f"startup directory {str(path)!r} does not exist")
    with _mock_init_devices(mock_connect):
        try:
            nspace = profile_ops.load_worker_startup_code(startup_dir=str(path))
        except Exception as e:  # noqa: BLE001 - any startup failure is reported as such
            raise RegistryImportError(
                f"loading profile collection {str(path)!r} failed: {type(e).__name__}: {e}"
            ) from e
    objects = profile_ops.devices_from_nspace(nspace)
    return devices_from_objects(objects, ioc=ioc, mock_connect=mock_connect)


@contextlib.contextmanager
def _mock_init_devices(enabled: bool) -> Iterator[None]:
    """While loading, make ophyd-async's ``init_devices()`` connect in mock mode (no PV I/O)."""
    if not enabled:
        yield
        return
    try:
        import ophyd_async.core as oac  # noqa: PLC0415 - optional dependency
    except ImportError:
        yield
        return
    original = oac.init_devices

    def init_devices_mock(*args: Any, **kwargs: Any):
        kwargs["mock"] = True
        return original(*args, **kwargs)

    oac.init_devices = init_devices_mock
    try:
        yield
    finally:
        oac.init_devices = original


# --- the caller's side ------------------------------------------------------------------------


def import_registry(
    startup_dir: str | Path,
    *,
    ioc: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    mock_connect: bool = True,
    env: Mapping[str, str] | None = None,
) -> list[Device]:
    """Registry entries for every device of the profile collection in ``startup_dir``.

    Args:
        startup_dir: an IPython-style startup directory (``00-*.py`` files) as given to
            ``start-re-manager --startup-dir``.
        ioc: value of every entry's ``ioc`` field (the profile does not say which IOC serves
            a PV).
        timeout: seconds the load may take; the loading process is then killed.
        mock_connect: connect ophyd-async ``init_devices()`` in mock mode (no PV traffic).
        env: environment of the loading process (default: this process's).

    Returns:
        Devices sorted by name, ready for :func:`pvdb.registry_file.save_registry`.

    Raises:
        RegistryImportError: the directory does not exist, a startup file fails, or the load
            takes longer than ``timeout``; the message includes the loader's output.
    """
    path = Path(startup_dir).expanduser().resolve()
    if not path.is_dir():
        raise RegistryImportError(f"startup directory {str(path)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="pvcoord-import-") as tmp:
        out_file = Path(tmp) / "devices.json"
        argv = [PYTHON, "-m", __name__, "--startup-dir", str(path),
                "--output", str(out_file), "--ioc", ioc]
        if not mock_connect:
            argv.append("--connect")
        try:
            proc = subprocess.run(
                argv, env=dict(os.environ if env is None else env), cwd=tmp,
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            output = _text(e.stdout) + _text(e.stderr)
            raise RegistryImportError(
                f"loading {str(path)!r} took longer than {timeout:g} s (does a startup file "
                f"wait for a connection?); output:\n{output[-4000:]}"
            ) from None
        if proc.returncode != 0 or not out_file.exists():
            raise RegistryImportError(
                (proc.stderr.strip().splitlines() or ["import failed"])[-1]
                + f"\n--- loader output ---\n{(proc.stdout + proc.stderr)[-4000:]}"
            )
        data = json.loads(out_file.read_text())
    for line in data.get("skipped", []):
        log.info("skipped %s", line)
    for line in data.get("notes", []):
        log.warning("%s", line)
    return [Device.model_validate(d) for d in data["devices"]]


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")


def _child_main(argv: list[str] | None = None) -> int:
    """Entry of the loading process: load, walk, write JSON to ``--output``."""
    p = argparse.ArgumentParser(prog="python -m pvcoord.registry_import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--startup-dir", required=True)
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--ioc", default="")
    p.add_argument("--connect", action="store_true",
                   help="let init_devices() really connect (default: mock mode)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        walked = load_and_walk(a.startup_dir, ioc=a.ioc, mock_connect=not a.connect)
    except (RegistryImportError, ValueError) as e:
        print(f"registry import failed: {e}", file=sys.stderr)
        return 1
    Path(a.output).write_text(json.dumps({
        "devices": [d.model_dump(mode="json", by_alias=True) for d in walked.devices],
        "skipped": walked.skipped,
        "notes": walked.notes,
    }))
    for line in walked.skipped:
        print(f"skipped {line}", file=sys.stderr)
    for line in walked.notes:
        print(line, file=sys.stderr)
    # the profile may have started threads (RunEngine loop, CA contexts): do not wait for them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_child_main())
