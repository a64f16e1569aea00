"""Process entry of the guard: ``serve()`` (a coroutine tests can call) and ``main()``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence

from pvcoord.service import config_argv, run_as_service
from pvdb.names import check_prefix
from pvdb.policy import PolicyError, load_policy
from pvdb.redact import install_log_redaction

from . import __doc__ as HELP  # noqa: N812 - the module docstring is the --help text
from .config import GuardConfig, GuardConfigError, load_guard_config
from .gateway import Guard

_log = logging.getLogger("bridges.guard")

TICK = 0.05
"""Seconds between staleness checks of the lock state (a stopped heartbeat is noticed within
``stale_after + TICK``; a disconnect is noticed at once)."""
SWEEP = 30.0
"""Seconds between sweeps of closed channels (pvagw's period)."""


async def serve(
    prefix: str,
    config: GuardConfig,
    stop: asyncio.Event,
    policy_path: str | None = None,
    registry_prefix: str | None = None,
    ready: Callable[[Guard], None] | None = None,
) -> None:
    """Run the guard until ``stop`` is set.

    Args:
        prefix: endstation prefix ``P`` (ends in ``:``).
        config: parsed config file.
        stop: set it to stop the guard.
        policy_path: policy TOML (default: ``config.guard.policy``, else the built-in policy).
        registry_prefix: prefix of the registry IOC (default: config, else ``prefix``).
        ready: called with the running :class:`Guard` once it serves.

    Raises:
        ValueError: bad prefix. PolicyError / GuardConfigError: bad policy, ACF or pvlist file.
    """
    check_prefix(prefix)
    if registry_prefix:
        check_prefix(registry_prefix)
    policy = load_policy(policy_path or config.guard.policy)
    exposure = config.coordination_exposure()
    if exposure:
        _log.warning("%s", exposure)
    guard = Guard(prefix, config, policy, registry_prefix)
    try:
        guard.start()
        if ready is not None:
            ready(guard)
        loop = asyncio.get_running_loop()
        next_second = next_sweep = loop.time()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), TICK)
            except TimeoutError:
                pass
            guard.tick()
            now = loop.time()
            if now >= next_second:
                guard.every_second()
                next_second = now + 1.0
            if now >= next_sweep:
                guard.sweep(SWEEP)
                next_sweep = now + SWEEP
    finally:
        guard.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, wire SIGTERM/SIGINT to a clean stop and run :func:`serve`."""
    parser = argparse.ArgumentParser(
        prog="python -m bridges.guard",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prefix", required=True, help="endstation prefix P, e.g. BL01:")
    parser.add_argument("--config", required=True,
                        help="guard config (pvagw JSON + 'guard'), or the endstation TOML file")
    parser.add_argument("--policy", help="policy TOML (overrides guard.policy in the config)")
    parser.add_argument("--registry-prefix", help="prefix of the registry IOC (default: P)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(config_argv("guard", argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.Formatter.converter = time.localtime
    install_log_redaction()
    try:
        check_prefix(args.prefix)
        if args.registry_prefix:
            check_prefix(args.registry_prefix)
        config = load_guard_config(args.config)
        load_policy(args.policy or config.guard.policy)
    except (ValueError, PolicyError, GuardConfigError) as e:
        print(f"guard: {e}", file=sys.stderr)
        return 2

    async def run(stop: asyncio.Event, serving: asyncio.Event) -> None:
        def ready(guard: Guard) -> None:
            _log.info("guard ready: prefix %s, %d server(s)", args.prefix, len(config.servers))
            serving.set()

        await serve(args.prefix, config, stop, args.policy, args.registry_prefix, ready)

    try:
        run_as_service(run, f"guard {args.prefix}")
    except GuardConfigError as e:
        print(f"guard: {e}", file=sys.stderr)
        return 2
    _log.info("guard stopped")
    return 0
