"""The queue part of ``pvcoord demo``: redis, RE Manager and queue IOC start with the beamline,
and the issue-3 walkthrough (preemption by a queued scan; MAINTENANCE stopping a plan) passes."""

from __future__ import annotations

import io
import os
import subprocess

import pytest
from p4p.client.thread import Context

from pvcoord.client import Client, RefusedError
from pvcoord.demo import beamline
from pvcoord.demo.queue_part import (
    PRIVATE_KEY_ENV,
    QUEUE_LOCK_OWNER,
    manager_call,
    run_queue_walkthrough,
    zmq_addr,
)
from pvcoord.procs import PYTHON, client_conf
from pvdb import demo as demo_pvs
from pvdb import queue as qn
from pvdb.catalog import all_specs
from pvdb.models import LockType
from pvdb.names import PVKind
from pvdb.policy import load_policy

from .test_demo_beamline import cmdlines, free_block

pytestmark = pytest.mark.system


def test_demo_starts_the_queue_part_and_the_walkthrough_passes(shared_run_dir):
    out = io.StringIO()
    ctx = beamline.start_beamline("QD:", ports_from=free_block(), run_dir=shared_run_dir, out=out)
    try:
        assert {"redis", "re-manager", "queue"} <= set(ctx.procs)
        if os.geteuid() == 0:
            # the production arrangement: RE Manager and queue IOC as the queue's service account
            assert "note: queue part runs as" not in out.getvalue(), out.getvalue()
            for name in ("re-manager", "queue"):
                assert ctx.procs[name].argv[:3] == ["runuser", "-u", QUEUE_LOCK_OWNER]
        pol = load_policy(ctx.files["policy"])
        assert pol.may_take(LockType.QUEUE_EXECUTING, QUEUE_LOCK_OWNER, [])
        assert any(qn.ITEM_ADD.name("QD:") in n for n in ctx.notes)
        ok = run_queue_walkthrough(ctx)
        text = out.getvalue()
        assert ok, text
        assert "preempted" in text and "refused 'set' on m2" in text
        _no_secret_anywhere(ctx, out)
        if os.geteuid() == 0:
            _queue_start_by_an_unnamed_account_is_refused(ctx)
    except BaseException:
        print(out.getvalue())
        for p in ctx.procs.values():
            print(f"--- {p.name} ---\n{p.output()[-3000:]}")
        raise
    finally:
        ctx.stop_all()


def _plain_manager_request(control_port: int) -> bool:
    """Whether the control socket answers an unencrypted ``status`` within 2 s."""
    import zmq

    with zmq.Context() as zctx, zctx.socket(zmq.REQ) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(zmq_addr(control_port))
        sock.send_json({"method": "status", "params": {}})
        return bool(sock.poll(2000))


def _no_secret_anywhere(ctx, out) -> None:
    """Issue 11, finding 4 and 5: after the walkthrough, no lock key, 0MQ private key or store
    password is in any PV, event, log line, error or command line; the RE Manager's control
    socket does not answer a client without its public key."""
    control = ctx.port("zmq-control")
    assert not _plain_manager_request(control), "the control socket answered a plain request"
    conf = client_conf(ctx.env)
    secrets: list[str] = [ctx._argv["re-manager"][1][PRIVATE_KEY_ENV]]
    errors: list[str] = []
    with Client("QD:", conf=conf, timeout=10.0) as c:
        g = c.acquire("m3", "MANUAL_OPERATOR", 60, reason="scan for secrets")
        secrets.append(g.key)
        for args in ({"device": g.key}, {"device": f"m3,{g.key}"}, {"key": "x" + g.key}):
            try:
                c.release(args.get("device"), args.get("key"))
            except RefusedError as e:
                errors.append(str(e))
        c.renew(key=g.key, timeout=30)
        c.release(key=g.key)
    texts = list(errors)
    names = []
    for spec in all_specs():
        if spec.kind is not PVKind.RPC:
            names += [spec.name("QD:", device=d) for d in (
                list(demo_pvs.DEVICE_NAMES) if spec.per_device else [None])]
    with Context("pva", conf=conf, useenv=False) as pva:
        values = pva.get(names, timeout=5, throw=False)  # in parallel; PVs not served time out
    got = [str(v) for v in values if not isinstance(v, Exception)]
    assert len(got) > 50, f"only {len(got)} of {len(names)} PVs read"
    texts += got
    for f in ctx.run_dir.rglob("*"):
        if f.is_file() and f.suffix in (".log", ".sqlite", ".toml", ".yaml") or "sqlite-" in f.name:
            texts.append(f.read_bytes().decode("latin-1"))
    texts.extend(cmdlines().values())
    texts.append(out.getvalue())
    blob = "\n".join(texts)
    assert "scan for secrets" in blob and "released" in blob  # we looked at the right things
    for secret in secrets:
        assert secret not in blob


def _queue_start_by_an_unnamed_account_is_refused(ctx) -> None:
    """Issue 11, finding 4: ``nobody`` (not in the demo policy's queue_control) cannot start the
    queue, so cannot preempt a manual lock through it; the manager's state is unchanged."""
    name = qn.QUEUE_START.name("QD:")
    argv = ["runuser", "-u", "nobody", "--", PYTHON, "-m", "p4p.client.cli", "-w", "10",
            "rpc", name]
    p = subprocess.run(argv, env=dict(ctx.env), capture_output=True, text=True, timeout=60,
                       cwd="/")
    out = p.stdout + p.stderr
    assert "account 'nobody' may not control the queue" in out, out
    assert manager_call(ctx.port("zmq-control"), "status")["manager_state"] == "idle"
