"""khod.store: round trips, transactions, PRAGMAs, bad input, and SIGKILL at random moments."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType, ModuleType

import pytest

from khod.store import Store, Transition
from khod.store_schema import DB_NAME, SCHEMA_VERSION
from khod_wire.errors import StoreError
from tests.storeview import stored_fragments


def _load_child_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "store_child.py"
    spec = importlib.util.spec_from_file_location("store_child", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load_child_module()


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    s = Store(state_dir)
    yield s
    s.close()


def raw(state_dir: Path) -> sqlite3.Connection:
    """A plain connection, to look at or damage the file behind the store's back."""
    return sqlite3.connect(state_dir / DB_NAME, isolation_level=None)


# -- opening ---------------------------------------------------------------------


def test_creates_private_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "state"
    with Store(state_dir):
        assert (state_dir / DB_NAME).is_file()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_pragmas_in_force_after_reopen(state_dir: Path) -> None:
    Store(state_dir).close()
    with Store(state_dir) as s:
        conn = s._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        # No foreign keys, so none of the PRAGMA foreign_keys would enforce.
        assert conn.execute(
            "SELECT count(*) FROM sqlite_master AS t, pragma_foreign_key_list(t.name) AS f"
            " WHERE t.type = 'table'"
        ).fetchone() == (0,)
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("not a directory")
    with pytest.raises(StoreError, match="state"):
        Store(path)


def test_garbage_db_file(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / DB_NAME).write_bytes(b"this is not a database, just garbage\n" * 200)
    with pytest.raises(StoreError, match=re.escape(str(state_dir / DB_NAME))):
        Store(state_dir)


def test_newer_schema_version_refused(state_dir: Path) -> None:
    Store(state_dir).close()
    conn = raw(state_dir)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store(state_dir)


def test_foreign_database_refused(state_dir: Path) -> None:
    state_dir.mkdir()
    conn = raw(state_dir)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.close()
    with pytest.raises(StoreError, match="not khod's"):
        Store(state_dir)


def test_closed_store_refuses_use(state_dir: Path) -> None:
    s = Store(state_dir)
    s.close()
    s.close()  # idempotent
    assert "closed" in repr(s)
    with pytest.raises(StoreError, match="closed"):
        s.load_handover()
    with pytest.raises(StoreError, match="closed"):
        s.set_meta("k", "v")
    with pytest.raises(StoreError, match="closed"), s.transaction():
        pass


# -- round trips -----------------------------------------------------------------


def test_handover_and_restore_round_trip(state_dir: Path) -> None:
    handover = {"id": "5b1d", "state": "preparing", "deadline": 12.5, "expected": ["a", "b"]}
    restore = {"state": "restoring", "nested": {"x": [1, None, True]}}
    with Store(state_dir) as s:
        assert s.load_handover() is None
        assert s.load_restore() is None
        s.save_handover(handover)
        s.save_restore(MappingProxyType(restore))
        assert s.load_handover() == handover
        assert s.load_restore() == restore
    with Store(state_dir) as s:
        assert s.load_handover() == handover
        assert s.load_restore() == restore
        s.save_handover({"id": "other"})
        assert s.load_handover() == {"id": "other"}
        assert s.load_restore() == restore  # independent records
        s.clear_restore()
        s.clear_restore()
        assert s.load_restore() is None
        assert s.load_handover() == {"id": "other"}
    with Store(state_dir) as s:
        assert s.load_handover() == {"id": "other"} and s.load_restore() is None


def test_participants_upsert_delete_ordered(store: Store) -> None:
    store.save_participant("vmm", {"state": "registered"})
    store.save_participant("iommu", {"state": "preparing", "after": ["vmm"]})
    store.save_participant("vmm", {"state": "serialized"})
    assert store.load_participants() == {
        "iommu": {"state": "preparing", "after": ["vmm"]},
        "vmm": {"state": "serialized"},
    }
    assert list(store.load_participants()) == ["iommu", "vmm"]
    store.delete_participant("iommu")
    store.delete_participant("never-there")
    assert store.load_participants() == {"vmm": {"state": "serialized"}}


def test_transitions_ordered_filtered_limited(store: Store) -> None:
    before = time.time()
    store.record_transition("handover", "begin", "idle", "preparing")
    store.record_transition("vmm", "register", None, "registered", at=100.0, detail="hi")
    store.record_transition("handover", "freeze", "preparing", "freezing")
    store.record_transition("handover", "abort", "freezing", "idle", detail="deadline")
    everything = store.transitions()
    assert [t.event for t in everything] == ["begin", "register", "freeze", "abort"]
    assert [t.seq for t in everything] == sorted(t.seq for t in everything)
    assert before <= everything[0].at <= time.time()
    assert everything[1] == Transition(
        everything[1].seq, 100.0, "vmm", "register", None, "registered", "hi"
    )
    assert [t.event for t in store.transitions("handover")] == ["begin", "freeze", "abort"]
    assert [t.event for t in store.transitions("handover", limit=2)] == ["freeze", "abort"]
    assert [t.event for t in store.transitions(limit=1)] == ["abort"]
    assert store.transitions(limit=0) == []
    assert store.transitions("nobody") == []
    with pytest.raises(ValueError):
        store.transitions(limit=-1)
    with pytest.raises(AttributeError):
        everything[0].event = "x"  # type: ignore[misc]


def test_fragments(state_dir: Path) -> None:
    one, two = b"\xd0\x0d\xfe\xed" + bytes(60), b"\x00\xff" * 2048
    with Store(state_dir) as s:
        s.put_fragment("vmm", one, sha(one))
        s.put_fragment("iommu", b"", sha(b""))
        assert s.get_fragment("vmm") == one
        assert stored_fragments(state_dir)["vmm"] == (len(one), sha(one))
        s.put_fragment("vmm", two, sha(two))
        assert s.get_fragment("vmm") == two
        assert stored_fragments(state_dir) == {"iommu": (0, sha(b"")), "vmm": (len(two), sha(two))}
    with Store(state_dir) as s:
        assert s.get_fragment("vmm") == two
        s.delete_fragment("iommu")
        s.delete_fragment("never-there")
        assert list(stored_fragments(state_dir)) == ["vmm"]
        assert s.get_fragment("iommu") is None


def test_fragment_with_wrong_sha256_refused(store: Store) -> None:
    store.put_fragment("vmm", b"old", sha(b"old"))
    for bad in (sha(b"other"), sha(b"new").upper(), "", "zz"):
        with pytest.raises(StoreError, match="sha256"):
            store.put_fragment("vmm", b"new", bad)
    assert store.get_fragment("vmm") == b"old"


def test_fragment_damaged_on_disk_detected(state_dir: Path) -> None:
    with Store(state_dir) as s:
        s.put_fragment("vmm", b"good bytes", sha(b"good bytes"))
    conn = raw(state_dir)
    conn.execute("UPDATE fragment SET blob = ? WHERE name = 'vmm'", (b"evil bytes",))
    conn.close()
    with Store(state_dir) as s, pytest.raises(StoreError, match="vmm"):
        s.get_fragment("vmm")


def test_meta(state_dir: Path) -> None:
    with Store(state_dir) as s:
        assert s.get_meta("boot_id") is None
        s.set_meta("boot_id", "1234")
        s.set_meta("boot_id", "5678")
        s.set_meta("payload", "/var/lib/khod/payload.kho")
    with Store(state_dir) as s:
        assert s.get_meta("boot_id") == "5678"
        assert s.get_meta("payload") == "/var/lib/khod/payload.kho"


def test_usable_from_another_thread(store: Store) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            store.save_participant("t", {"thread": True})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors
    assert store.load_participants() == {"t": {"thread": True}}


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"x": {1, 2}},
        {"x": object()},
        {"x": math.nan},
        {"x": math.inf},
        {"x": b"bytes"},
        {1: "int key"},
        {"nested": {2: "int key"}},
        {"list": [{None: 1}]},
        ["not", "a", "mapping"],
    ],
)
def test_unserializable_record_changes_nothing(state_dir: Path, record: object) -> None:
    with Store(state_dir) as s:
        s.save_handover({"kept": 1})
        s.save_restore({"kept": 2})
        s.save_participant("p", {"kept": 3})
        with pytest.raises(StoreError):
            s.save_handover(record)  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            s.save_restore(record)  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            s.save_participant("p", record)  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            s.save_participant("q", record)  # type: ignore[arg-type]
    with Store(state_dir) as s:
        assert s.load_handover() == {"kept": 1}
        assert s.load_restore() == {"kept": 2}
        assert s.load_participants() == {"p": {"kept": 3}}


def test_damaged_record_reported(state_dir: Path) -> None:
    with Store(state_dir) as s:
        s.save_participant("p", {"ok": True})
        s.save_handover({"ok": True})
    conn = raw(state_dir)
    conn.execute("UPDATE participant SET body = '{not json'")
    conn.execute("UPDATE singleton SET body = '[1, 2]'")
    conn.close()
    with Store(state_dir) as s:
        with pytest.raises(StoreError, match="participant 'p'"):
            s.load_participants()
        with pytest.raises(StoreError, match="handover"):
            s.load_handover()


# -- transactions ----------------------------------------------------------------


def test_transaction_commits_together(state_dir: Path) -> None:
    with Store(state_dir) as s, Store(state_dir) as observer:
        with s.transaction():
            s.save_handover({"state": "frozen"})
            s.save_participant("vmm", {"state": "frozen"})
            s.put_fragment("vmm", b"f", sha(b"f"))
            s.record_transition("vmm", "freeze", "serialized", "frozen")
            s.set_meta("k", "v")
            # Inside the block, the writer sees its own writes; nobody else does.
            assert s.load_handover() == {"state": "frozen"}
            assert observer.load_handover() is None
            assert observer.load_participants() == {}
            assert observer.transitions() == []
        assert observer.load_handover() == {"state": "frozen"}
        assert observer.get_fragment("vmm") == b"f"
    with Store(state_dir) as s:
        assert s.load_participants() == {"vmm": {"state": "frozen"}}
        assert s.get_meta("k") == "v"
        assert len(s.transitions()) == 1


def test_transaction_rolls_back_on_exception(state_dir: Path) -> None:
    with Store(state_dir) as s:
        s.save_handover({"state": "preparing"})
        with pytest.raises(RuntimeError, match="boom"), s.transaction():
            s.save_handover({"state": "frozen"})
            s.save_participant("vmm", {"state": "frozen"})
            s.put_fragment("vmm", b"f", sha(b"f"))
            s.record_transition("vmm", "freeze", "serialized", "frozen")
            s.set_meta("k", "v")
            raise RuntimeError("boom")
        assert s.load_handover() == {"state": "preparing"}
        # Usable again afterwards.
        s.set_meta("after", "yes")
    with Store(state_dir) as s:
        assert s.load_handover() == {"state": "preparing"}
        assert s.load_participants() == {}
        assert stored_fragments(state_dir) == {}
        assert s.transitions() == []
        assert s.get_meta("k") is None
        assert s.get_meta("after") == "yes"


def test_bad_record_inside_transaction_rolls_back_everything(state_dir: Path) -> None:
    with Store(state_dir) as s:
        with pytest.raises(StoreError), s.transaction():
            s.save_participant("a", {"ok": 1})
            s.save_participant("b", {"bad": {1, 2}})
        assert s.load_participants() == {}


def test_a_write_sqlite_refuses_inside_a_transaction_undoes_only_itself(
    state_dir: Path,
) -> None:
    # Writes inside a transaction run without a savepoint each: SQLite
    # itself undoes the failed statement, the others stay.
    with Store(state_dir) as s, Store(state_dir) as observer:
        with s.transaction():
            s.record_transition("a", "register", None, "registered")
            with pytest.raises(StoreError, match="cannot record a transition of 'b'"):
                s.record_transition("b", "register", None, None)  # type: ignore[arg-type]
            s.record_transition("c", "register", None, "registered")
        assert [t.subject for t in observer.transitions()] == ["a", "c"]


def test_nested_transaction_is_a_savepoint(state_dir: Path) -> None:
    with Store(state_dir) as s, Store(state_dir) as observer:
        with s.transaction():
            s.set_meta("outer", "1")
            with pytest.raises(RuntimeError), s.transaction():
                s.set_meta("inner-failed", "1")
                raise RuntimeError
            with s.transaction():
                s.set_meta("inner-ok", "1")
            # Joined: nothing is visible until the outermost block ends.
            assert observer.get_meta("inner-ok") is None
            assert s.get_meta("inner-failed") is None
        assert observer.get_meta("outer") == "1"
        assert observer.get_meta("inner-ok") == "1"
        assert observer.get_meta("inner-failed") is None


def test_outer_failure_undoes_committed_inner_block(state_dir: Path) -> None:
    with Store(state_dir) as s, pytest.raises(RuntimeError), s.transaction():
        with s.transaction():
            s.set_meta("inner", "1")
        raise RuntimeError
    with Store(state_dir) as s:
        assert s.get_meta("inner") is None


# -- SIGKILL at random moments ---------------------------------------------------


def check_acks_store(state_dir: Path, acked: set[int]) -> int:
    """Every acknowledged number is there, whole; returns how many were committed."""
    with Store(state_dir) as s:
        participants = s.load_participants()
        numbers = sorted(r["n"] for r in participants.values())
        committed = len(numbers)
        # Commits are sequential: what survived is exactly 1..committed.
        assert numbers == list(range(1, committed + 1))
        assert acked <= set(numbers), f"lost acknowledged {sorted(acked - set(numbers))}"
        assert committed <= max(acked, default=0) + 1
        fragments = stored_fragments(state_dir)
        assert list(fragments) == sorted(participants)
        for name, record in participants.items():
            assert record["sha256"] == child.record_sha(record["n"])
            assert fragments[name] == (len(child.fragment_blob(record["n"])), record["sha256"])
            assert s.get_fragment(name) == child.fragment_blob(record["n"])
        assert [int(t.detail) for t in s.transitions()] == numbers
        if committed:
            assert s.get_meta("last") == str(committed)
            assert s.load_handover() == {"last": committed}
            # The single-call write after each transaction trails it by at most one.
            assert int(s.get_meta("single") or 0) in (committed - 1, committed)
    return committed


def test_sigkill_never_loses_an_acknowledged_transaction(state_dir: Path) -> None:
    rng = random.Random()
    acked: set[int] = set()
    for round_ in range(6):
        with child.Child("acks", str(state_dir)) as proc:
            proc.wait_for(rng.randint(1, 25))
            time.sleep(rng.uniform(0, 0.01))
            acked |= {int(line) for line in proc.kill()}
        committed = check_acks_store(state_dir, acked)
        assert committed >= max(acked), f"round {round_}"
    assert len(acked) >= 6


def test_sigkill_during_large_transactions_is_all_or_nothing(state_dir: Path) -> None:
    size = 1500  # about 3 MiB per transaction: more than the page cache, so it spills
    rng = random.Random()
    acked: set[int] = set()
    for _ in range(3):
        with child.Child("batches", str(state_dir), str(size)) as proc:
            proc.wait_for(rng.randint(1, 2))
            time.sleep(rng.uniform(0, 0.15))
            acked |= {int(line) for line in proc.kill()}
        with Store(state_dir) as s:
            counts: dict[int, int] = {}
            for record in s.load_participants().values():
                counts[record["batch"]] = counts.get(record["batch"], 0) + 1
            batches = sorted(counts)
            assert batches == list(range(1, len(batches) + 1))
            assert all(n == size for n in counts.values()), "a batch landed in part"
            assert acked <= set(batches)
            assert s.get_meta("batch") == (str(batches[-1]) if batches else None)


def test_sigkill_mid_transaction_leaves_nothing_of_it(state_dir: Path) -> None:
    with Store(state_dir) as s:
        s.save_participant("before", {"committed": True})
    with child.Child("hold", str(state_dir), "3000") as proc:
        proc.wait_for(1)
        # The open transaction is bigger than the page cache: SQLite has
        # already spilled uncommitted pages into the WAL on disk.
        assert (state_dir / f"{DB_NAME}-wal").stat().st_size > 1024 * 1024
        proc.kill()
    with Store(state_dir) as s:
        assert s.load_participants() == {"before": {"committed": True}}
        assert s.get_meta("held") is None


# -- replies already sent ---------------------------------------------------------


def test_replies_are_kept_first_sent_and_bounded(state_dir: Path) -> None:
    with Store(state_dir) as s, s.transaction():
        for i in range(10):
            s.put_reply(bytes([i]) * 32, f"reply {i}".encode(), "application/json")
        s.put_reply(bytes([3]) * 32, b"a second copy", "application/json")
        s.forget_replies(keep=4)
    with Store(state_dir) as s:
        kept = s.load_replies()
    assert [k[0] for k, _, _ in kept] == [6, 7, 8, 9]
    assert kept[0][1:] == (b"reply 6", "application/json")


def test_a_version_1_store_gains_the_reply_table(state_dir: Path) -> None:
    Store(state_dir).close()
    conn = raw(state_dir)
    conn.execute("DROP TABLE reply")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Store(state_dir) as s:
        assert s.load_replies() == []
        with s.transaction():
            s.put_reply(b"k" * 32, b"r", "application/json")
        assert s.load_replies() == [(b"k" * 32, b"r", "application/json")]
