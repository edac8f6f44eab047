"""Broker credentials: in URLs of both kinds, in files and the environment, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from khod.config import load_settings
from khod_wire.errors import ConfigError
from khod_wire.urls import BrokerURL

SECRET = "s3cr:t@/x"


@pytest.mark.parametrize(
    ("url", "transport", "host", "user"),
    [
        ("unix:///run/mosquitto/khod.sock", "unix", "/run/mosquitto/khod.sock", None),
        ("unix://khod:s3cr%3At%40%2Fx@/run/mq.sock", "unix", "/run/mq.sock", "khod"),
        ("unix://khod@/run/mq.sock", "unix", "/run/mq.sock", "khod"),
        ("mqtt://op:s3cr%3At%40%2Fx@127.0.0.1:1884", "tcp", "127.0.0.1", "op"),
    ],
)
def test_urls_carry_credentials_for_both_transports(
    url: str, transport: str, host: str, user: str | None
) -> None:
    u = BrokerURL.parse(url)
    assert (u.transport, u.host, u.username) == (transport, host, user)
    if "%40" in url:
        assert u.password == SECRET
    assert SECRET not in str(u) and SECRET not in repr(u)
    assert "s3cr" not in str(u) and "s3cr" not in repr(u)


def test_a_bad_url_is_refused_without_echoing_its_password() -> None:
    with pytest.raises(ConfigError) as err:
        BrokerURL.parse("unix://khod:hunter2@")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError):
        BrokerURL.parse("unix://somehost/run/mq.sock")


def test_settings_take_the_password_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text(SECRET + "\n")
    s = load_settings(broker="unix:///run/mq.sock", broker_username="khod", broker_password_file=f)
    assert (s.broker_url.username, s.broker_url.password) == ("khod", SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s.broker_url)


def test_settings_take_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KHOD_BROKER_PASSWORD", SECRET)
    monkeypatch.setenv("KHOD_BROKER_USERNAME", "khod")
    s = load_settings(broker="unix:///run/mq.sock")
    assert (s.broker_url.username, s.broker_url.password) == ("khod", SECRET)
    assert SECRET not in repr(s)


def test_an_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password file"):
        load_settings(broker_password_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="one non-empty line"):
        load_settings(broker_password_file=tmp_path / "empty")


def test_password_and_password_file_together_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text("x\n")
    monkeypatch.setenv("KHOD_BROKER_PASSWORD", "y")
    with pytest.raises(ConfigError, match="not both"):
        load_settings(broker_password_file=tmp_path / "pw")
