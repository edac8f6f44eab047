"""Shared fixtures: a private mosquitto and khod daemons as real processes.

The broker is started by the suite itself (``khod.broker.PrivateBroker``),
one per test module, on a Unix socket, so tests never depend on a broker
already running and may stop and restart it. Each test gets its own host id,
hence its own topic tree.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from khod.broker import PrivateBroker
from tests.daemonproc import DaemonFactory, DaemonProc


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.close()


@pytest.fixture
def host_id() -> str:
    return "t-" + uuid.uuid4().hex[:10]


@pytest.fixture
def daemon_factory(broker: PrivateBroker, host_id: str, tmp_path: Path) -> Iterator[DaemonFactory]:
    made: list[DaemonProc] = []

    def make(name: str = "state", host: str | None = None, **env: str) -> DaemonProc:
        d = DaemonProc(broker, host or host_id, tmp_path / name, **env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonProc]:
    """A running daemon; from an async test restart it with ``asyncio.to_thread(d.start)``."""
    d = daemon_factory()
    d.start()
    yield d
    d.stop()
