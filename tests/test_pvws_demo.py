"""The PVWS bridge in the demo beamline: started with the guard, banner, the web walkthrough."""

from __future__ import annotations

import io
import re

import pytest

from pvcoord.demo import beamline, guard_part, web_part

from .test_demo_beamline import free_block

pytestmark = pytest.mark.system


def test_demo_web_part_banner_and_walkthrough(shared_run_dir):
    out = io.StringIO()
    comps = [*beamline.BASE_COMPONENTS, *guard_part.COMPONENTS, *web_part.COMPONENTS]
    ctx = beamline.start_beamline(ports_from=free_block(), run_dir=shared_run_dir, out=out,
                                  components=comps)
    try:
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
    finally:
        ctx.stop_all()
