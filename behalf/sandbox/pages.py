"""HTML pages of the sandbox AS (Jinja2, autoescaped; templates live beside this file)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse

_TEMPLATES = Path(__file__).parent / "templates"

SCOPE_DESCRIPTIONS = {
    "openid": "Know who you are (your user id)",
    "profile": "See your name",
    "email": "See your email address",
    "reports:read": "Read your reports",
    "reports:write": "Create reports as you",
    "calendar:read": "Read your calendar",
}


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Pages:
    def __init__(self) -> None:
        self._env = Environment(
            loader=FileSystemLoader(_TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._env.filters["when"] = _when

    def render(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self._env.get_template(name).render(**context)
        headers = {
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",  # no clickjacking of the consent page
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self' http: https:; frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer",
        }
        return HTMLResponse(html, status_code=status_code, headers=headers)
