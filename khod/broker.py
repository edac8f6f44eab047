"""A private mosquitto for the demo and the test suite.

It listens on a Unix socket (no port to collide with), on a free loopback
TCP port, or on both (``unix_and_tcp=True``, for comparing the two), keeps
nothing on disk, sets ``set_tcp_nodelay true`` (so that a reply is not held
back ~40 ms for a delayed ACK), and sets ``max_queued_messages`` high: the
default of 1000 silently drops QoS 1 messages to a slow subscriber, which
would show up as a lost fragment or a stuck participant. ``stop()`` and
``start()`` may be called again to test a broker that goes away and comes
back on the same address.

With ``shipped=`` (the ``deploy/mosquitto`` directory) it runs the config a
host runs instead, authentication, ACL and all, with only its paths and port
replaced by private ones, so that tests exercise exactly what is shipped.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from khod_wire.errors import ConfigError

INSTALL_HINT = (
    "mosquitto is not installed (or not on PATH). Install it, e.g. "
    "`sudo apt-get install mosquitto` on Debian/Ubuntu or `dnf install mosquitto` on Fedora."
)


#: Debian installs the broker in sbin, which is not on every user's PATH.
CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next((p for p in CANDIDATES if Path(p).exists()), None)
    if found is None:
        raise ConfigError(INSTALL_HINT)
    return found


def password_hash(password: str) -> str:
    """A mosquitto 2.0 password file hash (what ``mosquitto_passwd`` writes)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateBroker:
    """A mosquitto process of our own. Use as a context manager."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        tcp: bool = False,
        unix_and_tcp: bool = False,
        persistence: bool = False,
        shipped: Path | None = None,
        passwords: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """``tcp``: listen on a loopback TCP port instead of the Unix socket;
        ``unix_and_tcp``: on both (``url`` is the one ``tcp`` selects,
        ``unix_url``/``tcp_url`` name each);
        ``persistence``: keep retained messages and sessions on disk across
        restarts, as the shipped config does (saved at a clean stop, not at a SIGKILL);
        ``shipped``: a directory with khod.conf and khod.acl to run as is (it
        listens on both); ``passwords``: for each password file it names (by
        file name), user -> password.
        """
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="khod-broker-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.shipped = shipped
        self.persistence = persistence
        self.passwords = passwords or {}
        self.tcp = tcp and shipped is None
        self.unix_and_tcp = unix_and_tcp or shipped is not None
        self.port = free_port() if tcp or self.unix_and_tcp else 0
        # Unix socket paths are limited to ~107 bytes: keep it short.
        self.socket_path = Path(tempfile.mkdtemp(prefix="khodmq-")) / "mq.sock"
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.tcp_url if self.tcp else self.unix_url

    @property
    def tcp_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def _listens_unix(self) -> bool:
        return self.unix_and_tcp or not self.tcp

    def _listens_tcp(self) -> bool:
        return self.unix_and_tcp or self.tcp

    def _shipped_config(self, shipped: Path) -> str:
        text = (shipped / "khod.conf").read_text()

        def sub(pattern: str, repl: str) -> None:
            nonlocal text
            text, n = re.subn(pattern, repl, text, flags=re.M)
            if n == 0:
                raise ConfigError(f"{shipped / 'khod.conf'}: no line matches {pattern!r}")

        sub(r"^listener 0 /run/mosquitto/khod\.sock$", f"listener 0 {self.socket_path}")
        sub(r"^listener 1883 127\.0\.0\.1$", f"listener {self.port} 127.0.0.1")
        sub(r"^persistence_location .*$", f"persistence_location {self.workdir}/")
        shutil.copy(shipped / "khod.acl", self.workdir / "khod.acl")
        sub(r"^acl_file /etc/mosquitto/khod\.acl$", f"acl_file {self.workdir / 'khod.acl'}")
        for name in re.findall(r"^password_file /etc/mosquitto/(\S+)$", text, flags=re.M):
            users = self.passwords.get(name)
            if users is None:
                raise ConfigError(f"the shipped config names {name}: give its passwords")
            (self.workdir / name).write_text(
                "".join(f"{u}:{password_hash(pw)}\n" for u, pw in users.items())
            )
        sub(r"^password_file /etc/mosquitto/", f"password_file {self.workdir}/")
        left = [
            line
            for line in text.splitlines()
            if not line.startswith("#") and re.search(r"\s/(etc|run|var)/", line)
        ]
        if left:
            raise ConfigError(f"{shipped / 'khod.conf'}: a system path is left: {left}")
        return "\n".join(
            [
                *(["user root"] if os.geteuid() == 0 else []),
                text,
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_dest stderr",
                "",
            ]
        )

    def _config(self) -> str:
        if self.shipped is not None:
            return self._shipped_config(self.shipped)
        listeners = [
            *([f"listener 0 {self.socket_path}"] if self._listens_unix() else []),
            *([f"listener {self.port} 127.0.0.1"] if self._listens_tcp() else []),
        ]
        return "\n".join(
            [
                *listeners,
                "allow_anonymous true",
                *(
                    [
                        "persistence true",
                        f"persistence_location {self.workdir}/",
                        "autosave_interval 3600",
                    ]
                    if self.persistence
                    else ["persistence false"]
                ),
                "max_queued_messages 100000",
                "max_inflight_messages 0",
                "max_packet_size 1048576",
                # A reply that follows a PUBACK must not wait for a delayed ACK.
                "set_tcp_nodelay true",
                # As root, mosquitto would drop to its own user, which cannot
                # reach our private socket directory.
                *(["user root"] if os.geteuid() == 0 else []),
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_dest stderr",
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.conf_path.write_text(self._config())
        self.socket_path.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.conf_path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(
                    f"mosquitto exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if self._accepts():
                return
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"mosquitto did not start listening within {timeout:g}s")

    def _accepts(self) -> bool:
        addrs: list[tuple[socket.AddressFamily, tuple[str, int] | str]] = []
        if self._listens_unix():
            addrs.append((socket.AF_UNIX, str(self.socket_path)))
        if self._listens_tcp():
            addrs.append((socket.AF_INET, ("127.0.0.1", self.port)))
        return all(self._accepts_at(family, addr) for family, addr in addrs)

    @staticmethod
    def _accepts_at(family: socket.AddressFamily, addr: tuple[str, int] | str) -> bool:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(addr)
            except OSError:
                return False
        return True

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
