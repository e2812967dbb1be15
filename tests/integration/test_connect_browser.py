"""End to end in a real headless Chromium: connect an agent on the AS's own pages, see the
grant, revoke it, see it revoked. No JavaScript of ours is involved (there is none)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.integration import connect_support
from tests.integration.connect_support import ConnectWorld
from tests.support import browser

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

world = connect_support.world  # the fixtures
chromium = browser.chromium
page = browser.page


def test_connect_see_the_grant_revoke_see_it_revoked(world: ConnectWorld, page: Any) -> None:
    # Alice opens the connect link: behalf sends her to sign in at the AS first.
    page.goto(f"{world.url}/connect/reporter")
    page.wait_for_url(re.compile(re.escape(world.provider.issuer) + "/interaction/"))
    page.fill("#login", "alice")
    page.fill("#password", "pass")
    page.click("#submit")
    # Signing in to behalf asks only for who she is: openid, and email (where mails go).
    assert page.inner_text("#client").startswith("behalf sign-in")
    offered = page.locator("input[name=scope]:not([disabled])")
    assert [offered.nth(i).get_attribute("value") for i in range(offered.count())] == ["email"]
    page.click("#allow")

    # Back at behalf, signed in, the connect continues: the AS asks her about the agent.
    page.wait_for_url(re.compile(re.escape(world.provider.issuer) + "/interaction/"))
    assert page.inner_text("#client").startswith("reporter")
    assert page.inner_text("#account") == "alice"
    page.uncheck("input[name=scope][value='calendar:read']")
    page.click("#allow")

    # She lands on her grants and sees the agent, with what she granted.
    page.wait_for_url(f"{world.url}/grants?connected=reporter")
    assert "reporter is connected" in page.inner_text("#notice")
    assert page.inner_text("#user") == "alice"
    row = page.locator("tr.grant[data-agent=reporter]")
    assert row.get_attribute("data-status") == "active"
    assert "reports:read" in row.locator("td.scopes").inner_text()
    assert "not granted: calendar:read" in row.locator("td.scopes").inner_text()
    (stored,) = world.delegations()
    world.tokens(stored)  # (for the database leak scan)
    assert stored.granted_scopes == ["reports:read", "reports:write"]

    # She revokes it and sees it revoked.
    row.locator("button.revoke").click()
    page.wait_for_url(re.compile(re.escape(world.url) + r"/grants\?revoked="))
    assert "reporter was revoked" in page.inner_text("#notice")
    row = page.locator("tr.grant[data-agent=reporter]")
    assert row.get_attribute("data-status") == "revoked"
    assert row.locator("button.revoke").count() == 0
    assert world.delegations()[0].status == "revoked"
    assert world.stops == [stored.id]
    # The session cookie is HttpOnly and SameSite, as the state binding needs.
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "behalf_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
