"""The Phoebus screens parse and use only the documented widget set (opi/make_screens.py).

Every ``pv_name`` resolving to a pvdb spec is checked by tests/test_project.py; connecting to each
on a running bridge is in tests/test_flat_system.py (``test_every_screen_pv_connects``).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "opi"))
try:
    import make_screens
finally:
    sys.path.pop(0)

BOBS = sorted((REPO / "opi").glob("*.bob"))


@pytest.mark.parametrize("bob", BOBS, ids=[b.name for b in BOBS])
def test_screen_uses_only_the_documented_widget_set(bob):
    root = ET.parse(bob).getroot()
    assert root.tag == "display" and root.get("version") == "2.0.0"
    widgets = list(root.iter("widget"))
    assert widgets
    for w in widgets:
        kind = w.get("type")
        assert kind in make_screens.WIDGET_SET, f"{bob.name}: widget type {kind}"
        assert w.get("version") == make_screens.VERSIONS.get(kind, "2.0.0"), (bob.name, kind)
        props = {child.tag for child in w}
        extra = props - make_screens.WIDGET_SET[kind]
        assert not extra, f"{bob.name}: {kind} {w.findtext('name')} has {sorted(extra)}"
        for action in w.iter("action"):
            assert action.get("type") in ("write_pv", "open_display"), bob.name
            if action.get("type") == "write_pv":
                # the button's own PV is the one written: Phoebus greys it out without access
                assert action.findtext("pv_name") == w.findtext("pv_name"), bob.name
            else:
                assert (REPO / "opi" / action.findtext("file")).exists(), bob.name
        if kind == "multi_state_led":
            labels = [s.findtext("label") for s in w.iter("state")]
            assert labels == list(make_screens.pvn.DEVICE_STATES)


def test_overview_has_a_row_per_demo_device_with_commands():
    root = ET.parse(REPO / "opi" / "overview.bob").getroot()
    names = {w.findtext("name") for w in root.iter("widget")}
    for d in make_screens.demo.DEVICES:
        assert {f"{d.name} lock", f"{d.name} take", f"{d.name} release", f"{d.name} message",
                f"{d.name} setpoint"} <= names
