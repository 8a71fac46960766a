"""The one settings model: environment variables (and an optional `.env`), validated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_KITE_CONNECTIONS = 3
MAX_KITE_TOKENS_PER_CONNECTION = 3000
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Every variable of the contract, typed. Field aliases are the env var names."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    kite_api_key: SecretStr | None = Field(None, validation_alias=_env("KITE_API_KEY"))
    kite_access_token: SecretStr | None = Field(None, validation_alias=_env("KITE_ACCESS_TOKEN"))
    kite_access_token_file: Path | None = Field(None, validation_alias=_env("KITE_ACCESS_TOKEN_FILE"))
    kite_ws_url: str = Field("wss://ws.kite.trade", validation_alias=_env("KITE_WS_URL"))
    redis_url: str = Field("redis://localhost:6379/0", validation_alias=_env("REDIS_URL"))
    namespace: str = Field("kite", validation_alias=_env("KITEBUS_NAMESPACE"))
    connections: Annotated[int, Field(ge=1, le=MAX_KITE_CONNECTIONS)] = Field(
        3, validation_alias=_env("KITEBUS_CONNECTIONS")
    )
    tokens_per_connection: Annotated[int, Field(ge=1, le=MAX_KITE_TOKENS_PER_CONNECTION)] = Field(
        3000, validation_alias=_env("KITEBUS_TOKENS_PER_CONNECTION")
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0, validation_alias=_env("KITEBUS_METRICS_PORT")
    )
    log_level: str = Field("INFO", validation_alias=_env("KITEBUS_LOG_LEVEL"))
    instruments: str | None = Field(None, validation_alias=_env("KITEBUS_INSTRUMENTS"))

    @field_validator("kite_access_token_file")
    @classmethod
    def _access_token_file(cls, value: Path | None) -> Path | None:
        if value is None or not str(value):
            return None
        value = value.expanduser().absolute()
        if not value.parent.is_dir():
            raise ValueError(f"its folder {value.parent} does not exist (the file itself may come later)")
        if value.is_dir():
            raise ValueError("is a folder, not a file")
        return value

    @field_validator("kite_ws_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("must be a ws:// or wss:// URL with a host")
        if parts.query:
            raise ValueError("must not carry a query; credentials come from KITE_API_KEY/KITE_ACCESS_TOKEN")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '-' or '.'")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("instruments")
    @classmethod
    def _instruments(cls, value: str | None) -> str | None:
        """A path or an http(s) URL; whether it can be read is the publisher's to report."""
        value = (value or "").strip()
        if "://" in value and not value.startswith(("http://", "https://")):
            raise ValueError("a path or an http(s) URL")
        return value or None

    @property
    def capacity(self) -> int:
        """How many instruments the publisher can hold in all."""
        return self.connections * self.tokens_per_connection

    def require_credentials(self) -> tuple[str, str | None]:
        """Return (api_key, KITE_ACCESS_TOKEN or None) or raise SettingsError naming what is
        missing. With KITE_ACCESS_TOKEN_FILE the access token comes from that file."""
        missing = []
        if self.kite_api_key is None or not self.kite_api_key.get_secret_value():
            missing.append("KITE_API_KEY")
        token = self.kite_access_token.get_secret_value() if self.kite_access_token else ""
        if not token and self.kite_access_token_file is None:
            missing.append("KITE_ACCESS_TOKEN (or KITE_ACCESS_TOKEN_FILE)")
        if missing:
            raise SettingsError(f"missing setting {' and '.join(missing)} (required to publish)")
        assert self.kite_api_key is not None
        return self.kite_api_key.get_secret_value(), token or None


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


_SECRET_FIELDS = frozenset({"kite_api_key", "kite_access_token"})
_ENV_NAMES = {
    name: str(field.validation_alias.choices[0])  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment, turning validation errors into SettingsError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = _ENV_NAMES.get(field, field.upper())
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        secret = field in _SECRET_FIELDS or isinstance(value, dict)
        shown = "" if secret else f" (got {value!r})"
        problems.append(f"{name}: {message}{shown}")
    return "invalid setting " + "; ".join(problems)
