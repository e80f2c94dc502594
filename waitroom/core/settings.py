"""One frozen settings object, read once from ``WAITROOM_*`` environment variables.

Every process (server, workers, CLI, benchmarks) builds its settings with
:func:`load_settings` at its edge and passes the object down; nothing else reads the
environment. A bad value raises :class:`~waitroom.core.errors.SettingsError` whose message is a
single line naming the variable, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

from waitroom.core.errors import SettingsError

PREFIX = "WAITROOM_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Process configuration. Field ``x`` comes from the variable ``WAITROOM_X``."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every Redis key this deployment writes; tests use a fresh one per run.
    redis_prefix: str = "wr"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/waitroom"
    #: Bearer token of the operators' API; ``None`` disables the admin API (401 always).
    admin_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    #: Largest request body accepted before answering 413.
    max_body_bytes: int = 64 * 1024
    #: Bound on every call to Redis or PostgreSQL made to answer a request or a probe.
    dependency_timeout_s: float = 2.0
    db_pool_min: int = 1
    db_pool_max: int = 10
    redis_max_connections: int = 256
    #: Where development keys and private services live.
    run_dir: str = ".run"
    #: PEM file of the Ed25519 key that signs queue passes (generated under run_dir when unset).
    pass_signing_key: str | None = None
    #: Extra PEM public keys that still verify passes (key rotation).
    pass_verify_keys: tuple[str, ...] = ()
    pass_issuer: str = "waitroom"
    #: Run admission loops in this process (they elect one leader per event across all
    #: processes); off for web-only nodes, and in tests that do not exercise admission.
    admission_loop: bool = True
    #: Secret that signs anonymous visitor tokens (generated under run_dir when unset).
    visitor_secret_file: str | None = None
    #: PEM public key of the host site's user JWTs; when set, fans must present one.
    user_jwt_public_key: str | None = None
    user_jwt_issuer: str | None = None
    user_jwt_audience: str | None = None
    user_jwt_algorithm: str = "RS256"
    #: Base URL of the payment provider the payment workers call.
    payment_url: str = "http://127.0.0.1:8090"
    #: Bound on one call to the payment provider; a slower answer is retried later.
    payment_timeout_s: float = 2.0
    #: Payments one workers process handles at once.
    payment_concurrency: int = 32


@dataclass(frozen=True)
class _Field:
    parse: Callable[[str], Any]
    expected: str


def _int_range(low: int, high: int) -> _Field:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not low <= value <= high:
            raise ValueError
        return value

    return _Field(parse, f"an integer from {low} to {high}")


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not 0 < value < 3600:
        raise ValueError
    return value


def _url(*schemes: str) -> _Field:
    def parse(raw: str) -> str:
        parts = urlsplit(raw.strip())
        if parts.scheme not in schemes or (not parts.hostname and not parts.path):
            raise ValueError
        return raw.strip()

    return _Field(parse, "a URL starting with " + " or ".join(f"{s}://" for s in schemes))


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError
    return raw.strip()


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError
    return value


def _prefix(raw: str) -> str:
    value = raw.strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value) or len(value) > 64:
        raise ValueError
    return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def _paths(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _algorithm(raw: str) -> str:
    value = raw.strip()
    if value not in {"RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA", "PS256"}:
        raise ValueError
    return value


_TEXT = _Field(_text, "a non-empty value")
_FIELDS: dict[str, _Field] = {
    "redis_url": _url("redis", "rediss", "unix"),
    "redis_prefix": _Field(_prefix, "up to 64 letters, digits, '-', '_' or '.'"),
    "database_url": _url("postgresql", "postgres"),
    "admin_token": _TEXT,
    "host": _TEXT,
    "port": _int_range(0, 65535),
    "log_level": _Field(_log_level, "one of " + ", ".join(LOG_LEVELS)),
    "max_body_bytes": _int_range(1024, 64 * 1024 * 1024),
    "dependency_timeout_s": _Field(_positive_float, "a number of seconds above 0"),
    "db_pool_min": _int_range(0, 1000),
    "db_pool_max": _int_range(1, 1000),
    "redis_max_connections": _int_range(1, 100_000),
    "run_dir": _TEXT,
    "pass_signing_key": _TEXT,
    "pass_verify_keys": _Field(_paths, "comma-separated file paths"),
    "pass_issuer": _TEXT,
    "admission_loop": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "visitor_secret_file": _TEXT,
    "user_jwt_public_key": _TEXT,
    "user_jwt_issuer": _TEXT,
    "user_jwt_audience": _TEXT,
    "user_jwt_algorithm": _Field(_algorithm, "one of RS256, RS384, RS512, ES256, ES384, EdDSA"),
    "payment_url": _url("http", "https"),
    "payment_timeout_s": _Field(_positive_float, "a number of seconds above 0"),
    "payment_concurrency": _int_range(1, 10_000),
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``environ`` (default: the process environment).

    Unknown ``WAITROOM_*`` variables are refused too: a misspelt variable that is silently
    ignored is how a production sale ends up on a default.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(PREFIX):
            continue
        key = name[len(PREFIX) :].lower()
        field = _FIELDS.get(key)
        if field is None:
            raise SettingsError(f"{name}: unknown setting", variable=name)
        try:
            values[key] = field.parse(raw)
        except ValueError:
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            raise SettingsError(
                f"{name}: expected {field.expected}, got {shown!r}", variable=name
            ) from None
    settings = Settings(**values)
    if settings.db_pool_min > settings.db_pool_max:
        raise SettingsError(
            f"{PREFIX}DB_POOL_MIN: must not exceed {PREFIX}DB_POOL_MAX ({settings.db_pool_max})",
            variable=f"{PREFIX}DB_POOL_MIN",
        )
    return settings


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process that loads exactly ``settings``.

    ``base`` (default: this process's environment) is kept, except its ``WAITROOM_*``
    variables, which are replaced by ``settings``' own.
    """
    env = {
        k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(PREFIX)
    }
    for key, value in msgspec.structs.asdict(settings).items():
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"{PREFIX}{key.upper()}"] = str(value)
    return env
