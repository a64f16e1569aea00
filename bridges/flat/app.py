"""Process entry of the CA bridge: ``serve()`` (a coroutine tests can call) and ``main()``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence

from pvcoord.service import config_argv, run_as_service
from pvdb.names import check_prefix
from pvdb.policy import PolicyError, load_policy

from . import __doc__ as HELP  # noqa: N812 - the module docstring is the --help text
from .caput import CA_KEYS
from .server import PUT_TIMEOUT, STALE_AFTER, FlatBridge

_log = logging.getLogger("bridges.flat")


class _OnceBeaconFailure(logging.Filter):
    """Let caproto's 'Failed to send beacon' error through once, without its traceback.

    No repeater listening is normal on a loopback test network; caproto would log it every
    15 s.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Failed to send beacon" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.exc_info = None
        return True


def parse_upstream(items: Sequence[str], option: str = "--upstream") -> dict[str, str] | None:
    """``--upstream`` / ``--service`` ``KEY=VALUE`` items as a p4p client configuration.

    Returns None if none are given.

    Raises:
        ValueError: an item is not ``EPICS_PVA_...=VALUE`` (for ``--upstream`` also one of
            the libca keys ``EPICS_CA_ADDR_LIST``, ``EPICS_CA_AUTO_ADDR_LIST``,
            ``EPICS_CA_SERVER_PORT``, ``EPICS_CA_MAX_ARRAY_BYTES``).
    """
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        ca_ok = option == "--upstream" and key in CA_KEYS
        if not sep or not (key.startswith("EPICS_PVA_") or ca_ok):
            also = f" or one of {', '.join(CA_KEYS)}" if option == "--upstream" else ""
            raise ValueError(f"{option} {item!r}: give EPICS_PVA_<NAME>=VALUE{also}")
        out[key] = value.strip()
    return out


async def serve(
    prefix: str,
    stop: asyncio.Event,
    policy_path: str | None = None,
    registry_prefix: str | None = None,
    upstream: Mapping[str, str] | None = None,
    stale_after: float = STALE_AFTER,
    put_timeout: float = PUT_TIMEOUT,
    service: Mapping[str, str] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the bridge until ``stop`` is set; ``ready`` is set once the CA server listens.

    Raises:
        ValueError: bad prefix. PolicyError: bad policy file.
    """
    check_prefix(prefix)
    if registry_prefix:
        check_prefix(registry_prefix)
    policy = load_policy(policy_path)
    bridge = FlatBridge(prefix, policy, registry_prefix, upstream_conf=upstream,
                        service_conf=service, stale_after=stale_after, put_timeout=put_timeout)
    await bridge.serve(stop, ready)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, wire SIGTERM/SIGINT to a clean stop and run :func:`serve`."""
    parser = argparse.ArgumentParser(
        prog="python -m bridges.flat", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="ENDSTATION.toml",
                        help="endstation file: [ca_bridge] and the shared part set the options "
                        "and the EPICS_* environment (options given here win; docs/deploy.md)")
    parser.add_argument("--prefix", required=True, help="endstation prefix P, e.g. BL01:")
    parser.add_argument("--registry-prefix", help="prefix of the registry IOC (default: P)")
    parser.add_argument("--policy", help="policy TOML (default: the built-in policy)")
    parser.add_argument("--upstream", action="append", default=[], metavar="EPICS_PVA_X=V",
                        help="p4p client setting of the device network (repeatable); "
                        "EPICS_CA_ADDR_LIST etc. of the device network: forwarded puts over CA")
    parser.add_argument("--service", action="append", default=[], metavar="EPICS_PVA_X=V",
                        help="p4p client setting of the network of the coordination and registry "
                        "IOCs (repeatable; default: this process's environment)")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER,
                        help="seconds without Coord:Heartbeat before failing closed")
    parser.add_argument("--put-timeout", type=float, default=PUT_TIMEOUT,
                        help="seconds a forwarded put may take upstream")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(config_argv("flat", argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.Formatter.converter = time.localtime
    if not args.verbose:
        logging.getLogger("caproto").setLevel(logging.WARNING)
    logging.getLogger("caproto.ctx").addFilter(_OnceBeaconFailure())
    # caproto sends beacons to EPICS_CAS_BEACON_PORT (default 5065); the clients' repeater port
    # is EPICS_CA_REPEATER_PORT
    if "EPICS_CA_REPEATER_PORT" in os.environ:
        os.environ.setdefault("EPICS_CAS_BEACON_PORT", os.environ["EPICS_CA_REPEATER_PORT"])
    try:
        check_prefix(args.prefix)
        if args.registry_prefix:
            check_prefix(args.registry_prefix)
        upstream = parse_upstream(args.upstream)
        service = parse_upstream(args.service, "--service")
        load_policy(args.policy)
        if not 0 < args.stale_after <= 60 or not 0 < args.put_timeout <= 86400:
            raise ValueError("--stale-after must be in (0, 60] s, --put-timeout in (0, 86400] s")
    except (ValueError, PolicyError) as e:
        print(f"flat: {e}", file=sys.stderr)
        return 2

    run_as_service(lambda stop, ready: serve(
        args.prefix, stop, args.policy, args.registry_prefix, upstream, args.stale_after,
        args.put_timeout, service, ready), f"CA bridge {args.prefix}")
    _log.info("CA bridge stopped")
    return 0
