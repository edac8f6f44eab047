"""Runs inside the guest kernel (scripts/kernel.sh run): khod's luo backend across real kexecs.

    guest_scenario.py RESULTS_DIR BZIMAGE

The same command runs again in every kernel booted by ``kexec
--reuse-cmdline``; RESULTS_DIR (on the host, shared over 9p, the only thing
that outlives the guest's overlays) says which boot this is:

  boot 1  abort   khod (luo) owns /dev/liveupdate; a second ``khod run``
                  exits 2; a handover begins and is aborted; kexec.
  boot 2  clean   khod finds no session of its own and starts on the outgoing
                  side; then 8 participants hand over; committed; khod is
                  restarted (the kernel drops the closed session's memfd, the
                  new khod preserves the same payload again); kexec with khod
                  holding the session.
  boot 3  restore khod retrieves the payload from its session; ``khod
                  inspect`` reads the retrieved memfd; every participant
                  retrieves its fragment (sha256 compared on the host) and
                  finishes; khod FINISHes the session; once khod is gone,
                  no session is left.

Each boot writes ``<stage>.json`` (``ok`` plus what it saw) before it kexecs
or powers off. Exit status is ignored by the guest's init: the host test
reads the files.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from khod import luo
from khod.broker import PrivateBroker
from khod.luo_handoff import session_name
from khod_client import HandoverCancelled, Participant

HOST = "kguest"
STATE = Path("/tmp/khod-state")
STAGES = ("abort", "clean", "restore")
KHOD = [sys.executable, "-m", "khod.cli"]
# Under TCG everything is slow: generous, but bounded.
WAIT = 240.0

#: name -> (compatible, freeze_after); different compatibles, some ordered
PARTICIPANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "iommufd0": ("khod-test,iommufd-v1", ()),
    "vfio0": ("khod-test,vfio-v1", ("iommufd0",)),
    "vfio1": ("khod-test,vfio-v1", ("iommufd0",)),
    "vmm0": ("khod-test,vmm-v1", ("vfio0",)),
    "vmm1": ("khod-test,vmm-v1", ("vfio1",)),
    "vmm2": ("khod-test,vmm-v1", ()),
    "trace0": ("khod-test,trace-v1", ()),
    "blk0": ("khod-test,blk-v1", ("vmm2",)),
}


class Stage:
    def __init__(self, results: Path, name: str) -> None:
        self.results = results
        self.name = name
        self.data: dict[str, Any] = {
            "stage": name,
            "ok": False,
            "boot_id": boot_id(),
            "started_at": time.time(),
        }
        self.t0 = time.monotonic()

    def note(self, **kw: Any) -> None:
        self.data.update(kw)
        print(f"[guest {self.name}] {kw}", flush=True)

    def save(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.t0, 1)
        self.data["saved_at"] = time.time()
        path = self.results / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(self.data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        os.sync()


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def khod_env(broker: PrivateBroker, state: Path = STATE) -> dict[str, str]:
    return {
        **os.environ,
        "KHOD_BACKEND": "luo",
        "KHOD_STATE_DIR": str(state),
        "KHOD_BROKER": broker.url,
        "KHOD_HOST_ID": HOST,
        "KHOD_RESTORE_DEADLINE": "600",
        "KHOD_HANDOVER_DEADLINE": "600",
    }


class Khod:
    """``khod run`` with the luo backend, its log on the host."""

    def __init__(self, broker: PrivateBroker, log: Path) -> None:
        self.log = log
        self.broker = broker
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*KHOD, "run"],
                env=khod_env(broker),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        # The log lives on the host over 9p; a read racing khod's own append
        # failed once in CI with ENODATA (after the second kexec, khod itself
        # fine). Not reproduced since: such a read is tried again for 5 s.
        for _ in range(25):
            try:
                return self.log.read_text(errors="replace")
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EAGAIN, errno.EIO):
                    raise
                time.sleep(0.2)
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"khod exited with {self.proc.returncode}: {self.text()[-2000:]}"
                )
            time.sleep(0.2)
        raise TimeoutError(f"khod never logged {pattern!r}: {self.text()[-2000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT)


def cli(broker: PrivateBroker, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*KHOD, args[0], "--broker", broker.url, "--host-id", HOST, "--timeout", "120"]
    return subprocess.run(
        [*cmd, *args[1:]], capture_output=True, text=True, timeout=WAIT, check=False
    )


def status(broker: PrivateBroker) -> dict[str, Any]:
    r = cli(broker, "status", "--json")
    if r.returncode != 0:
        raise RuntimeError(f"khod status: {r.returncode} {r.stderr}")
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def participant(broker: PrivateBroker, name: str, instance: int) -> Participant:
    compatible, after = PARTICIPANTS[name]
    return Participant(
        name,
        compatible=compatible,
        instance=instance,
        broker=broker.url,
        host_id=HOST,
        freeze_after=after,
        restore_after=after,
        request_timeout=WAIT,
    )


def fragment(p: Participant) -> bytes:
    b = p.start_storage()
    b.property_string("owner", p.name)
    b.property_u64("boot-marker", int(time.time_ns()))
    # Different sizes, and content nobody could guess on the other side.
    b.property_bytes("state", os.urandom(64 + 150 * len(p.name)))
    return b.finish_storage()


def kexec(bzimage: str) -> None:
    exe = shutil.which("kexec") or "/usr/sbin/kexec"
    subprocess.run([exe, "-s", "-l", bzimage, "--reuse-cmdline"], check=True, timeout=WAIT)
    os.sync()
    print("[guest] kexec -e", flush=True)
    subprocess.run([exe, "-e"], check=True, timeout=WAIT)


# -- boot 1 -------------------------------------------------------------------


async def abort_handover(broker: PrivateBroker, st: Stage) -> None:
    names = ["vmm2", "trace0", "iommufd0"]  # none waits for someone outside the handover
    parts = [participant(broker, n, i) for i, n in enumerate(names)]
    for p in parts:
        await p.__aenter__()
    try:
        for p in parts:
            await p.register()
        r = await asyncio.to_thread(cli, broker, "begin", "--expect", *names)
        if r.returncode != 0:
            raise RuntimeError(f"khod begin: {r.stderr}")
        await parts[0].wait_for_begin()
        await parts[0].submit(fragment(parts[0]))
        cancels = [asyncio.create_task(p.wait_for_cancel()) for p in parts]
        r = await asyncio.to_thread(cli, broker, "abort", "--reason", "kernel test abort")
        if r.returncode != 0:
            raise RuntimeError(f"khod abort: {r.stderr}")
        reasons = await asyncio.wait_for(asyncio.gather(*cancels), WAIT)
        st.note(cancel_reasons=list(reasons))
    except HandoverCancelled as exc:
        st.note(cancelled=str(exc))
    finally:
        for p in parts:
            await p.__aexit__(None, None, None)


def boot_abort(results: Path, bzimage: str) -> bool:
    st = Stage(results, "abort")
    broker = PrivateBroker(Path("/tmp/broker"))
    broker.start(timeout=WAIT)
    khod = Khod(broker, results / "khod-abort.log")
    try:
        khod.wait_log(r"khod \S+ running")
        st.note(first_start=bool(re.search(r"no LUO session", khod.text())))
        # A second agent on the same host: the device has one owner.
        second = subprocess.run(
            [*KHOD, "run"],
            env=khod_env(broker, Path("/tmp/khod-second")),
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        st.note(second_rc=second.returncode, second_stderr=second.stderr.strip()[-500:])
        asyncio.run(abort_handover(broker, st))
        s = status(broker)
        st.note(
            handover_after_abort=s["handover"]["state"],
            abort_reason=s["handover"].get("abort_reason"),
        )
        st.note(ok=True)
    except Exception:
        st.note(error=traceback.format_exc())
    st.save()
    if not st.data["ok"]:
        khod.stop()
        return False
    # khod keeps running: whatever it still held would be carried now.
    kexec(bzimage)
    return True


# -- boot 2 -------------------------------------------------------------------


async def hand_over(broker: PrivateBroker, st: Stage) -> dict[str, str]:
    names = list(PARTICIPANTS)
    parts = [participant(broker, n, i) for i, n in enumerate(names)]
    for p in parts:
        await p.__aenter__()
    try:
        for p in parts:
            await p.register()

        async def one(p: Participant) -> bytes:
            await p.wait_for_begin()
            blob = fragment(p)
            await p.submit(blob)
            await p.wait_for_freeze()
            await p.frozen()
            return blob

        tasks = [asyncio.create_task(one(p)) for p in parts]
        r = await asyncio.to_thread(cli, broker, "begin", "--expect", *names, "--deadline", "600")
        if r.returncode != 0:
            raise RuntimeError(f"khod begin: {r.stderr}")
        blobs = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    finally:
        for p in parts:
            await p.__aexit__(None, None, None)
    return {n: hashlib.sha256(b).hexdigest() for n, b in zip(names, blobs, strict=True)}


def boot_clean(results: Path, bzimage: str) -> bool:
    st = Stage(results, "clean")
    broker = PrivateBroker(Path("/tmp/broker"))
    broker.start(timeout=WAIT)
    khod = Khod(broker, results / "khod-clean.log")
    try:
        khod.wait_log(r"khod \S+ running")
        s = status(broker)
        st.note(
            no_session=bool(re.search(r"no LUO session", khod.text())),
            side=s["daemon"]["side"],
            handover_at_start=s["handover"]["state"],
        )
        st.note(submitted=asyncio.run(hand_over(broker, st)))
        khod.wait_log(r"handover \S+ committed")
        s = status(broker)
        st.note(
            handover_id=s["handover"]["id"],
            handover_state=s["handover"]["state"],
            payload=s["handover"]["payload"],
            participants=[(p["name"], p["state"]) for p in s["participants"]],
        )
        # A khod restarted between commit and kexec: its predecessor's session
        # closed with it (the kernel dropped the memfd), it preserves the same
        # payload again from its store. The restore below proves the bytes.
        st.note(stop_after_commit=khod.stop())
        st.note(stop_warned=bool(re.search(r"unpreserves the payload", khod.text())))
        khod = Khod(broker, results / "khod-clean-restarted.log")
        khod.wait_log(r"payload preserved again in LUO session")
        khod.wait_log(r"khod \S+ running")
        st.note(preserved_again=True)
        st.note(ok=True)
    except Exception:
        st.note(error=traceback.format_exc())
    st.save()
    if not st.data["ok"]:
        khod.stop()
        return False
    kexec(bzimage)  # khod still holds its session: that is what carries the payload
    return True


# -- boot 3 -------------------------------------------------------------------


async def restore(broker: PrivateBroker) -> dict[str, str]:
    async def one(name: str, i: int) -> tuple[str, str]:
        async with participant(broker, name, i) as p:
            blob = await p.retrieve(timeout=WAIT)
            await p.finish()
            return name, hashlib.sha256(blob).hexdigest()

    pairs = await asyncio.gather(*(one(n, i) for i, n in enumerate(PARTICIPANTS)))
    return dict(pairs)


def boot_restore(results: Path) -> bool:
    st = Stage(results, "restore")
    # Before khod starts: only the LUO session may carry the payload over.
    st.note(state_dir_survived=STATE.exists())
    broker = PrivateBroker(Path("/tmp/broker"))
    broker.start(timeout=WAIT)
    khod = Khod(broker, results / "khod-restore.log")
    try:
        m = khod.wait_log(
            r"retrieved payload from LUO session (\S+): .*\(memfd (/proc/\d+/fd/\d+)\)"
        )
        st.note(session=m.group(1), memfd=m.group(2))
        khod.wait_log(r"khod \S+ running")
        # khod inspect reads the image straight from the retrieved memfd.
        r = subprocess.run(
            [*KHOD, "inspect", "--json", m.group(2)],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        inspected = json.loads(r.stdout) if r.stdout.strip() else {}
        st.note(
            inspect_rc=r.returncode,
            inspect_handover=inspected.get("handover_id"),
            inspect_participants=len(inspected.get("participants", [])),
        )
        st.note(restored=asyncio.run(restore(broker)))
        khod.wait_log(r"LUO session \S+ finished")
        s = status(broker)
        st.note(
            side=s["daemon"]["side"],
            restore_state=s["handover"]["state"],
            restore_id=s["handover"]["id"],
        )
        st.note(khod_exit=khod.stop())
        # khod is gone: the device is free, and no session of ours is left.
        with luo.Device() as dev:
            left = dev.retrieve_session(session_name(HOST))
            st.note(session_left=left is not None)
            if left is not None:
                left.close()
        st.note(ok=True)
    except Exception:
        st.note(error=traceback.format_exc())
        if khod.proc.poll() is None:
            khod.stop()
    st.save()
    return bool(st.data["ok"])


def main() -> int:
    results, bzimage = Path(sys.argv[1]), sys.argv[2]
    done = [s for s in STAGES if (results / f"{s}.json").exists()]
    stage = next((s for s in STAGES if s not in done), None)
    print(f"[guest] boot {boot_id()}: stage {stage}", flush=True)
    if stage == "abort":
        return 0 if boot_abort(results, bzimage) else 1
    if stage == "clean":
        return 0 if boot_clean(results, bzimage) else 1
    if stage == "restore":
        return 0 if boot_restore(results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
