"""Process entry of the queue IOC: ``python -m iocs.queue --help``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pvcoord.service import config_argv, run_as_service
from pvdb.names import check_prefix
from pvdb.policy import PolicyError, load_policy

from ..pvutil import setup_logging
from . import __doc__ as DOC  # noqa: N812 - the package docstring is the help text
from .ioc import serve


def _loopback_or_host(addr: str) -> str:
    if not addr.startswith("tcp://") or "*" in addr:
        raise argparse.ArgumentTypeError(
            f"{addr!r}: give a tcp://HOST:PORT address of the RE Manager (never '*')"
        )
    return addr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the package docstring)."""
    argv = config_argv("queue", argv)  # --config FILE: the endstation file
    p = argparse.ArgumentParser(
        prog="python -m iocs.queue", description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE",
                   help="endstation TOML file: sets the options below and the EPICS network "
                        "(options given here win); docs/deploy.md")
    p.add_argument("--prefix", required=True, help="endstation prefix P, ending in ':'")
    p.add_argument("--zmq-control", required=True, type=_loopback_or_host,
                   help="RE Manager control address, tcp://HOST:PORT")
    p.add_argument("--zmq-info", required=True, type=_loopback_or_host,
                   help="RE Manager info (publish) address, tcp://HOST:PORT")
    p.add_argument("--policy", default=None, help="policy TOML file (default: built-in policy)")
    p.add_argument("--redis", default=os.environ.get("PVCOORD_REDIS_URL") or None,
                   help="redis://[:PASSWORD@]HOST:PORT/DB where the worker hook sends lock "
                        "requests (default: $PVCOORD_REDIS_URL, which keeps a password out of "
                        "the process list)")
    p.add_argument("--no-locks", action="store_true", help="take no automatic locks")
    p.add_argument("--coord-prefix", default=None,
                   help="prefix of the coordination IOC (default: --prefix)")
    p.add_argument("--registry-prefix", default=None,
                   help="prefix of the registry IOC that tells the worker hook which device a PV "
                        "belongs to (default: --coord-prefix, else --prefix)")
    p.add_argument("--lock-owner", default=None,
                   help="hold the locks on behalf of this user (this account must be a trusted "
                        "service in the coordination policy); default: this process's account")
    p.add_argument("--exec-lease", type=float, default=60.0,
                   help="lease of QUEUE_EXECUTING locks in s (renewed every third)")
    p.add_argument("--queued-lease", type=float, default=600.0,
                   help="lease of QUEUE_QUEUED locks in s")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    a = p.parse_args(argv)
    try:
        check_prefix(a.prefix)
        for given in (a.coord_prefix, a.registry_prefix):
            if given is not None:
                check_prefix(given)
    except ValueError as e:
        p.error(str(e))
    for name in ("exec_lease", "queued_lease"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the IOC until SIGTERM/SIGINT; return the exit status."""
    a = parse_args(argv)
    setup_logging(a.log_level)
    try:
        policy = load_policy(a.policy)
    except PolicyError as e:
        print(f"policy rejected: {e}", file=sys.stderr)
        return 2

    run_as_service(lambda stop, ready: serve(
        a.prefix, a.zmq_control, a.zmq_info, stop, policy=policy, locks=not a.no_locks,
        redis_url=a.redis, coord_prefix=a.coord_prefix, exec_lease=a.exec_lease,
        queued_lease=a.queued_lease, lock_owner=a.lock_owner, registry_prefix=a.registry_prefix,
        ready=lambda _ioc: ready.set(),
    ))
    logging.getLogger("iocs.queue").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
