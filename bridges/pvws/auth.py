"""Web users: the password file (argon2 hashes), sessions, and the ``passwd`` tool.

Password file: one ``user:hash`` line per user (``#`` comments and blank lines allowed), the hash
in argon2's PHC string format (``$argon2id$v=19$m=...``, salted by argon2-cffi). Written by
``python -m bridges.pvws passwd FILE USER`` (password from stdin, or generated and printed with
``--generate``). The file is read at each login, so adding a user needs no restart.

Sessions: a random 256-bit token in the cookie ``pvcoord_session`` maps to the user name in the
bridge's memory (a restart logs everybody out); nothing secret is derived from the user name.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

COOKIE = "pvcoord_session"
USER_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")
"""Valid web user names (they become lock owners ``user@host``; policy principal characters)."""

_hasher = PasswordHasher()


class PasswordFileError(ValueError):
    """The password file cannot be used (``FILE:LINE: reason``)."""


def read_password_file(path: Path) -> dict[str, str]:
    """Return user -> argon2 hash from ``path``.

    Raises:
        PasswordFileError: unreadable file, a line that is not ``user:hash``, a bad user name, a
            hash that is not argon2, or a user listed twice.
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise PasswordFileError(f"{path}:0: cannot read: {e.strerror}") from None
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not USER_RE.match(user):
            raise PasswordFileError(f"{path}:{i}: expected 'user:argon2-hash'")
        if not hashed.startswith("$argon2"):
            raise PasswordFileError(f"{path}:{i}: the hash of {user} is not an argon2 hash")
        if user in out:
            raise PasswordFileError(f"{path}:{i}: {user} is listed twice")
        out[user] = hashed
    return out


def hash_password(password: str) -> str:
    """An argon2id hash (random salt) of ``password``."""
    return _hasher.hash(password)


def check_password(path: Path, user: str, password: str) -> bool:
    """Whether ``user`` / ``password`` match the password file (slow on purpose: argon2).

    Raises:
        PasswordFileError: the file cannot be used.
    """
    users = read_password_file(path)
    hashed = users.get(user)
    if hashed is None:
        # Spend the same time as for a known user, so timing does not reveal user names.
        _burn(password)
        return False
    try:
        return _hasher.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


_DUMMY = _hasher.hash("pvcoord-dummy")


def _burn(password: str) -> None:
    try:
        _hasher.verify(_DUMMY, password + "\0")
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        pass


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace ``user`` in the password file (created 0600 if missing).

    Raises:
        ValueError: bad user name or empty password.
        PasswordFileError: the existing file is not usable.
    """
    if not USER_RE.match(user):
        raise ValueError(f"user name {user[:70]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if not password:
        raise ValueError("empty password")
    users = read_password_file(path) if path.exists() else {}
    users[user] = hash_password(password)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# pvcoord web users: user:argon2-hash (python -m bridges.pvws passwd)\n")
        for u, h in users.items():
            f.write(f"{u}:{h}\n")
    os.replace(tmp, path)


def generate_password() -> str:
    """A random password of 16 URL-safe characters."""
    return secrets.token_urlsafe(12)


@dataclass
class Session:
    """One logged-in browser."""

    user: str
    host: str
    expires: float


class Sessions:
    """Token -> :class:`Session`, in memory. Times are ``time.time()`` seconds."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._by_token: dict[str, Session] = {}

    def create(self, user: str, host: str) -> str:
        """Start a session; return its token."""
        self._expire()
        token = secrets.token_urlsafe(32)
        self._by_token[token] = Session(user, host, time.time() + self.lifetime)
        return token

    def user(self, token: str | None) -> str | None:
        """The user of a live session token, or None."""
        if not token:
            return None
        s = self._by_token.get(token)
        if s is None:
            return None
        if s.expires < time.time():
            del self._by_token[token]
            return None
        return s.user

    def drop(self, token: str | None) -> None:
        """End a session (unknown tokens are ignored)."""
        if token:
            self._by_token.pop(token, None)

    def _expire(self) -> None:
        now = time.time()
        for t in [t for t, s in self._by_token.items() if s.expires < now]:
            del self._by_token[t]

    def __len__(self) -> int:
        return len(self._by_token)
