"""Durable storage of locks and audit events: SQLite (WAL, the default) or Redis.

The coordination IOC is the only writer. It calls :meth:`Store.commit` with every change *before*
it changes its memory, and :meth:`Store.durable` before it replies to the client, so a granted
lock survives ``kill -9`` of the IOC and a power loss of its host. Readers (the worker hook inside
the RE worker, the CLI) may open the same store read-only to learn the lock state without EPICS.

URLs accepted by :func:`open_store`:

- ``sqlite:///ABSOLUTE/PATH.sqlite`` or a plain path: SQLite in WAL mode. ``?sync=full``
  (default): each change is written to the WAL under the IOC's mutex, and the WAL file is
  fsync'ed before the reply, once for all the requests in flight (group commit), so a reply
  means the change survives a power loss. The fsync runs on a store thread that starts it at
  the commit, while the IOC publishes the change. The WAL is written to its working size when
  the writer claims the store (:data:`WAL_WORKING_PAGES`), so a commit overwrites it in place
  and its fsync does not also commit the file's growth to the ext4 journal. ``?sync=normal``:
  no fsync (survives a crash or ``kill -9`` of the IOC, not a power loss; an explicit opt-out
  the IOC logs as a warning).
  See docs/decisions/0100-durable-before-the-reply-group-fsync.md,
  0146-fsync-started-at-the-commit.md and 0180-wal-preallocated-at-open.md.
- ``redis://HOST:PORT/DB``: Redis; durability is the server's, so it is checked when the store is
  opened: ``appendonly yes`` and ``appendfsync always`` (``CONFIG GET``), else :class:`StoreError`
  unless ``allow_nondurable`` is given (the IOC's ``--allow-nondurable-store``, logged).

One authority: a writer takes the store's authority (an ``flock`` on ``PATH.authority`` for SQLite,
a key with a 10 s lease for Redis) and keeps it while it runs; a second writer on the same store is
refused with a message naming the first (pid, host, prefix, since when).

Rows are not trusted: :meth:`Store.load_rows` returns the locks that parse and the rows that do not
(the caller reports and drops them); :meth:`Store.load_locks` returns only the ones that parse.

Notices (what a holder is told on its next release/renew about a lock it lost: preempted,
expired, released, force-released) are stored too, as opaque ``(id, JSON)`` rows written in the
same transaction as the change that made them (:meth:`Store.commit`'s ``notices``), so a request
retried after a restart (a PVA client re-sends an RPC whose reply was lost with the connection)
gets the answer it would have got without the restart. See
docs/decisions/0120-notices-are-durable-retried-rpcs.md.

Request outcomes (what a request with a client-chosen ``requestId`` was answered) are stored the
same way, as opaque ``(id, JSON)`` rows in the transaction of the change they answer
(:meth:`Store.commit`'s ``requests``; SQLite table ``requests``, Redis hash ``...:requests``), so a
retried request is answered with the first answer and not applied twice, across a restart too.
See docs/decisions/0160-request-ids-make-retries-idempotent.md.

SQLite files: ``?mode=0600`` (default: only the service account that runs the IOC reads the
file) or ``?mode=0640`` (its group too, e.g. a queue service account whose worker hook reads the
store). A new file and its folder are created with that mode (the folder 0700 / 0750); an
existing file that others may read is narrowed to it. SQLite gives the ``-wal`` and ``-shm``
files the database file's mode. Passwords in a Redis URL are never shown (``pvdb.redact``).

Keys are never stored: a lock keeps only SHA-256 digests of its keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlparse

from pydantic import ValidationError

from pvdb.models import Lock, LockEvent
from pvdb.redact import redact, redact_url, register_url

if TYPE_CHECKING:  # redis is imported only by the Redis store
    from redis.typing import EncodableT, FieldT

log = logging.getLogger("pvcoord.store")

AUTHORITY_LEASE = 10.0
"""Seconds a Redis authority key lives without renewal (the IOC renews it every second)."""
FLUSHER_IDLE = 5.0
"""Seconds the SQLite store's fsync thread waits for work before it ends (started again by the
next commit), so an idle or forgotten store holds no thread."""
WAL_WORKING_PAGES = 1100
"""Pages a fsync'ing SQLite store's WAL is written to when its writer claims it: SQLite's
auto-checkpoint (1,000 pages) plus a margin. Commits then overwrite blocks the file already has,
and an fsync of an overwrite costs the disk's flush only, not also a journal commit for the
file's growth (on this project's ext4 VM 0.25 ms against 0.55 ms; docs/benchmarks.md)."""
FAILURES_KEPT = 256
"""Failed fsyncs whose commit ranges a SQLite store remembers for late :meth:`Store.durable`
calls (each range is reported to every caller whose commit it covers)."""


class StoreError(RuntimeError):
    """The store could not be opened, read or written."""


class AuthorityError(StoreError):
    """Another writer holds the store's authority; ``str(e)`` names it."""


class OutcomeUnknownError(StoreError):
    """A commit failed after it may have reached the store, which cannot be asked: it may stand.

    A plain :class:`StoreError` from :meth:`Store.commit` means nothing was written.
    """


@dataclass(frozen=True)
class BadRow:
    """A stored lock row that does not parse: its key, the start of its data, and why.

    ``raw`` is set when the stored key is not UTF-8 text (undecodable bytes, or in SQLite a BLOB
    or a number): its bytes as stored, by which the row is deleted; ``key`` is then the key as
    text, undecodable bytes replaced, for the report. A row with a text key has ``raw=None`` and
    is deleted by ``key``.
    """

    key: str
    data: str
    why: str
    raw: bytes | None = None


UNTRUSTED_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError)
"""What parsing an untrusted stored row may raise (pydantic's ValidationError, JSON and UTF-8
errors are ValueErrors; ``float(10**400)`` an OverflowError; JSON nested 100,000 deep a
RecursionError)."""


def _utf8(raw: bytes) -> str | None:
    """A stored field's bytes as text, or ``None`` if they are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _sqlite_fields(rows: Iterable[tuple[bytes, bytes, str, str]]
                   ) -> list[tuple[bytes, str | None, bytes, str | None]]:
    """SQLite rows -> ``(key bytes, key text, data bytes, data text)``.

    The rows are ``(CAST(key AS BLOB), CAST(data AS BLOB), typeof(key), typeof(data))``. A field
    that is not UTF-8 TEXT (a BLOB, a number) has no text: its row is bad (a BLOB key would also
    escape the deletes by text key).
    """
    return [(bytes(k or b""), _utf8(bytes(k)) if kt == "text" else None,
             bytes(d or b""), _utf8(bytes(d)) if dt == "text" else None)
            for k, d, kt, dt in rows]


def _redis_fields(items: Iterable[tuple[Any, Any]]
                  ) -> list[tuple[bytes, str | None, bytes, str | None]]:
    """Redis hash items (bytes) -> ``(key bytes, key text, data bytes, data text)``."""
    out = []
    for k, d in items:
        kb = k if isinstance(k, bytes) else str(k).encode()
        db = d if isinstance(d, bytes) else str(d).encode()
        out.append((kb, _utf8(kb), db, _utf8(db)))
    return out


class Store(Protocol):
    """What the coordination IOC needs from a store."""

    url: str

    def load_locks(self) -> list[Lock]:
        """Locks that parse, as last committed (expired ones included: the caller drops them)."""
        ...

    def load_rows(self) -> tuple[list[Lock], list[BadRow]]:
        """The locks that parse, and the rows that do not (never raises for a bad row)."""
        ...

    def commit(
        self, upsert: Iterable[Lock], delete: Iterable[str | bytes],
        events: Iterable[LockEvent],
        notices: Mapping[str | bytes, str | None] | None = None,
        requests: Mapping[str | bytes, str | None] | None = None,
    ) -> int:
        """Apply one change atomically: all of it or nothing.

        Args:
            upsert: locks to insert or replace (keyed by device).
            delete: devices (store keys) whose lock row is removed; ``bytes`` name a row by its
                key's exact stored bytes (:attr:`BadRow.raw`: a key that is not UTF-8 text).
            events: audit events to append.
            notices: notice id -> JSON text to insert or replace (it becomes the newest), or
                ``None`` to delete that id (a ``bytes`` id: the row whose id is those bytes).
            requests: request record id -> JSON outcome to insert or replace, or ``None`` to
                delete that id (the same form as ``notices``).

        Returns:
            A token for :meth:`durable`: the change is durable once ``durable(token)`` returned.

        Raises:
            OutcomeUnknownError: the connection broke after the change may have been applied,
                and the store cannot tell whether it was (Redis).
            StoreError: nothing was written.
        """
        ...

    def load_notices(self) -> list[tuple[str | bytes, str]]:
        """Every stored notice as ``(id, JSON text)``, in no particular order (the JSON has a time).

        The rows are untrusted: the caller parses and validates them. A row whose id is not UTF-8
        text comes as ``(id's stored bytes, "")`` (delete it by those bytes), one whose data is
        not as ``(id, "")``.
        """
        ...

    def load_requests(self) -> list[tuple[str | bytes, str]]:
        """Every stored request outcome as ``(id, JSON text)``, in no particular order.

        The rows are untrusted: the caller parses and validates them (as :meth:`load_notices`).
        """
        ...

    def durable(self, token: int) -> None:
        """Wait until the commit of ``token`` (and every earlier one) is on stable storage.

        Raises:
            StoreError: the flush failed (the change is written but may not survive a power loss).
        """
        ...

    def recent_events(self, n: int) -> list[LockEvent]:
        """The last ``n`` audit events, oldest first."""
        ...

    def claim_authority(self, who: str) -> None:
        """Become the store's only writer, described by ``who`` (pid, host, prefix).

        Raises:
            AuthorityError: another writer holds it (the message names it).
        """
        ...

    def keep_authority(self) -> None:
        """Renew the authority (called every second by the IOC).

        Raises:
            AuthorityError: it was lost to another writer.
        """
        ...

    def prune_events(self, before: float, keep: int) -> int:
        """Delete audit events older than ``before`` (epoch s) and all but the newest ``keep``.

        Returns how many were deleted.

        Raises:
            StoreError: nothing was deleted.
        """
        ...

    def close(self) -> None:
        """Release the authority and the connection."""
        ...


_SCHEMA = """
-- locks without a rowid: one b-tree keyed by device (a rowid table also keeps an index on
-- device, so every lock write changed two pages); stores made before keep theirs, both work
CREATE TABLE IF NOT EXISTS locks (device TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
-- events.id is the rowid without AUTOINCREMENT (which rewrites sqlite_sequence, one more WAL
-- page, on every insert): pruning removes the oldest ids only, so new ids still grow
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL, action TEXT NOT NULL, device TEXT NOT NULL, lock_type TEXT,
    actor TEXT NOT NULL, holder TEXT NOT NULL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS notices (id TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
"""

_TABLES = {
    "locks": ("device", ("device", "data")),
    "events": ("id", ("id", "time", "action", "device", "lock_type", "actor", "holder", "message")),
    "notices": ("id", ("id", "data")),
    "requests": ("id", ("id", "data")),
}
"""Each table of the schema: its primary key and the columns the store reads and writes."""


def _schema_problem(db: sqlite3.Connection) -> str | None:
    """What makes an existing database unusable as a store (``None`` if nothing).

    ``CREATE TABLE IF NOT EXISTS`` keeps a table of the same name whatever its shape: a ``locks``
    without its primary key holds two rows of one device (one wins at load, silently), a view
    fails every write. Extra columns and tables are tolerated.
    """
    encoding = str(db.execute("PRAGMA encoding").fetchone()[0])
    if encoding != "UTF-8":  # the rows are read as their bytes and decoded as UTF-8
        return f"its text encoding is {encoding}, not UTF-8"
    for name, (key, columns) in _TABLES.items():
        row = db.execute("SELECT type FROM sqlite_master WHERE name=?", (name,)).fetchone()
        if row is None or row[0] != "table":
            return f"{name} is {'missing' if row is None else 'a ' + str(row[0])}, not a table"
        info = db.execute(f"PRAGMA table_info({name})").fetchall()  # cid, name, type, nn, dflt, pk
        have = {str(r[1]) for r in info}
        missing = [c for c in columns if c not in have]
        if missing:
            return f"table {name} has no column {', '.join(missing)}"
        pk = [str(r[1]) for r in sorted(info, key=lambda r: r[5]) if r[5]]
        if pk != [key]:
            return f"table {name}'s primary key is {pk or 'missing'}, not ({key})"
    return None


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


def _events_from_rows(rows: Iterable[Any]) -> list[LockEvent]:
    """Stored audit rows -> events.

    A malformed row is skipped (an audit row does not decide a lock), counted in a log line.
    """
    out: list[LockEvent] = []
    skipped = 0
    for r in rows:
        try:
            if isinstance(r, bytes | str):  # Redis: one JSON array per event
                r = json.loads(r)
            out.append(_event_from_row(tuple(
                f.decode("utf-8") if isinstance(f, bytes) else f for f in r)))
        except UNTRUSTED_ERRORS:
            skipped += 1
    if skipped:
        log.warning("%d malformed stored audit event(s) not shown", skipped)
    return out


def _text(raw: bytes | str | None) -> str:
    """A Redis reply as text (bytes decoded, a bad byte replaced; ``None`` is ``""``)."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return raw or ""


def _parse_rows(rows: Iterable[tuple[bytes, str | None, bytes, str | None]]
                ) -> tuple[list[Lock], list[BadRow]]:
    """(key, JSON) rows as stored -> the locks that parse and whose key is their device.

    Also returns the bad rows, each with its key's stored bytes (by which it is deleted).
    """
    good: list[Lock] = []
    bad: list[BadRow] = []
    for raw_key, key, raw_data, text in rows:
        if key is None:
            bad.append(BadRow(raw_key.decode("utf-8", "replace"),
                              raw_data[:200].decode("utf-8", "replace"),
                              "the row's key is not UTF-8 text", raw_key))
            continue
        if text is None:
            bad.append(BadRow(key, raw_data[:200].decode("utf-8", "replace"),
                              "the row's data is not UTF-8 text"))
            continue
        try:
            lk = Lock.model_validate_json(text)
        except UNTRUSTED_ERRORS as e:
            first = e.errors()[0] if isinstance(e, ValidationError) else {
                "msg": f"{type(e).__name__}: {str(e)[:100]}"}
            where = ".".join(str(x) for x in first.get("loc", ())) or "row"
            bad.append(BadRow(key, text[:200], f"{where}: {first.get('msg', 'invalid')}"[:200]))
            continue
        if lk.device != key:
            bad.append(BadRow(key, text[:200], f"row key {key[:64]!r} is not its device "
                              f"{lk.device[:64]!r}"))
            continue
        good.append(lk)
    return sorted(good, key=lambda x: x.device), bad


def _id_rows(rows: Iterable[tuple[bytes, str | None, bytes, str | None]]
             ) -> list[tuple[str | bytes, str]]:
    """(id, data) rows as stored -> ``(id, text)``.

    ``(id's bytes, "")`` where the id is not UTF-8 text (deleted by those bytes), ``(id, "")``
    where only the data is not: the caller rejects the row.
    """
    return [(rid, text if text is not None else "") if rid is not None else (raw, "")
            for raw, rid, _, text in rows]


def _delete_raw(db: sqlite3.Connection, table: str, col: str, keys: list[bytes]) -> None:
    """Delete the rows of ``table`` whose key ``col`` is not UTF-8 text, by its stored bytes.

    A key whose bytes are UTF-8 is a BLOB or a number (a TEXT key with those bytes is another,
    valid row: ``typeof`` keeps it); one whose bytes are not is TEXT or BLOB that no valid row
    has. One scan per 500 keys (the CAST defeats the key's index; such rows exist only where
    someone wrote them).
    """
    decodable = [k for k in keys if _utf8(k) is not None]
    other = [k for k in keys if _utf8(k) is None]
    for group, extra in ((decodable, f" AND typeof({col}) <> 'text'"), (other, "")):
        for i in range(0, len(group), 500):
            chunk = group[i:i + 500]
            db.execute(f"DELETE FROM {table} WHERE CAST({col} AS BLOB) IN "
                       f"({','.join('?' * len(chunk))}){extra}", chunk)


def _split_keys(keys: Iterable[str | bytes]) -> tuple[list[tuple[str]], list[tuple[bytes]]]:
    """Keys to delete as SQLite parameters: text keys, and keys given by their stored bytes."""
    text: list[tuple[str]] = []
    raw: list[tuple[bytes]] = []
    for k in keys:
        if isinstance(k, bytes):
            raw.append((k,))
        else:
            text.append((k,))
    return text, raw


def authority_text(prefix: str) -> str:
    """``pid PID on HOST for PREFIX since ISO-TIME``: how a writer describes itself."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"pid {os.getpid()} on {socket.gethostname()} for {prefix} since {since}"


def _pid_of(text: str) -> tuple[int | None, str | None]:
    """(pid, host) from an :func:`authority_text`, or (None, None)."""
    parts = text.split()
    try:
        return int(parts[1]), parts[3]
    except (IndexError, ValueError):
        return None, None


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
        sync: ``"full"`` (fsync the WAL before each reply, grouped) or ``"normal"`` (no fsync).
        readonly: open for reading only (the worker hook, the CLI).
    """

    def __init__(
        self, path: str | Path, sync: str = "full", readonly: bool = False, mode: int = 0o600
    ) -> None:
        if sync not in ("full", "normal"):
            raise StoreError(f"sync must be 'full' or 'normal', not {sync!r}")
        if mode not in FILE_MODES:
            raise StoreError(f"mode must be 0600 or 0640, not {mode:04o}")
        # the real path: SQLite names the WAL after the file a symlink points to, and the fsync
        # and the authority lock must be the WAL's and the file's (not a stale "<link>-wal")
        self.path = Path(os.path.realpath(path))
        self.sync = sync
        self.url = f"sqlite://{self.path}?sync={sync}"
        self._mutex = threading.Lock()
        self._written = 0  # commits written to the WAL (under _mutex)
        # the fsync thread (under _sync_cond): commits it was asked to flush, the newest commit
        # its running or last fsync covers, the commits known to be on stable storage, and the
        # commit ranges (after, upto, why) whose fsync failed
        self._sync_cond = threading.Condition()
        self._wanted = 0
        self._started = 0
        self._synced = 0
        self._failed: deque[tuple[int, int, str]] = deque(maxlen=FAILURES_KEPT)
        # after a failed fsync: the newest commit before it, and why. Every WAL frame's checksum
        # chains over the frames before it and recovery stops at the first bad one, so a commit
        # written after lost frames is lost with them: no later commit counts as durable until
        # a checkpoint has copied the WAL into the database and synced it (:meth:`_restore`)
        self._unsafe: tuple[int, str] | None = None
        self._syncing = False  # an fsync is running (one at a time)
        self._flusher: threading.Thread | None = None
        self._closing = False
        self._wal_fd: int | None = None
        self._authority_fd: int | None = None
        try:
            if readonly:
                uri = self.path.resolve().as_uri() + "?mode=ro"  # file:///abs/path?mode=ro
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                _private_file(self.path, mode)
                links = self.path.stat().st_nlink
                if links > 1:
                    raise StoreError(
                        f"SQLite store {self.path} has {links} hard links: SQLite's locks, its WAL "
                        "and the store's one-writer lock go by the file's name, so two names "
                        "would be two writers; remove the other links (find -samefile)")
                self._db = sqlite3.connect(self.path, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL: SQLite itself does not fsync a commit; durable() does, for every
                # commit in flight at once (group commit). Checkpoints still fsync both files.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._db.commit()
                problem = _schema_problem(self._db)
                if problem is not None:
                    self._db.close()
                    raise StoreError(
                        f"SQLite store {self.path} is not a pvcoord store of this version: "
                        f"{problem}; move it aside (its locks are not loaded)")
                if sync == "full":
                    self._open_wal()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot create SQLite store {self.path}: {e.strerror}") from None

    def _preallocate_wal(self) -> None:
        """Write the WAL once to :data:`WAL_WORKING_PAGES` pages, unless it is that long already.

        One transaction writes that many pages of a scratch table and the next drops it; the
        checkpoint copies them into the database, whose file keeps them as free pages (reused by
        later rows: about 4.5 MB once). From then on SQLite restarts the WAL at its start after
        each checkpoint and overwrites it in place: the file no longer grows on a commit (a
        reader of the store that keeps a snapshot open can still make it grow, as before).

        Skipped, with a log line, where the disk has less than four times that free (the store
        must not take the last free space of its disk at start) or the writes fail: commits
        then grow the WAL as SQLite does by default, only their fsyncs are slower.

        Run by :meth:`claim_authority` once this process holds the store's authority, so a
        second IOC refused on the same store writes nothing into it. The WAL is fsync'ed after
        it, so the first change's fsync is an overwrite too.
        """
        wal = Path(str(self.path) + "-wal")
        try:
            with self._mutex:
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                if self._db.execute(
                        "SELECT 1 FROM sqlite_master WHERE name='wal_scratch'").fetchone():
                    with self._db:  # left by a kill between its two transactions
                        self._db.execute("DROP TABLE IF EXISTS wal_scratch")
            size = WAL_WORKING_PAGES * (24 + page)
            if wal.exists() and wal.stat().st_size >= 32 + size:
                return  # a WAL left by a stop without close (kill -9, power loss) is that long
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 4 * 2 * size:  # the WAL and the db's free pages
                log.info("store %s: %d kB free on its disk, the WAL is not preallocated",
                         self.path, st.f_bavail * st.f_frsize // 1024)
                return
            with self._mutex, self._db:
                self._db.execute("DROP TABLE IF EXISTS wal_scratch")  # from a failed start
                self._db.execute("CREATE TABLE wal_scratch (b BLOB)")
                self._db.execute("INSERT INTO wal_scratch VALUES (zeroblob(?))",
                                 (WAL_WORKING_PAGES * page,))
            with self._mutex:
                with self._db:
                    self._db.execute("DROP TABLE wal_scratch")
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            if self._wal_fd is not None:
                os.fsync(self._wal_fd)
        except (sqlite3.Error, OSError) as e:
            log.warning("store %s: the WAL could not be preallocated (%s); commits grow it "
                        "instead", self.path, e)
            with contextlib.suppress(sqlite3.Error), self._mutex, self._db:
                self._db.execute("DROP TABLE IF EXISTS wal_scratch")

    def _open_wal(self) -> None:
        """Open the WAL file for fsync, and make it and the database exist durably."""
        wal = Path(str(self.path) + "-wal")
        self._wal_fd = os.open(wal, os.O_RDONLY)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(self._wal_fd)
            os.fsync(dfd)  # the directory entries of the database and its WAL
        finally:
            os.close(dfd)

    def load_rows(self) -> tuple[list[Lock], list[BadRow]]:  # noqa: D102 - see Store
        with self._mutex:
            try:
                # as bytes: a row that is not UTF-8 text is a bad row, not a failed load
                rows = self._db.execute(
                    "SELECT CAST(device AS BLOB), CAST(data AS BLOB), typeof(device),"
                    " typeof(data) FROM locks ORDER BY device").fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read locks from {self.path}: {e}") from None
        return _parse_rows(_sqlite_fields(rows))

    def load_locks(self) -> list[Lock]:  # noqa: D102 - see Store
        return self.load_rows()[0]

    def load_notices(self) -> list[tuple[str | bytes, str]]:  # noqa: D102 - see Store
        with self._mutex:
            try:
                # one b-tree keyed by id (no rowid): the caller orders them by their time
                rows = self._db.execute(
                    "SELECT CAST(id AS BLOB), CAST(data AS BLOB), typeof(id), typeof(data)"
                    " FROM notices").fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read notices from {self.path}: {e}") from None
        return _id_rows(_sqlite_fields(rows))

    def load_requests(self) -> list[tuple[str | bytes, str]]:  # noqa: D102 - see Store
        with self._mutex:
            try:
                rows = self._db.execute(
                    "SELECT CAST(id AS BLOB), CAST(data AS BLOB), typeof(id), typeof(data)"
                    " FROM requests").fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read request outcomes from {self.path}: {e}") from None
        return _id_rows(_sqlite_fields(rows))

    def commit(  # noqa: D102 - see Store
        self, upsert: Iterable[Lock], delete: Iterable[str | bytes],
        events: Iterable[LockEvent],
        notices: Mapping[str | bytes, str | None] | None = None,
        requests: Mapping[str | bytes, str | None] | None = None,
    ) -> int:
        ups = [(lk.device, lk.model_dump_json()) for lk in upsert]
        dels, raw_dels = _split_keys(delete)
        evs = [_event_row(e) for e in events]
        note_ups = [(k, v) for k, v in (notices or {}).items() if v is not None]
        note_dels, raw_note_dels = _split_keys(k for k, v in (notices or {}).items() if v is None)
        req_ups = [(k, v) for k, v in (requests or {}).items() if v is not None]
        req_dels, raw_req_dels = _split_keys(k for k, v in (requests or {}).items() if v is None)
        with self._mutex:
            try:
                with self._db:  # one transaction: commit on success, rollback on error
                    for table, col, raw in (("locks", "device", raw_dels),
                                            ("notices", "id", raw_note_dels),
                                            ("requests", "id", raw_req_dels)):
                        _delete_raw(self._db, table, col, [k for (k,) in raw])
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
                    if note_dels:
                        self._db.executemany("DELETE FROM notices WHERE id=?", note_dels)
                    if note_ups:
                        self._db.executemany(
                            "INSERT OR REPLACE INTO notices(id, data) VALUES (?, ?)", note_ups)
                    if req_dels:
                        self._db.executemany("DELETE FROM requests WHERE id=?", req_dels)
                    if req_ups:
                        self._db.executemany(
                            "INSERT OR REPLACE INTO requests(id, data) VALUES (?, ?)", req_ups)
            except sqlite3.Error as e:
                raise StoreError(f"cannot write to SQLite store {self.path}: {e}") from None
            self._written += 1
            if self._wal_fd is not None:
                self._kick(self._written)
            return self._written

    def _kick(self, token: int) -> None:
        """Ask the fsync thread to flush commits up to ``token`` (starting it if needed).

        The fsync starts at once, while the caller publishes the change, instead of after it;
        :meth:`durable` then waits only for what is left of it.
        """
        with self._sync_cond:
            self._wanted = max(self._wanted, token)
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="pvcoord-store-fsync", daemon=True)
                self._flusher.start()
            else:
                self._sync_cond.notify_all()

    def _flush_loop(self) -> None:
        """The fsync thread: one fsync of the WAL at a time, for every commit written so far.

        Commits made while one runs share the next (group commit); the thread ends after
        :data:`FLUSHER_IDLE` s without work.
        """
        cond = self._sync_cond
        with cond:
            while True:
                if self._started >= self._wanted or self._syncing:
                    if self._closing or not cond.wait(FLUSHER_IDLE):
                        if self._started >= self._wanted and not self._syncing:
                            self._flusher = None
                            return
                    continue
                self._fsync_locked()

    def _fsync_locked(self) -> None:
        """One fsync covering every commit asked for so far; call it holding ``_sync_cond``.

        Run by the fsync thread, or by :meth:`durable` itself when no fsync covering its commit
        has started yet (the thread was not scheduled in time: on a loaded host a wake-up can
        cost more than the fsync).
        """
        cond = self._sync_cond
        target = self._started = self._wanted  # every commit asked for is in the WAL
        after, fd = self._synced, self._wal_fd
        self._syncing = True
        cond.release()
        err: OSError | None = None
        try:
            if fd is not None:
                os.fsync(fd)
        except OSError as e:
            err = e
        finally:
            cond.acquire()
            self._syncing = False
        if err is None:
            self._synced = max(self._synced, target)
        else:
            # never retried for these commits: after a failed fsync Linux may have dropped
            # the dirty pages, so a later fsync does not cover them
            self._failed.append((after, target, str(err)))
            if self._unsafe is None:
                self._unsafe = (target, str(err))
        cond.notify_all()

    def _restore(self) -> None:
        """After a failed fsync: checkpoint the whole WAL into the database and truncate it.

        SQLite syncs the WAL before and the database after a checkpoint (``synchronous=NORMAL``):
        the database file's pages are new writes, so their sync is a real one. The commits written
        before it are then durable again.

        Raises:
            StoreError: the checkpoint did not complete (a reader holds an old snapshot, or the
                disk still fails).
        """
        with self._mutex:  # no commit in between: the checkpoint covers every one written
            with self._sync_cond:
                if self._unsafe is None:
                    return  # another thread restored it meanwhile
            written = self._written
            try:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as e:
                raise StoreError(f"checkpoint of {self.path} failed: {e}") from None
            if busy:
                raise StoreError(f"checkpoint of {self.path} did not complete (a reader holds "
                                 "an old snapshot)")
        with self._sync_cond:
            self._unsafe = None
            self._synced = max(self._synced, written)
            self._started = max(self._started, written)
            self._sync_cond.notify_all()
        log.warning("store %s: the WAL was checkpointed and synced after a failed fsync; "
                    "commits are durable again", self.path)
        self._preallocate_wal()  # the truncated WAL would grow on every commit again

    def durable(self, token: int) -> None:  # noqa: D102 - see Store
        if self._wal_fd is None:
            return  # sync=normal or read-only: nothing to flush
        while True:
            unsafe = self._durable_or_unsafe(token)
            if unsafe is None:
                return
            try:
                self._restore()
            except StoreError as e:
                raise StoreError(
                    f"cannot flush SQLite store {self.path} to disk: an earlier fsync failed "
                    f"({unsafe}), and commits after it are not durable until the store is "
                    f"checkpointed: {e}") from None

    def _durable_or_unsafe(self, token: int) -> str | None:
        """Wait until commit ``token`` is durable (``None``), or say why it cannot be yet.

        It cannot while an earlier fsync failed, until :meth:`_restore` (the text says why).

        Raises:
            StoreError: the fsync covering ``token`` failed.
        """
        with self._sync_cond:
            self._wanted = max(self._wanted, token)
            while True:
                for after, upto, why in self._failed:
                    if after < token <= upto:
                        raise StoreError(f"cannot flush SQLite store {self.path} to disk: {why}")
                if self._unsafe is not None and token > self._unsafe[0]:
                    return self._unsafe[1]
                if self._synced >= token:
                    return None
                if self._started < token and not self._syncing:
                    self._fsync_locked()  # the fsync thread has not started it: do it here
                    continue
                self._sync_cond.wait()

    def recent_events(self, n: int) -> list[LockEvent]:  # noqa: D102 - see Store
        with self._mutex:
            try:
                rows = self._db.execute(
                    "SELECT time, CAST(action AS BLOB), CAST(device AS BLOB),"
                    " CAST(lock_type AS BLOB), CAST(actor AS BLOB), CAST(holder AS BLOB),"
                    " CAST(message AS BLOB) FROM events ORDER BY id DESC LIMIT ?",
                    (n,),
                ).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read events from {self.path}: {e}") from None
        return _events_from_rows(reversed(rows))

    def claim_authority(self, who: str) -> None:  # noqa: D102 - see Store
        path = Path(str(self.path) + ".authority")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open {path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            first = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise AuthorityError(
                f"another coordination IOC already writes the store {self.path} ({first}); "
                "stop it first: one authority per store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, who.encode() + b"\n", 0)
        self._authority_fd = fd
        if self._wal_fd is not None:  # the one writer now: it may write the scratch table
            self._preallocate_wal()

    def keep_authority(self) -> None:  # noqa: D102 - see Store
        return  # the flock lasts as long as the process

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
        with self._sync_cond:
            self._closing = True  # the fsync thread finishes what it was asked, then ends
            self._sync_cond.notify_all()
            flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout=10)
        with self._mutex:
            self._db.close()
        for fd in (self._wal_fd, self._authority_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wal_fd = self._authority_fd = None


_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class RedisStore:
    """Redis: hashes ``pvcoord:<ns>:locks``, ``...:notices``, ``...:requests``; list ``...:events``.

    Locks are device -> JSON lock; notices id -> JSON notice, requests id -> JSON outcome (a hash
    keeps no order: the caller orders them by their time).

    Each commit is one MULTI/EXEC transaction; with ``appendfsync always`` Redis fsyncs it before
    it answers, and Redis itself groups the fsyncs of concurrent clients.

    Args:
        url: ``redis://HOST:PORT/DB``.
        namespace: separates endstations sharing one Redis (the IOC uses its prefix).
        allow_nondurable: accept a Redis without ``appendonly yes`` / ``appendfsync always``.
        check_durability: check the persistence settings (readers skip it).

    Raises:
        StoreError: cannot connect, or the persistence settings are not durable (the message says
            which setting and how to fix it) and ``allow_nondurable`` is false.
    """

    def __init__(
        self, url: str, namespace: str = "default", allow_nondurable: bool = False,
        check_durability: bool = True,
    ) -> None:
        import redis  # noqa: PLC0415 - only needed for this store

        register_url(url)
        self.url = redact_url(url)  # what messages and Coord:Health show: no password
        self._shown = self.url
        self._locks_key = f"pvcoord:{namespace}:locks"
        self._events_key = f"pvcoord:{namespace}:events"
        self._notices_key = f"pvcoord:{namespace}:notices"
        self._requests_key = f"pvcoord:{namespace}:requests"
        self._commit_key = f"pvcoord:{namespace}:commit"
        self._commits = 0
        self._authority_key = f"pvcoord:{namespace}:authority"
        self._who: str | None = None
        self._redis_error = redis.RedisError
        self.durability_warning: str | None = None
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            self._r.ping()
        except redis.RedisError as e:
            raise StoreError(
                redact(f"cannot connect to Redis store {self._shown}: {e}")) from None
        if check_durability:
            problem = self._durability_problem()
            if problem is not None:
                if not allow_nondurable:
                    raise StoreError(
                        f"Redis store {self._shown} is not durable: {problem}; run redis-server "
                        "with --appendonly yes --appendfsync always (or accept the risk with "
                        "--allow-nondurable-store)"
                    )
                self.durability_warning = f"Redis store {self._shown} is not durable: {problem}"

    def _durability_problem(self) -> str | None:
        """What is wrong with the server's persistence settings, or None."""
        try:
            conf = {}
            for name in ("appendonly", "appendfsync"):
                got = self._r.config_get(name)
                conf[name] = got.get(name) if isinstance(got, dict) else None
        except self._redis_error as e:
            return f"its persistence settings cannot be read (CONFIG GET: {e})"
        if conf["appendonly"] != "yes":
            return f"appendonly is {conf['appendonly']!r}, not 'yes'"
        if conf["appendfsync"] != "always":
            return f"appendfsync is {conf['appendfsync']!r}, not 'always'"
        return None

    def load_rows(self) -> tuple[list[Lock], list[BadRow]]:  # noqa: D102 - see Store
        try:
            data = self._r.hgetall(self._locks_key)
        except self._redis_error as e:
            raise StoreError(redact(f"cannot read locks from {self._shown}: {e}")) from None
        return _parse_rows(_redis_fields(data.items()))

    def load_locks(self) -> list[Lock]:  # noqa: D102 - see Store
        return self.load_rows()[0]

    def load_notices(self) -> list[tuple[str | bytes, str]]:  # noqa: D102 - see Store
        try:
            data = self._r.hgetall(self._notices_key)
        except self._redis_error as e:
            raise StoreError(redact(f"cannot read notices from {self._shown}: {e}")) from None
        return _id_rows(_redis_fields(data.items()))

    def load_requests(self) -> list[tuple[str | bytes, str]]:  # noqa: D102 - see Store
        try:
            data = self._r.hgetall(self._requests_key)
        except self._redis_error as e:
            raise StoreError(redact(
                f"cannot read request outcomes from {self._shown}: {e}")) from None
        return _id_rows(_redis_fields(data.items()))

    def commit(  # noqa: D102 - see Store
        self, upsert: Iterable[Lock], delete: Iterable[str | bytes],
        events: Iterable[LockEvent],
        notices: Mapping[str | bytes, str | None] | None = None,
        requests: Mapping[str | bytes, str | None] | None = None,
    ) -> int:
        ups: dict[FieldT, EncodableT] = {lk.device: lk.model_dump_json() for lk in upsert}
        dels = list(delete)
        evs = [json.dumps(_event_row(e)) for e in events]
        note_ups: dict[FieldT, EncodableT] = {
            k: v for k, v in (notices or {}).items() if v is not None}
        note_dels = [k for k, v in (notices or {}).items() if v is None]
        req_ups: dict[FieldT, EncodableT] = {
            k: v for k, v in (requests or {}).items() if v is not None}
        req_dels = [k for k, v in (requests or {}).items() if v is None]
        self._commits += 1
        marker = f"{os.getpid()} {time.time():.6f} {self._commits}"
        try:
            pipe = self._r.pipeline(transaction=True)
            if dels:
                pipe.hdel(self._locks_key, *dels)
            if ups:
                pipe.hset(self._locks_key, mapping=ups)
            if evs:
                pipe.rpush(self._events_key, *evs)
            if note_dels:
                pipe.hdel(self._notices_key, *note_dels)
            if note_ups:
                pipe.hset(self._notices_key, mapping=note_ups)
            if req_dels:
                pipe.hdel(self._requests_key, *req_dels)
            if req_ups:
                pipe.hset(self._requests_key, mapping=req_ups)
            pipe.set(self._commit_key, marker)  # tells whether this transaction was applied
            pipe.execute()
        except self._redis_error as e:
            # A MULTI/EXEC whose reply was lost may have been applied (and fsync'ed): ask
            try:
                applied = _text(self._r.get(self._commit_key)) == marker
            except self._redis_error:
                raise OutcomeUnknownError(redact(
                    f"cannot write to Redis store {self._shown}: {e}; the change may or may not "
                    "have been applied (the store cannot be asked)")) from None
            if applied:
                log.warning("Redis store %s: the reply to a commit was lost (%s), but it was "
                            "applied", self._shown, redact(str(e)))
                return 0
            raise StoreError(redact(f"cannot write to Redis store {self._shown}: {e}")) from None
        return 0

    def durable(self, token: int) -> None:  # noqa: D102 - see Store
        return  # appendfsync always: Redis answered the commit after its fsync

    def recent_events(self, n: int) -> list[LockEvent]:  # noqa: D102 - see Store
        try:
            rows = self._r.lrange(self._events_key, -n, -1)
        except self._redis_error as e:
            raise StoreError(redact(f"cannot read events from {self._shown}: {e}")) from None
        return _events_from_rows(rows)

    def claim_authority(self, who: str) -> None:  # noqa: D102 - see Store
        ttl = int(AUTHORITY_LEASE * 1000)
        try:
            if not self._r.set(self._authority_key, who, nx=True, px=ttl):
                first = _text(self._r.get(self._authority_key))
                pid, host = _pid_of(first)
                if host == socket.gethostname() and pid is not None and not _alive(pid):
                    # the previous writer on this host is gone (kill -9): take over at once
                    self._r.set(self._authority_key, who, px=ttl)
                else:
                    raise AuthorityError(
                        f"another coordination IOC already writes the Redis store {self._shown} "
                        f"under {self._authority_key} ({first or 'unknown'}); stop it first "
                        f"(its claim lapses {AUTHORITY_LEASE:g} s after it stops): one authority "
                        "per store"
                    )
        except self._redis_error as e:
            raise StoreError(redact(f"cannot claim the Redis store {self._shown}: {e}")) from None
        self._who = who

    def keep_authority(self) -> None:  # noqa: D102 - see Store
        if self._who is None:
            return
        try:
            ok = self._r.eval(_RENEW_LUA, 1, self._authority_key, self._who,
                              int(AUTHORITY_LEASE * 1000))
        except self._redis_error as e:
            raise StoreError(redact(f"cannot renew the claim on {self._shown}: {e}")) from None
        if not ok:
            first = _text(self._r.get(self._authority_key))
            raise AuthorityError(f"lost the claim on the Redis store {self._shown} to "
                                 f"{first or 'nobody'}")

    def prune_events(self, before: float, keep: int) -> int:  # noqa: D102 - see Store
        try:
            n = max(0, int(self._r.llen(self._events_key)) - max(0, keep))
            if n:
                self._r.ltrim(self._events_key, n, -1)
            for _ in range(100_000):  # events are appended in time order: drop from the left
                first = self._r.lindex(self._events_key, 0)
                if first is None:
                    break
                try:
                    t = float(json.loads(first)[0])
                except UNTRUSTED_ERRORS:
                    t = -math.inf  # a malformed audit row at the head: pruned as the oldest
                if t >= before:
                    break
                self._r.lpop(self._events_key)
                n += 1
        except self._redis_error as e:
            raise StoreError(redact(f"cannot prune events in {self.url}: {e}")) from None
        return n

    def close(self) -> None:  # noqa: D102 - see Store
        if self._who is not None:
            with contextlib.suppress(self._redis_error):
                self._r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                             "return redis.call('del', KEYS[1]) end return 0",
                             1, self._authority_key, self._who)
        self._r.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_store(
    url: str, namespace: str = "default", readonly: bool = False, allow_nondurable: bool = False
) -> Store:
    """Open the store named by ``url`` (see the module docstring for the forms).

    Args:
        url: ``sqlite:///path[?sync=full|normal]``, a plain path, or ``redis://host:port/db``.
        namespace: Redis key namespace (the coordination IOC passes its prefix).
        readonly: open for reading only (readers such as the worker hook): no durability check.
        allow_nondurable: accept a Redis whose persistence is not ``appendfsync always``.

    Raises:
        StoreError: unknown scheme, bad option, a non-durable Redis, or the store cannot be
            opened.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("redis", "rediss"):
        return RedisStore(url, namespace=namespace, allow_nondurable=allow_nondurable,
                          check_durability=not readonly)
    if parsed.scheme in ("sqlite", ""):
        path = parsed.path if parsed.scheme else url
        if not path:
            raise StoreError(f"store URL {url!r} has no file path")
        opts = parse_qs(parsed.query) if parsed.scheme else {}
        unknown = set(opts) - {"sync", "mode"}
        if unknown:
            raise StoreError(
                f"unknown store option(s) {sorted(unknown)} in {url!r}; use sync= or mode=")
        sync = opts.get("sync", ["full"])[0]
        mode_text = opts.get("mode", ["0600"])[0]
        try:
            mode = int(mode_text, 8)
        except ValueError:
            raise StoreError(f"mode must be 0600 or 0640, not {mode_text!r}") from None
        return SQLiteStore(path, sync=sync, readonly=readonly, mode=mode)
    raise StoreError(
        f"unknown store {redact_url(url)!r}: use sqlite:///PATH or redis://HOST:PORT/DB")
