"""Build registry entries from a bluesky profile collection (``pvcoord registry import``).

The startup directory is loaded the way the RE worker loads it, with bluesky-queueserver's own
``profile_ops.load_worker_startup_code`` and ``profile_ops.devices_from_nspace`` (unchanged), in a
child process (``python -m pvcoord.registry_import``) so a profile's side effects (a RunEngine,
event loops, ``sys.path`` changes) stay out of the caller and a hanging profile is stopped after
``timeout`` seconds. Every device the queue server would offer becomes one entry:

- PV names: ophyd signals' ``pvname`` / ``setpoint_pvname`` (lazy components included);
  ophyd-async signals' sources (``ca://X``, ``pva://X``, ``mock+ca://X`` -> ``X``, read and write
  PVs). Signals of other kinds (soft, sim, tango) have no PV and are skipped.
- capabilities: bluesky protocols (``Readable``, ``Movable``, ``Triggerable``, ``Flyable``); an
  ophyd device is triggerable only if its class overrides ``trigger`` (every ophyd device has the
  default no-op ``trigger``).
- ``class``: the device's class (``module.Class``); ``pv_prefix``: an ophyd device's ``prefix``,
  else the longest common ``:``-terminated prefix of its PVs; a prefix shared by two devices is
  dropped from both. A PV claimed by two devices (a component also named at top level) goes to the
  device with more PVs.

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

from pvcoord.procs import PYTHON
from pvdb.models import DEVICE_NAME_RE, Capability, Device
from pvdb.registry_file import PV_NAME_RE, check_device, check_devices

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
"""Seconds the profile collection may take to load before the import is abandoned."""

PV_SCHEMES = ("ca://", "pva://")
"""Signal source schemes that name an EPICS PV."""


class RegistryImportError(RuntimeError):
    """The profile collection could not be loaded or walked; the message says why."""


# --- walking devices (runs in the process that loaded the profile) ----------------------------


def pv_from_source(source: str) -> str | None:
    """``ca://X`` / ``pva://X`` / ``mock+ca://X`` -> ``X``; None for sources that are not PVs."""
    src = source.strip()
    src = src.removeprefix("mock+")
    for scheme in PV_SCHEMES:
        if src.startswith(scheme):
            pv = src[len(scheme):]
            return pv if pv and PV_NAME_RE.match(pv) else None
    return None


def _is_ophyd(obj: object) -> bool:
    try:
        from ophyd.ophydobj import OphydObject  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    return isinstance(obj, OphydObject)


def _is_ophyd_async(obj: object) -> bool:
    try:
        from ophyd_async.core import Device as AsyncDevice  # noqa: PLC0415 - optional
    except ImportError:
        return False
    return isinstance(obj, AsyncDevice)


def _ophyd_signals(dev: Any) -> Iterator[Any]:
    """Every signal of an ophyd device, lazy ones included, instantiated without waiting."""
    from ophyd import Device as OphydDevice  # noqa: PLC0415
    from ophyd.device import do_not_wait_for_lazy_connection  # noqa: PLC0415

    with do_not_wait_for_lazy_connection(dev):
        for attr in dev.component_names:
            child = getattr(dev, attr)
            if isinstance(child, OphydDevice):
                yield from _ophyd_signals(child)
            else:
                yield child


def _ophyd_pvs(obj: Any) -> list[str]:
    """PV names of an ophyd signal or device (``pvname`` and ``setpoint_pvname``)."""
    from ophyd import Device as OphydDevice  # noqa: PLC0415

    signals = list(_ophyd_signals(obj)) if isinstance(obj, OphydDevice) else [obj]
    pvs: list[str] = []
    for sig in signals:
        for attr in ("pvname", "setpoint_pvname"):
            pv = getattr(sig, attr, None)
            if isinstance(pv, str) and pv and PV_NAME_RE.match(pv):
                pvs.append(pv)
    return pvs


def _async_signal_sources(sig: Any) -> list[str]:
    """Read and write sources of an ophyd-async signal, without connecting.

    ``Signal.source`` is the read source; ophyd-async has no public accessor for the write
    source, so it is asked from the signal's backend (``SignalBackend.source(name, read=False)``).
    """
    out = [sig.source]
    connector = getattr(sig, "_connector", None)  # no public accessor (see docstring)
    backend = getattr(connector, "backend", None)
    if backend is not None:
        with contextlib.suppress(Exception):
            out.append(backend.source(sig.name, read=False))
    return out


def _ophyd_async_pvs(obj: Any) -> list[str]:
    """PV names of an ophyd-async device tree (every signal's read and write source)."""
    from ophyd_async.core import Signal  # noqa: PLC0415

    pvs: list[str] = []
    stack = [obj]
    seen: set[int] = set()
    while stack:
        dev = stack.pop()
        if id(dev) in seen:
            continue
        seen.add(id(dev))
        if isinstance(dev, Signal):
            for src in _async_signal_sources(dev):
                pv = pv_from_source(src) if isinstance(src, str) else None
                if pv:
                    pvs.append(pv)
            continue
        children = list(dev.children())
        stack.extend(child for _, child in reversed(children))
    return pvs


def device_pvs(obj: object) -> list[str]:
    """PV names of an ophyd or ophyd-async device or signal, each once, in walk order."""
    if _is_ophyd(obj):
        pvs = _ophyd_pvs(obj)
    elif _is_ophyd_async(obj):
        pvs = _ophyd_async_pvs(obj)
    else:
        pvs = []
    return list(dict.fromkeys(pvs))


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
    """Devices found in a namespace, and what was left out (with why)."""

    devices: list[Device] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def devices_from_objects(objects: Mapping[str, object], ioc: str = "") -> Walked:
    """Registry entries for ``name -> device object`` (e.g. ``profile_ops.devices_from_nspace``).

    Rules (module docstring): PVs from the signals, capabilities from the bluesky protocols, a
    PV claimed twice goes to the device with more PVs, a shared prefix is dropped, a device with
    no PV is skipped. The result passes :func:`pvdb.registry_file.check_devices`.
    """
    out = Walked()
    found: list[tuple[str, object, list[str], str]] = []
    for name in sorted(objects):
        obj = objects[name]
        if name.startswith("_"):
            continue
        if not DEVICE_NAME_RE.match(name):
            out.skipped.append(f"{name}: not a valid device name")
            continue
        try:
            pvs = device_pvs(obj)
        except Exception as e:  # noqa: BLE001 - a broken device must not stop the import
            out.skipped.append(f"{name}: walking its signals failed: {type(e).__name__}: {e}")
            continue
        given = getattr(obj, "prefix", "") if _is_ophyd(obj) else ""
        prefix = pick_prefix(given if isinstance(given, str) else "", pvs)
        found.append((name, obj, pvs, prefix))

    # a PV belongs to one device: the one with the most PVs (then the first by name)
    owner: dict[str, str] = {}
    size = {name: len(pvs) for name, _, pvs, _ in found}
    for name, _, pvs, _ in found:
        for pv in pvs:
            other = owner.get(pv)
            if other is None or size[name] > size[other]:
                owner[pv] = name
    prefix_count: dict[str, int] = {}
    for _, _, _, prefix in found:
        if prefix:
            prefix_count[prefix] = prefix_count.get(prefix, 0) + 1

    for name, obj, pvs, prefix in found:
        mine = [pv for pv in pvs if owner[pv] == name]
        given_away = len(pvs) - len(mine)
        if prefix_count.get(prefix, 0) > 1:
            prefix = ""
        if not mine:
            why = "no EPICS PV" if not pvs else "all its PVs belong to a larger device"
            out.skipped.append(f"{name}: {why}")
            continue
        dev = Device(
            name=name, device_class=class_name(obj), capabilities=capabilities(obj),
            pv_prefix=prefix, pvs=mine, ioc=ioc,
            description=f"imported from profile collection: {_count(len(mine), 'PV')}"
            + (f" (and {_count(given_away, 'PV')} of a larger device)" if given_away else ""),
        )
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
    return devices_from_objects(objects, ioc=ioc)


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
    }))
    for line in walked.skipped:
        print(f"skipped {line}", file=sys.stderr)
    # the profile may have started threads (RunEngine loop, CA contexts): do not wait for them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_child_main())
