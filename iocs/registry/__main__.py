"""Process entry of the registry IOC: ``python -m iocs.registry --help``."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from pvcoord.service import config_argv, run_as_service
from pvdb.names import check_prefix
from pvdb.registry_file import RegistryFileError, load_registry

from ..pvutil import setup_logging
from . import __doc__ as DOC  # noqa: N812 - the module docstring is the help text
from .ioc import DEFAULT_CHECK_PERIOD, serve

log = logging.getLogger("iocs.registry")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    argv = config_argv("registry", argv)  # --config FILE: the endstation file
    p = argparse.ArgumentParser(
        prog="python -m iocs.registry", description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE",
                   help="endstation TOML file: sets the options below and the EPICS network "
                        "(options given here win); docs/deploy.md")
    p.add_argument("--prefix", required=True, help="endstation prefix P, ending in ':'")
    p.add_argument("--registry", required=True, help="registry file (YAML)")
    p.add_argument("--check-period", type=float, default=DEFAULT_CHECK_PERIOD,
                   help=f"seconds between connectivity checks (default {DEFAULT_CHECK_PERIOD})")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    a = p.parse_args(argv)
    try:
        check_prefix(a.prefix)
    except ValueError as e:
        p.error(str(e))
    if not math.isfinite(a.check_period) or not 0.05 <= a.check_period <= 3600:
        p.error("--check-period must be between 0.05 and 3600 seconds")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the IOC until SIGTERM/SIGINT; return the exit status."""
    a = parse_args(argv)
    setup_logging(a.log_level)
    try:
        devices = load_registry(a.registry)
    except RegistryFileError as e:
        print(f"registry rejected: {e}", file=sys.stderr)
        return 2

    run_as_service(lambda stop, ready: serve(a.prefix, devices, stop, check_period=a.check_period,
                                             ready=lambda _conf: ready.set()))
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
