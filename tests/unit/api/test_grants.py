"""The grants page, its JSON twin, and revoking from there: own grants only, CSRF-protected."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import pytest
from sqlalchemy import select

from api.app import create_app
from api.deps import ApiDeps
from delegation import audit
from models import Delegation, JobRun, Schedule
from tests.unit.api.conftest import PUBLIC_URL, SECRET_KEY, SyncASGITransport, World
from tests.unit.api.helpers import actions, delegations, snapshot


@pytest.fixture
def alice(world: World) -> httpx.Client:
    browser = world.browser()
    world.sign_in(browser, "alice")
    world.connect(browser, "alice", grant=["reports:read"])
    return browser


def _grant_id(world: World) -> uuid.UUID:
    (row,) = delegations(world.sessions)
    return row.id


def test_grants_need_sign_in(world: World) -> None:
    browser = world.browser()
    page = browser.get("/grants")
    assert page.status_code == 303
    assert page.headers["location"] == "/auth/login?next=/grants"
    api = browser.get("/api/grants")
    assert api.status_code == 401
    assert api.json()["error"] == "not_signed_in"
    assert browser.post(f"/api/grants/{uuid.uuid4()}/revoke").status_code == 401


def test_the_page_lists_agent_scopes_status_dates_schedules_and_activity(
        world: World, alice: httpx.Client) -> None:
    grant_id = _grant_id(world)
    now = world.clock.now()
    with world.sessions.begin() as s:
        row = s.get(Delegation, grant_id)
        assert row is not None
        row.last_used_at = now + dt.timedelta(hours=1)
        s.add(Schedule(user_id=row.user_id, agent_id=row.agent_id, job="nightly-report",
                       cron="0 2 * * *", timezone="Europe/Paris",
                       next_slot_at=now + dt.timedelta(days=1),
                       next_run_at=now + dt.timedelta(days=1), created_at=now, updated_at=now))
        audit.append(s, audit.AuditRecord(
            action="api:call:made", user_id=row.user_id, user_subject="alice",
            agent_name="reporter", client_id="c", delegation_id=row.id,
            detail={"method": "GET", "path": "/v2/reports", "status": 200}), now)

    page = alice.get("/grants")
    data = alice.get("/api/grants").json()

    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<script" not in page.text  # works without JavaScript
    for text in ("reporter", "reports:read", "active", "2026-01-01 00:00 UTC",
                 "2026-01-01 01:00 UTC", "nightly-report", "2026-01-02 00:00 UTC",
                 "api:call:made", "path=/v2/reports", "delegation:granted"):
        assert text in page.text, text
    (grant,) = data["grants"]
    assert data["user"] == "alice"
    assert grant["agent"] == "reporter"
    assert grant["scopes_granted"] == ["reports:read"]
    assert grant["status"] == "active"
    assert grant["last_used_at"].startswith("2026-01-01T01:00")
    assert grant["schedules"][0]["job"] == "nightly-report"
    assert grant["schedules"][0]["next_run_at"].startswith("2026-01-02")
    assert [a["action"] for a in grant["recent_activity"]] == ["api:call:made",
                                                               "delegation:granted"]


def test_the_page_offers_agents_not_connected_yet(world: World, alice: httpx.Client) -> None:
    world.register_agent("calendar-bot", scopes="calendar:read")
    page = alice.get("/grants").text
    assert 'href="/connect/calendar-bot"' in page
    assert 'href="/connect/reporter"' not in page  # connected and active


def test_revoke_from_the_page_without_javascript(world: World, alice: httpx.Client) -> None:
    grant_id = _grant_id(world)
    page = alice.get("/grants").text
    csrf = page.split('name="csrf_token" value="')[1].split('"')[0]

    response = alice.post(f"/api/grants/{grant_id}/revoke", data={"csrf_token": csrf})

    assert response.status_code == 303
    assert response.headers["location"] == f"/grants?revoked={grant_id}"
    after = alice.get(response.headers["location"]).text
    assert "reporter was revoked" in after
    assert 'data-status="revoked"' in after
    assert world.stops == [grant_id]
    assert "delegation:revoked" in actions(world.sessions)


def test_revoke_as_json_then_again(world: World, alice: httpx.Client) -> None:
    grant_id = _grant_id(world)
    csrf = alice.get("/api/grants").json()["csrf_token"]

    first = alice.post(f"/api/grants/{grant_id}/revoke", headers={"X-CSRF-Token": csrf})
    second = alice.post(f"/api/grants/{grant_id}/revoke", headers={"X-CSRF-Token": csrf})

    assert first.json() == {"id": str(grant_id), "status": "revoked", "already_revoked": False}
    assert second.json()["already_revoked"] is True
    assert world.stops == [grant_id]  # pushed once
    (row,) = delegations(world.sessions)
    assert row.status == "revoked"


def test_revoke_cancels_queued_runs(world: World, alice: httpx.Client) -> None:
    grant_id = _grant_id(world)
    with world.sessions.begin() as s:
        row = s.get(Delegation, grant_id)
        assert row is not None
        s.add(JobRun(job="nightly-report", user_id=row.user_id, agent_id=row.agent_id,
                     delegation_id=row.id, queued_at=world.clock.now(),
                     updated_at=world.clock.now()))
    csrf = alice.get("/api/grants").json()["csrf_token"]
    alice.post(f"/api/grants/{grant_id}/revoke", headers={"X-CSRF-Token": csrf})
    with world.sessions() as s:
        assert s.scalars(select(JobRun.status)).all() == ["cancelled"]


@pytest.mark.parametrize("how", ["no token", "wrong token", "foreign origin", "null origin"])
def test_revoke_needs_the_csrf_token_and_our_origin(world: World, alice: httpx.Client,
                                                    how: str) -> None:
    grant_id = _grant_id(world)
    csrf = alice.get("/api/grants").json()["csrf_token"]
    headers = {"no token": {}, "wrong token": {"X-CSRF-Token": "x" * 43},
               "foreign origin": {"X-CSRF-Token": csrf, "Origin": "https://evil.test"},
               "null origin": {"X-CSRF-Token": csrf, "Origin": "null"}}[how]
    before = snapshot(world.sessions)

    response = alice.post(f"/api/grants/{grant_id}/revoke", headers=headers)

    assert response.status_code == 403
    assert snapshot(world.sessions) == before
    assert world.stops == []
    form = alice.post(f"/api/grants/{grant_id}/revoke", data={"csrf_token": "nope"})
    assert form.status_code == 403 and "Nothing was revoked" in form.text


def test_a_user_cannot_see_or_revoke_anothers_grant(world: World, alice: httpx.Client) -> None:
    alices = _grant_id(world)
    bob = world.browser()
    world.sign_in(bob, "bob")
    csrf = bob.get("/api/grants").json()["csrf_token"]
    before = snapshot(world.sessions)

    assert bob.get("/api/grants").json()["grants"] == []
    assert "reporter" not in bob.get("/grants").text.split("Agents you can connect")[0]
    json_try = bob.post(f"/api/grants/{alices}/revoke", headers={"X-CSRF-Token": csrf})
    missing = bob.post(f"/api/grants/{uuid.uuid4()}/revoke", headers={"X-CSRF-Token": csrf})
    form_try = bob.post(f"/api/grants/{alices}/revoke", data={"csrf_token": csrf})

    # Someone else's grant looks exactly like one that does not exist.
    assert json_try.status_code == missing.status_code == form_try.status_code == 404
    assert json_try.json() == missing.json()
    assert snapshot(world.sessions) == before
    assert world.stops == []


@pytest.mark.parametrize("grant_id", ["not-a-uuid", "1" * 500, "%00"])
def test_malformed_grant_ids_are_404(world: World, alice: httpx.Client, grant_id: str) -> None:
    csrf = alice.get("/api/grants").json()["csrf_token"]
    response = alice.post(f"/api/grants/{grant_id}/revoke", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 404


def test_an_oversized_form_is_refused(world: World, alice: httpx.Client) -> None:
    grant_id = _grant_id(world)
    response = alice.post(f"/api/grants/{grant_id}/revoke", data={"csrf_token": "x" * 10000})
    assert response.status_code == 400
    assert delegations(world.sessions)[0].status == "active"


def test_notices_name_only_the_users_own_grants(world: World, alice: httpx.Client) -> None:
    page = alice.get("/grants?connected=%3Cb%3Eevil&revoked=" + "x" * 5000).text
    assert "evil" not in page and "was revoked" not in page


def test_a_failing_stop_push_does_not_undo_the_revocation(world: World,
                                                          alice: httpx.Client) -> None:
    def broken(_delegation_id: uuid.UUID) -> None:
        raise ConnectionError("redis is down")

    grant_id = _grant_id(world)
    csrf = alice.get("/api/grants").json()["csrf_token"]
    world.stops.clear()
    # The same database and cookie, served by an app whose stop push fails:
    app = create_app(ApiDeps(sessions=world.sessions, vault=world.vault, clock=world.clock,
                             oauth=world.oauth, public_url=PUBLIC_URL, secret_key=SECRET_KEY,
                             environment="test", publish_stop=broken))
    with httpx.Client(transport=SyncASGITransport(app), base_url=PUBLIC_URL,
                      cookies=alice.cookies) as other:
        response = other.post(f"/api/grants/{grant_id}/revoke", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert delegations(world.sessions)[0].status == "revoked"


def test_the_openapi_schema_has_the_json_api_only(world: World) -> None:
    schema = world.browser().get("/openapi.json").json()
    paths = schema["paths"]
    assert "/api/grants" in paths
    assert "post" in paths["/api/grants/{grant_id}/revoke"]
    assert {"200", "401", "403", "404"} <= set(paths["/api/grants/{grant_id}/revoke"]["post"]
                                              ["responses"])
    for page in ("/grants", "/connect/{agent}", "/oauth/callback", "/auth/login"):
        assert page not in paths
