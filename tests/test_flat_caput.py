"""Which forwarded puts the CA bridge sends over CA (decision 0155), as a unit.

The libca calls are faked here (native type and element count of a channel); the real path,
libca against the softIoc with a put the IOC refuses, is
``tests/test_flat_system.py::test_puts_over_ca_complete_and_a_failed_ca_put_is_a_put_failure``.
"""

from __future__ import annotations

import numpy as np
import pytest
from epics import dbr

from bridges.flat.app import parse_upstream
from bridges.flat.caput import (
    DBR_CHAR,
    DBR_DOUBLE,
    DBR_ENUM,
    DBR_LONG,
    DBR_SHORT,
    DBR_STRING,
    CaUpstream,
)


class FakeLibca:
    """``ca_field_type`` / ``ca_element_count`` of one channel."""

    def __init__(self, ftype: int, count: int = 1) -> None:
        self.ftype, self.count = ftype, count

    def ca_field_type(self, chid):
        return self.ftype

    def ca_element_count(self, chid):
        return self.count


def data(ftype: int, values: list, count: int = 1):
    up = CaUpstream({"EPICS_CA_ADDR_LIST": "127.0.0.1"})
    up._libca, up._dbr = FakeLibca(ftype, count), dbr
    return up._data(None, values)


@pytest.mark.parametrize(("ftype", "values", "count"), [
    (DBR_DOUBLE, [1.5], 1), (DBR_DOUBLE, [np.float64(2.0), 3], 4), (DBR_LONG, [-(2**31)], 1),
    (DBR_SHORT, [np.int16(-5)], 1), (DBR_ENUM, [3], 1), (DBR_CHAR, [255, 0], 2),
    (DBR_LONG, [7.0], 1),
])
def test_numbers_the_native_type_holds_go_over_ca(ftype, values, count):
    out = data(ftype, values, count)
    assert out is not None
    got_type, arr = out
    assert got_type == ftype and [float(x) for x in arr] == [float(v) for v in values]


@pytest.mark.parametrize(("ftype", "values", "count"), [
    (DBR_STRING, ["abc"], 1),  # strings: PVA
    (DBR_DOUBLE, ["1.0"], 1),  # a text for a number: PVA decides
    (DBR_LONG, [2**31], 1),  # does not fit int32 (e.g. an int64 record): PVA
    (DBR_SHORT, [40000], 1), (DBR_CHAR, [-1], 1), (DBR_ENUM, [65536], 1),
    (DBR_LONG, [1.5], 1),  # not an integer
    (DBR_DOUBLE, [True], 1),  # a bool is not a number here
    (DBR_DOUBLE, [1.0, 2.0], 1),  # more elements than the channel has
    (DBR_DOUBLE, [], 1),
    (14, [1.0], 1),  # not a native DBR type
])
def test_everything_else_goes_over_pva(ftype, values, count):
    assert data(ftype, values, count) is None


def test_upstream_takes_the_libca_keys_only_for_the_device_network():
    conf = parse_upstream(["EPICS_PVA_ADDR_LIST=127.0.0.1", "EPICS_CA_ADDR_LIST=127.0.0.1",
                           "EPICS_CA_SERVER_PORT=5064"])
    assert conf == {"EPICS_PVA_ADDR_LIST": "127.0.0.1", "EPICS_CA_ADDR_LIST": "127.0.0.1",
                    "EPICS_CA_SERVER_PORT": "5064"}
    with pytest.raises(ValueError, match="EPICS_CA_ADDR_LIST"):
        parse_upstream(["EPICS_CA_REPEATER_PORT=5065"])
    with pytest.raises(ValueError, match="EPICS_PVA_"):
        parse_upstream(["EPICS_CA_ADDR_LIST=127.0.0.1"], "--service")


def test_a_put_before_libca_is_open_is_not_for_ca():
    assert CaUpstream({"EPICS_CA_ADDR_LIST": "127.0.0.1"}).put("X:y", [1.0]) is None
