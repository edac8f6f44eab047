"""What the store holds on disk, read with plain sqlite3.

For assertions about rows that no production path lists: the daemon reads a
fragment only by the name of a participant that has one, so an orphaned
fragment row would never show through the Store API.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from khod.store_schema import DB_NAME


def stored_fragments(state_dir: Path) -> dict[str, tuple[int, str]]:
    """``{name: (size, sha256)}`` of every fragment row, in name order."""
    conn = sqlite3.connect(state_dir / DB_NAME)
    try:
        rows = conn.execute("SELECT name, size, sha256 FROM fragment ORDER BY name").fetchall()
    finally:
        conn.close()
    return {str(name): (int(size), str(sha256)) for name, size, sha256 in rows}
