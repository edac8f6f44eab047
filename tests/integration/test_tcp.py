"""A whole handover and restore over TCP (the rest of the suite uses the Unix socket).

Over TCP every connection khod opens must set TCP_NODELAY, and so must the
broker (``set_tcp_nodelay true``): otherwise a reply that follows a PUBACK
waits for the peer's delayed ACK. The options are read back from the sockets.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from khod.broker import PrivateBroker
from khod.payload import PayloadImage
from khod_client import Participant
from khod_wire.fragment import start_storage
from khod_wire.protocol import ControlOp
from tests.busclient import OperatorClient
from tests.daemonproc import DaemonProc

pytestmark = pytest.mark.integration

COMPAT = "test,tcp-v1"


@pytest.fixture
def tcp_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path / "broker", tcp=True)
    b.start()
    yield b
    b.close()


def blob(i: int) -> bytes:
    b = start_storage(COMPAT, i)
    b.property_u32("vcpus", i + 1)
    return b.finish_storage()


async def test_a_handover_and_its_restore_over_tcp(
    tcp_broker: PrivateBroker, tmp_path: Path
) -> None:
    assert tcp_broker.url.startswith("mqtt://127.0.0.1:")
    assert "set_tcp_nodelay true" in tcp_broker.conf_path.read_text()
    d = DaemonProc(tcp_broker, "tcp", tmp_path / "state")
    await asyncio.to_thread(d.start)
    parts = [
        Participant(
            f"vm-{i}",
            compatible=COMPAT,
            instance=i,
            broker=tcp_broker.url,
            host_id="tcp",
            freeze_after=["vm-0"] if i else [],
        )
        for i in range(3)
    ]

    async def take_part(p: Participant, i: int) -> None:
        await p.wait_for_begin()
        await p.submit(blob(i))
        await p.wait_for_freeze()
        await p.frozen()

    try:
        for p in parts:
            await p.__aenter__()
        # The SDK's own connection: Nagle is off.
        sock = parts[0]._conn._client._client.socket()  # type: ignore[union-attr]
        assert isinstance(sock, socket.socket) and sock.family == socket.AF_INET
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        for p in parts:
            await p.register()
        tasks = [asyncio.create_task(take_part(p, i)) for i, p in enumerate(parts)]
        async with OperatorClient(tcp_broker.url, "tcp") as op:
            await op(ControlOp.BEGIN, {"deadline": 60})
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        done = await parts[0].wait_for_handover(lambda s: s.state == "committed")
        assert done.payload is not None and done.payload["participants"] == 3
    finally:
        for p in parts:
            await p.__aexit__(None, None, None)
    d.stop()

    image = d.state_dir / "payload.kho"
    # vm-1 and vm-2 freeze after vm-0: it comes first in the payload.
    assert PayloadImage.from_file(image).entries[0].name == "vm-0"
    incoming = DaemonProc(tcp_broker, "tcp", tmp_path / "next-boot")
    await asyncio.to_thread(incoming.start, restore=image)
    try:
        for i in range(3):
            async with Participant(
                f"vm-{i}", compatible=COMPAT, instance=i, broker=tcp_broker.url, host_id="tcp"
            ) as p:
                assert await asyncio.wait_for(p.retrieve(), 30) == blob(i)
                await p.finish()
    finally:
        incoming.stop()
