"""Pure parts of the PVWS bridge: value conversion, name parsing, write values, passwords.

Each of these is also exercised against real IOCs in tests/test_pvws_system.py.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from p4p.nt import NTEnum, NTScalar, NTTable

from bridges.pvws.app import _put_value
from bridges.pvws.auth import (
    PasswordFileError,
    Sessions,
    check_password,
    read_password_file,
    set_password,
)
from bridges.pvws.config import BridgeConfig, PVNameError, parse_name
from bridges.pvws.values import convert


def fields(c) -> tuple[dict, dict]:
    return json.loads("{" + c.meta + "}"), json.loads("{" + c.body + "}")


def test_scalar_with_display_and_alarm_limits_nan_as_string():
    v = NTScalar("d", display=True, valueAlarm=True).wrap(math.nan)
    v["display.units"] = "mm"
    v["display.limitHigh"] = 5.0
    v["valueAlarm.highAlarmLimit"] = math.inf
    v["alarm.severity"] = 2
    c = convert(v)
    meta, body = fields(c)
    assert meta["vtype"] == "VDouble" and meta["units"] == "mm" and meta["max"] == 5.0
    assert meta["alarm_high"] == "NaN" and body["value"] == "NaN" and c.severity == "MAJOR"
    assert "NaN" not in c.body.replace('"NaN"', "")  # never a bare NaN


def test_enum_bool_string_table_and_arrays():
    e = convert(NTEnum().wrap({"index": 1, "choices": ["a", "b"]}))
    assert fields(e)[1] == {"seconds": 0, "nanos": 0, "value": 1, "text": "b"}
    assert fields(e)[0]["labels"] == ["a", "b"]
    b = convert(NTScalar("?").wrap(True))
    assert fields(b)[1]["text"] == "true" and b.labels == ("false", "true")
    s = convert(NTScalar("s").wrap("hi"))
    assert fields(s)[1]["text"] == "hi" and s.vtype == "VString"
    t = convert(NTTable([("a", "s"), ("b", "d")]).wrap([{"a": "x", "b": math.nan}]))
    table = fields(t)[1]["table"]
    assert table == {"labels": ["a", "b"], "columns": {"a": ["x"], "b": ["NaN"]}}
    for code, key, dtype in (("ad", "b64dbl", "<f8"), ("af", "b64flt", "<f4"),
                             ("ah", "b64srt", "<i2"), ("ai", "b64int", "<i4"),
                             ("aB", "b64byt", "u1")):
        a = convert(NTScalar(code).wrap(np.array([1, 2, 3])))
        raw = base64.b64decode(fields(a)[1][key], validate=True)
        assert np.frombuffer(raw, dtype).tolist() == [1, 2, 3]
    assert fields(convert(NTScalar("as").wrap(["x", "y"])))[1]["value"] == ["x", "y"]


def test_parse_names():
    assert parse_name("X:a").key == "pva://X:a"
    assert parse_name("X:a", "ca").scheme == "ca"
    assert parse_name("pva://X:a").name == "X:a"
    loc = parse_name("loc://x(3.5)")
    assert (loc.scheme, loc.name, loc.arg) == ("loc", "x", "3.5")
    ff = parse_name("sim://flipflop(29.929)")
    assert (ff.name, ff.arg) == ("flipflop", "29.929")
    for bad, code in (("dev://m1", "unknown-scheme"), ("sim://x", "unknown-sim"),
                      ("", "bad-name"), ("a\nb", "bad-name"), (5, "bad-name"),
                      ("x" * 2000, "bad-name"), ("pva://", "bad-name")):
        with pytest.raises(PVNameError) as e:
            parse_name(bad)
        assert e.value.code == code


def test_write_values_are_converted_or_refused():
    assert _put_value("42", True, (), "VDouble") == 42.0
    assert _put_value("42", True, (), "VInt") == 42
    assert _put_value("One", True, ("Zero", "One"), "VEnum") == 1
    assert _put_value(3, False, (), "VString") == "3"
    for args in (("abc", True, (), "VDouble"), ("Three", True, ("a",), "VEnum"),
                 (1, True, (), "VDoubleArray"), (1, False, (), "VTable")):
        with pytest.raises(ValueError):
            _put_value(*args)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="auth"):
        BridgeConfig(prefix="P:", auth="magic")
    with pytest.raises(ValueError, match="password file"):
        BridgeConfig(prefix="P:", auth="password")
    assert BridgeConfig(prefix="P:").registry_prefix == "P:"


def test_password_file_and_sessions(tmp_path):
    pw = tmp_path / "users"
    set_password(pw, "alice", "s3cret")
    set_password(pw, "bob", "other")
    assert pw.stat().st_mode & 0o777 == 0o600
    users = read_password_file(pw)
    assert set(users) == {"alice", "bob"} and users["alice"].startswith("$argon2id$")
    assert check_password(pw, "alice", "s3cret")
    assert not check_password(pw, "alice", "wrong") and not check_password(pw, "eve", "x")
    with pytest.raises(ValueError):
        set_password(pw, "bad name", "x")
    (tmp_path / "bad").write_text("alice:plaintext\n")
    with pytest.raises(PasswordFileError, match=":1:"):
        read_password_file(tmp_path / "bad")
    s = Sessions(60)
    tok = s.create("alice", "127.0.0.1")
    assert s.user(tok) == "alice" and s.user("nope") is None
    s.drop(tok)
    assert s.user(tok) is None


def test_command_line_defaults_are_the_config_defaults():
    from bridges.pvws.main import _parser

    a = _parser().parse_args(["--prefix", "P:"])
    cfg = BridgeConfig(prefix="P:")
    assert a.max_pvs == cfg.max_pvs and a.throttle_ms / 1000 == cfg.throttle
    assert a.host == cfg.host and a.auth == cfg.auth and a.writes is cfg.writes


def test_device_ca_configuration_takes_ca_keys_only():
    from bridges.pvws.cawrite import device_ca_env
    from bridges.pvws.main import main

    base = {"EPICS_CA_ADDR_LIST": "10.0.0.255", "EPICS_CA_SERVER_PORT": "5064", "PATH": "/bin"}
    env = device_ca_env({"EPICS_CA_ADDR_LIST": "127.0.0.1"}, base)
    assert env == {"EPICS_CA_ADDR_LIST": "127.0.0.1", "PATH": "/bin"}  # none of the bridge's
    with pytest.raises(ValueError, match="EPICS_CA_"):
        device_ca_env({"EPICS_PVA_ADDR_LIST": "127.0.0.1"}, base)
    with pytest.raises(ValueError, match="EPICS_CA_"):
        BridgeConfig(prefix="P:", device_ca_conf={"EPICS_PVA_ADDR_LIST": "127.0.0.1"})
    with pytest.raises(SystemExit):
        main(["--prefix", "P:", "--device-ca-conf", "EPICS_PVA_ADDR_LIST=127.0.0.1"])
