"""How long assembling and verifying a payload takes, next to a plain copy.

Run: ``.venv/bin/python bench/bench_payload.py``. Prints the machine, then
one row per participant count: the time to ``assemble`` the image, the time
of a baseline that only concatenates the same fragments with the same page
padding (the least any assembler must do), and the time to
``PayloadImage.parse`` (which hashes and checks every fragment). Each figure
is the best of a few runs in this process. Figures, never assertions.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from khod.payload import PayloadImage
from khod.payload_layout import PayloadEntry, layout
from khod_wire import fragment

COUNTS = (16, 256, 4096)
PAGE = 4096
HANDOVER_ID = "00000000-0000-4000-8000-000000000000"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_entries(n: int) -> list[PayloadEntry]:
    """``n`` participants with fragments just under a page, like real VMM state."""
    entries = []
    for i in range(n):
        b = fragment.start_storage("cloud-hypervisor,vm-v1", i, size_hint=4096)
        b.property_string("state", "paused")
        b.property_bytes("memory-map", bytes([i & 0xFF]) * 3400)
        with b.node("devices"):
            for d in range(8):
                with b.node(f"dev@{d}"):
                    b.property_u64("base", 0x1000 * d)
        blob = b.finish_storage()
        entries.append(
            PayloadEntry(
                f"vm-{i}", "cloud-hypervisor,vm-v1", i, blob, hashlib.sha256(blob).digest()
            )
        )
    return entries


def concatenate(entries: list[PayloadEntry]) -> bytes:
    """The baseline: the same fragments and padding, with no root to build."""
    parts: list[bytes] = []
    end = 0
    for e in entries:
        offset = -(-end // PAGE) * PAGE
        parts += [bytes(offset - end), e.blob]
        end = offset + len(e.blob)
    return b"".join(parts)


def best(runs: int, fn: Callable[..., object], *args: object) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    print(f"machine : {platform.platform()} ({platform.machine()})")
    print(f"cpu     : {cpu_model()}")
    print(f"python  : {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"pylibfdt: {version('pylibfdt')}")
    print()
    header = (
        f"{'participants':>12} {'image MiB':>9} {'fragment B':>10} {'concat ms':>9} "
        f"{'assemble ms':>11} {'x concat':>8} {'us/part':>7} {'parse ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in COUNTS:
        entries = make_entries(n)
        runs = 5 if n <= 256 else 3
        image = layout(HANDOVER_ID, entries).image
        t_cat = best(runs, concatenate, entries)
        t_asm = best(runs, layout, HANDOVER_ID, entries)
        t_parse = best(runs, PayloadImage.parse, image)
        print(
            f"{n:>12} {len(image) / 2**20:>9.2f} {len(entries[0].blob):>10} "
            f"{t_cat * 1e3:>9.2f} {t_asm * 1e3:>11.2f} {t_asm / t_cat:>8.1f} "
            f"{t_asm / n * 1e6:>7.1f} {t_parse * 1e3:>9.2f}"
        )


if __name__ == "__main__":
    main()
