"""The demo people who can sign in to the sandbox AS (their password is shown on the login page)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

DEMO_PASSWORD = "demo"  # noqa: S105 - a published demo password, printed on the login page


@dataclass(frozen=True)
class DemoUser:
    sub: str
    name: str
    email: str


DEMO_USERS: dict[str, DemoUser] = {
    "alice": DemoUser(sub="alice", name="Alice Anders", email="alice@example.test"),
    "bob": DemoUser(sub="bob", name="Bob Berg", email="bob@example.test"),
}


def authenticate(username: str, password: str) -> DemoUser | None:
    user = DEMO_USERS.get(username)
    if user is None or not hmac.compare_digest(password.encode(), DEMO_PASSWORD.encode()):
        return None
    return user
