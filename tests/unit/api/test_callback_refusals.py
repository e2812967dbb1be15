"""Every bad answer to /oauth/callback is refused with a clear page, changes nothing (no
delegation, user or audit record; a grant the AS already issued is revoked there) and leaks
nothing (no token, code or secret in any response)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from joserfc.jwk import RSAKey

from tests.unit.api.conftest import World, build_world, query
from tests.unit.api.helpers import delegations, open_tokens, snapshot


@pytest.fixture
def alice(world: World) -> httpx.Client:
    browser = world.browser()
    world.sign_in(browser, "alice")
    return browser


def refused(world: World, browser: httpx.Client, url: str, status: int,
            words: str) -> httpx.Response:
    before = snapshot(world.sessions)
    response = browser.get(url)
    assert response.status_code == status, response.text
    assert words in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert snapshot(world.sessions) == before
    assert world.secrets_seen() == []
    return response


# --- state ------------------------------------------------------------------------------------


def test_missing_state(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    code = query(back)["code"]
    refused(world, alice, "/oauth/callback?" + urlencode({"code": code}), 400, "no state")


def test_forged_state(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    forged = back.replace(query(back)["state"], "A" * 43)
    refused(world, alice, forged, 400, "does not belong to any request")


def test_state_with_bad_characters(world: World, alice: httpx.Client) -> None:
    refused(world, alice, "/oauth/callback?state=%27%3B--&code=x", 400,
            "does not belong to any request")


def test_expired_state(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    world.clock.advance(601)
    refused(world, alice, back, 400, "expired")


def test_replayed_state(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    assert alice.get(back).status_code == 303

    refused(world, alice, back, 400, "already used")


def test_state_from_another_browser(world: World, alice: httpx.Client) -> None:
    # Given a callback meant for alice's first browser,
    back = world.fake.authorize(world.start_connect(alice), "alice")
    # when it is opened in another browser, even one signed in as alice,
    other = world.browser()
    world.sign_in(other, "alice")
    refused(world, other, back, 400, "another browser")
    # it is refused there and still works in the right one.
    assert alice.get(back).status_code == 303


def test_a_sign_in_state_is_not_a_connect_state(world: World, alice: httpx.Client) -> None:
    login = alice.get("/auth/login?next=/grants")
    assert login.status_code == 303 and login.headers["location"] == "/grants"
    fresh = world.browser()
    url = fresh.get("/auth/login").headers["location"]
    back = world.fake.authorize(url, "alice").replace("/auth/callback", "/oauth/callback")
    refused(world, fresh, back, 400, "does not belong to any request")


# --- the AS's answer ---------------------------------------------------------------------------


def test_iss_mismatch(world: World, alice: httpx.Client) -> None:
    world.fake.knobs.response_iss = "https://evil.test"
    back = world.fake.authorize(world.start_connect(alice), "alice")
    exchanges = len(world.fake.token_requests)
    refused(world, alice, back, 400, "another authorization server")
    assert len(world.fake.token_requests) == exchanges  # the code was never sent anywhere


def test_iss_missing_though_advertised(world: World, alice: httpx.Client) -> None:
    world.fake.knobs.omit_response_iss = True
    back = world.fake.authorize(world.start_connect(alice), "alice")
    refused(world, alice, back, 400, "does not name its issuer")


def test_iss_may_be_absent_when_not_advertised(tmp_path: Path, sqlite_sessions: Any) -> None:
    world = build_world(tmp_path, sqlite_sessions, iss_parameter=False)
    world.register_agent()
    browser = world.browser()
    world.sign_in(browser, "alice")
    assert world.connect(browser, "alice").status_code == 303


def test_access_denied_is_a_clear_page(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice", error="access_denied")
    page = refused(world, alice, back, 403, "You declined")
    assert 'href="/connect/reporter"' in page.text  # try again


@pytest.mark.parametrize("error", ["invalid_scope", "server_error", "made_up_<b>"])
def test_other_error_responses(world: World, alice: httpx.Client, error: str) -> None:
    url = world.start_connect(alice)
    back = world.fake.authorize(url, "alice", error="x").replace(
        "error=x", urlencode({"error": error, "error_description": "<script>x</script>"}))
    page = refused(world, alice, back, 503 if error == "server_error" else 400, "Nothing")
    assert "<script>x" not in page.text
    assert "made_up" not in page.text  # unknown codes are not echoed


def test_a_replayed_code(world: World, alice: httpx.Client) -> None:
    first = world.fake.authorize(world.start_connect(alice), "alice")
    assert alice.get(first).status_code == 303
    # A new request, answered with the spent code:
    second = world.fake.authorize(world.start_connect(alice), "alice")
    replay = second.replace(query(second)["code"], query(first)["code"])
    refused(world, alice, replay, 400, "did not accept this answer")


def test_a_code_of_another_client(world: World, alice: httpx.Client) -> None:
    world.register_agent("other-agent")
    theirs = world.fake.authorize(world.start_connect(alice, "other-agent"), "alice")
    ours = world.fake.authorize(world.start_connect(alice), "alice")
    swapped = ours.replace(query(ours)["code"], query(theirs)["code"])
    refused(world, alice, swapped, 400, "did not accept this answer")


def test_a_pkce_verifier_mismatch(world: World, alice: httpx.Client) -> None:
    # Two requests of the same agent: the code of one with the state (verifier) of the other.
    one = world.fake.authorize(world.start_connect(alice), "alice")
    two = world.fake.authorize(world.start_connect(alice), "alice")
    crossed = two.replace(query(two)["code"], query(one)["code"])
    refused(world, alice, crossed, 400, "did not accept this answer")
    last = world.fake.token_requests[-1]
    assert last["code"] == query(one)["code"]


def test_a_token_response_without_refresh_token(world: World, alice: httpx.Client) -> None:
    world.fake.knobs.omit_refresh_token = True
    back = world.fake.authorize(world.start_connect(alice), "alice")
    refused(world, alice, back, 400, "no refresh token")
    assert world.fake.revoked  # the access token it did issue is revoked


def test_granted_scopes_wider_than_requested(world: World, alice: httpx.Client) -> None:
    world.fake.knobs.scope_in_response = "reports:read calendar:read reports:write"
    back = world.fake.authorize(world.start_connect(alice), "alice")
    refused(world, alice, back, 502, "more than was asked")
    assert len(world.fake.revoked) == 1
    assert world.fake.revoked[0] in world.fake.refresh_tokens


def test_a_required_scope_not_granted(world: World, alice: httpx.Client) -> None:
    world.register_agent("needy", required="calendar:read")
    back = world.fake.authorize(world.start_connect(alice, "needy"), "alice",
                                grant=["reports:read"])
    refused(world, alice, back, 400, "needs calendar:read")


def test_nothing_granted(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice", grant=[])
    refused(world, alice, back, 400, "None of reporter")


@pytest.mark.parametrize("forgery", ["signature", "audience", "nonce", "issuer", "expired"])
def test_an_id_token_that_does_not_check_out(world: World, alice: httpx.Client,
                                             forgery: str) -> None:
    knobs = world.fake.knobs
    if forgery == "signature":
        knobs.id_token_signer = RSAKey.generate_key(2048, private=True)
    elif forgery == "audience":
        knobs.id_token_claims = {"aud": "someone-else"}
    elif forgery == "nonce":
        knobs.id_token_claims = {"nonce": "not-the-one"}
    elif forgery == "issuer":
        knobs.id_token_claims = {"iss": "https://evil.test"}
    else:
        now = int(world.clock.now().timestamp())
        knobs.id_token_claims = {"iat": now - 7200, "exp": now - 3600}
    back = world.fake.authorize(world.start_connect(alice), "alice")
    refused(world, alice, back, 502, "did not check out")
    assert world.fake.revoked


def test_a_callback_for_bob_while_alice_is_signed_in(world: World, alice: httpx.Client) -> None:
    # Alice started the request; at the AS, bob consents (another session there).
    back = world.fake.authorize(world.start_connect(alice), "bob")
    refused(world, alice, back, 403, "someone other than the person signed in")
    assert world.fake.revoked  # bob's unwanted grant is undone at the AS


def test_a_callback_after_signing_in_as_someone_else(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    csrf = alice.get("/api/grants").json()["csrf_token"]
    alice.post("/auth/logout", data={"csrf_token": csrf})
    refused(world, alice, back, 403, "not signed in as the person who started")


def test_a_callback_when_signed_out(world: World) -> None:
    browser = world.browser()
    refused(world, browser, "/oauth/callback?state=" + "a" * 43 + "&code=abc", 400,
            "does not belong")


def test_the_as_being_down_is_a_clear_page(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    world.fake.knobs.down = True
    page = refused(world, alice, back, 503, "did not answer")
    assert 'href="/connect/reporter"' in page.text


def test_the_as_answering_500_is_a_clear_page(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    world.fake.knobs.token_status = 500
    refused(world, alice, back, 503, "did not answer")


# --- size and shape ----------------------------------------------------------------------------


@pytest.mark.parametrize("query_string", [
    "state=" + "a" * 5000 + "&code=x",
    "state=abc&code=" + "c" * 3000,
    "state=abc&state=def&code=x",
    "state=abc&code=x&iss=" + "i" * 600,
    "state=abc&code=x&error_description=" + "d" * 3000,
    "state=abc&code=%00%01",
    "state=abc&code=%C3%A9t%C3%A9",
    "state=abc&code=x&pad=" + "p" * 9000,
], ids=["long state", "long code", "repeated state", "long iss", "long description",
        "control characters", "non-ascii", "long query"])
def test_oversized_and_malformed_parameters(world: World, alice: httpx.Client,
                                            query_string: str) -> None:
    refused(world, alice, "/oauth/callback?" + query_string, 400, "Nothing was saved")


def test_malformed_parameters_do_not_burn_a_good_state(world: World, alice: httpx.Client) -> None:
    back = world.fake.authorize(world.start_connect(alice), "alice")
    refused(world, alice, back + "&code=again", 400, "repeats")
    assert alice.get(back).status_code == 303


def test_a_refused_reconnect_leaves_the_working_grant_alone(world: World,
                                                            alice: httpx.Client) -> None:
    # Given alice's working delegation,
    world.register_agent("needy", required="calendar:read")
    assert world.connect(alice, "alice", agent="needy").status_code == 303
    (row,) = delegations(world.sessions)
    working = open_tokens(world.vault, row)
    # when she reconnects but unticks a required scope,
    back = world.fake.authorize(world.start_connect(alice, "needy"), "alice",
                                grant=["reports:read"])
    refused(world, alice, back, 400, "needs calendar:read")
    # the refused tokens are dropped, not revoked: the AS may revoke a whole grant for either.
    assert world.fake.revoked == []
    assert world.fake.refresh_tokens[working.refresh_token or ""].alive
