"""The project's own rules: generated docs and screens are current, import contracts hold, lint is
clean, every systemd unit starts an importable module and passes ``systemd-analyze verify``."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pvcoord.procs import BIN, PYTHON
from pvdb import catalog
from pvdb.catalog import all_specs, markdown
from pvdb.names import PVSpec

REPO = Path(__file__).resolve().parent.parent


def test_pv_list_doc_is_generated_from_pvdb():
    assert (REPO / "docs/pvs.md").read_text() == markdown(), (
        "docs/pvs.md is stale: run python -m pvdb > docs/pvs.md")


ENTRIES = sorted(p.parent for p in (*REPO.glob("iocs/*/__main__.py"),
                                     *REPO.glob("bridges/*/__main__.py")))


def test_every_pvdb_spec_is_in_the_catalogue():
    import importlib
    import pkgutil

    import pvdb

    known = {(s.server, s.suffix) for s in all_specs()}
    for info in pkgutil.iter_modules(pvdb.__path__):
        mod = importlib.import_module(f"pvdb.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, PVSpec) and not name.startswith("_"):
                assert (obj.server, obj.suffix) in known, (
                    f"pvdb.{info.name}.{name} is not in pvdb.catalog.SPEC_MODULES")


WITH_PVS = list(ENTRIES)
"""Every entry serves PVs of its own (the web bridge only its status PVs, pvdb.process)."""


@pytest.mark.system
@pytest.mark.parametrize("entry", WITH_PVS, ids=[f"{p.parent.name}.{p.name}" for p in WITH_PVS])
def test_every_process_has_its_pvs_in_the_catalogue_and_its_help(entry):
    """Every IOC and bridge serves a PV family of the catalogue (server = its package name), and
    its --help lists every one of its PVs (generated from the catalogue)."""
    server = entry.name
    assert server in catalog.servers(), f"no pvdb spec has server={server!r}"
    module = f"{entry.parent.name}.{server}"
    out = subprocess.run([PYTHON, "-m", module, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for s in all_specs():
        if s.server == server:
            assert "P " + s.suffix.replace("{device}", "<dev>") in out.stdout, (module, s.suffix)


def test_import_contracts():
    out = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(600)
def test_pyright_clean():
    """pyright as configured in pyproject.toml (standard; strict for pvdb)."""
    out = subprocess.run([str(BIN / "pyright"), "--pythonpath", PYTHON], cwd=REPO,
                         capture_output=True, text=True, timeout=570)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr


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


@pytest.mark.system
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
    out = subprocess.run([PYTHON, "-m", m.group(1), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not installed (Debian package systemd)")
    local = text.replace("/opt/pvcoord/.venv/bin/python", PYTHON).replace(
        "WorkingDirectory=/opt/pvcoord", f"WorkingDirectory={REPO}")
    inst = tmp_path / unit.name.replace("@.", "@BL01.")
    (tmp_path / unit.name).write_text(local)
    inst.write_text(local)
    res = subprocess.run(["systemd-analyze", "verify", str(inst)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.system
@pytest.mark.identity
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root and runuser to run as other accounts")
@pytest.mark.parametrize("account", ["nobody", "pvcoord-queue"])
def test_other_accounts_run_the_installed_pvcoord(account):
    """From a checkout anywhere (root's private home too) other accounts run the venv's copy."""
    probe = ("import pvcoord.worker_hook, pvcoord.cli, iocs.queue, bridges.guard, pvdb, sys; "
             "print(pvcoord.cli.__file__)")
    out = subprocess.run(["runuser", "-u", account, "--", PYTHON, "-c", probe], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout or out.stdout.startswith(str(REPO)), out.stdout


def test_children_start_with_the_shared_interpreter():
    """Every child process uses ``pvcoord.procs.PYTHON`` (``pvcoord.service.shared_python()``,
    for the bridges, which may not import the harness), never ``sys.executable``.

    From a private checkout ``sys.executable`` goes through the ``.venv`` symlink in root's home,
    which other accounts (``runuser``) cannot follow (docs/decisions/0045-install-anywhere.md).
    """
    hits = []
    for top in ("pvdb", "iocs", "bridges", "pvcoord", "tests", "benchmarks", "opi", "scripts"):
        for path in (REPO / top).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel in ("pvcoord/service.py", "tests/test_project.py"):
                continue
            hits += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if "sys.executable" in line]
    assert not hits, f"use pvcoord.procs.PYTHON or pvcoord.service.shared_python(): {hits}"
