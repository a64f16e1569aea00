"""Process entry of the coordination IOC: ``python -m iocs.coordination --help``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pvcoord.service import config_argv, run_as_service
from pvcoord.store import StoreError, authority_text, open_store
from pvdb.names import check_prefix
from pvdb.policy import PolicyError, load_policy
from pvdb.redact import redact_url

from ..pvutil import setup_logging
from . import __doc__ as DOC  # noqa: N812 - the module docstring is the help text
from .ioc import (
    NAME_CHECK_TIMEOUT,
    AuthorityClashError,
    PrefixClaim,
    roles_of,
    search_port,
    serve,
)
from .locktable import LockTable

log = logging.getLogger("iocs.coordination")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    argv = config_argv("coordination", argv)  # --config FILE: the endstation file
    p = argparse.ArgumentParser(
        prog="python -m iocs.coordination", description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE",
                   help="endstation TOML file: sets the options below and the EPICS network "
                        "(options given here win); docs/deploy.md")
    p.add_argument("--prefix", required=True, help="endstation prefix P, ending in ':'")
    p.add_argument("--policy", default=None, help="policy TOML file (default: built-in policy)")
    p.add_argument("--store", default=os.environ.get("PVCOORD_STORE") or None,
                   help="sqlite:///PATH[?mode=0600|0640] (default ./pvcoord-<prefix>.sqlite) or "
                        "redis://[:PASSWORD@]HOST:PORT/DB (default: $PVCOORD_STORE; give a "
                        "password only there: a command line is visible in the process list)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--registry-prefix", default=None,
                     help="follow P Registry:Devices under this prefix (default: --prefix)")
    src.add_argument("--devices", default=None,
                     help="static comma list of devices instead of following the registry")
    p.add_argument("--allow-nondurable-store", action="store_true",
                   help="accept a Redis store without appendonly yes / appendfsync always "
                   "(logged as a warning: a granted lock may be lost in a power cut)")
    p.add_argument("--name-check-timeout", type=float, default=NAME_CHECK_TIMEOUT,
                   help="seconds to look for another IOC serving P Coord:* before serving "
                   f"(default {NAME_CHECK_TIMEOUT}; 0 skips the check)")
    p.add_argument("--events-tail", type=int, default=50, help="rows of Coord:Events (1-1000)")
    p.add_argument("--events-keep-days", type=float, default=365.0,
                   help="audit retention: events older than this are removed from the store")
    p.add_argument("--events-keep", type=int, default=1_000_000,
                   help="audit retention: at most this many events are kept in the store")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    a = p.parse_args(argv)
    try:
        check_prefix(a.prefix)
        if a.registry_prefix is not None:
            check_prefix(a.registry_prefix)
    except ValueError as e:
        p.error(str(e))
    if not 1 <= a.events_tail <= 1000:
        p.error("--events-tail must be between 1 and 1000")
    if not a.events_keep_days > 0 or a.events_keep < a.events_tail:
        p.error("--events-keep-days must be positive and --events-keep at least --events-tail")
    return a


def default_store(prefix: str) -> str:
    """The store without ``--store``: ``./pvcoord-<prefix>.sqlite`` in the working directory.

    (As an absolute path: ``sqlite:///pvcoord-P.sqlite`` would name ``/pvcoord-P.sqlite``.)
    """
    return os.path.abspath(f"pvcoord-{prefix.strip(':').replace(':', '_')}.sqlite")


def main(argv: list[str] | None = None) -> int:
    """Run the IOC until SIGTERM/SIGINT; return the exit status."""
    a = parse_args(argv)
    setup_logging(a.log_level)
    try:
        policy = load_policy(a.policy)
    except PolicyError as e:
        print(f"policy rejected: {e}", file=sys.stderr)
        return 2
    if a.store and a.store != os.environ.get("PVCOORD_STORE") and redact_url(a.store) != a.store:
        log.warning("--store names a password on the command line (visible in the process "
                    "list): set $PVCOORD_STORE instead")
    url = a.store or default_store(a.prefix)
    who = authority_text(a.prefix)
    try:
        store = open_store(url, namespace=a.prefix, allow_nondurable=a.allow_nondurable_store)
    except StoreError as e:
        print(f"store: {e}", file=sys.stderr)
        return 2
    try:
        store.claim_authority(who)
    except StoreError as e:
        store.close()
        print(f"refusing to start: {e}", file=sys.stderr)
        return 2
    warning = getattr(store, "durability_warning", None)
    if warning:
        log.warning("%s: accepted because of --allow-nondurable-store; a granted lock may be lost "
                    "in a power cut of the Redis host", warning)
    if getattr(store, "sync", "full") == "normal":
        log.warning("store %s: sync=normal, no fsync before the reply; a granted lock may be lost "
                    "in a power cut of this host", store.url)
    claim = None
    if a.name_check_timeout > 0:
        try:  # this host first: answers even when the first IOC cannot (stopped, busy)
            claim = PrefixClaim(a.prefix, search_port(), who)
        except AuthorityClashError as e:
            store.close()
            print(f"refusing to start: {e}", file=sys.stderr)
            return 2
    devices = None
    if a.devices is not None:
        devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    try:
        table = LockTable(policy, store, devices=devices, roles_of=roles_of)
        for e in table.startup_events:
            log.warning("dropped at start: %s", e.line())
        registry_prefix = None if devices is not None else (a.registry_prefix or a.prefix)
        run_as_service(lambda stop, ready: serve(
            a.prefix, table, stop, registry_prefix=registry_prefix, events_tail=a.events_tail,
            authority=who, name_check=a.name_check_timeout, ready=lambda _ioc: ready.set(),
            retention=(a.events_keep_days * 86400.0, a.events_keep)))
    except AuthorityClashError as e:
        print(f"refusing to start: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"store: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
        if claim is not None:
            claim.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
