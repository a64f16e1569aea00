"""Redaction of secrets (store/redis passwords, lock keys) from every text pvcoord shows.

One home for the rule "a password or key never appears in a PV, event, log line, error or
process list". Used by the store's error texts, ``Coord:Health``, the logs of every IOC (through
:class:`RedactingFilter`), the queue IOC's messages and console, the worker hook and the CLI.

- :func:`redact_url` hides the password of one URL (``redis://:pw@h:6379/0`` ->
  ``redis://:***@h:6379/0``).
- :func:`redact` hides every URL password inside a text, and every extra secret it is given.
- :func:`looks_like_key` tells whether a string has the shape of a lock key, so a key typed where a
  device belongs is refused instead of being published as a device name.

What this is worth: it removes the secrets pvcoord knows about (URLs with credentials, the key
shape of ``secrets.token_urlsafe(24)``, values registered with :func:`register_secret`). It cannot
recognise a secret typed into free text such as a lock's ``reason``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

MASK = "***"
"""What a hidden secret is replaced with."""

KEY_LENGTH = 32
"""Length of a lock key (``secrets.token_urlsafe(24)``)."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{" + str(KEY_LENGTH) + r"}\Z")
# scheme://[user][:password]@host : the password part is hidden (the user name is kept).
# The scheme is at most 32 characters (real ones are short): unbounded, a long run of letters
# without "://" was rescanned from each of its characters (quadratic: a 45,000-letter claimed
# account name took 15 s of the IOC's GIL in one log line); bounded, each start costs at most 32.
_URL_CRED_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]{0,31}://)(?P<auth>[^\s/@]*)@")
# ``--requirepass X``, ``requirepass X`` (redis config), ``password=X``, ``passwd: X``; not the
# word "pass" in ordinary text ("puts pass the guard", "bypass").
_PW_OPTION_RE = re.compile(
    r"(?P<opt>(?<![A-Za-z0-9_])(?:--?(?:requirepass|masterauth|password|passwd)[ =]|"
    r"(?:requirepass|masterauth) |(?:password|passwd|requirepass|masterauth)\s*[=:]\s*))\S+",
    re.IGNORECASE)

_registered: set[str] = set()
_registered_mutex = threading.Lock()


def redact_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``.

    A URL without credentials is returned unchanged; ``redis://secret@host`` (a bare password,
    as redis-py reads it) becomes ``redis://***@host``.
    """
    scheme, sep, rest = url.partition("://")
    auth, at, hostpart = rest.rpartition("@")
    if not sep or not at:
        return url
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{hostpart}" if ":" in auth else f"{scheme}://{MASK}@{hostpart}"


def _url_sub(m: re.Match[str]) -> str:
    auth = m.group("auth")
    if not auth:
        return m.group(0)
    user, colon, _ = auth.partition(":")
    return f"{m.group('scheme')}{user}:{MASK}@" if colon else f"{m.group('scheme')}{MASK}@"


def register_secret(value: str) -> None:
    """Remember ``value`` (a password read from a file or the environment) for :func:`redact`.

    Values shorter than 4 characters are ignored (they would mask ordinary words).
    """
    if value and len(value) >= 4:
        with _registered_mutex:
            _registered.add(value)


def register_url(url: str | None) -> None:
    """Register the password of ``url`` (if it has one) with :func:`register_secret`."""
    if not url:
        return
    m = _URL_CRED_RE.search(url)
    if m and m.group("auth"):
        user, colon, pw = m.group("auth").partition(":")
        register_secret(pw if colon else user)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords, ``password=...``-style options and known secrets hidden.

    Args:
        text: any message, log line or console output.
        secrets: further values to hide (in addition to the registered ones).

    Returns:
        The text with every secret replaced by ``***``.
    """
    if not text:
        return text
    out = _URL_CRED_RE.sub(_url_sub, text)
    out = _PW_OPTION_RE.sub(lambda m: m.group("opt") + MASK, out)
    with _registered_mutex:
        known = sorted({*_registered, *(s for s in secrets if s and len(s) >= 4)},
                       key=len, reverse=True)
    for s in known:
        out = out.replace(s, MASK)
    return out


def looks_like_key(text: str) -> bool:
    """Whether ``text`` has the shape of a lock key (32 URL-safe base64 characters)."""
    return bool(_KEY_RE.match(text))


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record through :func:`redact` (message and args).

    Install it on the handlers of a process (``iocs.pvutil.setup_logging`` does) so no log line
    carries a password, whichever library wrote it.
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging.Filter API
        try:
            msg = record.getMessage()
        except Exception:
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = redact(msg), None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger)."""
    lg = logger or logging.getLogger()
    for h in lg.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
