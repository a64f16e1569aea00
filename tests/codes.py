"""Assert refusals by their machine-readable code and named holder, not by their wording."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pvdb.lockmodel import ErrorCode, parse_error_text


@contextmanager
def raises_code(
    exc_type: type[BaseException], code: ErrorCode, holder: str | None = None
) -> Iterator[pytest.ExceptionInfo]:
    """Like ``pytest.raises(exc_type)``; then the error's ``code`` (and ``holder``) must match.

    The code is the exception's ``.code`` attribute, or else the ``[code ...]`` head of its text.
    """
    with pytest.raises(exc_type) as info:
        yield info
    err = info.value
    got = getattr(err, "code", None)
    got_holder = getattr(err, "holder", None)
    if got is None:
        parsed = parse_error_text(str(err))
        got, got_holder = parsed.code, parsed.holder
    assert got == code, f"expected [{code}], got [{got}]: {err}"
    if holder is not None:
        assert got_holder == holder, f"expected holder {holder!r}, got {got_holder!r}: {err}"


def code_of(text: str) -> ErrorCode | None:
    """The code at the head of an error text (``None`` if there is none)."""
    return parse_error_text(text).code


def holder_of(text: str) -> str:
    """The holder named in the head of an error text ('' if none)."""
    return parse_error_text(text).holder
