"""The luo backend across real kexecs of a real kernel (Linux 7.3 with KHO + LUO).

One guest run (scripts/kernel.sh: QEMU under TCG, the host's filesystem over
9p) boots three times, driven by tests/kernel/guest_scenario.py: an aborted
handover then a kexec; a clean start and a committed handover of 8
participants then a kexec; the restore. The guest writes what it saw to a
host directory; the tests below judge it. The first run on a machine builds
the kernel (cached afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
KERNEL_SH = REPO / "scripts" / "kernel.sh"
# The build (first run only) and three boots under TCG; bounded all the same.
BUILD_TIMEOUT = 3600
GUEST_TIMEOUT = 1800


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "khod-kernel"
    return Path(os.environ.get("KHOD_KERNEL_CACHE", default))


@pytest.fixture(scope="module")
def guest() -> Iterator[dict[str, Any]]:
    build = subprocess.run(
        [str(KERNEL_SH), "path"], capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert build.returncode == 0, f"kernel build failed:\n{build.stderr[-4000:]}"
    bzimage = build.stdout.strip().splitlines()[-1]
    # Not under /tmp: the guest sees the host's /tmp only through an overlay.
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results = Path(tempfile.mkdtemp(prefix="luo-", dir=runs))
    console = results / "console.log"
    started = time.monotonic()
    with console.open("wb") as out:
        proc = subprocess.run(
            [
                str(KERNEL_SH),
                "run",
                # The kernel's messages and the script's output on the console.
                "--verbose",
                "--rwdir",
                str(results),
                "--",
                sys.executable,
                str(REPO / "tests" / "kernel" / "guest_scenario.py"),
                str(results),
                bzimage,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=GUEST_TIMEOUT,
            cwd=REPO,
        )
    stages = {
        p.stem: json.loads(p.read_text()) for p in results.glob("*.json") if p.stem != "console"
    }
    print(f"guest run: {time.monotonic() - started:.0f} s, exit {proc.returncode}")
    for name in ("abort", "clean", "restore"):
        data = stages.get(name, {})
        print(f"  boot {name}: ok={data.get('ok')}, {data.get('seconds')} s in its script")
    if "saved_at" in stages.get("clean", {}) and "saved_at" in stages.get("restore", {}):
        # From the commit (just before kexec) to every fragment retrieved and the session finished.
        trip = stages["restore"]["saved_at"] - stages["clean"]["saved_at"]
        print(f"  round trip, commit -> kexec -> restore released: {trip:.0f} s")
    ok = all(stages.get(s, {}).get("ok") for s in ("abort", "clean", "restore"))
    if not ok:
        # What the guest said is the only clue: show it.
        tail = console.read_text(errors="replace")[-6000:]
        logs = {p.name: p.read_text(errors="replace")[-2000:] for p in results.glob("khod-*.log")}
        print(f"results in {results}\n--- console ---\n{tail}")
        for name, text in logs.items():
            print(f"--- {name} ---\n{text}")
    yield {"stages": stages, "results": results}
    if ok:
        shutil.rmtree(results, ignore_errors=True)


def stage(guest: dict[str, Any], name: str) -> dict[str, Any]:
    data: dict[str, Any] | None = guest["stages"].get(name)
    assert data is not None, f"the guest never reached stage {name!r}"
    assert data["ok"], f"stage {name!r} failed in the guest:\n{data.get('error')}"
    return data


def test_a_second_khod_run_exits_2_while_the_first_holds_the_device(
    guest: dict[str, Any],
) -> None:
    abort = stage(guest, "abort")
    assert abort["second_rc"] == 2
    assert "/dev/liveupdate is held by another agent" in abort["second_stderr"]


def test_an_aborted_handover_leaves_no_session_across_the_kexec(guest: dict[str, Any]) -> None:
    abort = stage(guest, "abort")
    assert abort["cancel_reasons"] == ["kernel test abort"] * 3
    assert abort["handover_after_abort"] == "idle"
    assert abort["abort_reason"] == "kernel test abort"
    clean = stage(guest, "clean")
    assert clean["boot_id"] != abort["boot_id"], "no kexec happened"
    assert clean["no_session"], "khod found a session after an aborted handover"
    assert clean["side"] == "outgoing"
    assert clean["handover_at_start"] == "idle"


def test_the_committed_payload_is_preserved_in_the_luo_session(guest: dict[str, Any]) -> None:
    clean = stage(guest, "clean")
    assert clean["handover_state"] == "committed"
    payload = clean["payload"]
    assert payload["backend"] == "luo"
    assert payload["session"] == "khod-kguest"
    assert payload["token"] == 0x6B686F64
    assert payload["participants"] == 8
    assert {state for _, state in clean["participants"]} == {"frozen"}


def test_a_khod_restarted_after_the_commit_preserves_the_payload_again(
    guest: dict[str, Any],
) -> None:
    clean = stage(guest, "clean")
    assert clean["stop_after_commit"] == 0
    assert clean["stop_warned"], "khod stopped with a committed payload without a warning"
    assert clean["preserved_again"]
    # The restore (test_every_fragment_crosses_the_kexec_byte_identical) used
    # the session of the restarted khod: the first one's was closed.


def test_every_fragment_crosses_the_kexec_byte_identical(guest: dict[str, Any]) -> None:
    clean, restore = stage(guest, "clean"), stage(guest, "restore")
    assert restore["boot_id"] != clean["boot_id"], "no kexec happened"
    assert not restore["state_dir_survived"], "the state dir survived: the test proves nothing"
    assert len(clean["submitted"]) == 8
    assert restore["restored"] == clean["submitted"]
    assert restore["restore_id"] == clean["handover_id"]


def test_khod_inspect_reads_the_retrieved_memfd(guest: dict[str, Any]) -> None:
    restore = stage(guest, "restore")
    assert restore["inspect_rc"] == 0
    assert restore["inspect_handover"] == stage(guest, "clean")["handover_id"]
    assert restore["inspect_participants"] == 8


def test_the_luo_session_is_finished_and_gone(guest: dict[str, Any]) -> None:
    restore = stage(guest, "restore")
    assert restore["session"] == "khod-kguest"
    assert restore["restore_state"] == "released"
    assert restore["khod_exit"] == 0
    assert restore["session_left"] is False
