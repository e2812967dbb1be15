"""Signing in to the pages through the same AS, with an `openid`-only client."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import Agent, User
from tests.unit.api.conftest import PUBLIC_URL, World, build_world, query
from tests.unit.api.helpers import actions, snapshot


def test_sign_in_uses_an_openid_only_client_and_records_the_user(world: World) -> None:
    browser = world.browser()
    login = browser.get("/auth/login")
    params = query(login.headers["location"])
    first_cookie = browser.cookies["behalf_session"]

    done = browser.get(world.fake.authorize(login.headers["location"], "alice"))

    assert params["scope"] == "openid"
    assert params["redirect_uri"] == f"{PUBLIC_URL}/auth/callback"
    assert params["code_challenge_method"] == "S256" and params["nonce"]
    assert done.headers["location"] == "/grants"
    assert browser.cookies["behalf_session"] != first_cookie  # a new binding once signed in
    with world.sessions() as s:
        user = s.scalars(select(User)).one()
        signin = s.scalars(select(Agent).where(Agent.role == "signin")).one()
    assert (user.issuer, user.subject) == (world.fake.issuer, "alice")
    assert signin.scopes == ["openid"]
    assert world.fake.clients[signin.client_id].grant_types == ["authorization_code"]
    assert "user:session:signed_in" in actions(world.sessions)
    assert world.secrets_seen() == []


@pytest.mark.parametrize("target", ["https://evil.test/", "//evil.test/x", "/\\evil.test",
                                    "javascript:alert(1)", "/grants\r\nX: y"])
def test_sign_in_never_redirects_off_site(world: World, target: str) -> None:
    browser = world.browser()
    login = browser.get("/auth/login", params={"next": target})
    done = browser.get(world.fake.authorize(login.headers["location"], "alice"))
    assert done.headers["location"] == "/grants"


def test_a_second_sign_in_as_someone_else_shows_their_grants(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    world.connect(browser, "alice")
    csrf = browser.get("/api/grants").json()["csrf_token"]
    browser.post("/auth/logout", data={"csrf_token": csrf})

    world.sign_in(browser, "bob")

    data = browser.get("/api/grants").json()
    assert data["user"] == "bob" and data["grants"] == []


def test_logout_needs_the_csrf_token(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")

    assert browser.post("/auth/logout", data={"csrf_token": "nope"}).status_code == 403
    assert browser.get("/api/grants").status_code == 200

    csrf = browser.get("/api/grants").json()["csrf_token"]
    out = browser.post("/auth/logout", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/"
    assert browser.get("/api/grants").status_code == 401
    assert 'href="/auth/login?next=/grants"' in browser.get("/").text


def test_a_tampered_session_cookie_is_no_session(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    value = browser.cookies["behalf_session"]
    browser.cookies.clear()
    browser.cookies.set("behalf_session", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    assert browser.get("/api/grants").status_code == 401


def test_sign_in_refuses_a_forged_id_token(world: World) -> None:
    browser = world.browser()
    login = browser.get("/auth/login")
    world.fake.knobs.id_token_claims = {"aud": "someone-else"}
    before = snapshot(world.sessions)

    page = browser.get(world.fake.authorize(login.headers["location"], "alice"))

    assert page.status_code == 502
    assert snapshot(world.sessions) == before
    assert browser.get("/api/grants").status_code == 401


def test_sign_in_refuses_a_replayed_answer(world: World) -> None:
    browser = world.browser()
    login = browser.get("/auth/login")
    back = world.fake.authorize(login.headers["location"], "alice")
    assert browser.get(back).status_code == 303
    before = snapshot(world.sessions)
    replay = browser.get(back)
    # (Signing in gave this browser a new binding, so the old answer is not even its own.)
    assert replay.status_code == 400 and "another browser" in replay.text
    assert snapshot(world.sessions) == before


def test_without_a_sign_in_client_the_page_says_what_to_do(
        tmp_path: Path, sqlite_sessions: sessionmaker[Session]) -> None:
    world = build_world(tmp_path, sqlite_sessions, signin=False)
    page = world.browser().get("/auth/login")
    assert page.status_code == 503
    assert "behalf provider add" in page.text and "--signin" in page.text
