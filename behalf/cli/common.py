"""What every command shares: lazily built deps, JSON output, operator name, clean errors."""

from __future__ import annotations

import functools
import getpass
import json
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from behalf import settings as settings_module
from behalf.deps import Deps
from behalf.settings import Settings, SettingsError
from delegation import redaction
from delegation.errors import BehalfError

F = TypeVar("F", bound=Callable[..., Any])


class AppContext:
    """Per-invocation state; settings and deps are built on first use, not at import."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self._environ = environ
        self._settings: Settings | None = None
        self._deps: Deps | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = settings_module.load(self._environ)
            except SettingsError as exc:
                raise click.UsageError(str(exc)) from None
            setup_logging(self._settings.log_level)
        return self._settings

    @property
    def deps(self) -> Deps:
        if self._deps is None:
            try:
                self._deps = Deps.from_settings(self.settings)
            except BehalfError as exc:
                raise click.ClickException(str(exc)) from None
        return self._deps

    def close(self) -> None:
        if self._deps is not None:
            self._deps.close()


pass_app = click.make_pass_decorator(AppContext, ensure=True)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(
        func
    )


def operator_option(func: F) -> F:
    return click.option(
        "--operator",
        default=lambda: _login_name(),
        show_default="the login name",
        help="Who is making this change (recorded in the audit trail).",
    )(func)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def emit(rows: Iterable[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    """Print a listing: a JSON document, or aligned columns for people."""
    rows = list(rows)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def domain_errors(func: F) -> F:
    """Turn our own errors into a one-line message and exit 1 (usage errors exit 2)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BehalfError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str) -> None:
    """Every role (api, worker, scheduler, relay, dev, one-off commands) logs through here, so
    token-shaped text is redacted from all of them (`delegation.redaction`)."""
    redaction.install()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
