"""The shipped broker setup under attack and misuse (issue 8, items 1-3, 13).

Every test here runs the broker config a host runs (``deploy/mosquitto``:
authentication, ACL, client-id binding), with only its paths and port made
private, and real ``khod run`` processes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from khod.broker import PrivateBroker
from khod.protocol import HandoverStatus
from khod_client import Participant
from tests.daemonproc import DaemonProc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPATIBLE = "khod-test,vm-v1"
TIMEOUT = 20.0
PARTICIPANTS = ("vm-a", "vm-b")


@dataclass
class Shipped:
    """The shipped broker, its users' passwords, and a password file for each."""

    broker: PrivateBroker
    passwords: dict[str, str]
    secrets_dir: Path

    def password_file(self, user: str) -> Path:
        return self.secrets_dir / user

    @property
    def operator_url(self) -> str:
        """Credentials in the URL: fine for a test, what item 2 says not to do on a host."""
        port = self.broker.port
        return f"mqtt://operator:{self.passwords['operator']}@127.0.0.1:{port}"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shipped]:
    work = tmp_path_factory.mktemp("shipped")
    users = ("khod", "operator", *PARTICIPANTS)
    passwords = {u: secrets.token_urlsafe(12) for u in users}
    secrets_dir = work / "secrets"
    secrets_dir.mkdir()
    for user, pw in passwords.items():
        (secrets_dir / user).write_text(pw + "\n")
    broker = PrivateBroker(
        work / "broker",
        shipped=ROOT / "deploy" / "mosquitto",
        passwords={"khod.passwd": passwords},
    )
    broker.start()
    yield Shipped(broker, passwords, secrets_dir)
    broker.close()


@pytest.fixture
async def daemon(shipped: Shipped, host_id: str, tmp_path: Path) -> AsyncIterator[DaemonProc]:
    """``khod run`` logged in as the shipped config's ``khod`` user, from a password file."""
    d = DaemonProc(
        shipped.broker,
        host_id,
        tmp_path / "state",
        reader=shipped.operator_url,
        KHOD_BROKER_USERNAME="khod",
        KHOD_BROKER_PASSWORD_FILE=str(shipped.password_file("khod")),
    )
    await asyncio.to_thread(d.start)
    yield d
    await asyncio.to_thread(d.stop)


def participant(shipped: Shipped, host: str, name: str, **kw: Any) -> Participant:
    kw.setdefault("username", name)
    kw.setdefault("password_file", shipped.password_file(name))
    return Participant(
        name,
        compatible=COMPATIBLE,
        instance=1,
        broker=shipped.broker.url,
        host_id=host,
        request_timeout=TIMEOUT,
        **kw,
    )


async def khod(
    shipped: Shipped, host: str, *args: str, user: str = "operator"
) -> tuple[int, str, str]:
    """The operator CLI as an operator runs it: password from a file, not the command line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "khod.cli",
        *args,
        "--broker",
        shipped.broker.tcp_url,
        "--broker-username",
        user,
        "--broker-password-file",
        str(shipped.password_file(user)),
        "--host-id",
        host,
        "--timeout",
        str(TIMEOUT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    async with asyncio.timeout(TIMEOUT + 10):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def fragment(p: Participant) -> bytes:
    b = p.start_storage()
    b.property_string("owner", p.name)
    return b.finish_storage()


def committed(s: HandoverStatus) -> bool:
    return s.side == "outgoing" and s.state == "committed"


# -- item 2: authenticated Unix-socket connections ------------------------------------


async def test_the_shipped_setup_logs_in_over_the_socket_and_hands_over(
    shipped: Shipped, host_id: str, daemon: DaemonProc
) -> None:
    async with participant(shipped, host_id, "vm-a") as p:
        await p.register()
        rc, out, err = await khod(shipped, host_id, "begin", "--expect", "vm-a")
        assert rc == 0, err
        await p.wait_for_begin()
        await p.submit(fragment(p))
        await p.wait_for_freeze()
        await p.frozen()
        await asyncio.wait_for(p.wait_for_handover(committed), TIMEOUT)
    rc, out, err = await khod(shipped, host_id, "status", "--json")
    assert rc == 0, err
    assert json.loads(out)["handover"]["state"] == "committed"
    log = daemon.log()
    assert "khod@" in log  # it says who it logged in as ...
    for user, pw in shipped.passwords.items():
        assert pw not in log, f"{user}'s password is in the daemon's log"  # ... never how
