"""The one place a pvcoord process's start command is written (tests, demo and benchmarks use it).

Each function returns the argv of ``python -m <process>`` with this interpreter; pass it to
:class:`pvcoord.procs.ManagedProcess` (with :func:`pvcoord.procs.server_env`) or systemd. The
options are the processes' own (see their ``--help``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .procs import PYTHON

COORDINATION = "iocs.coordination"
"""Module of the coordination IOC."""


def coordination_argv(
    prefix: str,
    store: str,
    policy: str | Path | None = None,
    *,
    devices: Iterable[str] | None = None,
    registry_prefix: str | None = None,
    log_level: str | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """Argv of the coordination IOC.

    Args:
        prefix: endstation prefix ``P`` (with its trailing colon).
        store: ``sqlite:///PATH`` or ``redis://HOST:PORT/DB``.
        policy: policy TOML file (``None``: the built-in policy).
        devices: a static device list (instead of following the registry).
        registry_prefix: follow ``Registry:Devices`` under this prefix (exclusive with
            ``devices``).
        log_level: DEBUG, INFO, WARNING or ERROR (``None``: the IOC's default).
        extra: further options, appended as given.

    Raises:
        ValueError: both ``devices`` and ``registry_prefix`` given.
    """
    if devices is not None and registry_prefix is not None:
        raise ValueError("give devices or registry_prefix, not both")
    argv = [PYTHON, "-m", COORDINATION, "--prefix", prefix, "--store", store]
    if policy is not None:
        argv += ["--policy", str(policy)]
    if devices is not None:
        argv += ["--devices", ",".join(devices)]
    if registry_prefix is not None:
        argv += ["--registry-prefix", registry_prefix]
    if log_level is not None:
        argv += ["--log-level", log_level]
    return [*argv, *extra]
