"""`behalf provider …` / `behalf agent …` against the in-memory AS (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from behalf.cli import identity, main
from behalf.deps import Deps
from delegation.clock import FrozenClock
from delegation.oauth import OAuthClient, new_private_jwk
from tests.unit.api.fake_oidc import FakeOidcProvider


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeOidcProvider:
    monkeypatch.setenv("BEHALF_DATABASE_URL", f"sqlite:///{tmp_path}/db.sqlite3")
    monkeypatch.setenv("BEHALF_LOCAL_KEY_FILE", os.fspath(tmp_path / "key"))
    monkeypatch.setenv("BEHALF_PUBLIC_URL", "https://behalf.example")
    fake = FakeOidcProvider(FrozenClock())

    def oauth(deps: Deps) -> OAuthClient:
        return OAuthClient(httpx.Client(transport=fake.transport()), deps.clock)

    monkeypatch.setattr(identity, "oauth_client", oauth)
    assert main(["migrate"]) == 0
    return fake


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_provider_add_with_signin_then_list(fake: FakeOidcProvider,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "provider", "add", "acme", "--issuer", fake.issuer,
                       "--api-base", "https://api.test", "--signin", "--operator", "ann")
    assert code == 0
    assert "users sign in with client" in out
    assert "https://behalf.example/auth/callback" in out

    code, out, _ = run(capsys, "provider", "list", "--json")
    (row,) = json.loads(out)
    assert (row["name"], row["issuer"], row["openid"]) == ("acme", fake.issuer, True)


def test_bad_arguments_exit_2_with_one_line(fake: FakeOidcProvider,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "provider", "add", "acme", "--issuer", "http://as.example.com")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "https" in err
    run(capsys, "provider", "add", "acme", "--issuer", fake.issuer)
    code, _, err = run(capsys, "agent", "register", "r", "--provider", "acme",
                       "--scopes", 'bad"scope')
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_refusals_exit_1_with_the_reason(fake: FakeOidcProvider,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    metadata = fake.metadata()
    metadata["code_challenge_methods_supported"] = ["plain"]
    fake.metadata = lambda: metadata  # type: ignore[method-assign]
    code, _, err = run(capsys, "provider", "add", "acme", "--issuer", fake.issuer)
    assert code == 1 and "S256" in err


def test_agent_register_prints_the_client_id(fake: FakeOidcProvider,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "provider", "add", "acme", "--issuer", fake.issuer)
    code, out, err = run(capsys, "agent", "register", "reporter", "--provider", "acme",
                         "--scopes", "reports:read calendar:read",
                         "--required-scopes", "reports:read")
    assert code == 0
    client_id = out.strip()
    assert fake.clients[client_id].auth_method == "private_key_jwt"
    assert "private_key_jwt" in err

    code, _, err = run(capsys, "agent", "register", "reporter", "--provider", "acme",
                       "--scopes", "reports:read")
    assert code == 1 and "one client per agent per environment" in err

    code, out, _ = run(capsys, "agent", "list", "--json")
    (agent,) = json.loads(out)
    assert agent["client_id"] == client_id
    assert agent["required_scopes"] == ["reports:read"]
    assert agent["environment"] == "dev"

    code, out, _ = run(capsys, "agent", "rotate-key", "reporter", "--grace", "0", "--json")
    assert code == 0
    rotated = json.loads(out)
    assert rotated["agent"]["key_ids"] == [rotated["new_kid"]]


def test_agent_add_reads_secrets_from_files_or_stdin(
        fake: FakeOidcProvider, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run(capsys, "provider", "add", "acme", "--issuer", fake.issuer)
    secret = tmp_path / "secret"
    secret.write_text("hand-made-secret\n")
    code, out, _ = run(capsys, "agent", "add", "by-hand", "--provider", "acme",
                       "--client-id", "cid-1", "--scopes", "reports:read",
                       "--client-secret-file", os.fspath(secret))
    assert (code, out.strip()) == (0, "cid-1")

    jwk = new_private_jwk()
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(json.dumps(jwk)))
    code, out, _ = run(capsys, "agent", "add", "by-hand-jwt", "--provider", "acme",
                       "--client-id", "cid-2", "--scopes", "reports:read",
                       "--auth", "private_key_jwt", "--private-key-file", "-", "--json")
    assert code == 0 and json.loads(out)["key_ids"] == [jwk["kid"]]

    code, _, err = run(capsys, "agent", "add", "again", "--provider", "acme",
                       "--client-id", "cid-1", "--scopes", "reports:read",
                       "--client-secret-file", os.fspath(secret))
    assert code == 1 and "never shared" in err

    code, _, err = run(capsys, "agent", "add", "nosecret", "--provider", "acme",
                       "--client-id", "cid-3", "--scopes", "reports:read")
    assert code == 2 and "--client-secret-file" in err
