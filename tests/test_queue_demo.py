"""The queue part of ``pvcoord demo``: redis, RE Manager and queue IOC start with the beamline,
and the issue-3 walkthrough (preemption by a queued scan; MAINTENANCE stopping a plan) passes."""

from __future__ import annotations

import io
import os

import pytest

from pvcoord.demo import beamline
from pvcoord.demo.queue_part import QUEUE_LOCK_OWNER, run_queue_walkthrough
from pvdb import queue as qn
from pvdb.models import LockType
from pvdb.policy import load_policy

from .test_demo_beamline import free_block

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
    except BaseException:
        print(out.getvalue())
        for p in ctx.procs.values():
            print(f"--- {p.name} ---\n{p.output()[-3000:]}")
        raise
    finally:
        ctx.stop_all()
