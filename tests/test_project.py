"""The project's own rules: generated docs and screens are current, import contracts hold, lint is
clean, every systemd unit starts an importable module and passes ``systemd-analyze verify``."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pvdb.catalog import all_specs, markdown

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_pv_list_doc_is_generated_from_pvdb():
    assert (REPO / "docs/pvs.md").read_text() == markdown(), (
        "docs/pvs.md is stale: run python -m pvdb > docs/pvs.md")


def test_import_contracts():
    out = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_clean():
    out = subprocess.run([str(BIN / "ruff"), "check", "--output-format", "concise", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _spec_patterns() -> list[re.Pattern[str]]:
    pats = []
    for s in all_specs():
        pat = re.escape("$(P)" + s.suffix).replace(re.escape("{device}"), r"[^:]+")
        pats.append(re.compile("^" + pat + "$"))
    return pats


def test_screens_are_generated_and_every_pv_resolves_to_pvdb():
    sys.path.insert(0, str(REPO / "opi"))
    try:
        import make_screens
    finally:
        sys.path.pop(0)
    pats = _spec_patterns()
    bobs = sorted((REPO / "opi").glob("*.bob"))
    assert bobs
    generated = make_screens.screens()
    for bob in bobs:
        if bob.name in generated:
            assert bob.read_text() == generated[bob.name], f"{bob.name} stale: opi/make_screens.py"
        names = [e.text or "" for e in ET.parse(bob).iter("pv_name")]
        assert names, bob
        for n in names:
            bare = n.split("://", 1)[-1].replace("$(DEV)", "m1")
            assert any(p.match(bare) for p in pats), f"{bob.name}: {n} is not a pvdb PV"


UNITS = sorted((REPO / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_unit(unit, tmp_path):
    text = unit.read_text()
    m = re.search(r"^ExecStart=\S+ -m (\S+)", text, re.M)
    assert m, "ExecStart must run python -m MODULE"
    try:  # bridges.flat/.pvws: built on other branches
        runnable = importlib.util.find_spec(m.group(1) + ".__main__") is not None
    except ModuleNotFoundError:
        runnable = False
    if not runnable:
        pytest.skip(f"{m.group(1)} is not in this tree (its unit is verified in test_deploy_units)")
    out = subprocess.run([sys.executable, "-m", m.group(1), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not installed (Debian package systemd)")
    local = text.replace("/opt/pvcoord/.venv/bin/python", sys.executable).replace(
        "WorkingDirectory=/opt/pvcoord", f"WorkingDirectory={REPO}")
    inst = tmp_path / unit.name.replace("@.", "@BL01.")
    (tmp_path / unit.name).write_text(local)
    inst.write_text(local)
    res = subprocess.run(["systemd-analyze", "verify", str(inst)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
