"""The database file under the store: how it is opened, its PRAGMAs, its schema and migration.

:func:`open_database` hands :class:`khod.store.Store` a connection that is
durable by configuration (WAL, ``synchronous=FULL``) and holds the current
schema; what the tables mean is the store's business, not this module's.
Everything here runs once, before the daemon serves anything.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from khod.atomicfile import fsync_directory
from khod_wire.errors import StoreError

__all__ = ["BUSY_TIMEOUT_MS", "DB_NAME", "SCHEMA_VERSION", "open_database", "undo"]

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

# The PRAGMAs durability rests on, with the value each must read back as.
# Not foreign_keys: no table references another (a transition outlives its
# participant on purpose), so that PRAGMA would have nothing to enforce.
_PRAGMAS = {"synchronous": 2, "busy_timeout": BUSY_TIMEOUT_MS}


def open_database(state_dir: Path) -> sqlite3.Connection:
    """The configured connection to ``state_dir/DB_NAME``, schema current.

    Creates ``state_dir`` (mode 0o700) and the schema if missing; StoreError
    if the file cannot be opened, is another program's database, or has a
    schema version this khod does not know.
    """
    db_path = state_dir / DB_NAME
    created = not state_dir.exists()
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create state directory {state_dir}: {exc}") from exc
    try:
        # isolation_level=None: the sqlite3 module must not open transactions
        # behind our back; Store.transaction() owns BEGIN/COMMIT.
        # check_same_thread=False: the daemon writes each batch from a worker
        # thread (asyncio.to_thread); Store's lock serializes the threads.
        conn = sqlite3.connect(
            db_path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {db_path}: {exc}") from exc
    try:
        _configure(conn, db_path)
        _migrate(conn, db_path)
        # SQLite fsyncs the directory for the WAL it creates but not for
        # the database file itself: make the file's name durable too.
        fsync_directory(state_dir)
        if created:
            fsync_directory(state_dir.parent)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, db_path: Path) -> None:
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = FULL")
        # A PRAGMA that SQLite does not accept is silently ignored: read
        # each back, since durability rests on them.
        settings = {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in _PRAGMAS}
    except sqlite3.Error as exc:
        raise StoreError(f"{db_path}: cannot configure the database: {exc}") from exc
    if str(mode).lower() != "wal":
        raise StoreError(f"{db_path}: cannot enable WAL (journal_mode is {mode!r})")
    if settings != _PRAGMAS:
        raise StoreError(f"{db_path}: PRAGMAs not in force: {settings} != {_PRAGMAS}")


def _migrate(conn: sqlite3.Connection, db_path: Path) -> None:
    # Inside BEGIN IMMEDIATE so that two processes opening a fresh store at
    # once cannot both create the schema; DDL and user_version are
    # transactional, so a crash leaves either no schema or all of it.
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 0:
                (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if tables:
                    raise StoreError(f"{db_path} is a SQLite database but not khod's")
                # Not executescript(): it would COMMIT the open transaction first.
                _execute_all(conn, _SCHEMA + _SCHEMA_2)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1:
                _execute_all(conn, _SCHEMA_2)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{db_path}: schema version {version} is not supported"
                    f" (this khod knows version {SCHEMA_VERSION})"
                )
            conn.execute("COMMIT")
        except BaseException:
            undo(conn, None)
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"{db_path}: cannot read or create the schema: {exc}") from exc


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of ``script`` inside the caller's transaction."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def undo(conn: sqlite3.Connection, savepoint: str | None) -> None:
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
