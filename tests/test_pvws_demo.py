"""The PVWS bridge in the demo beamline: started with the guard, banner, the web walkthrough, and
its writes through the guard as the policy's delegate (decision 0140).

One demo run (softIoc behind the guard, registry, coordination, guard, the bridge) for the module.
The bridge runs as the service account ``pvcoord-web`` and writes through the guard: the guard's
``Guard:Audit`` names the bridge's account and the web user it wrote for, and a device held by a
privileged account (root) stays closed to the bridge's account at the guard even when the bridge's
own decision is bypassed (a second bridge process with a policy that lets alice write anything).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from p4p.client.thread import Context

from pvcoord.demo import beamline, guard_part, web_part
from pvcoord.procs import client_conf
from pvdb import demo
from pvdb.names import COORD_ACQUIRE, COORD_RELEASE

from .conftest import TIMEOUT
from .test_demo_beamline import free_block

pytestmark = pytest.mark.system

DELEGATE = beamline.WEB_ACCOUNT
BYPASS_POLICY = """
# The bypassed bridge: its own decision lets alice write a device root holds (alice counts as a
# delegate for root). Only the guard's policy (the demo's) stands between it and the device.
[access]
trusted_services = ["alice"]
delegates = ["alice"]

[access.on_behalf_of]
alice = ["root"]
"""


def _no_delegate_account() -> str | None:
    return beamline.service_account_problem(DELEGATE, None, "bridges.pvws")


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[Any, io.StringIO]]:
    """The demo's run directory is one other accounts can reach (pytest's tmp_path is not)."""
    run = Path(tempfile.mkdtemp(prefix="pvcoord-test-pvws-demo-"))
    run.chmod(0o755)
    out = io.StringIO()
    comps = [*beamline.BASE_COMPONENTS, *guard_part.COMPONENTS, *web_part.COMPONENTS]
    ctx = None
    try:
        ctx = beamline.start_beamline(ports_from=free_block(), run_dir=run, out=out,
                                      components=comps)
        yield ctx, out
    finally:
        if ctx is not None:
            ctx.stop_all()
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="module")
def pva(site) -> Iterator[Context]:
    ctx, _out = site
    with Context("pva", conf=client_conf(ctx.env), useenv=False, nt=False) as c:
        yield c


def test_demo_web_part_banner_and_walkthrough(site):
    ctx, out = site
    text = beamline.banner(ctx)
    assert re.search(r"web: http://127\.0\.0\.1:\d+/ .*log in as alice or bob", text), text
    users = web_part.read_users(ctx.files["web-users"])
    assert set(users) == {"alice", "bob"} and all(len(p) >= 12 for p in users.values())
    assert (ctx.files["web-users"].stat().st_mode & 0o777) == 0o600
    assert "$argon2id$" in ctx.files["web-passwd"].read_text()
    assert web_part.run_web_walkthrough(ctx), out.getvalue()
    said = out.getvalue()
    assert re.search(r"bob's write refused: \[holder-conflict\] m1 is held by alice@",
                     said), said
    if _no_delegate_account() is None:
        assert ctx.account_of("web") == DELEGATE
        assert f"the bridge runs as {DELEGATE} and writes through the guard" in text, text
        assert re.search(rf"through the guard: allowed put {ctx.prefix}m1:Setpoint = 2\.5 by "
                         rf"{DELEGATE}@127\.0\.0\.1 holder=alice@.*delegate of alice", said), said


@pytest.mark.identity
@pytest.mark.skipif(_no_delegate_account() is not None, reason=str(_no_delegate_account()))
def test_the_bridge_writes_through_the_guard_as_the_web_users_delegate(site, pva):
    ctx, _out = site
    m2 = demo.MOTORS[1]
    pv = demo.motor_setpoint(ctx.prefix, m2)
    sp = f"pva://{pv}"
    alice = web_part.WebUser(web_part.web_url(ctx), "alice",
                             web_part.read_users(ctx.files["web-users"])["alice"])
    try:
        status, body = alice.lock("take", m2)
        assert status == 200, body
        alice.send({"type": "subscribe", "pvs": [sp]})
        alice.wait(lambda m: m.get("pv") == sp and m.get("readonly") is False, TIMEOUT)
        web_part.wait_guard_holder(ctx, pv, "alice@")  # the guard's own view has the lock
        alice.send({"type": "write", "pv": sp, "value": 1.75})
        alice.wait(lambda m: m.get("pv") == sp and m.get("value") == 1.75, TIMEOUT)
        row = web_part.wait_guard_audit(
            ctx, lambda r: r["pv"] == pv and r["value"].startswith("1.75"))
        assert (row["action"], row["account"], row["host"]) == ("allowed", DELEGATE, "127.0.0.1")
        assert row["holder"].startswith("alice@") and row["device"] == m2
        assert "delegate of alice" in row["message"], row
    finally:
        alice.lock("release", m2)
        alice.close()


@pytest.mark.identity
@pytest.mark.skipif(_no_delegate_account() is not None, reason=str(_no_delegate_account()))
def test_a_device_root_holds_is_refused_at_the_guard_even_if_the_bridge_lets_it_through(
        site, pva):
    ctx, _out = site
    m3 = demo.MOTORS[2]
    pv = demo.motor_setpoint(ctx.prefix, m3)
    sp = f"pva://{pv}"
    policy = ctx.run_dir / "bypass-policy.toml"
    policy.write_text(BYPASS_POLICY)
    os.chmod(policy, 0o644)
    web_part.start_bridge(ctx, "web-bypass", ctx.files["web-passwd"], policy)
    assert ctx.account_of("web-bypass") == DELEGATE
    before = float(pva.get(pv, timeout=TIMEOUT)["value"])
    pva.rpc(COORD_ACQUIRE.name(ctx.prefix), _args(device=m3, type="MANUAL_OPERATOR",
                                                  timeout="60", reason="bypass test"),
            timeout=TIMEOUT)
    alice = web_part.WebUser(f"http://127.0.0.1:{ctx.port('web-bypass')}/", "alice",
                             web_part.read_users(ctx.files["web-users"])["alice"])
    try:
        alice.send({"type": "subscribe", "pvs": [sp]})
        # the bypassed bridge's own decision: writable for alice although root holds m3
        alice.wait(lambda m: m.get("pv") == sp and m.get("readonly") is False, TIMEOUT)
        web_part.wait_guard_holder(ctx, pv, "root@")  # the guard's own view has the lock
        alice.send({"type": "write", "pv": sp, "value": before + 1.0})
        err = alice.wait(lambda m: m.get("type") == "error", TIMEOUT)
        assert err["code"] == "put-failed" and "denied by gateway" in err["message"], err
        row = web_part.wait_guard_audit(ctx, lambda r: r["pv"] == pv and r["action"] == "refused")
        assert (row["account"], row["host"], row["device"]) == (DELEGATE, "127.0.0.1", m3)
        assert row["holder"] == "root@127.0.0.1", row
        assert f"{DELEGATE} may not act on behalf of root" in row["message"] \
            or "only account root" in row["message"], row
        assert float(pva.get(pv, timeout=TIMEOUT)["value"]) == before
    finally:
        alice.close()
        pva.rpc(COORD_RELEASE.name(ctx.prefix), _args(device=m3), timeout=TIMEOUT)
        ctx.procs["web-bypass"].stop()


def _args(**kw: str) -> Any:
    from p4p.nt import NTURI

    return NTURI([(k, "s") for k in kw]).wrap("", kws=kw)
