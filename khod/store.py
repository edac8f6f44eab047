"""Durable state of the daemon, on one SQLite database (``<state_dir>/khod.db``).

Theory of operation
-------------------
The contract is that nothing acknowledged is ever lost. So every mutating
call commits before it returns, and a commit is durable when it returns:
the database runs in WAL mode with ``synchronous=FULL``, where each commit
fsyncs the WAL (``NORMAL`` would let the last commits vanish on power loss).
A process killed at any instant leaves only whole transactions: SQLite
ignores WAL frames that no commit frame seals.

Several writes that must land together go in ``with store.transaction():``.
The outermost block is ``BEGIN IMMEDIATE`` ... ``COMMIT``: taking the write
lock up front means no write inside the block can fail for lack of it. A
nested block is a SAVEPOINT: it joins the outer transaction (nothing of it
is durable before the outermost block commits), but an exception leaving the
inner block undoes only the inner block's writes.

The store is generic on purpose: it persists JSON-able dicts, an append-only
history of transitions, fragments as raw bytes, and a few strings. What
those records mean belongs to the lifecycle module.

One connection, guarded by a re-entrant lock, so that the store may also be
called from worker threads (``asyncio.to_thread``); a transaction holds the
lock for its whole block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from khod.atomicfile import fsync_directory
from khod.changes import Transition
from khod_wire.errors import StoreError

__all__ = ["DB_NAME", "SCHEMA_VERSION", "Store", "Transition"]

DB_NAME = "khod.db"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE singleton (
    kind TEXT PRIMARY KEY CHECK (kind IN ('handover', 'restore')),
    body TEXT NOT NULL
);
CREATE TABLE participant (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE transition (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    subject TEXT NOT NULL,
    event TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX transition_by_subject ON transition (subject, seq);
CREATE TABLE fragment (
    name TEXT PRIMARY KEY,
    blob BLOB NOT NULL,
    size INTEGER NOT NULL CHECK (size = length(blob)),
    sha256 TEXT NOT NULL CHECK (length(sha256) = 64)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Version 2: the replies already sent, so that a request re-sent under the
# same correlation data gets the same answer after a restart.
_SCHEMA_2 = """
CREATE TABLE reply (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL UNIQUE,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL
);
"""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Store:
    """The daemon's durable state in ``state_dir`` (created with mode 0o700 if missing).

    Every method raises StoreError when the database cannot be read or
    written, when a record is not JSON-serializable, or after ``close()``.
    """

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = Path(state_dir)
        self._db_path = self._state_dir / DB_NAME
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        created = not self._state_dir.exists()
        try:
            self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {self._state_dir}: {exc}") from exc
        try:
            # isolation_level=None: the sqlite3 module must not open
            # transactions behind our back; transaction() owns BEGIN/COMMIT.
            conn = sqlite3.connect(
                self._db_path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self._db_path}: {exc}") from exc
        try:
            self._configure(conn)
            self._migrate(conn)
            # SQLite fsyncs the directory for the WAL it creates but not for
            # the database file itself: make the file's name durable too.
            fsync_directory(self._state_dir)
            if created:
                fsync_directory(self._state_dir.parent)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- lifecycle of the store ----------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    def close(self) -> None:
        """Close the database; idempotent. An open transaction is rolled back."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "open" if self._conn is not None else "closed"
        return f"<Store {str(self._state_dir)!r} {status}>"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make every write in the block durable together at its end, or none of them.

        Nested blocks join the outer transaction as savepoints: an exception
        leaving an inner block undoes that block only; durability comes when
        the outermost block ends.
        """
        with self._lock:
            conn = self._live()
            depth = self._depth
            savepoint = f"khod_{depth}"
            if depth > 0:
                self._require_open_transaction(conn)
            with self._translating("begin a transaction"):
                conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
            self._depth = depth + 1
            try:
                yield
            except BaseException:
                self._depth = depth
                _undo(conn, savepoint if depth > 0 else None)
                raise
            self._depth = depth
            # The block may have closed the store, or SQLite may have rolled
            # the whole transaction back after an I/O error that the block
            # swallowed: committing then would report success for nothing.
            conn = self._live()
            self._require_open_transaction(conn)
            try:
                conn.execute("COMMIT" if depth == 0 else f"RELEASE {savepoint}")
            except sqlite3.Error as exc:
                _undo(conn, savepoint if depth > 0 else None)
                raise StoreError(f"{self._db_path}: cannot commit: {exc}") from exc

    # -- the handover record (outgoing side) and the restore record (incoming side)

    def save_handover(self, record: Mapping[str, Any]) -> None:
        self._save_singleton("handover", record)

    def load_handover(self) -> dict[str, Any] | None:
        return self._load_singleton("handover")

    def clear_handover(self) -> None:
        self._mutate("clear the handover", "DELETE FROM singleton WHERE kind = 'handover'")

    def save_restore(self, record: Mapping[str, Any]) -> None:
        self._save_singleton("restore", record)

    def load_restore(self) -> dict[str, Any] | None:
        return self._load_singleton("restore")

    def clear_restore(self) -> None:
        self._mutate("clear the restore", "DELETE FROM singleton WHERE kind = 'restore'")

    # -- participants ---------------------------------------------------------

    def save_participant(self, name: str, record: Mapping[str, Any]) -> None:
        """Insert or replace the record of participant ``name``."""
        body = _encode(record, f"participant {name!r}")
        self._mutate(
            f"save participant {name!r}",
            "INSERT INTO participant (name, body) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            (name, body),
        )

    def delete_participant(self, name: str) -> None:
        """Forget participant ``name``; forgetting an unknown name is not an error."""
        self._mutate(
            f"delete participant {name!r}", "DELETE FROM participant WHERE name = ?", (name,)
        )

    def load_participants(self) -> dict[str, dict[str, Any]]:
        """Every participant's record, by name, in name order."""
        rows = self._query("load participants", "SELECT name, body FROM participant ORDER BY name")
        return {name: _decode(body, f"participant {name!r}") for name, body in rows}

    # -- history of transitions -----------------------------------------------

    def record_transition(
        self,
        subject: str,
        event: str,
        from_state: str | None,
        to_state: str,
        *,
        at: float | None = None,
        detail: str = "",
    ) -> None:
        """Append one transition; ``at`` defaults to now (seconds since the epoch)."""
        self._mutate(
            f"record a transition of {subject!r}",
            "INSERT INTO transition (at, subject, event, from_state, to_state, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (time.time() if at is None else at, subject, event, from_state, to_state, detail),
        )

    def transitions(
        self, subject: str | None = None, *, limit: int | None = None
    ) -> list[Transition]:
        """The history, oldest first; only ``subject``'s and only the last ``limit``, if given."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        columns = "seq, at, subject, event, from_state, to_state, detail"
        where, params = ("WHERE subject = ?", [subject]) if subject is not None else ("", [])
        # LIMIT -1 means no limit in SQLite.
        sql = (
            f"SELECT * FROM (SELECT {columns} FROM transition {where}"
            " ORDER BY seq DESC LIMIT ?) ORDER BY seq"
        )
        rows = self._query("read transitions", sql, (*params, -1 if limit is None else limit))
        return [Transition(*row) for row in rows]

    # -- fragments --------------------------------------------------------------

    def put_fragment(self, name: str, blob: bytes, sha256: str) -> None:
        """Store (or replace) fragment ``name``; ``sha256`` must be the blob's, in lowercase hex."""
        blob = bytes(blob)
        if not _SHA256_HEX.fullmatch(sha256) or hashlib.sha256(blob).hexdigest() != sha256:
            raise StoreError(f"fragment {name!r}: sha256 {sha256!r} is not that of its blob")
        self._mutate(
            f"save fragment {name!r}",
            "INSERT INTO fragment (name, blob, size, sha256) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET"
            " blob = excluded.blob, size = excluded.size, sha256 = excluded.sha256",
            (name, blob, len(blob), sha256),
        )

    def get_fragment(self, name: str) -> bytes | None:
        """The fragment's bytes, checked against the stored sha256; None if there is none."""
        rows = self._query(
            f"read fragment {name!r}", "SELECT blob, sha256 FROM fragment WHERE name = ?", (name,)
        )
        if not rows:
            return None
        blob, sha256 = rows[0]
        # SQLite has no page checksums: a payload must never be built from
        # silently damaged bytes.
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise StoreError(f"{self._db_path}: fragment {name!r} does not match its sha256")
        return bytes(blob)

    def fragment_info(self, name: str) -> tuple[int, str] | None:
        """``(size, sha256)`` of the fragment, without reading it; None if there is none."""
        rows = self._query(
            f"read fragment {name!r}", "SELECT size, sha256 FROM fragment WHERE name = ?", (name,)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def delete_fragment(self, name: str) -> None:
        """Forget fragment ``name``; forgetting an unknown name is not an error."""
        self._mutate(f"delete fragment {name!r}", "DELETE FROM fragment WHERE name = ?", (name,))

    def fragment_names(self) -> list[str]:
        rows = self._query("list fragments", "SELECT name FROM fragment ORDER BY name")
        return [name for (name,) in rows]

    # -- replies already sent ---------------------------------------------------

    def put_reply(self, key: bytes, body: bytes, content_type: str) -> None:
        """Remember the reply sent under ``key`` (the first one, if sent twice)."""
        self._mutate(
            "save a reply",
            "INSERT INTO reply (key, body, content_type) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO NOTHING",
            (key, body, content_type),
        )

    def forget_replies(self, *, keep: int) -> None:
        """Keep only the last ``keep`` replies."""
        self._mutate(
            "forget old replies",
            "DELETE FROM reply WHERE n <= (SELECT max(n) FROM reply) - ?",
            (keep,),
        )

    def load_replies(self) -> list[tuple[bytes, bytes, str]]:
        """``(key, body, content type)`` of every reply kept, oldest first."""
        rows = self._query("load replies", "SELECT key, body, content_type FROM reply ORDER BY n")
        return [(bytes(k), bytes(b), str(c)) for k, b, c in rows]

    # -- small metadata -------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        self._mutate(
            f"set meta {key!r}",
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def get_meta(self, key: str) -> str | None:
        rows = self._query(f"read meta {key!r}", "SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    # -- internals --------------------------------------------------------------

    def _configure(self, conn: sqlite3.Connection) -> None:
        with self._translating("configure the database"):
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            # A PRAGMA that SQLite does not accept is silently ignored: read
            # each back, since durability rests on them.
            settings = {
                name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("synchronous", "foreign_keys", "busy_timeout")
            }
        if str(mode).lower() != "wal":
            raise StoreError(f"{self._db_path}: cannot enable WAL (journal_mode is {mode!r})")
        expected = {"synchronous": 2, "foreign_keys": 1, "busy_timeout": BUSY_TIMEOUT_MS}
        if settings != expected:
            raise StoreError(f"{self._db_path}: PRAGMAs not in force: {settings} != {expected}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Inside BEGIN IMMEDIATE so that two processes opening a fresh store
        # at once cannot both create the schema; DDL and user_version are
        # transactional, so a crash leaves either no schema or all of it.
        with self._translating("read or create the schema"):
            conn.execute("BEGIN IMMEDIATE")
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version == 0:
                    (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                    if tables:
                        raise StoreError(f"{self._db_path} is a SQLite database but not khod's")
                    # Not executescript(): it would COMMIT the open transaction first.
                    _execute_all(conn, _SCHEMA + _SCHEMA_2)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version == 1:
                    _execute_all(conn, _SCHEMA_2)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self._db_path}: schema version {version} is not supported"
                        f" (this khod knows version {SCHEMA_VERSION})"
                    )
                conn.execute("COMMIT")
            except BaseException:
                _undo(conn, None)
                raise

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self._db_path} is closed")
        return self._conn

    def _require_open_transaction(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            raise StoreError(
                f"{self._db_path}: the enclosing transaction was rolled back after an error"
            )

    @contextlib.contextmanager
    def _translating(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self._db_path}: cannot {what}: {exc}") from exc

    def _query(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock, self._translating(what):
            return self._live().execute(sql, params).fetchall()

    def _mutate(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> None:
        with self.transaction(), self._translating(what):
            self._live().execute(sql, params)

    def _save_singleton(self, kind: str, record: Mapping[str, Any]) -> None:
        body = _encode(record, f"{kind} record")
        self._mutate(
            f"save the {kind} record",
            "INSERT INTO singleton (kind, body) VALUES (?, ?)"
            " ON CONFLICT (kind) DO UPDATE SET body = excluded.body",
            (kind, body),
        )

    def _load_singleton(self, kind: str) -> dict[str, Any] | None:
        rows = self._query(
            f"load the {kind} record", "SELECT body FROM singleton WHERE kind = ?", (kind,)
        )
        return _decode(rows[0][0], f"{kind} record") if rows else None


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _encode(record: Mapping[str, Any], what: str) -> str:
    """Serialize before touching the database, so that a bad record changes nothing."""
    if not isinstance(record, Mapping):
        raise StoreError(f"{what}: expected a mapping, got {type(record).__name__}")
    _check_keys(record, what)
    try:
        return json.dumps(dict(record), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serializable: {exc}") from exc


def _check_keys(value: Any, what: str) -> None:
    # json.dumps turns int/float/bool/None keys into strings without a word:
    # the record read back would not be the record saved.
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"{what}: key {key!r} is not a string")
            _check_keys(item, what)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_keys(item, what)


def _decode(body: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} in the store is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"{what} in the store is not a JSON object")
    return value


def _undo(conn: sqlite3.Connection, savepoint: str | None) -> None:
    """Roll back the transaction or the savepoint, if SQLite has not already done it."""
    # Best effort: the caller is already raising the error that matters.
    with contextlib.suppress(sqlite3.Error):
        if not conn.in_transaction:
            return
        if savepoint is None:
            conn.execute("ROLLBACK")
        else:
            conn.execute(f"ROLLBACK TO {savepoint}")
            conn.execute(f"RELEASE {savepoint}")
