"""The daemon's configuration: a TOML file, ``KHOD_*`` variables, flags.

Precedence, highest first: explicit overrides (command-line flags), the
environment (``KHOD_BROKER``, ``KHOD_STATE_DIR``, ...), the TOML file
(``--config`` or ``$KHOD_CONFIG``), the defaults below. Unknown keys in the
file are an error, not a silent no-op: a misspelt deadline on a hypervisor
host must not fall back to a default unnoticed.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from khod_wire import identity
from khod_wire.errors import ConfigError, RegistrationError
from khod_wire.identity import default_host_id
from khod_wire.urls import BrokerURL, read_password_file

_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("khod_config_file", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_DATA.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get() or {})


class Settings(BaseSettings):
    """Everything the daemon and the operator commands can be told."""

    model_config = SettingsConfigDict(env_prefix="KHOD_", extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"
    #: the broker user (overrides one in the URL)
    broker_username: str | None = None
    #: a file holding the broker password (one line), e.g. systemd's
    #: $CREDENTIALS_DIRECTORY/broker-password: out of ps, logs and the config
    broker_password_file: Path | None = None
    #: the broker password itself; for KHOD_BROKER_PASSWORD, not the file
    broker_password: SecretStr | None = None
    host_id: str = Field(default_factory=default_host_id)
    state_dir: Path = Path("/var/lib/khod")
    #: where the committed payload image and its manifest go (default: state_dir)
    payload_dir: Path | None = None
    max_fragment_size: int = Field(default=4096, ge=64, le=1024 * 1024)
    #: seconds from begin until an unfinished handover aborts
    handover_deadline: float = Field(default=300.0, gt=0)
    #: seconds after the kexec until unclaimed fragments are reported and released
    restore_deadline: float = Field(default=600.0, gt=0)
    #: seconds the daemon's own connection must outlive a participant's will
    #: for it to count (a broker that shuts down publishes every client's will)
    gone_grace: float = Field(default=1.0, ge=0, le=600)
    backend: Literal["dir", "exec", "luo"] = "dir"
    #: with backend "exec": argv run after the image is on disk; "{image}" is replaced
    exec_command: list[str] = Field(default_factory=list)
    #: with backend "exec": argv run when a committed payload is withdrawn
    #: (``khod abort`` after commit), e.g. ["kexec", "-u"]; "{image}" is replaced
    exec_undo_command: list[str] = Field(default_factory=list)
    #: physical base the payload is loaded at (0: offsets)
    payload_base: int = Field(default=0, ge=0)

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        BrokerURL.parse(v)
        return v

    @field_validator("host_id")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            return identity.check_host(v)
        except RegistrationError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _one_password(self) -> Settings:
        if self.broker_password is not None and self.broker_password_file is not None:
            raise ValueError("set broker_password or broker_password_file, not both")
        return self

    @property
    def broker_url(self) -> BrokerURL:
        """The broker URL with the configured credentials (ConfigError if unreadable)."""
        password = None
        if self.broker_password is not None:
            password = self.broker_password.get_secret_value()
        elif self.broker_password_file is not None:
            password = read_password_file(self.broker_password_file)
        return BrokerURL.parse(self.broker).with_credentials(self.broker_username, password)

    @property
    def payload_path(self) -> Path:
        return (self.payload_dir or self.state_dir) / "payload.kho"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``path`` (or ``$KHOD_CONFIG``), the environment and overrides.

    Any problem is a ConfigError whose message names the file and the key.
    """
    if path is None and os.environ.get("KHOD_CONFIG"):
        path = Path(os.environ["KHOD_CONFIG"])
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data = data.get("khod", data)
    token = _FILE_DATA.set(data)
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        settings.broker_url  # noqa: B018  (an unreadable password file is a config error now)
        return settings
    except ValidationError as exc:
        where = f" (file {path})" if path else ""
        details = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {details}") from None
    except ConfigError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _FILE_DATA.reset(token)
