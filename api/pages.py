"""Server-rendered pages: one Jinja2 environment (autoescaped), the headers every page gets,
and the error page that every refusal ends on (a clear sentence, never a stack trace)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # Never a referrer to another site (a page at the callback URL has a code and state in
    # its address); same-origin requests keep theirs, so a form post carries our Origin
    # (with no-referrer, browsers send `Origin: null`, which the CSRF check refuses).
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

TITLES = {
    400: "This request could not be used",
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    409: "Not right now",
    502: "The authorization server's answer was not usable",
    503: "Temporarily unavailable",
}


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "never"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


_env = Environment(
    loader=PackageLoader("api", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["when"] = _when


def render(template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=dict(PAGE_HEADERS))


def error_page(status: int, message: str, *, retry_url: str | None = None,
               signed_in: bool = False) -> HTMLResponse:
    return render("error.html", status=status, title=TITLES.get(status, "Something went wrong"),
                  message=message, retry_url=retry_url, signed_in=signed_in)
