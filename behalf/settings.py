"""One settings object, read from `BEHALF_*` variables once, at the entry point.

Every value is validated up front; a bad one raises `SettingsError` whose message is one line
naming the variable, so the CLI can print it and exit 2 before anything starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PREFIX = "BEHALF_"
MEMORY_URL = "memory://"


class SettingsError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        scheme = urlsplit(raw).scheme.split("+", 1)[0]
        if scheme not in schemes:
            raise ValueError(f"expected a URL starting with one of {', '.join(schemes)}")
        return raw

    return parse


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number (0 or more), got {raw!r}") from None
    if value < 0:
        raise ValueError("expected a whole number (0 or more)")
    return value


def _rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number of requests per second, got {raw!r}") from None
    if not 0 <= value <= 1_000_000:  # also refuses NaN
        raise ValueError("expected a number from 0 (no limit) to 1000000")
    return value


def _modules(raw: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    for name in names:
        if not all(piece.isidentifier() for piece in name.split(".")):
            raise ValueError(f"{name!r} is not a Python module path")
    return names


def _env(raw: str) -> str:
    if raw not in ("dev", "production"):
        raise ValueError("expected 'dev' or 'production'")
    return raw


def _str(raw: str) -> str:
    return raw


def _path(raw: str) -> Path:
    return Path(raw)


def _level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


def _var(default: Any, parse: Callable[[str], Any], doc: str) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """The whole configuration; field `x` is read from `BEHALF_X`."""

    env: str = _var("dev", _env, "dev (embedded defaults allowed) or production")
    database_url: str = _var(
        "sqlite:///behalf-dev.sqlite3",
        _url(("postgresql", "sqlite")),
        "SQLAlchemy URL; PostgreSQL in production",
    )
    redis_url: str = _var(
        MEMORY_URL, _url(("redis", "rediss", "memory")), "locks, budgets, revocation channel"
    )
    broker_url: str = _var(
        MEMORY_URL, _url(("redis", "rediss", "amqp", "memory")), "Celery broker"
    )
    kms_key_id: str = _var("", _str, "AWS KMS key id/ARN/alias; empty = local key file")
    kms_endpoint_url: str = _var("", _url(("http", "https")), "KMS endpoint override")
    kms_region: str = _var("us-east-1", _str, "AWS region of the KMS key")
    local_key_file: Path = _var(
        Path(".behalf/dev-master.key"), _path, "dev-only master key file"
    )
    public_url: str = _var(
        "http://127.0.0.1:8000", _url(("http", "https")), "base URL users reach the app at"
    )
    secret_key: str = _var("", _str, "signs cookies and links; required in production")
    smtp_url: str = _var("", _url(("smtp", "smtps")), "SMTP server; empty = log + outbox")
    mail_from: str = _var("behalf@localhost", _str, "From: address of notification mails")
    mail_templates_dir: str = _var(
        "", _str, "directory whose reauth.subject.txt/.txt/.html override the mail templates"
    )
    reauth_link_days: int = _var(7, _positive_int, "days a re-authorisation link stays valid")
    reminder_hours: int = _var(
        48, _non_negative_int, "hours after a break to remind if still broken; 0 = never"
    )
    mails_per_user_per_day: int = _var(
        3, _positive_int, "at most this many notification mails per user in 24 hours"
    )
    jobs_modules: tuple[str, ...] = _var((), _modules, "comma-separated modules with jobs")
    refresh_skew_seconds: int = _var(60, _positive_int, "minimum refresh-ahead margin")
    data_key_cache_seconds: int = _var(300, _positive_int, "max age of a cached data key")
    data_key_cache_size: int = _var(10_000, _positive_int, "max cached data keys")
    ops_token: str = _var("", _str, "bearer token for /api/ops; empty disables ops API")
    provider_rate_limit: float = _var(
        0.0, _rate, "requests/s per provider (AS + API), shared by the fleet; 0 = no limit"
    )
    agent_rate_limit: float = _var(0.0, _rate, "requests/s per agent, shared; 0 = no limit")
    run_lease_seconds: int = _var(
        60, _positive_int, "a running run's lease; a lost worker's run is re-queued after it"
    )
    redispatch_after_seconds: int = _var(
        300, _positive_int, "a queued run due this long and never claimed gets a new wake-up"
    )
    rate_limit_max_wait: int = _var(
        30, _positive_int, "longest wait for a rate budget before a job is retried later"
    )
    log_level: str = _var("INFO", _level, "log level")

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def uses_local_key(self) -> bool:
        return not self.kms_key_id


def variable(name: str) -> str:
    return PREFIX + name.upper()


KNOWN_VARIABLES: frozenset[str] = frozenset(variable(f.name) for f in fields(Settings))


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from the environment, validating every value and production rules."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in fields(Settings):
        name = variable(spec.name)
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[spec.name] = spec.metadata["parse"](raw.strip())
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in KNOWN_VARIABLES)
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (known: BEHALF_DATABASE_URL, ...)")
    settings = Settings(**values)
    if settings.production:
        _refuse_dev_defaults(settings)
    return settings


def _refuse_dev_defaults(settings: Settings) -> None:
    if settings.uses_local_key:
        raise SettingsError(
            "BEHALF_KMS_KEY_ID: required in production (the local key file is dev-only)"
        )
    if settings.redis_url == MEMORY_URL:
        raise SettingsError("BEHALF_REDIS_URL: in-process Redis is dev-only; set a redis:// URL")
    if settings.broker_url == MEMORY_URL:
        raise SettingsError("BEHALF_BROKER_URL: in-memory broker is dev-only; set a broker URL")
    if settings.database_url.startswith("sqlite"):
        raise SettingsError("BEHALF_DATABASE_URL: SQLite is dev-only; use PostgreSQL")
    if len(settings.secret_key) < 32:
        raise SettingsError("BEHALF_SECRET_KEY: required in production, at least 32 characters")


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the README's reference table."""
    rows = []
    for spec in fields(Settings):
        default = spec.default
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        rows.append((variable(spec.name), shown, spec.metadata["doc"]))
    return rows
