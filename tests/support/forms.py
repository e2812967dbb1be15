"""Drive server-rendered login and consent pages with plain httpx (a browser without JS)."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlencode, urljoin

import httpx


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, object]] = []
        self._current: dict[str, object] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = {"action": a.get("action", ""), "fields": [], "buttons": []}
            self.forms.append(self._current)
        elif self._current is not None and tag == "input":
            if a.get("type") == "checkbox" and "checked" not in a:
                return
            self._current["fields"].append((a.get("name", ""), a.get("value", "")))  # type: ignore[union-attr]
        elif self._current is not None and tag == "button":
            self._current["buttons"].append(a)  # type: ignore[union-attr]

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def forms(html: str) -> list[dict[str, object]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def walk(client: httpx.Client, url: str, *, username: str, password: str,
         stop_at: str, max_steps: int = 20) -> httpx.Response:
    """Follow redirects and submit login/consent forms (allowing everything) until a response
    whose URL starts with `stop_at` and is not a redirect."""
    method, data = "GET", None
    for _ in range(max_steps):
        if data is None:
            response = client.request(method, url, follow_redirects=False)
        else:
            response = client.request(
                method, url, content=urlencode(data), follow_redirects=False,
                headers={"Content-Type": "application/x-www-form-urlencoded"})
        if response.is_redirect:
            url, method, data = urljoin(str(response.url), response.headers["location"]), \
                "GET", None
            continue
        if str(response.url).startswith(stop_at):
            return response
        found = forms(response.text)
        if not found:
            raise AssertionError(f"stuck at {response.url}: {response.status_code}")
        form = found[0]
        fields = dict(form["fields"])  # type: ignore[arg-type]
        values: list[tuple[str, str]] = list(form["fields"])  # type: ignore[arg-type]
        if "password" in fields:
            values = [(k, v) for k, v in values if k not in ("username", "login", "password")]
            name = "username" if "username" in fields else "login"
            values += [(name, username), ("password", password)]
        for button in form["buttons"]:  # type: ignore[attr-defined]
            if button.get("id") == "allow" or button.get("value") == "allow":
                values.append((button.get("name", "decision"), button.get("value", "allow")))
        url, method, data = urljoin(str(response.url), str(form["action"])), "POST", values
    raise AssertionError("too many steps")
