"""Durable state of the daemon, on one SQLite database (``<state_dir>/khod.db``).

Owns the transactions and the records; opening the file, its PRAGMAs and its
schema belong to :mod:`khod.store_schema`.

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

Threads
-------
The daemon calls the store from two threads: the event loop (at startup, and
to read) and a worker thread that writes each batch (``asyncio.to_thread``).
Its run loop awaits one batch before staging the next, so today the two never
overlap. The lock makes that the store's guarantee rather than the caller's
habit: SQLite transactions belong to the connection, not to a thread, so a
call from a second thread during an open ``transaction()`` would otherwise
land inside it (committed or undone with another caller's batch), read its
uncommitted rows, or upset the savepoint depth. The lock is held for a whole
transaction block, and it is re-entrant because every write inside the block
takes it again on the same thread.
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

from khod.changes import Transition
from khod.store_schema import DB_NAME, open_database, undo
from khod_wire.errors import StoreError

__all__ = ["Store", "Transition"]

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
        self._conn: sqlite3.Connection | None = open_database(self._state_dir)

    # -- lifecycle of the store ----------------------------------------------

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
                undo(conn, savepoint if depth > 0 else None)
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
                undo(conn, savepoint if depth > 0 else None)
                raise StoreError(f"{self._db_path}: cannot commit: {exc}") from exc

    # -- the handover record (outgoing side) and the restore record (incoming side)

    def save_handover(self, record: Mapping[str, Any]) -> None:
        self._save_singleton("handover", record)

    def load_handover(self) -> dict[str, Any] | None:
        return self._load_singleton("handover")

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

    def delete_fragment(self, name: str) -> None:
        """Forget fragment ``name``; forgetting an unknown name is not an error."""
        self._mutate(f"delete fragment {name!r}", "DELETE FROM fragment WHERE name = ?", (name,))

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
        with self._lock:
            if self._depth == 0:
                with self.transaction(), self._translating(what):
                    self._live().execute(sql, params)
                return
            # Inside a transaction one statement needs no savepoint of its
            # own: SQLite undoes a failed statement alone. A batch of N
            # writes is then N statements, not 3N.
            conn = self._live()
            self._require_open_transaction(conn)
            with self._translating(what):
                conn.execute(sql, params)

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
