"""Durable storage of locks and audit events: SQLite (WAL, the default) or Redis.

The coordination IOC is the only writer. It calls :meth:`Store.commit` with every change *before*
it replies to the client, so a granted lock survives ``kill -9`` of the IOC. Readers (the worker
hook inside the RE worker, the CLI) may open the same store read-only to learn the lock state
without EPICS.

URLs accepted by :func:`open_store`:

- ``sqlite:///ABSOLUTE/PATH.sqlite`` or a plain path: SQLite in WAL mode. ``?sync=normal``
  (default: each commit is written to the WAL before the reply, so it survives a crash or
  ``kill -9`` of the IOC, not a power loss of the host) or ``?sync=full`` (each commit is also
  fsync'ed: survives a power loss; costs one fsync, ~0.5 ms on the benchmark machine, per change).
  See docs/decisions/0003-sqlite-synchronous-normal.md.
  ``?mode=0600`` (default: only the service account that runs the IOC reads the file) or
  ``?mode=0640`` (its group too, e.g. a queue service account whose worker hook reads the
  store). A new file and its folder are created with that mode (the folder 0700 / 0750); an
  existing file that others may read is narrowed to it. SQLite gives the ``-wal`` and ``-shm``
  files the database file's mode.
- ``redis://HOST:PORT/DB``: Redis; durability is the server's (run it with
  ``appendonly yes`` / ``appendfsync always`` as ``pvcoord.procs.start_redis`` does).

Keys are never stored: a lock keeps only SHA-256 digests of its keys.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

from pvdb.models import Lock, LockEvent
from pvdb.redact import redact, redact_url, register_url

log = logging.getLogger("pvcoord.store")


class StoreError(RuntimeError):
    """The store could not be opened, read or written."""


class Store(Protocol):
    """What the coordination IOC needs from a store."""

    url: str

    def load_locks(self) -> list[Lock]:
        """All locks as last committed (expired ones included: the caller drops them)."""
        ...

    def commit(
        self, upsert: Iterable[Lock], delete: Iterable[str], events: Iterable[LockEvent]
    ) -> None:
        """Apply one change atomically and durably: all of it or nothing.

        Args:
            upsert: locks to insert or replace (keyed by device).
            delete: devices whose lock is removed.
            events: audit events to append.

        Raises:
            StoreError: nothing was written.
        """
        ...

    def recent_events(self, n: int) -> list[LockEvent]:
        """The last ``n`` audit events, oldest first."""
        ...

    def prune_events(self, before: float, keep: int) -> int:
        """Delete audit events older than ``before`` (epoch s) and all but the newest ``keep``.

        Returns how many were deleted.

        Raises:
            StoreError: nothing was deleted.
        """
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS locks (device TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, action TEXT NOT NULL, device TEXT NOT NULL, lock_type TEXT,
    actor TEXT NOT NULL, holder TEXT NOT NULL, message TEXT NOT NULL
);
"""


def _event_row(e: LockEvent) -> tuple:
    return (
        e.time, e.action.value, e.device, e.lock_type.value if e.lock_type else None,
        e.actor, e.holder, e.message,
    )


def _event_from_row(row: tuple) -> LockEvent:
    t, action, device, lock_type, actor, holder, message = row
    return LockEvent(
        time=t, action=action, device=device, lock_type=lock_type, actor=actor, holder=holder,
        message=message,
    )


FILE_MODES = (0o600, 0o640)
"""Modes a SQLite store file may have: the service account only, or its group reading too."""


def _private_file(path: Path, mode: int) -> None:
    """Create ``path`` (and its folder) with ``mode``, or narrow an existing one to it."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750 if mode & 0o040 else 0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists() and p.stat().st_mode & 0o777 & ~mode:
            log.warning("store file %s was readable by others (%04o): narrowed to %04o",
                        p, p.stat().st_mode & 0o777, mode)
            p.chmod(p.stat().st_mode & 0o777 & mode)
        elif p == path and p.stat().st_mode & 0o777 != mode:
            p.chmod(mode)


class SQLiteStore:
    """SQLite in WAL mode; one connection guarded by a mutex (the IOC calls it from p4p threads).

    Args:
        path: database file (created with its folder if missing).
        sync: ``"full"`` (fsync each commit) or ``"normal"``.
        readonly: open for reading only (the worker hook, the CLI).
    """

    def __init__(
        self, path: str | Path, sync: str = "normal", readonly: bool = False, mode: int = 0o600
    ) -> None:
        if sync not in ("full", "normal"):
            raise StoreError(f"sync must be 'full' or 'normal', not {sync!r}")
        if mode not in FILE_MODES:
            raise StoreError(f"mode must be 0600 or 0640, not {mode:04o}")
        self.path = Path(path)
        self.url = f"sqlite://{self.path}?sync={sync}"
        self._mutex = threading.Lock()
        try:
            if readonly:
                uri = self.path.resolve().as_uri() + "?mode=ro"  # file:///abs/path?mode=ro
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                _private_file(self.path, mode)
                self._db = sqlite3.connect(self.path, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={sync.upper()}")
                self._db.executescript(_SCHEMA)
                self._db.commit()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot create SQLite store {self.path}: {e.strerror}") from None

    def load_locks(self) -> list[Lock]:  # noqa: D102 - see Store
        with self._mutex:
            try:
                rows = self._db.execute("SELECT data FROM locks ORDER BY device").fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read locks from {self.path}: {e}") from None
        return [Lock.model_validate_json(r[0]) for r in rows]

    def commit(  # noqa: D102 - see Store
        self, upsert: Iterable[Lock], delete: Iterable[str], events: Iterable[LockEvent]
    ) -> None:
        ups = [(lk.device, lk.model_dump_json()) for lk in upsert]
        dels = [(d,) for d in delete]
        evs = [_event_row(e) for e in events]
        with self._mutex:
            try:
                with self._db:  # one transaction: commit on success, rollback on error
                    if dels:
                        self._db.executemany("DELETE FROM locks WHERE device=?", dels)
                    if ups:
                        self._db.executemany(
                            "INSERT OR REPLACE INTO locks(device, data) VALUES (?, ?)", ups
                        )
                    if evs:
                        self._db.executemany(
                            "INSERT INTO events(time, action, device, lock_type, actor, holder,"
                            " message) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            evs,
                        )
            except sqlite3.Error as e:
                raise StoreError(f"cannot write to SQLite store {self.path}: {e}") from None

    def recent_events(self, n: int) -> list[LockEvent]:  # noqa: D102 - see Store
        with self._mutex:
            try:
                rows = self._db.execute(
                    "SELECT time, action, device, lock_type, actor, holder, message FROM events"
                    " ORDER BY id DESC LIMIT ?",
                    (n,),
                ).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read events from {self.path}: {e}") from None
        return [_event_from_row(r) for r in reversed(rows)]

    def prune_events(self, before: float, keep: int) -> int:  # noqa: D102 - see Store
        with self._mutex:
            try:
                with self._db:
                    n = self._db.execute("DELETE FROM events WHERE time < ?", (before,)).rowcount
                    n += self._db.execute(
                        "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC"
                        " LIMIT 1 OFFSET ?)", (max(0, keep),)).rowcount
            except sqlite3.Error as e:
                raise StoreError(f"cannot prune events in {self.path}: {e}") from None
        return n

    def close(self) -> None:  # noqa: D102 - see Store
        with self._mutex:
            self._db.close()


class RedisStore:
    """Redis: a hash ``pvcoord:<ns>:locks`` (device -> JSON lock) and a list ``...:events``.

    Each commit is one MULTI/EXEC transaction.

    Args:
        url: ``redis://HOST:PORT/DB``.
        namespace: separates endstations sharing one Redis (the IOC uses its prefix).
    """

    def __init__(self, url: str, namespace: str = "default") -> None:
        import redis  # noqa: PLC0415 - only needed for this store

        register_url(url)
        self.url = redact_url(url)  # what messages and Coord:Health show: no password
        self._locks_key = f"pvcoord:{namespace}:locks"
        self._events_key = f"pvcoord:{namespace}:events"
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            self._r.ping()
        except redis.RedisError as e:
            raise StoreError(
                redact(f"cannot connect to Redis store {self.url}: {e}")) from None
        self._redis_error = redis.RedisError

    def load_locks(self) -> list[Lock]:  # noqa: D102 - see Store
        try:
            data = self._r.hgetall(self._locks_key)
        except self._redis_error as e:
            raise StoreError(redact(f"cannot read locks from {self.url}: {e}")) from None
        return sorted((Lock.model_validate_json(v) for v in data.values()), key=lambda x: x.device)

    def commit(  # noqa: D102 - see Store
        self, upsert: Iterable[Lock], delete: Iterable[str], events: Iterable[LockEvent]
    ) -> None:
        ups = {lk.device: lk.model_dump_json() for lk in upsert}
        dels = list(delete)
        evs = [json.dumps(_event_row(e)) for e in events]
        try:
            pipe = self._r.pipeline(transaction=True)
            if dels:
                pipe.hdel(self._locks_key, *dels)
            if ups:
                pipe.hset(self._locks_key, mapping=ups)
            if evs:
                pipe.rpush(self._events_key, *evs)
            pipe.execute()
        except self._redis_error as e:
            raise StoreError(redact(f"cannot write to Redis store {self.url}: {e}")) from None

    def recent_events(self, n: int) -> list[LockEvent]:  # noqa: D102 - see Store
        try:
            rows = self._r.lrange(self._events_key, -n, -1)
        except self._redis_error as e:
            raise StoreError(redact(f"cannot read events from {self.url}: {e}")) from None
        return [_event_from_row(tuple(json.loads(r))) for r in rows]

    def prune_events(self, before: float, keep: int) -> int:  # noqa: D102 - see Store
        try:
            n = max(0, int(self._r.llen(self._events_key)) - max(0, keep))
            if n:
                self._r.ltrim(self._events_key, n, -1)
            for _ in range(100_000):  # events are appended in time order: drop from the left
                first = self._r.lindex(self._events_key, 0)
                if first is None or float(json.loads(first)[0]) >= before:
                    break
                self._r.lpop(self._events_key)
                n += 1
        except self._redis_error as e:
            raise StoreError(redact(f"cannot prune events in {self.url}: {e}")) from None
        return n

    def close(self) -> None:  # noqa: D102 - see Store
        self._r.close()


def open_store(url: str, namespace: str = "default", readonly: bool = False) -> Store:
    """Open the store named by ``url`` (see the module docstring for the forms).

    Args:
        url: ``sqlite:///path``, a plain path, or ``redis://host:port/db``.
        namespace: Redis key namespace (the coordination IOC passes its prefix).
        readonly: SQLite only: open without write access (readers such as the worker hook).

    Raises:
        StoreError: unknown scheme, bad option, or the store cannot be opened.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("redis", "rediss"):
        return RedisStore(url, namespace=namespace)
    if parsed.scheme in ("sqlite", ""):
        path = parsed.path if parsed.scheme else url
        if not path:
            raise StoreError(f"store URL {url!r} has no file path")
        opts = parse_qs(parsed.query) if parsed.scheme else {}
        unknown = set(opts) - {"sync", "mode"}
        if unknown:
            raise StoreError(
                f"unknown store option(s) {sorted(unknown)} in {url!r}; use sync= or mode=")
        sync = opts.get("sync", ["normal"])[0]
        mode_text = opts.get("mode", ["0600"])[0]
        try:
            mode = int(mode_text, 8)
        except ValueError:
            raise StoreError(f"mode must be 0600 or 0640, not {mode_text!r}") from None
        return SQLiteStore(path, sync=sync, readonly=readonly, mode=mode)
    raise StoreError(
        f"unknown store {redact_url(url)!r}: use sqlite:///PATH or redis://HOST:PORT/DB")
