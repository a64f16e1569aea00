"""The endstation file: ``pvcoord config check`` on good and bad files (code and line of each
error), and what each process gets from it (``--config``). Pure: no processes."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest

from pvcoord import cli
from pvcoord.demo.devices import write_registry
from pvcoord.service import config_argv
from pvdb.endstation import (
    CODES,
    WEB_BRIDGE_ACCOUNT,
    EndstationError,
    guard_gateway,
    key_lines,
    load_endstation,
    parse_endstation,
    process_args,
    process_env,
    to_toml,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "endstation.example.toml"
POLICY = REPO / "deploy" / "policy.example.toml"  # the example's (10.0.1.5)


@pytest.fixture
def station(tmp_path) -> Path:
    """The shipped example with the files it names, in a fresh directory."""
    shutil.copy(POLICY, tmp_path / "policy.toml")
    write_registry("BL01:", tmp_path / "registry.yaml")
    text = EXAMPLE.read_text()
    for name in ("certificate", "key"):
        m = re.search(rf'^{name} = "(.*)"$', text, re.M)
        assert m
        (tmp_path / Path(m.group(1)).name).write_text("not checked beyond existence\n")
        text = text.replace(m.group(1), Path(m.group(1)).name)
    path = tmp_path / "endstation.toml"
    path.write_text(text)
    return path


def check(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(["config", "check", str(path)], out=out), out.getvalue()


def line_of(text: str, marker: str) -> int:
    for n, line in enumerate(text.splitlines(), 1):
        if marker in line:
            return n
    raise AssertionError(f"{marker!r} not in the file")


def test_example_file_is_valid(station):
    code, out = check(station)
    assert code == cli.EXIT_OK, out
    assert "processes registry, coordination, queue, guard, flat, pvws" in out
    cfg = load_endstation(station, deep=True)
    assert cfg.instance == "bl01"
    assert cfg.files.policy == str(station.parent / "policy.toml")


def test_minimal_file_gets_the_defaults(tmp_path):
    cfg = parse_endstation('prefix = "X:"\n[files]\nregistry = "r.yaml"\n')
    assert cfg.processes() == ["registry", "coordination"]
    assert cfg.instance == "x" and cfg.network.client.interfaces == ["127.0.0.1"]


# (case, old text, new text, code, marker of the line the error must name)
BAD = [
    ("syntax", 'prefix = "BL01:"', 'prefix = "BL01:', "syntax", 'prefix = "BL01:'),
    ("prefix", 'prefix = "BL01:"', 'prefix = "BL01"', "bad_prefix", 'prefix = "BL01"'),
    ("unknown key", "interfaces = [\"10.0.1.5\"]", "intrefaces = [\"10.0.1.5\"]", "unknown_key",
     "intrefaces"),
    ("port range", "ca_server_port = 5064", "ca_server_port = 70000", "bad_port",
     "ca_server_port = 70000"),
    ("address", '["10.0.2.5"]', '["10.0.2.500"]', "bad_address", "10.0.2.500"),
    ("port clash", "pva_server_port = 5077", "pva_server_port = 5075", "port_clash",
     "check_period"),  # the registry's port line is the one before check_period: see below
    ("store url", "url = \"sqlite:////var", "url = \"mysql:////var", "bad_store_url", "mysql"),
    ("secret", "redis://127.0.0.1:6379/0", "redis://:hunter2@127.0.0.1:6379/0", "secret_in_file",
     "hunter2"),
    ("missing key", 'registry = "registry.yaml"', "", "missing", "[files]"),
    ("type", "events_tail = 50", 'events_tail = "many"', "bad_type", "events_tail"),
    ("zmq wildcard", "tcp://127.0.0.1:60615", "tcp://*:60615", "bad_address", "tcp://*"),
    ("log level", 'log_level = "INFO"', 'log_level = "LOUD"', "bad_value", "LOUD"),
    ("missing file", 'policy = "policy.toml"', 'policy = "nope.toml"', "missing_file",
     "nope.toml"),
    ("needs tls", "[tls]", "[tls_off]", "unknown_key", "[tls_off]"),
]


@pytest.mark.parametrize(("case", "old", "new", "code", "marker"), BAD, ids=[b[0] for b in BAD])
def test_bad_file_names_line_and_code(station, case, old, new, code, marker):
    text = station.read_text()
    assert old in text, case
    text = text.replace(old, new, 1)
    station.write_text(text)
    rc, out = check(station)
    assert rc == cli.EXIT_BAD_INPUT, out
    want = line_of(text, marker)
    if case == "port clash":
        want -= 1
    found = re.findall(r"^\S*?:(\d+): .* \[(\w+)\]$", out, re.M)
    assert (str(want), code) in found, out
    assert code in CODES
    assert "Traceback" not in out


def test_bad_policy_and_registry_contents_are_named(station):
    (station.parent / "policy.toml").write_text("[access]\nunlocked_writable = 3\n")
    (station.parent / "registry.yaml").write_text("- {name: m1}\n")
    rc, out = check(station)
    assert rc == cli.EXIT_BAD_INPUT
    text = station.read_text()
    assert f":{line_of(text, 'policy = ')}: files.policy: " in out and "[bad_policy]" in out
    assert f":{line_of(text, 'registry = ')}: files.registry: " in out and "[bad_registry]" in out


def test_a_web_bridge_writing_through_the_guard_needs_its_account_as_a_delegate(station):
    text = station.read_text()
    at = f":{line_of(text, 'writes = true')}: web_bridge.writes: "
    # the demo's policy names pvcoord-web a delegate from 127.0.0.1 only, not from 10.0.1.5
    shutil.copy(REPO / "pvcoord" / "demo" / "policy.toml", station.parent / "policy.toml")
    rc, out = check(station)
    assert rc == cli.EXIT_BAD_INPUT and at in out and "false [not_delegate]\n1 error(s)" in out, out
    assert f'delegates = ["{WEB_BRIDGE_ACCOUNT}@10.0.1.5"]' in out, out
    # the built-in policy names no delegates
    station.write_text(text.replace('policy = "policy.toml"', ""))
    rc, out = check(station)
    assert rc == cli.EXIT_BAD_INPUT and "[not_delegate]" in out and "built-in policy" in out, out
    # no writes from the web: nothing to delegate
    station.write_text(text.replace("writes = true", "writes = false"))
    rc, out = check(station)
    assert rc == cli.EXIT_OK, out
    # the account checked is the one the web bridge's unit runs as
    unit = (REPO / "systemd" / "pvcoord-pvws@.service").read_text()
    assert f"\nUser={WEB_BRIDGE_ACCOUNT}\n" in unit


def test_every_error_is_reported_at_once_and_nothing_is_half_loaded(station):
    text = station.read_text().replace('prefix = "BL01:"', 'prefix = "BL01"').replace(
        "events_tail = 50", "events_tail = 5000").replace("[queue]\n", "[queue]\ncolour = 1\n")
    station.write_text(text)
    with pytest.raises(EndstationError) as e:
        load_endstation(station, deep=True)
    codes = sorted(i.code for i in e.value.issues)
    assert codes == ["bad_prefix", "bad_value", "unknown_key"]
    assert [i.line for i in e.value.issues] == sorted(i.line for i in e.value.issues)


def test_web_bridge_needs_tls():
    text = 'prefix = "X:"\n[files]\nregistry = "r.yaml"\n\n[web_bridge]\nlisten_port = 8080\n'
    with pytest.raises(EndstationError) as e:
        parse_endstation(text)
    [issue] = e.value.issues
    assert (issue.code, issue.line, issue.path) == ("needs_section", 5, "web_bridge")


def test_unreadable_file_is_an_error_not_a_crash(tmp_path):
    rc, out = check(tmp_path / "absent.toml")
    assert rc == cli.EXIT_BAD_INPUT and "[missing_file]" in out


def test_key_lines_index():
    text = ('a = 1\n[t]\nb = """\nx = 2\n"""\n"q.k" = 3\nd.e = 4\n[t.u]\nf = {g = 1}\n')
    idx = key_lines(text)
    assert idx[("a",)] == 1 and idx[("t",)] == 2 and idx[("t", "b")] == 3
    assert ("t", "x") not in idx  # inside a multi-line string
    assert idx[("t", "q.k")] == 6 and idx[("t", "d", "e")] == 7 and idx[("t", "u", "f")] == 9


def test_to_toml_round_trips():
    data = {"prefix": "X:", "files": {"registry": 'a "b".yaml'},
            "network": {"client": {"interfaces": ["127.0.0.1"], "auto_addr_list": False}}}
    cfg = parse_endstation(to_toml(data))
    assert cfg.files.registry == 'a "b".yaml' and cfg.network.client.auto_addr_list is False


def test_process_options_and_environment(station):
    cfg = load_endstation(station)
    coord = process_args(cfg, "coordination")
    assert coord[:2] == ["--prefix", "BL01:"] and "--store" in coord
    queue = process_args(cfg, "queue")
    assert queue[queue.index("--zmq-control") + 1] == "tcp://127.0.0.1:60615"
    env = process_env(cfg, "registry")
    assert env["EPICS_PVAS_INTF_ADDR_LIST"] == "10.0.1.5"
    assert env["EPICS_PVAS_SERVER_PORT"] == "5077" and env["EPICS_PVA_ADDR_LIST"] == "10.0.1.255"
    flat = process_env(cfg, "flat")
    assert flat["EPICS_CAS_SERVER_PORT"] == "5064"
    assert flat["EPICS_CAS_INTF_ADDR_LIST"] == "10.0.1.5"
    gw = guard_gateway(cfg)
    assert gw["clients"][0]["addrlist"] == "10.0.2.255"
    assert gw["servers"][0]["interface"] == ["10.0.1.5"] and gw["servers"][0]["serverport"] == 5079
    assert gw["guard"]["coordination"] == {"addrlist": "10.0.1.255", "autoaddrlist": False,
                                           "bcastport": 5076}


def test_config_argv_puts_the_file_first_and_sets_the_environment(station):
    env: dict[str, str] = {"PVCOORD_STORE_URL": "redis://:secret@127.0.0.1:1/0"}
    argv = config_argv("coordination", ["--config", str(station), "--events-tail", "7"], env)
    assert argv[-2:] == ["--events-tail", "7"]  # the command line wins: argparse takes the last
    assert argv[argv.index("--store") + 1] == "redis://:secret@127.0.0.1:1/0"
    assert env["EPICS_PVAS_SERVER_PORT"] == "5075"
    env = {}
    config_argv("queue", [f"--config={station}"], env)
    assert env["PVCOORD_REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert config_argv("guard", ["--config", "guard.json"], {}) == ["--config", "guard.json"]
    assert config_argv("registry", ["--prefix", "X:"], {}) == ["--prefix", "X:"]


def test_config_argv_bad_file_exits_2_with_the_errors(station, capsys):
    station.write_text(station.read_text().replace("events_tail = 50", "events_tail = 0"))
    with pytest.raises(SystemExit) as e:
        config_argv("coordination", ["--config", str(station)], {})
    assert e.value.code == 2
    assert "coordination.events_tail" in capsys.readouterr().err


def test_every_process_parses_its_options_from_the_file(station, monkeypatch):
    from bridges.guard.config import GuardConfigError, load_guard_config
    from iocs.coordination.__main__ import parse_args as coordination_args
    from iocs.queue.__main__ import parse_args as queue_args
    from iocs.registry.__main__ import parse_args as registry_args

    monkeypatch.setattr(os, "environ", dict(os.environ))  # config_argv sets EPICS_* here
    a = coordination_args(["--config", str(station)])
    assert (a.prefix, a.events_tail) == ("BL01:", 50) and a.store.startswith("sqlite:////var")
    a = registry_args(["--config", str(station), "--check-period", "2"])
    assert a.registry == str(station.parent / "registry.yaml") and a.check_period == 2.0
    a = queue_args(["--config", str(station)])
    assert a.zmq_info == "tcp://127.0.0.1:60625" and a.redis == "redis://127.0.0.1:6379/0"
    assert os.environ["EPICS_PVAS_SERVER_PORT"] == "5078"
    gw = load_guard_config(station)
    assert [s.interface for s in gw.servers] == [["10.0.1.5"]]
    assert gw.guard.coordination is not None and gw.guard.coordination.addrlist == "10.0.1.255"
    assert gw.guard.policy == str(station.parent / "policy.toml")
    station.write_text(station.read_text().replace("stale_after = 2.0", "stale_after = -1"))
    with pytest.raises(GuardConfigError) as e:
        load_guard_config(station)
    assert "guard.stale_after" in str(e.value)


def test_bridge_options_from_the_file(station):
    cfg = load_endstation(station)
    flat = process_args(cfg, "flat")
    assert flat[:4] == ["--prefix", "BL01:", "--registry-prefix", "BL01:"]
    assert "EPICS_PVA_ADDR_LIST=10.0.1.255" in flat and "EPICS_PVA_BROADCAST_PORT=5076" in flat
    assert flat.count("--upstream") == flat.count("--service") >= 3
    web = process_args(cfg, "pvws")
    pairs = dict(zip(web[::2], web[1::2], strict=False))
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8080"
    assert pairs["--auth"] == "header" and pairs["--user-header"] == "X-Remote-User"
    assert "--writes" in web and "--secure-cookies" in web and "--trusted-proxy" in web
    env = {"PVCOORD_WEB_PASSWORD_FILE": "/run/credentials/x/web-users"}
    argv = config_argv("pvws", ["--config", str(station)], env)
    assert argv[argv.index("--password-file") + 1] == "/run/credentials/x/web-users"


def test_every_bridge_option_has_a_key(station):
    text = re.sub(r"^\[ca_bridge\].*$", "[ca_bridge]\nstale_after = 3.5", station.read_text(),
                  flags=re.M)
    text = re.sub(r"^\[web_bridge\].*$", '[web_bridge]\nthrottle_ms = 50\nca_via = "pva"\n'
                  "max_sockets = 7", text, flags=re.M)
    text = text.replace("admins = []", 'admins = ["alice", "bob"]')
    station.write_text(text)
    cfg = load_endstation(station)
    flat = process_args(cfg, "flat")
    assert flat[flat.index("--stale-after") + 1] == "3.5"
    assert flat[flat.index("--put-timeout") + 1] == "300.0"
    assert process_env(cfg, "flat")["EPICS_PVAS_SERVER_PORT"] == "5080"
    web = process_args(cfg, "pvws")
    assert [web[i + 1] for i, a in enumerate(web) if a == "--admin"] == ["alice", "bob"]
    pairs = dict(zip(web[::2], web[1::2], strict=False))
    assert (pairs["--throttle-ms"], pairs["--ca-via"], pairs["--max-sockets"]) == (
        "50.0", "pva", "7")
    # ca:// names of the web bridge: Channel Access on the client side, at the CA bridge's port
    env = process_env(cfg, "pvws")
    assert env["EPICS_CA_ADDR_LIST"] == "10.0.1.255" and env["EPICS_CA_SERVER_PORT"] == "5064"


@pytest.mark.parametrize(("old", "new", "path", "code"), [
    ("pva_server_port = 5080", "pva_server_port = 5079", "ca_bridge.pva_server_port",
     "port_clash"),
    ('default_type = "pva"', 'default_type = "dev"', "web_bridge.default_type", "bad_value"),
    ("put_timeout = 300.0", "put_timeout = 0", "ca_bridge.put_timeout", "bad_value"),
])
def test_bad_bridge_values_are_named(station, old, new, path, code):
    text = station.read_text()
    assert old in text
    station.write_text(text.replace(old, new))
    with pytest.raises(EndstationError) as e:
        load_endstation(station)
    assert [(i.path, i.code) for i in e.value.issues] == [(path, code)], e.value
