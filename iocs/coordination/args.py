"""RPC arguments of the coordination IOC: ``pvcall``-style strings -> typed values (pure)."""

from __future__ import annotations

import functools
import math

from pvdb.models import LockType

from .locktable import LockError

MAX_ARG = 4096
"""Longest accepted argument value (characters); longer is refused before any parsing."""


@functools.cache
def _name_set(allowed: tuple[str, ...]) -> frozenset[str]:
    return frozenset(allowed)


def check_names(args: dict[str, str], allowed: tuple[str, ...], rpc: str) -> None:
    """Refuse unknown argument names and over-long values, naming them."""
    if not _name_set(allowed).issuperset(args):
        extra = sorted(set(args) - set(allowed))
        raise LockError(
            f"{rpc}: unknown argument(s) {', '.join(repr(e[:40]) for e in extra)}; "
            f"accepted: {', '.join(allowed)}"
        )
    for k, v in args.items():
        if len(v) > MAX_ARG:
            raise LockError(f"{rpc}: argument {k} is {len(v)} characters; the limit is {MAX_ARG}")


def devices_arg(value: str | None) -> list[str]:
    """``"m1, m2"`` -> ``["m1", "m2"]``; empty entries are an error."""
    if value is None or not value.strip():
        return []
    parts = [p.strip() for p in value.split(",")]
    if any(not p for p in parts):
        raise LockError(f"device list {value[:80]!r} has an empty entry")
    return parts


def lock_type_arg(value: str | None) -> LockType:
    """Lock type name (case-insensitive) -> :class:`LockType`."""
    if not value:
        raise LockError(
            "missing argument type: one of " + ", ".join(t.value for t in LockType)
        )
    try:
        return LockType(value.strip().upper())
    except ValueError:
        raise LockError(
            f"unknown lock type {value[:40]!r}: use one of "
            + ", ".join(t.value for t in LockType)
        ) from None


def timeout_arg(value: str | None) -> float | None:
    """Lease in seconds; ``None`` when absent (the policy default applies)."""
    if value is None or value.strip() == "":
        return None
    try:
        t = float(value)
    except ValueError:
        raise LockError(f"timeout {value[:40]!r} is not a number of seconds") from None
    if not math.isfinite(t) or t <= 0:
        raise LockError(f"timeout must be a positive, finite number of seconds, not {value[:40]}")
    return t
