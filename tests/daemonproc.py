"""``khod run`` as a child process, for integration tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from khod.broker import PrivateBroker

ROOT = Path(__file__).resolve().parent.parent


class DaemonProc:
    """``khod run`` in a child process, with its own state directory."""

    def __init__(
        self,
        broker: PrivateBroker,
        host_id: str,
        state_dir: Path,
        *,
        reader: str | None = None,
        **env: str,
    ) -> None:
        """``reader``: the broker URL (with credentials) to watch the daemon's status with."""
        self.broker = broker
        self.reader = reader
        self.host_id = host_id
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.extra_env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restore: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("KHOD_CONFIG", None)
        env.update(
            KHOD_BROKER=self.broker.url,
            KHOD_HOST_ID=self.host_id,
            KHOD_STATE_DIR=str(self.state_dir),
            KHOD_LOG_LEVEL="DEBUG",
            **self.extra_env,
        )
        return env

    def start(self, *, restore: Path | None = None, wait: bool = True) -> None:
        self.restore = restore if restore is not None else self.restore
        argv = [sys.executable, "-m", "khod.cli", "run"]
        if self.restore is not None:
            argv += ["--restore", str(self.restore)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        log.close()
        if wait:
            self.wait_online()

    def wait_online(self, timeout: float = 20.0) -> None:
        """Until the daemon's retained topic says online (read with a raw client)."""
        from khod_wire.protocol import Topics

        deadline = time.monotonic() + timeout
        topic = Topics(self.host_id).daemon
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"khod exited with {self.proc.returncode}:\n{self.log()}")
            body = read_retained(self.reader or self.broker.url, topic)
            if body and json.loads(body).get("state") == "online":
                return
            time.sleep(0.05)
        raise AssertionError(f"khod did not come online:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def read_retained(url: str, topic: str, timeout: float = 2.0) -> bytes | None:
    """The retained message of ``topic``, via a throwaway plain aiomqtt client."""
    import aiomqtt

    from khod_wire.transport import client_id
    from khod_wire.urls import BrokerURL

    async def _read() -> bytes | None:
        u = BrokerURL.parse(url)
        try:
            async with aiomqtt.Client(
                u.host,
                u.port,
                transport=u.transport,
                protocol=aiomqtt.ProtocolVersion.V5,
                username=u.username,
                password=u.password,
                identifier=client_id("khod-read"),
            ) as c:
                await c.subscribe(topic, qos=1)
                async with asyncio.timeout(timeout):
                    async for m in c.messages:
                        return bytes(m.payload) if m.payload else None
        except (aiomqtt.MqttError, TimeoutError):
            return None
        return None

    # A thread of its own, so that it also works from inside an async test.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _read()).result()


DaemonFactory = Callable[..., DaemonProc]
