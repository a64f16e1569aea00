"""``pvcoord``: device locks, the device registry and the demo beamline from a shell.

Commands (``pvcoord COMMAND --help`` for each)::

    pvcoord lock m1,m2 --type MANUAL_OPERATOR --timeout 600 --reason align
    pvcoord renew m1,m2 --timeout 600
    pvcoord release m1,m2
    pvcoord force-release m1 --reason "left locked overnight"
    pvcoord locks                    # table of the active locks, and the free devices
    pvcoord status [--config FILE]   # is every process of the endstation up? (exit 1 if not)
    pvcoord config check FILE        # validate an endstation file (every error with its line)
    pvcoord watch                    # live lock changes and audit events until Ctrl-C
    pvcoord registry show            # the registered devices
    pvcoord registry show m1         # one device and its signals (Registry:m1:Signals)
    pvcoord registry import --startup-dir ~/profile_collection/startup -o registry.yaml
    pvcoord demo [--walkthrough]     # the demo beamline on loopback

The endstation prefix comes from ``--prefix``, else ``$PVCOORD_PREFIX``, else ``DEMO:``. EPICS
settings come from the usual ``EPICS_PVA_*`` environment variables (``pvcoord demo`` prints them).

Exit codes: 0 done; 1 refused by the IOC (the message says why and who holds the lock); 2 bad
input (nothing was sent); 3 no answer from the IOC within ``--call-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from pvdb.models import DeviceSignal
from pvdb.names import COORD_EVENTS, COORD_LOCKS, check_prefix
from pvdb.redact import looks_like_key

from .client import (
    DEFAULT_CALL_TIMEOUT,
    BadRequestError,
    Client,
    CoordError,
    LockInfo,
    NoAnswerError,
    RefusedError,
    call_rpc,
    get_pv,
    parse_events,
    parse_locks,
    put_pv,
)
from .display import (  # re-exported: the CLI's exit codes and tables
    EXIT_BAD_INPUT,
    EXIT_NO_ANSWER,
    EXIT_OK,
    EXIT_REFUSED,
    fmt_remaining,
    fmt_time,
    locks_table,
    registry_table,
    table,
)

PREFIX_ENV = "PVCOORD_PREFIX"
DEFAULT_PREFIX = "DEMO:"


class UsageError(Exception):
    """Bad command-line input, reported as ``pvcoord: error: ...`` with exit code 2."""


# --- commands ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.prefix, timeout=args.call_timeout, registry_prefix=args.registry_prefix)


def cmd_lock(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord lock``."""
    with _client(args) as c:
        g = c.acquire(
            args.devices, args.type, args.timeout, args.reason, args.plan_uid,
            args.on_behalf_of,
        )
    print(f"granted {','.join(g.devices)} {args.type.upper()} until {fmt_time(g.expires)} "
          f"({fmt_remaining(g.expires - time.time())})", file=out)
    if g.preempted:
        print(f"preempted: {','.join(g.preempted)}", file=out)
    if g.message:
        print(f"server: {g.message}", file=out)
    if args.show_key:
        print(f"key: {g.key}", file=out)
    return EXIT_OK


KEY_ENV = "PVCOORD_KEY"
"""Environment variable holding a lock key (keeps it out of the process list)."""


def _key(args: argparse.Namespace) -> str | None:
    """The key of a release/renew: ``--key -`` (stdin), ``--key-file FILE``, or ``$PVCOORD_KEY``.

    A key on the command line is visible to every account in the process list, so ``--key`` takes
    only ``-``; a key-shaped device argument is refused too (it would be sent as a device name).

    Raises:
        UsageError: a literal key on the command line, an empty stdin or key file, or a key where
            a device belongs; nothing was sent.
    """
    for d in (args.devices or "").split(","):
        if looks_like_key(d.strip()):
            raise UsageError(
                f"{args.command}: the device argument looks like a lock key; it was not sent. "
                f"Give a key on stdin (--key -), in a file (--key-file FILE) or in ${KEY_ENV}")
    if args.key is not None and args.key != "-":
        raise UsageError(
            "--key takes only '-' (read the key from stdin): a key on the command line is "
            f"visible to every account in the process list; or use --key-file FILE or ${KEY_ENV}")
    if args.key == "-":
        key = sys.stdin.readline().strip()
        if not key:
            raise UsageError("--key -: no key on standard input")
        return key
    if args.key_file is not None:
        try:
            key = Path(args.key_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"--key-file {args.key_file}: {e.strerror}") from None
        if not key:
            raise UsageError(f"--key-file {args.key_file}: the file is empty")
        return key
    return os.environ.get(KEY_ENV) or None


def _said(what: str, message: str) -> str:
    """The server's message in parentheses, unless it only repeats ``what``."""
    same = message.replace(" ", "").endswith(what.replace(" ", ""))
    return "" if not message or same else f" ({message})"


def cmd_release(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord release``."""
    key = _key(args)
    if not args.devices and not key:
        raise UsageError(f"release: name the devices, or give --key (or ${KEY_ENV})")
    with _client(args) as c:
        r = c.release(args.devices or None, key, args.on_behalf_of)
    what = ",".join(r.devices) or args.devices or "the lock of that key"
    print(f"released {what}" + _said(what, r.message), file=out)
    return EXIT_OK


def cmd_renew(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord renew``."""
    key = _key(args)
    if not args.devices and not key:
        raise UsageError(f"renew: name the devices, or give --key (or ${KEY_ENV})")
    with _client(args) as c:
        r = c.renew(args.devices or None, key, args.timeout, args.on_behalf_of)
    what = ",".join(r.devices) or args.devices or "the lock of that key"
    until = f" until {fmt_time(r.expires)}" if r.expires else ""
    print(f"renewed {what}{until}" + _said(what, r.message), file=out)
    return EXIT_OK


def cmd_force_release(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord force-release``."""
    with _client(args) as c:
        r = c.force_release(args.devices, args.reason)
    what = ",".join(r.devices) or args.devices
    print(f"force-released {what}" + (f" ({r.message})" if r.message else ""), file=out)
    return EXIT_OK


def cmd_put(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord put PV VALUE``: a plain PVA put (through the guard, when it fronts the IOC)."""
    put_pv(args.pv, args.value, timeout=args.call_timeout)
    print(f"{args.pv} = {args.value}", file=out)
    return EXIT_OK


def cmd_call(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord call PV key=value ...``: like EPICS ``pvcall``, every argument a string."""
    kws: dict[str, str] = {}
    for a in args.args:
        k, sep, v = a.partition("=")
        if not sep or not k:
            raise UsageError(f"call: arguments are key=value, not {a!r}")
        kws[k] = v
    reply = call_rpc(args.pv, kws, timeout=args.call_timeout)
    for k, v in reply.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, list | dict) else v}", file=out)
    return EXIT_OK


def cmd_get(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord get PV``."""
    v = get_pv(args.pv, timeout=args.call_timeout)
    print(f"{args.pv} {_plain(v)}", file=out)
    return EXIT_OK


def _plain(v: Any) -> Any:
    """A p4p-unwrapped value without its time stamp decoration (enum -> its label)."""
    if hasattr(v, "choice"):
        return v.choice
    if isinstance(v, str):
        return str.__str__(v)  # a plain str, not p4p's str subclass with a time stamp
    for t in (bool, int, float):
        if isinstance(v, t):
            return t(v)
    return v


def cmd_locks(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord locks`` (``pvcoord status`` before the endstation status took that name)."""
    with _client(args) as c:
        locks = c.locks()
        try:
            devices = c.devices()
        except CoordError:
            devices = []
        events = c.events() if args.events else []
    if args.json:
        json.dump([lk.model_dump(mode="json") for lk in locks], out, indent=2)
        print(file=out)
        return EXIT_OK
    if locks:
        print(locks_table(locks), file=out)
    else:
        print(f"no active locks on {args.prefix}", file=out)
    held = {lk.device for lk in locks}
    if "beamline" in held:
        print("the whole beamline is locked", file=out)
    else:
        free = [d for d in devices if d not in held and d != "beamline"]
        if devices:
            print(f"free: {', '.join(free) if free else '(none)'}", file=out)
    if events:
        print(f"\nlast {min(args.events, len(events))} events:", file=out)
        for e in events[-args.events:]:
            print(f"  {fmt_time(e.time)}  {e.line()}", file=out)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord status``: one row per process of the endstation; exit 1 when one is down."""
    from pvdb.endstation import EndstationError, load_endstation

    from . import endstation_status as es  # p4p client: only for this command

    conf, processes, prefix = None, list(es.DEFAULT_PROCESSES), args.prefix
    if args.config:
        try:
            cfg = load_endstation(args.config)
        except EndstationError as e:
            raise UsageError(f"endstation file rejected:\n{e}") from None
        conf, processes, prefix = es.client_conf(cfg), cfg.processes(), cfg.prefix
    rows = es.read_status(prefix, processes, conf, timeout=args.call_timeout)
    if args.json:
        json.dump([vars(r) for r in rows], out, indent=2)
        print(file=out)
    else:
        print(table(es.STATUS_HEADERS, es.status_rows(rows)), file=out)
    down = [r.name for r in rows if r.up is False]
    if down and not args.json:
        print(f"down: {', '.join(down)}", file=out)
    return EXIT_REFUSED if down else EXIT_OK


def cmd_config_check(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord config check FILE``: every error with its line and code; exit 2 if any."""
    from pvdb.endstation import EndstationError, load_endstation

    try:
        cfg = load_endstation(args.file, deep=True)
    except EndstationError as e:
        print(str(e), file=out)
        print(f"{len(e.issues)} error(s) in {args.file}", file=out)
        return EXIT_BAD_INPUT
    print(f"{args.file}: OK: endstation {cfg.instance} (prefix {cfg.prefix}), processes "
          f"{', '.join(cfg.processes())}", file=out)
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord config show FILE``: what installing it involves, as JSON (for the Ansible role)."""
    from pvdb.endstation import EndstationError, install_facts

    try:
        facts = install_facts(args.file)
    except EndstationError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    json.dump(facts, out, indent=2)
    print(file=out)
    return EXIT_OK


def _lock_summary(locks: Sequence[LockInfo]) -> str:
    if not locks:
        return "locks: (none)"
    return "locks: " + ", ".join(f"{lk.device}={lk.lock_type.value}({lk.owner})" for lk in locks)


def cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord watch``: print lock-set changes and new audit events until Ctrl-C.

    ``--duration S`` / ``--events N`` end it earlier (for scripts).
    """
    updates: queue.Queue[tuple[str, Any]] = queue.Queue()
    deadline = time.monotonic() + args.duration if args.duration else None
    seen_events = 0
    last_event_time = 0.0
    last_locks: str | None = None
    printed = 0
    connected: set[str] = set()
    with _client(args) as c:
        subs = [
            c.monitor(COORD_LOCKS, lambda v: updates.put(("locks", v))),
            c.monitor(COORD_EVENTS, lambda v: updates.put(("events", v))),
        ]
        # "watching" once both monitors have their first value (up to --call-timeout): the
        # first Coord:Events value is the backlog, shown only with --history, so an event that
        # happens after the line is printed is never taken for backlog
        early: list[tuple[str, Any]] = []
        first: set[str] = set()
        connect_end = time.monotonic() + args.call_timeout
        if deadline is not None:
            connect_end = min(connect_end, deadline)
        while first != {"locks", "events"} and (left := connect_end - time.monotonic()) > 0:
            try:
                early.append(updates.get(timeout=left))
            except queue.Empty:
                break
            if not isinstance(early[-1][1], Exception):
                first.add(early[-1][0])
        missing = [c.pv(pv) for kind, pv in (("locks", COORD_LOCKS), ("events", COORD_EVENTS))
                   if kind not in first]
        note = f" (no answer yet from {' and '.join(missing)})" if missing else ""
        print(f"watching {c.pv(COORD_LOCKS)} and {c.pv(COORD_EVENTS)}{note} (Ctrl-C to stop)",
              file=out, flush=True)
        try:
            while True:
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    break
                try:
                    kind, value = early.pop(0) if early else updates.get(timeout=wait)
                except queue.Empty:
                    continue
                if isinstance(value, Exception):
                    # p4p reports "Disconnected" once before the first connection: say nothing
                    # until we had data, then tell each loss of the coordination IOC
                    if kind in connected:
                        connected.discard(kind)
                        print(f"{time.strftime('%H:%M:%S')} {kind}: lost the coordination IOC "
                              f"({type(value).__name__}); waiting for it", file=out, flush=True)
                        if kind == "locks":
                            last_locks = None
                    continue
                connected.add(kind)
                if kind == "locks":
                    summary = _lock_summary(parse_locks(value))
                    if summary != last_locks:
                        print(f"{time.strftime('%H:%M:%S')} {summary}", file=out, flush=True)
                        last_locks = summary
                    continue
                events = parse_events(value)
                fresh = [e for e in events if e.time > last_event_time]
                if seen_events == 0 and not args.history:
                    fresh = []  # the first update is the backlog: show only what happens now
                seen_events += 1
                if events:
                    last_event_time = max(last_event_time, max(e.time for e in events))
                for e in fresh:
                    stamp = time.strftime("%H:%M:%S", time.localtime(e.time))
                    print(f"{stamp} {e.line()}", file=out, flush=True)
                    printed += 1
                if args.events and printed >= args.events:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            for s in subs:
                s.close()
    return EXIT_OK


def signals_table(signals: Sequence[DeviceSignal]) -> str:
    """The ``registry show DEVICE`` table of a device's signals."""
    rows = [[s.name, s.kind or "-", s.access, s.read_pv, s.write_pv] for s in signals]
    return table(["SIGNAL", "KIND", "ACCESS", "READ PV", "WRITE PV"], rows)


def _show_device(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as c:
        devices = {d.name: d for d in c.registry_devices()}
        dev = devices.get(args.device)
        if dev is None:
            known = ", ".join(sorted(devices)) or "none"
            raise CoordError(f"no device {args.device!r} in the registry (known: {known})")
        signals = c.registry_signals(dev.name)
    if args.json:
        json.dump({**dev.model_dump(mode="json"),
                   "signals": [s.model_dump(mode="json") for s in signals]}, out, indent=2)
        print(file=out)
        return EXIT_OK
    print(registry_table([dev]), file=out)
    print(file=out)
    print(signals_table(signals) if signals else f"{dev.name} has no known signals", file=out)
    return EXIT_OK


def cmd_registry_show(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord registry show [DEVICE]``: every device, or one device and its signals."""
    if args.device:
        return _show_device(args, out)
    with _client(args) as c:
        devices = c.registry_devices()
    if args.json:
        json.dump([d.model_dump(mode="json") for d in devices], out, indent=2)
        print(file=out)
    elif devices:
        print(registry_table(devices), file=out)
    else:
        print("no devices registered", file=out)
    return EXIT_OK


def cmd_registry_import(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord registry import``: build a registry file from a profile collection.

    The collection is loaded by :func:`pvcoord.registry_import.import_registry` (in a child
    process, with bluesky-queueserver's own loader); the file is written with
    :func:`pvdb.registry_file.dump_registry`.
    """
    from pvdb.registry_file import dump_registry  # noqa: PLC0415

    from .registry_import import RegistryImportError, import_registry  # noqa: PLC0415

    startup = Path(args.startup_dir)
    if not startup.is_dir():
        raise UsageError(f"registry import: --startup-dir {startup} is not a directory")
    try:
        devices = import_registry(startup)
        text = dump_registry(devices, comment=f"imported from {startup.resolve()}")
    except (RegistryImportError, ValueError) as e:
        msg = str(e) if str(e).startswith("registry import") else f"registry import failed: {e}"
        print(f"pvcoord: {msg}", file=sys.stderr)
        return EXIT_REFUSED
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {len(devices)} devices to {args.output}", file=out)
    else:
        out.write(text)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """``pvcoord demo``: run the demo beamline (and the walkthrough)."""
    from .demo.beamline import run_demo  # noqa: PLC0415 - keeps the other commands light

    return run_demo(
        prefix=args.prefix, ports_from=args.ports_from, run_dir=args.run_dir,
        walkthrough=args.walkthrough, out=out,
    )


# --- argument parsing -------------------------------------------------------------------------


def _prefix(value: str) -> str:
    try:
        return check_prefix(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return v


def _port(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1024 <= v <= 65000:
        raise argparse.ArgumentTypeError(f"{v} is not in 1024..65000")
    return v


def _common(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--prefix", type=_prefix, default=default,
        help=f"endstation prefix with trailing ':' (default: ${PREFIX_ENV} or {DEFAULT_PREFIX})",
    )
    parser.add_argument("--registry-prefix", type=_prefix, default=default,
                        help="prefix of the registry IOC if it differs from --prefix")
    parser.add_argument(
        "--call-timeout", type=_positive,
        default=DEFAULT_CALL_TIMEOUT if default is None else default,
        help=f"seconds to wait for the IOC (default {DEFAULT_CALL_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pvcoord`` (all sub-commands).

    The common options (``--prefix``, ``--registry-prefix``, ``--call-timeout``) are accepted
    before and after the command name.
    """
    doc = (__doc__ or "").replace("``", "").replace("::", ":")
    p = argparse.ArgumentParser(
        prog="pvcoord", description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p, None)
    common = argparse.ArgumentParser(add_help=False)
    _common(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lk = sub.add_parser("lock", parents=[common], help="acquire locks (all devices or none)")
    lk.add_argument("devices", help="comma list of devices, or 'beamline'")
    lk.add_argument("--type", required=True,
                    help="MAINTENANCE, QUEUE_EXECUTING, MANUAL_OPERATOR or QUEUE_QUEUED")
    lk.add_argument("--timeout", type=_positive, default=None,
                    help="lease in seconds (default: the policy's default for the type)")
    lk.add_argument("--reason", default="", help="why, shown to everyone")
    lk.add_argument("--plan-uid", default="", help="plan or queue item this lock is for")
    lk.add_argument("--on-behalf-of", default=None, metavar="USER",
                    help="act for USER (trusted service accounts only)")
    lk.add_argument("--show-key", action="store_true",
                    help="print the secret key (release/renew by your account need no key)")
    lk.set_defaults(func=cmd_lock)

    rl = sub.add_parser(
        "release", parents=[common], help="release your locks (or the lock of a key)",
    )
    rl.add_argument("devices", nargs="?", default="", help="comma list of devices")
    rl.add_argument("--key", default=None,
                    help="'-': read the key the lock was granted with from stdin (never give a "
                    "key on the command line: the process list shows it; $PVCOORD_KEY works too)")
    rl.add_argument("--key-file", default=None, metavar="FILE", help="read the key from FILE")
    rl.add_argument("--on-behalf-of", default=None, metavar="USER")
    rl.set_defaults(func=cmd_release)

    rn = sub.add_parser("renew", parents=[common], help="extend the lease of your locks")
    rn.add_argument("devices", nargs="?", default="", help="comma list of devices")
    rn.add_argument("--key", default=None,
                    help="'-': read the key the lock was granted with from stdin "
                    "($PVCOORD_KEY works too)")
    rn.add_argument("--key-file", default=None, metavar="FILE", help="read the key from FILE")
    rn.add_argument("--timeout", type=_positive, default=None,
                    help="new lease from now, in seconds (default: the type's default)")
    rn.add_argument("--on-behalf-of", default=None, metavar="USER")
    rn.set_defaults(func=cmd_renew)

    fr = sub.add_parser(
        "force-release", parents=[common], help="remove anyone's lock (policy force_release)",
    )
    fr.add_argument("devices", help="comma list of devices")
    fr.add_argument("--reason", required=True, help="why, recorded in the audit log")
    fr.set_defaults(func=cmd_force_release)

    pu = sub.add_parser("put", parents=[common],
                        help="put a value to any PV (like pvput; refusals exit 1)")
    pu.add_argument("pv", help="full PV name, e.g. DEMO:m1:Setpoint")
    pu.add_argument("value", help="the value, as text (the server converts it)")
    pu.set_defaults(func=cmd_put)

    ca = sub.add_parser("call", parents=[common],
                        help="call an RPC with string arguments (like pvcall)")
    ca.add_argument("pv", help="full RPC PV name, e.g. DEMO:Queue:ItemAdd")
    ca.add_argument("args", nargs="*", metavar="KEY=VALUE", help="arguments, sent as strings")
    ca.set_defaults(func=cmd_call)

    ge = sub.add_parser("get", parents=[common], help="read any PV (like pvget)")
    ge.add_argument("pv", help="full PV name")
    ge.set_defaults(func=cmd_get)

    lo = sub.add_parser("locks", parents=[common], help="table of the active locks")
    lo.add_argument("--events", type=int, default=0, metavar="N",
                    help="also show the last N audit events")
    lo.add_argument("--json", action="store_true", help="print the locks as JSON")
    lo.set_defaults(func=cmd_locks)

    st = sub.add_parser("status", parents=[common],
                        help="every process of the endstation: up, health, heartbeat, version")
    st.add_argument("--config", default=None, metavar="FILE",
                    help="endstation file (its prefix, network and processes); default: the "
                    "four services under --prefix with the EPICS_PVA_* environment")
    st.add_argument("--json", action="store_true", help="print the rows as JSON")
    st.set_defaults(func=cmd_status)

    cf = sub.add_parser("config", parents=[common], help="the endstation file")
    csub = cf.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cc = csub.add_parser("check", parents=[common],
                         help="validate an endstation file (exit 2 with each error and its line)")
    cc.add_argument("file", help="the endstation TOML file")
    cc.set_defaults(func=cmd_config_check)
    cs = csub.add_parser("show", parents=[common],
                         help="what installing an endstation file involves (JSON)")
    cs.add_argument("file", help="the endstation TOML file")
    cs.set_defaults(func=cmd_config_show)

    wa = sub.add_parser(
        "watch", parents=[common], help="print lock changes and audit events until Ctrl-C",
    )
    wa.add_argument("--duration", type=_positive, default=None, metavar="S",
                    help="stop after S seconds")
    wa.add_argument("--events", type=int, default=0, metavar="N", help="stop after N events")
    wa.add_argument("--history", action="store_true",
                    help="also print the events that happened before watch started")
    wa.set_defaults(func=cmd_watch)

    rg = sub.add_parser("registry", parents=[common], help="the device registry")
    rsub = rg.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")
    rs = rsub.add_parser(
        "show", parents=[common], help="table of the registered devices (Registry:Devices), or "
        "one device and its signals (Registry:<device>:Signals)",
    )
    rs.add_argument("device", nargs="?", default=None, metavar="DEVICE",
                    help="show this device and its signals")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_registry_show)
    ri = rsub.add_parser(
        "import", parents=[common], help="build a registry file from a profile collection",
    )
    ri.add_argument("--startup-dir", required=True, metavar="DIR",
                    help="the profile collection's startup directory")
    ri.add_argument("-o", "--output", default=None, metavar="FILE",
                    help="write the registry YAML here (default: standard output)")
    ri.set_defaults(func=cmd_registry_import)

    dm = sub.add_parser(
        "demo", parents=[common], help="run the demo beamline on loopback until Ctrl-C",
        description="Start a real softIoc with simulated devices, the registry and the "
        "coordination IOC on 127.0.0.1 with fixed ports, print how to reach them, and run until "
        "Ctrl-C. --walkthrough runs a scripted two-identity scenario instead and exits.",
    )
    dm.add_argument("--walkthrough", action="store_true",
                    help="run the scripted scenario, then stop (exit 0 if every step behaved)")
    dm.add_argument("--ports-from", type=_port, default=None, metavar="PORT",
                    help="first of the demo's consecutive ports (default: the documented ones)")
    dm.add_argument("--run-dir", default=None, metavar="DIR",
                    help="where to write the database, registry, policy, store and logs")
    dm.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run ``pvcoord`` with ``argv``; return the exit code (see the module docstring)."""
    stream: TextIO = out or sys.stdout  # typeshed's sys.stdout may be None
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prefix is None:
        try:
            args.prefix = check_prefix(os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX)
        except ValueError as e:
            parser.error(f"${PREFIX_ENV}: {e}")
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        return func(args, stream)
    except (UsageError, BadRequestError) as e:
        print(f"pvcoord: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RefusedError as e:
        print(f"pvcoord: refused by {e.pv}: {e.message}", file=sys.stderr)
        return EXIT_REFUSED
    except NoAnswerError as e:
        print(f"pvcoord: {e}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except CoordError as e:
        print(f"pvcoord: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
