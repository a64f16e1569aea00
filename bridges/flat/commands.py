"""Take/Release command PVs: what a put means, and the message it leaves (pure, no network).

A put to ``Flat:<device>:Take`` / ``Flat:<device>:Release`` must be the command value (``1`` as a
number, or the label ``Take`` / ``Release`` or ``1`` as text); a put to ``Flat:Take`` /
``Flat:Release`` must be a device name or comma list. Anything else is refused with a message and
changes nothing. Every message starts with a machine-readable code (:class:`Code`) and a colon,
e.g. ``held: m1 is held by root@127.0.0.1 (MANUAL_OPERATOR, ...)``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from enum import StrEnum

TEXT_MAX = 512
"""Longest text a command PV accepts (bytes; a device comma list)."""
DEVICE_RE = re.compile(r"^[A-Za-z0-9_\-.]{1,64}\Z")


class Code(StrEnum):
    """First word of every message PV value."""

    GRANTED = "granted"
    RELEASED = "released"
    HELD = "held"
    """Refused: another holder has the device (the message names it)."""
    REFUSED = "refused"
    """Refused by the coordination IOC for another reason (policy, not locked, ...)."""
    BAD_VALUE = "bad-value"
    UNKNOWN_DEVICE = "unknown-device"
    NO_IDENTITY = "no-identity"
    UNAVAILABLE = "unavailable"
    """The coordination IOC did not answer."""
    BUSY = "busy"
    """Too many commands waiting; try again."""
    INTERNAL = "internal"
    """The bridge failed on the put in a way it does not expect (its log has the traceback)."""


class CommandError(ValueError):
    """A command put that is refused; ``str()`` is the message (``code: text``)."""

    def __init__(self, code: Code, text: str) -> None:
        super().__init__(f"{code.value}: {text}")
        self.code = code
        self.text = text


def message(code: Code, text: str) -> str:
    """``code: text``, shortened to :data:`TEXT_MAX` characters."""
    out = f"{code.value}: {text}"
    return out if len(out) <= TEXT_MAX else out[: TEXT_MAX - 3] + "..."


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_text(raw: bytes | str, what: str) -> str:
    """Decode a CA string/char-array put to text.

    Raises:
        CommandError: ``bad-value`` if longer than :data:`TEXT_MAX`, not UTF-8, or with control
            characters.
    """
    if isinstance(raw, str):
        text = raw
    else:
        raw = raw.split(b"\0", 1)[0] if b"\0" in raw else raw
        if len(raw) > TEXT_MAX:
            raise CommandError(Code.BAD_VALUE,
                               f"{what}: a {len(raw)}-byte value; the limit is {TEXT_MAX}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(Code.BAD_VALUE, f"{what}: the value is not UTF-8 text") from None
    if len(text) > TEXT_MAX:
        raise CommandError(Code.BAD_VALUE,
                           f"{what}: a {len(text)}-character value; the limit is {TEXT_MAX}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise CommandError(Code.BAD_VALUE, f"{what}: the value contains control characters")
    return text.strip()


def command_value(values: Sequence[object], label: str, what: str) -> None:
    """Check a put to a per-device command PV: one element, ``1`` or the ``label`` text.

    Args:
        values: the put's elements (numbers, or str/bytes for string puts).
        label: ``Take`` or ``Release``.
        what: the PV name, for the message.

    Raises:
        CommandError: ``bad-value`` naming what was wrong.
    """
    if len(values) != 1:
        raise CommandError(Code.BAD_VALUE,
                           f"{what}: put one value (1 or {label}), not {len(values)} elements")
    v = values[0]
    if isinstance(v, bytes | str):
        text = decode_text(v, what)
        if text in ("1", label):
            return
        raise CommandError(Code.BAD_VALUE, f"{what}: put 1 or {label!r}, not {_show(text)}")
    try:
        number = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CommandError(Code.BAD_VALUE, f"{what}: put 1 or {label!r}, not {_show(v)}") from None
    if number != 1:
        raise CommandError(Code.BAD_VALUE, f"{what}: put 1 ({label}), not {_show(v)}")


def device_names(text: str, known: Sequence[str], what: str) -> list[str]:
    """Devices named by a put to ``Flat:Take`` / ``Flat:Release`` (comma list).

    Raises:
        CommandError: ``bad-value`` for an empty or malformed list, ``unknown-device`` naming
            the first name that is not registered.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CommandError(Code.BAD_VALUE, f"{what}: put a device name or a comma list")
    if len(names) != len(set(names)):
        raise CommandError(Code.BAD_VALUE, f"{what}: a device is named twice")
    for n in names:
        if not DEVICE_RE.match(n):
            raise CommandError(Code.BAD_VALUE, f"{what}: {_show(n)} is not a device name")
        if n not in known:
            raise CommandError(Code.UNKNOWN_DEVICE,
                               f"{what}: unknown device {n!r} (registered: "
                               f"{', '.join(known) or 'none'})")
    return names


def refusal(error: str) -> CommandError:
    """Classify the coordination IOC's error text: ``held`` when it names a holder."""
    text = " ".join(error.split())
    if " held by " in text:
        return CommandError(Code.HELD, text)
    return CommandError(Code.REFUSED, text)


def granted(devices: Sequence[str], account: str, expires: float) -> str:
    """The message of a granted Take."""
    until = time.strftime("%H:%M:%S", time.localtime(expires)) if expires > 0 else "never"
    return message(Code.GRANTED, f"{', '.join(devices)} locked for {account} until {until}")


def released(devices: Sequence[str], account: str) -> str:
    """The message of a Release."""
    return message(Code.RELEASED, f"{', '.join(devices)} released by {account}")
