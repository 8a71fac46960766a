"""The one settings model: environment variables (and an optional `.env`), validated."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from config.masking import mask_secrets
from config.redisurl import is_sentinel_url, parse_sentinel_url

MAX_KITE_CONNECTIONS = 3
MAX_KITE_TOKENS_PER_CONNECTION = 3000
# A minute rides out what the library itself survives (a Redis restart, a Sentinel failover
# with its default 30 s down-after, a publisher takeover, a stalled VM) with heartbeats
# every 20 s, and still gives a crashed strategy's instruments back within a minute.
DEFAULT_CLIENT_TIMEOUT = 60.0
MAX_CLIENT_TIMEOUT = 7 * 24 * 3600  # a week, as for a claim's ttl
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Account(BaseModel):
    """One more Kite account (api_key with its own connections), from KITEBUS_ACCOUNTS."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    api_key: SecretStr
    access_token: SecretStr | None = None
    access_token_file: Path | None = None

    @model_validator(mode="after")
    def _credentials(self) -> Account:
        if not self.api_key.get_secret_value():
            raise ValueError(f"account {self.name!r} has no api_key")
        token = self.access_token.get_secret_value() if self.access_token else ""
        if not token and self.access_token_file is None:
            raise ValueError(f"account {self.name!r} needs access_token or access_token_file")
        return self


class Settings(BaseSettings):
    """Every variable of the contract, typed. Field aliases are the env var names."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    kite_api_key: SecretStr | None = Field(None, validation_alias=_env("KITE_API_KEY"))
    kite_access_token: SecretStr | None = Field(None, validation_alias=_env("KITE_ACCESS_TOKEN"))
    kite_access_token_file: Path | None = Field(None, validation_alias=_env("KITE_ACCESS_TOKEN_FILE"))
    kite_ws_url: str = Field("wss://ws.kite.trade", validation_alias=_env("KITE_WS_URL"))
    redis_cluster: bool = Field(False, validation_alias=_env("KITEBUS_REDIS_CLUSTER"))
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
    accounts: list[Account] = Field(default_factory=list, validation_alias=_env("KITEBUS_ACCOUNTS"))
    client_timeout: float = Field(DEFAULT_CLIENT_TIMEOUT, validation_alias=_env("KITEBUS_CLIENT_TIMEOUT"))

    @field_validator("client_timeout", mode="before")
    @classmethod
    def _client_timeout(cls, value: object) -> float:
        return _seconds(value)

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, value: list[Account]) -> list[Account]:
        names = [a.name for a in value]
        keys = [a.api_key.get_secret_value() for a in value]
        if len(set(names)) != len(names):
            raise ValueError("two accounts have the same name")
        if len(set(keys)) != len(keys):
            raise ValueError("two accounts have the same api_key (Kite allows 3 connections per api_key)")
        return value

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
    def _redis_url(cls, value: str, info: ValidationInfo) -> str:
        if is_sentinel_url(value):
            if info.data.get("redis_cluster"):
                raise ValueError("names Sentinel, which KITEBUS_REDIS_CLUSTER=1 does not go with")
            try:
                parse_sentinel_url(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            return value
        parts = urlsplit(value)
        scheme = parts.scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss://, unix:// or redis+sentinel:// URL")
        if scheme != "unix":
            try:
                readable = parts.port is not None or parts.netloc == "" or bool(parts.hostname)
            except ValueError:  # a port that is no number: part of a password, most often
                readable = False
            stray_at = "@" in parts.path + parts.query + parts.fragment and "@" not in parts.netloc
            if not readable or (parts.netloc and not parts.hostname) or stray_at:
                raise ValueError(
                    "cannot be read as a Redis URL (no host, or a port that is no number): a "
                    "password with '/', '?', '#' or '@' must be percent-encoded (%2F, %3F, %23, %40)"
                )
        if scheme == "unix" and info.data.get("redis_cluster"):
            raise ValueError("must name a cluster node as redis:// or rediss:// with KITEBUS_REDIS_CLUSTER=1")
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
    def total_connections(self) -> int:
        """KITEBUS_CONNECTIONS for the default account and for each of KITEBUS_ACCOUNTS."""
        return self.connections * (1 + len(self.accounts))

    @property
    def capacity(self) -> int:
        """How many instruments the publisher can hold in all."""
        return self.total_connections * self.tokens_per_connection

    def require_accounts(self) -> list[tuple[str, str, str | None, Path | None]]:
        """(name, api_key, access token or None, token file or None) of every account, the
        default first; raises SettingsError when one is missing or two share an api_key."""
        api_key, token = self.require_credentials()
        accounts = [("default", api_key, token, self.kite_access_token_file)]
        for account in self.accounts:
            key = account.api_key.get_secret_value()
            if key == api_key:
                raise SettingsError(f"KITEBUS_ACCOUNTS: account {account.name!r} repeats KITE_API_KEY")
            secret = account.access_token.get_secret_value() if account.access_token else None
            accounts.append((account.name, key, secret or None, account.access_token_file))
        return accounts

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


def _seconds(value: object) -> float:
    """KITEBUS_CLIENT_TIMEOUT: a finite number of seconds, more than 0 and at most a week."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds <= MAX_CLIENT_TIMEOUT:  # also refuses nan and inf
        raise ValueError(
            f"must be a number of seconds, more than 0 and at most {MAX_CLIENT_TIMEOUT} (a week)"
        )
    return seconds


class _ClientTimeout(BaseSettings):
    """KITEBUS_CLIENT_TIMEOUT alone: what the library needs when it is given no Settings."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    client_timeout: float = Field(DEFAULT_CLIENT_TIMEOUT, validation_alias=_env("KITEBUS_CLIENT_TIMEOUT"))

    @field_validator("client_timeout", mode="before")
    @classmethod
    def _client_timeout(cls, value: object) -> float:
        return _seconds(value)


def load_client_timeout() -> float:
    """KITEBUS_CLIENT_TIMEOUT from the environment (or ``.env``), without reading or
    validating any other setting; raises SettingsError naming it when it is invalid."""
    try:
        return _ClientTimeout().client_timeout
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


_SECRET_FIELDS = frozenset({"kite_api_key", "kite_access_token", "accounts"})
_SECRET_ENV = frozenset({"KITE_API_KEY", "KITE_ACCESS_TOKEN", "KITEBUS_ACCOUNTS"})
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
    except PydanticSettingsError as exc:  # a value that should be JSON and is not
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        name = _ENV_NAMES.get(field, field.upper())
        raise SettingsError(f"invalid setting {name}: not valid JSON") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = _ENV_NAMES.get(field, field.upper())
        secret = field in _SECRET_FIELDS or name in _SECRET_ENV or isinstance(error.get("input"), dict)
        index, *keys = error["loc"][1:] or (None,)
        if index is not None:  # inside a list of objects: which one, which key
            name += f"[{index}]" + "".join(f".{key}" for key in keys)
        message = error["msg"].removeprefix("Value error, ")
        shown = "" if secret else f" (got {error.get('input')!r})"
        problems.append(f"{name}: {message}{shown}")
    return mask_secrets("invalid setting " + "; ".join(problems))  # a URL's password never shows
