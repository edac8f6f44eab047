"""The shipped broker setup under attack and misuse (issue 8, items 1-3, 13).

Every test here runs the broker config a host runs (``deploy/mosquitto``:
authentication, ACL, client-id binding), with only its paths and port made
private, and real ``khod run`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from khod.broker import PrivateBroker
from khod_client import NotAuthorized, Participant
from khod_wire.message import Message
from khod_wire.protocol import JSON, ControlOp, HandoverStatus, ParticipantOp, Topics
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL
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
        # As on a host: the socket's file has no operator, the TCP listener's
        # has nobody else.
        passwords={
            "khod.passwd": {u: pw for u, pw in passwords.items() if u != "operator"},
            "khod-operators.passwd": {"operator": passwords["operator"]},
        },
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


def khod_argv(shipped: Shipped, host: str, *args: str, user: str = "operator") -> list[str]:
    """The operator CLI as an operator runs it: password from a file, not the command line."""
    return [
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
    ]


async def khod(
    shipped: Shipped, host: str, *args: str, user: str = "operator"
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *khod_argv(shipped, host, *args, user=user),
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
    # Nothing secret where other users of the host can read it (ps shows argv).
    assert daemon.proc is not None
    cmdline = await asyncio.to_thread(Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes)
    assert shipped.passwords["khod"].encode() not in cmdline
    log = daemon.log_path.read_text(errors="replace")
    assert "khod@" in log  # it says who it logged in as ...
    for user, pw in shipped.passwords.items():
        assert pw not in log, f"{user}'s password is in the daemon's log"  # ... never how


# -- item 1: client ids bound to users ----------------------------------------------


async def connect_as(url: str, username: str, password: str, identifier: str) -> str:
    """Connect a plain MQTT client with a chosen client id; "ok" or why it was refused."""
    u = BrokerURL.parse(url)
    client = aiomqtt.Client(
        u.host,
        u.port,
        transport=u.transport,
        identifier=identifier,
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=aiomqtt.Will(f"khod/v1/{identifier}/attacker-will", b"x", qos=1),
    )
    try:
        async with client:
            return "ok"  # it leaves cleanly: its own will is not the point
    except aiomqtt.MqttError as exc:
        return str(exc)


@contextlib.asynccontextmanager
async def bus_watch(shipped: Shipped, host: str) -> AsyncIterator[Watch]:
    w = Watch(shipped, host)
    task = asyncio.create_task(w.conn.run(), name="watch")
    try:
        await w.conn.wait_connected(TIMEOUT)
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Watch:
    """An operator connection recording every will and daemon status of a host."""

    def __init__(self, shipped: Shipped, host: str) -> None:
        self.topics = Topics(host)
        self.seen: list[tuple[str, bytes]] = []
        ident = client_id("khod-watch")
        self.conn = Connection(
            BrokerURL.parse(shipped.operator_url),
            identifier=ident,
            subscriptions=[self.topics.daemon, self.topics.request("+", ParticipantOp.GONE)],
            on_message=self._record,
        )
        self.conn.reply_topic = self.topics.control_reply(ident)

    async def _record(self, m: Message) -> None:
        self.seen.append((m.topic, m.payload))

    async def status(self) -> dict[str, Any]:
        """The daemon's status; every will published before this is then in ``seen``.

        The broker publishes a kicked client's will before it acknowledges the
        connection that kicked it, and delivers to this one connection in order.
        """
        m = await self.conn.request(
            self.topics.control(ControlOp.STATUS), b"{}", content_type=JSON, timeout=TIMEOUT
        )
        reply = json.loads(m.payload)
        assert reply["ok"], reply
        return reply["data"]  # type: ignore[no-any-return]

    def wills(self) -> list[str]:
        gone = [t for t, _ in self.seen if t.endswith("/req/gone")]
        offline = [
            t
            for t, body in self.seen
            if t == self.topics.daemon and json.loads(body)["state"] == "offline"
        ]
        return gone + offline


async def test_no_client_can_take_over_another_ones_session(
    shipped: Shipped, host_id: str, daemon: DaemonProc
) -> None:
    pw = shipped.passwords
    sock, tcp = shipped.broker.url, shipped.broker.tcp_url
    async with bus_watch(shipped, host_id) as watch, participant(shipped, host_id, "vm-b") as b:
        await b.register()
        rc, _, err = await khod(shipped, host_id, "begin", "--expect", "vm-b")
        assert rc == 0, err
        await b.wait_for_begin()
        assert not watch.wills(), watch.seen  # the daemon's first online status only

        # vm-a, with its own password, asks for vm-b's and the daemon's client
        # ids on the socket: it gets its own (its username) and kicks nobody.
        for stolen in (f"khod-{host_id}-p-vm-b", f"khod-{host_id}"):
            assert await connect_as(sock, "vm-a", pw["vm-a"], stolen) == "ok"
        await watch.status()
        assert not watch.wills(), f"a will fired: {watch.seen}"
        # Over TCP it cannot log in at all; an operator cannot claim a
        # socket client's id (the username the broker gave it) either.
        for user, stolen in (("vm-a", f"khod-{host_id}-p-vm-b"), ("vm-a", f"khod-{host_id}")):
            assert "Not authorized" in await connect_as(tcp, user, pw[user], stolen)
        for stolen in ("vm-b", "khod"):
            assert "Not authorized" in await connect_as(tcp, "operator", pw["operator"], stolen)

        data = await watch.status()
        assert not watch.wills(), f"a will fired: {watch.seen}"
        assert data["handover"]["state"] == "preparing"
        states = {p["name"]: p["state"] for p in data["participants"]}
        assert states["vm-b"] == "preparing"
        assert b._conn.connects == 1 and b._conn.connected  # never kicked

        # Every legitimate client still works: vm-b completes the handover
        # while two operator tools are connected at once.
        async with bus_watch(shipped, host_id) as second:
            monitor = await asyncio.create_subprocess_exec(
                *khod_argv(shipped, host_id, "monitor", "--exit-when-done"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            try:
                await b.submit(fragment(b))
                await b.wait_for_freeze()
                await b.frozen()
                await asyncio.wait_for(b.wait_for_handover(committed), TIMEOUT)
                async with asyncio.timeout(TIMEOUT):
                    out, err = await monitor.communicate()
                assert monitor.returncode == 0, err.decode()
                assert "committed" in out.decode()
            finally:
                if monitor.returncode is None:
                    monitor.kill()
                    await monitor.wait()
            assert (await second.status())["handover"]["state"] == "committed"
            assert (await watch.status())["handover"]["state"] == "committed"
            assert watch.conn.connects == 1 and second.conn.connects == 1
        assert not watch.wills(), watch.seen

    # The daemon's persistent session (its username as client id) survives a
    # restart, a SIGKILL included: the new connection takes over its own session.
    await asyncio.to_thread(daemon.kill)
    await asyncio.to_thread(daemon.start)
    rc, out, err = await khod(shipped, host_id, "status", "--json")
    assert rc == 0, err
    assert json.loads(out)["handover"]["state"] == "committed"


# -- item 3: refusals are visible, at once ---------------------------------------------

#: Well under TIMEOUT, the --timeout/request_timeout given: a refusal must not
#: be waited out like a silence.
AT_ONCE = TIMEOUT / 2


@pytest.mark.parametrize(
    ("user", "over"),
    [("operator", "wrong password"), ("vm-a", "socket")],
    ids=["bad-password", "acl-refuses-publish"],
)
async def test_the_cli_says_not_authorized_at_once(
    shipped: Shipped, host_id: str, daemon: DaemonProc, tmp_path: Path, user: str, over: str
) -> None:
    argv = khod_argv(shipped, host_id, "status", user=user)
    if over == "wrong password":
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password\n")
        argv[argv.index("--broker-password-file") + 1] = str(wrong)
    else:  # a participant's own login, on the socket: the ACL refuses ctl/req
        argv[argv.index("--broker") + 1] = shipped.broker.url
    loop = asyncio.get_running_loop()
    start = loop.time()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    async with asyncio.timeout(TIMEOUT + 10):
        _, err = await proc.communicate()
    took = loop.time() - start
    assert proc.returncode == 1, err.decode()
    assert err.decode().count("not authorized") == 1, err.decode()  # said once, clearly
    assert took < AT_ONCE, f"{took:.1f}s"


async def test_the_sdk_raises_not_authorized_at_once(
    shipped: Shipped, host_id: str, daemon: DaemonProc, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(NotAuthorized, match="not authorized"):
        async with participant(shipped, host_id, "vm-a", password_file=wrong):
            pass
    # vm-a's own login, speaking for vm-b: the ACL refuses it.
    with pytest.raises(NotAuthorized, match="not authorized"):
        async with participant(
            shipped, host_id, "vm-b", username="vm-a", password_file=shipped.password_file("vm-a")
        ) as p:
            await p.register()
    assert loop.time() - start < AT_ONCE


async def test_the_daemon_logs_its_refused_publishes(
    shipped: Shipped, host_id: str, tmp_path: Path
) -> None:
    """A daemon logged in as a participant: the ACL refuses what it publishes."""
    d = DaemonProc(
        shipped.broker,
        host_id,
        tmp_path / "state",
        KHOD_BROKER_USERNAME="vm-a",
        KHOD_BROKER_PASSWORD_FILE=str(shipped.password_file("vm-a")),
    )
    await asyncio.to_thread(d.start, wait=False)
    try:
        topic = Topics(host_id).daemon
        async with asyncio.timeout(TIMEOUT):
            while not re.search(  # noqa: ASYNC110  (a log file has no event)
                rf"WARNING .*not authorized: .* refused a publish to {topic}: Not authorized",
                d.log(),
            ):
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(d.stop)
    assert "Traceback" not in d.log()
