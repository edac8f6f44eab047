"""The daemon's start-up decisions, in-process (a real store, a recording publisher)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from khod import service
from khod.config import Settings
from khod.daemon import Daemon
from khod.handover import Outgoing
from khod.store import Store
from khod_wire.errors import StoreError
from khod_wire.fragment import start_storage
from khod_wire.protocol import JSON, ParticipantOp, Topics
from tests.fakes import Recorder


def frozen_handover(store: Store, *, deadline: float) -> None:
    """A handover left in `frozen` by a daemon that was killed before assembling."""
    out = Outgoing()
    out.register("vm", "test,vm-v1", 1, now=0.0)
    out.begin("h-1", deadline=deadline, now=0.0)
    blob = start_storage("test,vm-v1", 1).finish_storage()
    sha = hashlib.sha256(blob).hexdigest()
    out.submit("vm", len(blob), sha, now=1.0)
    out.frozen("vm", now=2.0)
    with store.transaction():
        store.save_handover(out.handover.to_record())
        store.save_participant("vm", out.participants["vm"].to_record())
        store.put_fragment("vm", blob, sha)


def daemon(tmp_path: Path, *, now: float) -> tuple[Daemon, Store]:
    settings = Settings(state_dir=tmp_path, host_id="h")
    store = Store(tmp_path)
    return Daemon(settings, store, Recorder(), clock=lambda: now), store


async def resumed(d: Daemon) -> None:
    async with d.running():
        await d.resume()
        await d.settled()


def test_resume_commits_a_handover_killed_before_assembly(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        frozen_handover(store, deadline=100.0)
    d, store = daemon(tmp_path, now=50.0)
    asyncio.run(resumed(d))
    assert d.out.handover.state == "committed"
    assert (tmp_path / "payload.kho").exists()
    store.close()


def test_resume_aborts_a_handover_whose_deadline_passed_meanwhile(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        frozen_handover(store, deadline=100.0)
    d, store = daemon(tmp_path, now=150.0)
    asyncio.run(resumed(d))
    assert d.out.handover.state == "idle"
    assert (d.out.handover.abort_reason or "").startswith("deadline passed")
    assert not (tmp_path / "payload.kho").exists()
    assert store.load_handover()["state"] == "idle"  # type: ignore[index]
    store.close()


def test_a_store_failure_inside_the_daemon_is_a_clear_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A request whose batch cannot be written stops the worker, and main says why."""
    pub = Recorder()
    topics = Topics("h")

    def broken() -> Iterator[None]:
        raise StoreError("khod.db: disk I/O error")

    async def serve_until_the_disk_fails(settings: Settings, *, restore: Path | None = None) -> int:
        # service.serve without the broker: the same worker in a TaskGroup.
        store = Store(settings.state_dir)
        d = Daemon(settings, store, pub)
        monkeypatch.setattr(store, "transaction", broken)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(d.run())
            body = json.dumps({"compatible": "test,vm-v1", "instance": 1}).encode()
            request = topics.request("vm", ParticipantOp.REGISTER)
            await d.handle(request, body, (JSON, topics.reply("vm"), b"c1"))
        return 0

    monkeypatch.setattr(service, "serve", serve_until_the_disk_fails)
    monkeypatch.setenv("KHOD_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("KHOD_HOST_ID", "h")
    assert service.main(None) == 1
    assert "khod: khod.db: disk I/O error" in capsys.readouterr().err
    # Said before stopping (a clean disconnect fires no will); never acknowledged.
    sent = {topic: payload for topic, payload, _ in pub.sent}
    assert json.loads(sent[topics.daemon])["state"] == "offline"
    assert topics.reply("vm") not in sent
