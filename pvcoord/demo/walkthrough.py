"""``pvcoord demo --walkthrough``: a scripted scenario with two identities on the demo beamline.

Identity 1 is this process's OS account, using the client library (:class:`pvcoord.client.Client`);
each of its steps prints the equivalent ``pvcoord`` command. Identity 2 runs the real ``pvcoord``
command line as a separate process: as the OS account ``nobody`` (``runuser -u nobody``) when the
demo runs as root, otherwise as identity 1 acting for the user ``bob`` through the trusted
``onBehalfOf`` path (the demo policy makes root, or the demo's account, a trusted service).

Steps: acquire; a refusal naming the holder; preemption by MAINTENANCE (the preempted holder is
told on its next renew); lease expiry; release; a kill -9 and restart of the coordination IOC with
the lock restored from the SQLite store. Every step checks the real result; the walkthrough passes
only if every step behaved as expected.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pvcoord.client import Client, LockInfo, RefusedError
from pvcoord.display import EXIT_OK, EXIT_REFUSED, locks_table
from pvcoord.procs import PYTHON, client_conf, wait_until
from pvdb import demo as demo_pvs
from pvdb.models import EventAction, LockEvent, LockType

CALL_TIMEOUT = 10.0
"""Seconds each client call of the walkthrough may take."""
CLI_TIMEOUT = 60.0
"""Seconds one ``pvcoord`` process of identity 2 may take (start-up of Python + p4p included)."""
SHORT_LEASE = 2.0
"""Lease of the expiry step, in seconds."""
EXPIRY_GRACE = 5.0
"""How long after the lease end the lock must be gone (server publishes expiry within 1 s)."""

PART_WALKTHROUGHS: dict[str, tuple[str, str, str, bool]] = {
    "guard": ("pvcoord.demo.guard_part", "run_guard_walkthrough",
              "the guard gateway refuses another account's put to a locked device", True),
    "queue": ("pvcoord.demo.queue_part", "run_queue_walkthrough",
              "the queue holds its devices while a plan runs", False),
    "flat": ("pvcoord.demo.flat_part", "run_flat_walkthrough",
             "over CA, another account's write access follows the lock; Take by PV", True),
    "web": ("pvcoord.demo.web_part", "run_web_walkthrough",
            "two web users: A takes m1, B is read-only (time shown) and refused naming A, A moves "
            "m1, A releases and B writes", False),
}
"""Walkthroughs of the optional parts, by the process name their component starts: module,
function ``(ctx, stop) -> bool`` (run if it exists), the step's title, and whether it needs a
second OS account (root and runuser; otherwise it is reported as skipped)."""

OTHER_ACCOUNT = "nobody"
ON_BEHALF_USER = "bob"


class StepFailedError(Exception):
    """A step did not behave as expected; the message says what happened instead."""


@dataclass
class Identity2:
    """How identity 2 runs ``pvcoord``: argv prefix, extra arguments, the name it holds as."""

    argv: list[str]
    extra: list[str]
    account: str
    how: str

    def command(self, *args: str) -> list[str]:
        """Full argv of ``pvcoord args...`` as identity 2."""
        extra = self.extra if args and args[0] in ("lock", "release", "renew") else []
        return [*self.argv, *args, *extra]

    def shown(self, *args: str) -> str:
        """The command as a person would type it."""
        cmd = self.command(*args)
        cmd = ["pvcoord" if c == "pvcoord.cli" else c for c in cmd]
        if "-m" in cmd:  # python -m pvcoord  ->  pvcoord
            i = cmd.index("-m")
            cmd = cmd[: i - 1] + cmd[i + 1:]
        return " ".join(_quote(c) for c in cmd)


def _quote(s: str) -> str:
    return f"'{s}'" if (" " in s or not s) else s


def identity2() -> Identity2:
    """A real second OS account when possible, else the trusted on-behalf-of path."""
    cli = [PYTHON, "-m", "pvcoord.cli"]
    if os.geteuid() == 0 and shutil.which("runuser"):
        return Identity2(["runuser", "-u", OTHER_ACCOUNT, "--", *cli], [], OTHER_ACCOUNT,
                         f"the OS account '{OTHER_ACCOUNT}' (runuser -u {OTHER_ACCOUNT})")
    return Identity2(cli, ["--on-behalf-of", ON_BEHALF_USER], ON_BEHALF_USER,
                     f"user '{ON_BEHALF_USER}' through the trusted onBehalfOf path")


class Walkthrough:
    """The scenario; :meth:`run` returns whether every step behaved as expected."""

    def __init__(self, ctx, stop: threading.Event) -> None:
        self.ctx = ctx
        self.stop = stop
        self.prefix = ctx.prefix
        self.conf = client_conf(ctx.env)
        self.env = dict(ctx.env, PVCOORD_PREFIX=ctx.prefix)
        self.me = Client(self.prefix, conf=self.conf, timeout=CALL_TIMEOUT)
        self.other = identity2()
        self.results: list[tuple[str, bool]] = []
        self.keys: dict[str, str] = {}
        self.m1, self.m2, self.m3, self.m4 = demo_pvs.MOTORS[:4]

    # --- output helpers

    def say(self, text: str = "") -> None:
        """Print a line."""
        self.ctx.say(text)

    def cmd(self, who: str, command: str) -> None:
        """Print the command of a step."""
        self.say(f"  [{who}] $ {command}")

    def result(self, text: str) -> None:
        """Print a result (indented, one or more lines)."""
        for line in text.rstrip().splitlines() or [""]:
            self.say(f"      {line}")

    def me_shown(self, *args: str) -> str:
        """Identity 1's command-equivalent."""
        return " ".join(["pvcoord", *(_quote(a) for a in args)])

    def run_other(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``pvcoord args...`` as identity 2 (printing the command and its output)."""
        self.cmd("identity 2", self.other.shown(*args))
        p = subprocess.run(self.other.command(*args), capture_output=True, text=True,
                           env=self.env, timeout=CLI_TIMEOUT, cwd="/")
        self.result((p.stdout + p.stderr).strip() + f"\n(exit {p.returncode})")
        return p

    def lock_row(self, device: str) -> LockInfo | None:
        """The ``Coord:Locks`` row of ``device``, or None."""
        return next((lk for lk in self.me.locks() if lk.device == device), None)

    # --- steps

    def step_acquire(self) -> None:
        """Identity 1 locks m1."""
        m1 = self.m1
        self.cmd("identity 1", self.me_shown("lock", m1, "--type", "MANUAL_OPERATOR",
                                             "--timeout", "120", "--reason", "align"))
        g = self.me.acquire(m1, LockType.MANUAL_OPERATOR, 120, "align")
        self.keys[m1] = g.key
        self.result(f"granted {','.join(g.devices)}: {g.message}")
        self.cmd("identity 1", self.me_shown("locks"))
        locks = self.me.locks()
        self.result(locks_table(locks))
        row = self.lock_row(m1)
        if row is None or row.lock_type is not LockType.MANUAL_OPERATOR:
            raise StepFailedError(f"{m1} is not shown as MANUAL_OPERATOR in Coord:Locks")
        self.holder1 = row.owner

    def step_refusal(self) -> None:
        """Identity 2 asks for m1: refused, the message names identity 1."""
        p = self.run_other("lock", self.m1, "--type", "MANUAL_OPERATOR", "--timeout", "60",
                           "--reason", "my scan")
        if p.returncode != EXIT_REFUSED:
            raise StepFailedError(f"expected a refusal (exit {EXIT_REFUSED}), got {p.returncode}")
        if self.holder1 not in p.stderr or "align" not in p.stderr:
            raise StepFailedError(f"the refusal does not name the holder {self.holder1}")
        if "Traceback" in p.stderr:
            raise StepFailedError("the refusal printed a traceback")

    def step_preemption(self) -> None:
        """Identity 2 locks m2; identity 1 takes it for MAINTENANCE; identity 2 is told."""
        m2 = self.m2
        p = self.run_other("lock", m2, "--type", "MANUAL_OPERATOR", "--timeout", "120",
                           "--reason", "sample change")
        if p.returncode != EXIT_OK:
            raise StepFailedError(f"identity 2 could not lock {m2}: exit {p.returncode}")
        row = self.lock_row(m2)
        if row is None or not row.owner.startswith(f"{self.other.account}@"):
            raise StepFailedError(f"{m2} is not held by {self.other.account}: {row}")
        self.cmd("identity 1", self.me_shown("lock", m2, "--type", "MAINTENANCE",
                                             "--timeout", "300", "--reason", "encoder fault"))
        g = self.me.acquire(m2, LockType.MAINTENANCE, 300, "encoder fault")
        self.keys[m2] = g.key
        self.result(f"granted {','.join(g.devices)}; preempted: {', '.join(g.preempted)}")
        if not any(p.startswith(m2) for p in g.preempted):
            raise StepFailedError(f"the MAINTENANCE grant does not report preempting {m2}")
        p = self.run_other("renew", m2, "--timeout", "120")
        if p.returncode != EXIT_REFUSED or "preempted" not in p.stderr:
            raise StepFailedError("identity 2's renew was not refused as preempted")

    def step_expiry(self) -> None:
        """Identity 1 locks m3 with a short lease and lets it run out."""
        m3 = self.m3
        self.cmd("identity 1", self.me_shown("lock", m3, "--type", "MANUAL_OPERATOR", "--timeout",
                                             f"{SHORT_LEASE:g}", "--reason", "quick check"))
        g = self.me.acquire(m3, LockType.MANUAL_OPERATOR, SHORT_LEASE, "quick check")
        self.result(f"granted {m3} until {time.strftime('%H:%M:%S', time.localtime(g.expires))}"
                    f" ({SHORT_LEASE:g} s); not renewing it")
        t0 = time.time()
        try:
            wait_until(lambda: self.lock_row(m3) is None, SHORT_LEASE + EXPIRY_GRACE,
                       f"{m3} leaving Coord:Locks", interval=0.1)
        except TimeoutError as e:
            raise StepFailedError(str(e)) from None

        def expired() -> list[LockEvent]:  # Coord:Events trails the lock table by a tick
            return [e for e in self.me.events() if e.device == m3
                    and e.action is EventAction.EXPIRED]

        try:
            ev = wait_until(expired, EXPIRY_GRACE, f"the expired event of {m3}", interval=0.1)
        except TimeoutError:
            ev = []
        self.cmd("identity 1", self.me_shown("locks", "--events", "1"))
        self.result(f"{m3} left Coord:Locks {time.time() - t0:.1f} s after the grant "
                    f"(lease end + {max(0.0, time.time() - g.expires):.1f} s)")
        if not ev:
            raise StepFailedError(f"no 'expired' event for {m3} in Coord:Events")
        self.result(ev[-1].line())

    def step_release(self) -> None:
        """Identity 1 releases m1 and m2."""
        devs = f"{self.m1},{self.m2}"
        self.cmd("identity 1", self.me_shown("release", devs))
        r = self.me.release(devs)
        self.result(r.message)
        left = {lk.device for lk in self.me.locks()} & {self.m1, self.m2}
        if left:
            raise StepFailedError(f"still locked after release: {sorted(left)}")

    def step_restart(self) -> None:
        """m4 survives a kill -9 and restart of the coordination IOC."""
        m4 = self.m4
        self.cmd("identity 1", self.me_shown("lock", m4, "--type", "MANUAL_OPERATOR",
                                             "--timeout", "300", "--reason", "overnight scan"))
        g = self.me.acquire(m4, LockType.MANUAL_OPERATOR, 300, "overnight scan")
        before = self.lock_row(m4)
        self.result(f"granted {m4} until {time.strftime('%H:%M:%S', time.localtime(g.expires))}")
        proc = self.ctx.procs["coordination"]
        self.cmd("demo", f"kill -9 {proc.pid}   # the coordination IOC; then start it again")
        new = self.ctx.restart("coordination", kill=True)
        self.result(f"coordination IOC restarted as pid {new.pid}")
        # identity 1's next commands are new processes, as an operator's are: a fresh client (a
        # client context open across the kill may wait out its search backoff for the new IOC)
        self.me.close()
        self.me = Client(self.prefix, conf=self.conf, timeout=CALL_TIMEOUT)
        self.cmd("identity 1", self.me_shown("locks"))
        after = self.lock_row(m4)
        self.result(locks_table(self.me.locks()))
        if before is None or after is None:
            raise StepFailedError(f"{m4} was not restored after the restart")
        if (after.owner, after.lock_type, after.expires) != (
            before.owner, before.lock_type, before.expires
        ):
            raise StepFailedError(f"{m4} came back changed: {before} -> {after}")
        self.cmd("identity 1", self.me_shown("renew", "--key", "-", "--timeout", "300")
                 + "   # the key granted before the restart, on stdin")
        r = self.me.renew(key=g.key, timeout=300)
        self.result(r.message)
        self.cmd("identity 1", self.me_shown("release", m4))
        self.result(self.me.release(key=g.key).message)

    # --- driver

    def run(self) -> bool:
        """Run every step; print a summary; return whether all behaved as expected."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("identity 1 acquires m1", self.step_acquire),
            ("identity 2 is refused, and told who holds m1", self.step_refusal),
            ("MAINTENANCE preempts identity 2, which learns it on renew", self.step_preemption),
            ("a lease that is not renewed expires", self.step_expiry),
            ("identity 1 releases its locks", self.step_release),
            ("a lock survives a crash and restart of the coordination IOC", self.step_restart),
        ]
        self.say("")
        self.say(f"walkthrough: identity 1 is this process's account; identity 2 is "
                 f"{self.other.how}")
        try:
            for i, (title, fn) in enumerate(steps, 1):
                if self.stop.is_set():
                    self.say("walkthrough interrupted")
                    return False
                self.say("")
                self.say(f"step {i}: {title}")
                try:
                    fn()
                except (StepFailedError, RefusedError, TimeoutError, OSError) as e:
                    self.say(f"  UNEXPECTED: {e}")
                    self.results.append((title, False))
                    continue
                except Exception as e:  # report every failure as a step failure
                    self.say(f"  UNEXPECTED {type(e).__name__}: {e}")
                    self.results.append((title, False))
                    continue
                self.say("  ok: as expected")
                self.results.append((title, True))
            self.run_parts()
        finally:
            self.me.close()
        passed = sum(ok for _, ok in self.results)
        self.say("")
        self.say(f"walkthrough: {passed}/{len(self.results)} steps behaved as expected")
        return passed == len(self.results) == len(steps) + self.part_steps

    part_steps = 0

    def run_parts(self) -> None:
        """The walkthroughs of the optional parts that run in this demo (one step each)."""
        for proc_name, (mod_name, func_name, title, second) in PART_WALKTHROUGHS.items():
            if proc_name not in self.ctx.procs or self.stop.is_set():
                continue
            func = getattr(importlib.import_module(mod_name), func_name, None)
            if func is None:
                continue
            self.say("")
            if second and (os.geteuid() != 0 or shutil.which("runuser") is None):
                self.say(f"not run: {title} (it needs a second OS account: run the demo as root)")
                continue
            self.say(f"step {len(self.results) + 1}: {title}")
            self.part_steps += 1
            try:
                ok = bool(func(self.ctx, self.stop))
            except Exception as e:  # a part's failure is a failed step
                self.say(f"  UNEXPECTED {type(e).__name__}: {e}")
                ok = False
            self.say("  ok: as expected" if ok else "  UNEXPECTED: a step of this part failed")
            self.results.append((title, ok))


def run_walkthrough(ctx, stop: threading.Event) -> bool:
    """Run the scenario on a started demo (``ctx``: :class:`pvcoord.demo.beamline.DemoContext`)."""
    return Walkthrough(ctx, stop).run()
