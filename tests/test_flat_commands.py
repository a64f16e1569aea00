"""Unit tests of the command PVs' input rules (bridges.flat.commands; the system test puts the
same values through the real bridge)."""

from __future__ import annotations

import pytest

from bridges.flat.commands import (
    TEXT_MAX,
    Code,
    CommandError,
    command_value,
    decode_text,
    device_names,
    message,
    refusal,
)

KNOWN = ["m1", "m2", "det1"]


@pytest.mark.parametrize("values", [[1], [1.0], ["1"], ["Take"], [b"Take"], [b"1\0junk"]])
def test_take_accepts_one_or_its_label(values):
    command_value(values, "Take", "P:Flat:m1:Take")


@pytest.mark.parametrize("values", [[], [1, 1], [0], [2], [2.5], ["take"], [b"\xff"], [None],
                                    ["x" * (TEXT_MAX + 1)], [b"y" * 40000], ["1\n"]])
def test_take_refuses_anything_else_with_bad_value(values):
    with pytest.raises(CommandError) as e:
        command_value(values, "Take", "P:Flat:m1:Take")
    assert e.value.code == Code.BAD_VALUE and str(e.value).startswith("bad-value: P:Flat:m1:Take")


def test_device_lists():
    assert device_names(" m1, det1 ", KNOWN, "Flat:Take") == ["m1", "det1"]
    for text, code in (("", Code.BAD_VALUE), ("m1,m1", Code.BAD_VALUE), ("m 1", Code.BAD_VALUE),
                       ("m9", Code.UNKNOWN_DEVICE), ("m1,m9", Code.UNKNOWN_DEVICE)):
        with pytest.raises(CommandError) as e:
            device_names(text, KNOWN, "Flat:Take")
        assert e.value.code == code, text
    with pytest.raises(CommandError) as e:
        decode_text(b"a\x01b", "Flat:Take")
    assert e.value.code == Code.BAD_VALUE


def test_refusals_are_classified_and_messages_bounded():
    held = refusal("m1 is held by root@127.0.0.1 (MANUAL_OPERATOR, reason x)")
    assert held.code == Code.HELD and "root@127.0.0.1" in str(held)
    assert refusal("nobody may not take MAINTENANCE").code == Code.REFUSED
    assert len(message(Code.REFUSED, "z" * 10000)) == TEXT_MAX


def test_an_unexpected_failure_of_a_pva_command_put_still_carries_a_code():
    # run_command answers every refusal itself; a defect below it must still reach the PVA
    # client as "internal: <pv>: ..." (a unit test: no real put can reach this branch)
    import asyncio

    from bridges.flat.server import _PvaCommand

    class Op:
        error: str | None = "not answered"

        def value(self):
            raise RuntimeError("boom")

        def done(self, error=None):
            self.error = error

    op = Op()
    asyncio.run(_PvaCommand(None, "P:Flat:m1:Take", "m1", "take").put(None, op))  # type: ignore[arg-type]
    assert op.error is not None and op.error.startswith(f"{Code.INTERNAL}: P:Flat:m1:Take: ")
