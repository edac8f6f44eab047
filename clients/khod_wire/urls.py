"""Where the broker is and who logs in: broker URLs, credentials.

A password never shows in ``str()``, ``repr()`` or an error message; prefer a
password file to a password in a URL. Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from khod_wire.errors import ConfigError


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://[user[:password]@]host[:port]`` or ``unix://[user[:password]@]/path``.

    A password in a URL shows in ``ps`` and in shell history: prefer
    :meth:`with_credentials` from a password file or the environment. Neither
    ``str()`` nor ``repr()`` ever shows the password.
    """

    transport: Literal["tcp", "unix"]
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url)
        try:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password is not None else None
        except ValueError:
            raise ConfigError("broker URL: invalid credentials") from None
        if parts.scheme == "unix":
            # unix://user:password@/path: the "host" part holds only the credentials.
            if parts.hostname or (parts.netloc and "@" not in parts.netloc):
                raise ConfigError(
                    f"broker URL {_redact(url)!r}: a unix socket URL has no host: "
                    "unix:///path or unix://user@/path"
                )
            path = unquote(parts.path)
            if not path.startswith("/"):
                raise ConfigError(
                    f"broker URL {_redact(url)!r}: a unix socket needs an absolute path"
                )
            # paho insists on a valid port even for a socket.
            return cls("unix", path, username=username, password=password)
        if parts.scheme not in ("mqtt", "tcp"):
            raise ConfigError(
                f"broker URL {_redact(url)!r}: use mqtt://host:port or unix:///path/to/socket"
            )
        try:
            port = parts.port or 1883
        except ValueError:
            raise ConfigError(f"broker URL {_redact(url)!r}: invalid port") from None
        if not parts.hostname:
            raise ConfigError(f"broker URL {_redact(url)!r}: no host")
        return cls("tcp", parts.hostname, port, username, password)

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        """This URL with the given username and/or password (None keeps the URL's)."""
        return replace(
            self,
            username=self.username if username is None else username,
            password=self.password if password is None else password,
        )

    def __str__(self) -> str:
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        if self.transport == "unix":
            return f"unix://{user}{self.host}"
        return f"mqtt://{user}{self.host}:{self.port}"


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def read_password_file(path: Path) -> str:
    """A password file's content without its final newline; ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"cannot read the broker password file {path}: {reason}") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password:
        raise ConfigError(f"broker password file {path}: expected one non-empty line")
    return password
