"""Child processes for the crash tests of khod.store and khod.atomicfile.

Run as a script, it writes in a loop and prints one line per write, flushed,
only after the write has returned: every line the parent reads is an
acknowledgement it may rely on after killing the child with SIGKILL.

    store_child.py acks <state_dir>          one multi-record transaction per number
    store_child.py batches <state_dir> <n>   n records per transaction (spills to the WAL)
    store_child.py hold <state_dir> <n>      one open transaction of n records, never committed
    store_child.py atomic <file>             atomic_write of large self-describing versions

Imported (by path, tests/ is not a package), it gives the parent ``Child``.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PAD = "x" * 2048


def record_sha(n: int) -> str:
    return hashlib.sha256(f"fragment {n}".encode()).hexdigest()


def fragment_blob(n: int) -> bytes:
    return f"fragment {n}".encode()


def make_version(n: int) -> bytes:
    """A file content that says which version it is and lets a reader prove it is whole."""
    body = os.urandom(64 * 1024 + (n * 7919) % (960 * 1024))
    header = f"khod-atomic v={n} len={len(body)} sha256={hashlib.sha256(body).hexdigest()}\n"
    return header.encode() + body


def parse_version(content: bytes) -> int:
    """The version number of a whole content; AssertionError if it is partial or mixed."""
    header, sep, body = content.partition(b"\n")
    assert sep, f"no header line in {len(content)} bytes"
    magic, version, length, sha = header.decode().split(" ")
    assert magic == "khod-atomic"
    assert int(length.removeprefix("len=")) == len(body), f"{header!r}: body is {len(body)} bytes"
    assert hashlib.sha256(body).hexdigest() == sha.removeprefix("sha256="), f"{header!r}: bad hash"
    return int(version.removeprefix("v="))


def ack(n: int) -> None:
    sys.stdout.write(f"{n}\n")
    sys.stdout.flush()


def run_acks(state_dir: Path) -> None:
    from khod.store import Store

    store = Store(state_dir)
    n = max((r["n"] for r in store.load_participants().values()), default=0) + 1
    while True:
        name = f"p{n:08d}"
        with store.transaction():
            store.save_participant(name, {"n": n, "sha256": record_sha(n), "pad": PAD})
            store.put_fragment(name, fragment_blob(n), record_sha(n))
            store.record_transition(name, "serialize", "preparing", "serialized", detail=str(n))
            store.set_meta("last", str(n))
            store.save_handover({"last": n})
        # One single-call write too: it must be just as durable once it returns.
        store.set_meta("single", str(n))
        ack(n)
        n += 1


def run_batches(state_dir: Path, size: int) -> None:
    from khod.store import Store

    store = Store(state_dir)
    batch = int(store.get_meta("batch") or "0") + 1
    while True:
        with store.transaction():
            for k in range(size):
                store.save_participant(f"b{batch:05d}-{k:05d}", {"batch": batch, "pad": PAD})
            store.set_meta("batch", str(batch))
        ack(batch)
        batch += 1


def run_hold(state_dir: Path, size: int) -> None:
    from khod.store import Store

    store = Store(state_dir)
    with store.transaction():
        for k in range(size):
            store.save_participant(f"h{k:06d}", {"held": k, "pad": PAD})
        store.set_meta("held", "yes")
        ack(size)
        time.sleep(3600)


def run_atomic(path: Path) -> None:
    from khod.atomicfile import atomic_write

    n = parse_version(path.read_bytes()) + 1 if path.exists() else 1
    while True:
        atomic_write(path, make_version(n))
        ack(n)
        n += 1


class Child:
    """One child process of this script, read line by line, killed with SIGKILL."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self._partial = b""

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def wait_for(self, count: int, timeout: float = 15.0) -> None:
        """Read until ``count`` lines have arrived in all."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"child gave {len(self.lines)} lines of {count} in {timeout}s"
            readable, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if readable and not self._read():
                self.proc.wait()
                assert self.proc.stderr is not None
                stderr = self.proc.stderr.read().decode(errors="replace")
                raise AssertionError(f"child exited {self.proc.returncode}:\n{stderr}")

    def kill(self) -> list[str]:
        """SIGKILL the child and return every whole line it printed: all were acknowledged."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        while self._read():
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.lines

    def _read(self) -> bool:
        assert self.proc.stdout is not None
        if self.proc.stdout.closed:
            return False
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        data = self._partial + chunk
        *whole, self._partial = data.split(b"\n")
        self.lines.extend(line.decode() for line in whole)
        return bool(chunk)


if __name__ == "__main__":
    mode, target, *rest = sys.argv[1:]
    if mode == "acks":
        run_acks(Path(target))
    elif mode == "batches":
        run_batches(Path(target), int(rest[0]))
    elif mode == "hold":
        run_hold(Path(target), int(rest[0]))
    elif mode == "atomic":
        run_atomic(Path(target))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
