"""The web client's PV list (``/pvws/names.json``), its queue RPC arguments, and its static files.

The browser tests (``tests/test_web_client.py``) drive the same code in a real Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bridges.pvws import names, rpc
from iocs.queue import model
from iocs.queue.model import BadRequestError
from pvdb import catalog
from pvdb import queue as qn

STATIC = Path(names.__file__).with_name("static")


def all_spec_names(prefix: str) -> set[str]:
    out = set()
    for module, _ in catalog.SPEC_MODULES:
        for spec in catalog.specs(module):
            out.add(spec.name(prefix, device=names.DEVICE_TEMPLATE) if spec.per_device
                    else spec.name(prefix))
    return out


def test_names_document_lists_only_pvdb_names():
    doc = names.names_document("BL01:")
    known = all_spec_names("BL01:")
    listed = [*doc["pv"].values(), *doc["device"].values()]
    listed += [v for c in doc["classes"].values() for v in c.values() if v]
    listed += [h["heartbeat"] for h in doc["health"]]
    listed += [s for h in doc["health"] for s in h["status"]]
    listed += [r["pv"] for r in doc["queueRpc"].values()]
    assert listed and all(name in known for name in listed), set(listed) - known
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


def test_names_document_health_covers_every_heartbeat_and_queue_rpcs():
    doc = names.names_document("BL01:")
    assert {h["process"] for h in doc["health"]} >= {"coordination", "registry", "queue", "guard"}
    assert {r["pv"] for r in doc["queueRpc"].values()} == {s.name("BL01:") for s in qn.CONTROL_RPCS}
    assert doc["queueRpc"]["move"]["args"] == list(qn.ITEM_MOVE_ARGS)
    doc2 = names.names_document("BL01:", registry_prefix="REG:")
    assert doc2["pv"]["registryDevices"] == "REG:Registry:Devices"
    assert doc2["pv"]["locks"] == "BL01:Coord:Locks"


def test_names_document_refuses_a_bad_prefix():
    with pytest.raises(ValueError, match="prefix 'BL01'"):
        names.names_document("BL01")


def test_static_files_spell_no_pv_name():
    """The page states its PVs in one place: no pvdb suffix appears in the JavaScript."""
    suffixes = {spec.suffix.split("{device}")[-1].strip(":") for m, _ in catalog.SPEC_MODULES
                for spec in catalog.specs(m)}
    suffixes = {s for s in suffixes if ":" in s or s[:1].isupper()}
    for path in STATIC.glob("*.js"):
        text = path.read_text()
        strings = re.findall(r'"([^"\n]*)"|\'([^\'\n]*)\'|`([^`]*)`', text)
        literals = {a or b or c for a, b, c in strings}
        # a PV name has a ':' (a bare word such as a button's "Take" is a label, not a PV)
        bad = {s for s in literals if ":" in s for suffix in suffixes if suffix and suffix in s
               and re.search(rf"(^|:){re.escape(suffix)}($|:)", s)}
        assert not bad, f"{path.name} spells PV names {bad}: take them from names.json"


def test_static_files_load_nothing_from_elsewhere():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
        assert not re.search(r"import .* from \"(https?:)?//", text), path.name


def test_queue_rpc_args_are_checked_before_anything_is_sent():
    assert rpc.parse_args("add", {"name": "count", "args": '[["det1"]]'}) == {
        "name": "count", "args": '[["det1"]]'}
    assert rpc.parse_args("move", {"uid": "u", "posDest": 0}) == {"uid": "u", "posDest": "0"}
    assert rpc.parse_args("start", None) == {}
    with pytest.raises(ValueError, match="Queue:QueueStart takes no arguments; not: x"):
        rpc.parse_args("start", {"x": "1"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        rpc.parse_args("add", ["count"])
    with pytest.raises(ValueError, match="'args' must be a string or number"):
        rpc.parse_args("add", {"name": "count", "args": [["det1"]]})
    # the web user is who the bridge logged in: a body cannot name another one
    for key in ("add", "start", "remove"):
        for arg in ("onBehalfOf", "clientHost"):
            with pytest.raises(ValueError, match=f"not: {arg}"):
                rpc.parse_args(key, {arg: "root"})
    doc = names.names_document("BL01:")
    assert all(not {"onBehalfOf", "clientHost"} & set(r["args"])
               for r in doc["queueRpc"].values())


def test_item_move_arguments():
    assert model.parse_item_move({"uid": "a", "posDest": "front"}) == {
        "uid": "a", "pos_dest": "front"}
    assert model.parse_item_move({"pos": "2", "beforeUid": "b"}) == {"pos": 2, "before_uid": "b"}
    assert model.parse_item_move({"uid": "a", "afterUid": "b"}) == {"uid": "a", "after_uid": "b"}
    for bad, match in (
        ({"posDest": "0"}, "exactly one of uid"),
        ({"uid": "a"}, "exactly one destination"),
        ({"uid": "a", "posDest": "0", "afterUid": "b"}, r"got posDest, afterUid"),
        ({"uid": "a", "posDest": "top"}, "posDest must be front, back or an integer"),
        ({"uid": "a", "posDest": "0", "x": "1"}, "x"),
    ):
        with pytest.raises(BadRequestError, match=match):
            model.parse_item_move(bad)
