"""The Ansible role and playbook, run for real (``ansible-playbook``, connection local) into a
staging root: install, a second run that changes nothing, the units it installs pass
``systemd-analyze verify`` there, then the removal leaves the staging root as it found it, and
nothing outside the staging root was touched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pvcoord.demo.devices import write_registry
from pvcoord.procs import PYTHON

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "deploy" / "ansible" / "endstation.yml"
EXAMPLE = REPO / "deploy" / "endstation.example.toml"
POLICY = REPO / "deploy" / "policy.example.toml"  # the example's (10.0.1.5)
SYSTEM_DIRS = ("etc/systemd/system/multi-user.target.wants", "usr/lib/sysusers.d",
               "etc/nginx/sites-available",
               "etc/nginx/sites-enabled")
"""What a Debian host with nginx already has (the staging root starts with these)."""


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def playbook(tmp: Path, staging: Path, station: Path, *extra: str) -> str:
    ansible = Path(PYTHON).with_name("ansible-playbook")
    if not ansible.exists():
        pytest.fail("ansible-playbook not installed (ansible-core, pyproject dev extra)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-local"), ANSIBLE_HOME=str(tmp / "ansible"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_PIPELINING="1",
               ANSIBLE_PYTHON_INTERPRETER=PYTHON)
    p = subprocess.run(
        [str(ansible), "-i", "localhost,", "-c", "local", str(PLAYBOOK),
         "-e", f"pvcoord_root={staging}", "-e", f"pvcoord_endstation_file={station}",
         "-e", f"pvcoord_python={PYTHON}", "-e", f"pvcoord_repo={REPO}",
         "-e", "pvcoord_htpasswd_file=/etc/pvcoord/bl01/htpasswd", *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


def recap(out: str) -> dict[str, int]:
    m = re.search(r"^localhost\s*:\s*(.*)$", out, re.M)
    assert m, out
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


class Run:
    """One staging install shared by the tests of this module (each test is one playbook run)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        src = tmp / "bl01"
        src.mkdir()
        shutil.copy(POLICY, src / "policy.toml")
        write_registry("BL01:", src / "registry.yaml")
        tls = tmp / "tls"
        tls.mkdir()
        text = EXAMPLE.read_text()
        for name in ("certificate", "key"):
            m = re.search(rf'^{name} = "(.*)"$', text, re.M)
            assert m
            (tls / Path(m.group(1)).name).write_text("throwaway\n")
            text = text.replace(m.group(1), str(tls / Path(m.group(1)).name))
        # this endstation runs no CA bridge (an earlier version of the file did: see below)
        text = re.sub(r"\n\[ca_bridge\][^\n]*\n(?:[^\n\[][^\n]*\n)*", "\n", text)
        assert "[ca_bridge]" not in text
        self.station = src / "endstation.toml"
        self.station.write_text(text)
        self.staging = tmp / "root"
        for d in SYSTEM_DIRS:
            (self.staging / d).mkdir(parents=True)
        self.before = tree(self.staging)
        self.wants = self.staging / "etc/systemd/system/pvcoord@bl01.target.wants"
        self.wants.mkdir()
        (self.wants / "pvcoord-flat@bl01.service").symlink_to("../pvcoord-flat@.service")

    def play(self, *extra: str) -> dict[str, int]:
        return recap(playbook(self.tmp, self.staging, self.station, *extra))


HOST_PATHS = ("/etc/pvcoord/bl01", "/etc/systemd/system/pvcoord@.target",
              "/etc/systemd/system/pvcoord@bl01.target.wants", "/usr/lib/sysusers.d/pvcoord.conf",
              "/etc/nginx/sites-available/pvcoord-bl01.conf")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    assert not any(Path(p).exists() for p in HOST_PATHS), "the host already has an install"
    r = Run(tmp_path_factory.mktemp("ansible"))
    r.first = r.play()
    return r


def test_install_into_a_staging_root(run, tmp_path):
    assert run.first["failed"] == 0 and run.first["changed"] > 0
    etc = run.staging / "etc/pvcoord/bl01"
    assert (etc / "endstation.toml").read_text() == run.station.read_text()
    assert (etc / "policy.toml").is_file() and (etc / "registry.yaml").is_file()
    assert sorted(os.listdir(run.wants)) == sorted(
        f"pvcoord-{p}@bl01.service" for p in ("registry", "coordination", "queue", "guard",
                                              "pvws")), "flat (no longer configured) disabled"
    assert os.readlink(run.wants / "pvcoord-guard@bl01.service") == "../pvcoord-guard@.service"
    site = (run.staging / "etc/nginx/sites-available/pvcoord-bl01.conf").read_text()
    assert "server_name bl01.example.org;" in site and "server 127.0.0.1:8080;" in site
    assert "auth_basic_user_file /etc/pvcoord/bl01/htpasswd;" in site
    assert (run.staging / "usr/lib/sysusers.d/pvcoord.conf").is_file()
    check = subprocess.run([PYTHON, "-m", "pvcoord.cli", "config", "check",
                            str(etc / "endstation.toml")], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not installed (Debian package systemd)")
    for u in (run.staging / "etc/systemd/system").glob("pvcoord*@.*"):
        text = u.read_text().replace("/opt/pvcoord/.venv/bin/python", PYTHON)
        (tmp_path / u.name).write_text(text)
        (tmp_path / u.name.replace("@.", "@bl01.")).write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.glob("*@bl01.*"))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not any(Path(p).exists() for p in HOST_PATHS), "changed the host outside the staging"


def test_second_run_changes_nothing(run):
    second = run.play()
    assert second["changed"] == 0 and second["failed"] == 0, second


def test_removal_leaves_nothing(run):
    gone = run.play("-e", "pvcoord_state=absent")
    assert gone["failed"] == 0
    assert tree(run.staging) == run.before, sorted(tree(run.staging) ^ run.before)
    assert not any(Path(p).exists() for p in HOST_PATHS), "changed the host outside the staging"
