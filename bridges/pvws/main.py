"""Process entry of the PVWS bridge: ``serve()`` (a coroutine tests can call), ``main()``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from pvcoord.service import config_argv, run_as_service
from pvdb.names import check_prefix
from pvdb.policy import PolicyError

from . import __doc__ as HELP  # noqa: N812 - the module docstring is the --help text
from .app import make_app
from .auth import PasswordFileError, generate_password, read_password_file, set_password
from .config import BridgeConfig

log = logging.getLogger("bridges.pvws")


async def serve(config: BridgeConfig, stop: asyncio.Event,
                ready: Callable[[int], None] | None = None) -> None:
    """Serve ``config`` until ``stop`` is set.

    Args:
        config: the bridge configuration.
        stop: set it to stop the bridge.
        ready: called with the bound HTTP port once the bridge accepts connections.

    Raises:
        PolicyError: the policy file is unusable. OSError: the port cannot be bound.
    """
    app = make_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = config.port
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            port = server.sockets[0].getsockname()[1]
        log.info("PVWS bridge on http://%s:%d/ (writes %s, auth %s)", config.host, port,
                 "on" if config.writes else "off", config.auth)
        if ready is not None:
            ready(port)
        await stop.wait()
    finally:
        await runner.cleanup()


def _conf(items: Sequence[str], p: argparse.ArgumentParser, family: str = "PVA",
          option: str = "--device-conf") -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.startswith(f"EPICS_{family}_"):
            p.error(f"{option} {it!r}: use EPICS_{family}_NAME=VALUE")
        out[k] = v
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bridges.pvws", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="ENDSTATION.toml",
                   help="endstation file: [web_bridge] and the shared part set the options and "
                        "the EPICS_* environment (options given here win; docs/deploy.md)")
    p.add_argument("--prefix", required=True, help="endstation prefix P, ending in ':'")
    p.add_argument("--registry-prefix", default="", help="registry IOC prefix (default: P)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port)")
    p.add_argument("--throttle-ms", type=float, default=20.0,
                   help="per-PV coalescing period in ms (default 20; the last state is kept)")
    p.add_argument("--default-type", default="pva", choices=("pva", "ca"),
                   help="scheme of names without one (PVWS uses ca)")
    p.add_argument("--writes", action="store_true", help="enable write support")
    p.add_argument("--auth", default="none", choices=("none", "password", "header"),
                   help="how web users are identified (default none: read-only)")
    p.add_argument("--password-file", type=Path, default=None, help="user:argon2-hash lines")
    p.add_argument("--user-header", default="X-Remote-User",
                   help="header with the proxy-authenticated user (--auth header)")
    p.add_argument("--trusted-proxy", action="append", default=[],
                   help="peer address whose --user-header is believed (default 127.0.0.1)")
    p.add_argument("--secure-cookies", action="store_true", help="Secure session cookie (https)")
    p.add_argument("--admin", action="append", default=[],
                   help="web user who may close other sockets (repeatable)")
    p.add_argument("--policy", type=Path, default=None, help="policy TOML (default: built-in)")
    p.add_argument("--device-conf", action="append", default=[],
                   help="EPICS_PVA_NAME=VALUE of the device network for writes (repeatable; "
                        "default: the environment's)")
    p.add_argument("--device-ca-conf", action="append", default=[],
                   help="EPICS_CA_NAME=VALUE of the device network (repeatable): writes to "
                        "ca:// names go over Channel Access there; without it they go over "
                        "PVA under the same record name")
    p.add_argument("--ca-via", default="ca", choices=("ca", "pva"),
                   help="read ca:// names with Channel Access (default) or over PVA")
    p.add_argument("--max-pvs", type=int, default=5000, help="most PVs per socket")
    p.add_argument("--max-channels", type=int, default=20000,
                   help="most distinct channels for all sockets together")
    p.add_argument("--max-sockets", type=int, default=1000, help="most open websockets")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


def passwd_main(argv: Sequence[str]) -> int:
    """``python -m bridges.pvws passwd FILE USER [--generate]``: add or replace a web user."""
    p = argparse.ArgumentParser(prog="python -m bridges.pvws passwd",
                                description="Add or replace a web user in the password file "
                                "(argon2id hash, file mode 0600). The password is read from "
                                "stdin (one line), or generated and printed with --generate.")
    p.add_argument("file", type=Path)
    p.add_argument("user")
    p.add_argument("--generate", action="store_true", help="generate a password and print it")
    a = p.parse_args(list(argv))
    if a.generate:
        password = generate_password()
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        set_password(a.file, a.user, password)
    except (ValueError, PasswordFileError) as e:
        print(f"passwd: {e}", file=sys.stderr)
        return 2
    if a.generate:
        print(password)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bridge until SIGTERM/SIGINT (or the ``passwd`` tool); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["passwd"]:
        return passwd_main(args[1:])
    p = _parser()
    a = p.parse_args(config_argv("pvws", args))
    try:
        check_prefix(a.prefix)
        if a.registry_prefix:
            check_prefix(a.registry_prefix)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if a.password_file is not None:
            read_password_file(a.password_file)
        config = BridgeConfig(
            prefix=a.prefix, registry_prefix=a.registry_prefix, host=a.host, port=a.port,
            throttle=a.throttle_ms / 1000.0, default_scheme=a.default_type, writes=a.writes,
            auth=a.auth, password_file=a.password_file, user_header=a.user_header,
            trusted_proxies=tuple(a.trusted_proxy) or ("127.0.0.1",),
            secure_cookies=a.secure_cookies, admins=tuple(a.admin), policy=a.policy,
            device_conf=_conf(a.device_conf, p), max_pvs=a.max_pvs, ca_via=a.ca_via,
            device_ca_conf=_conf(a.device_ca_conf, p, "CA", "--device-ca-conf"),
            max_channels=a.max_channels, max_sockets=a.max_sockets, status_pvs=True,
        )
    except (ValueError, PasswordFileError) as e:
        print(f"bridges.pvws: {e}", file=sys.stderr)
        return 2

    try:
        run_as_service(lambda stop, serving: serve(config, stop, lambda _port: serving.set()),
                       f"web bridge {a.prefix}")
    except PolicyError as e:
        print(f"policy rejected: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"bridges.pvws: cannot serve on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0
