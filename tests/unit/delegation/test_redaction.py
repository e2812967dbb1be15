"""Log redaction: token-shaped text never reaches a log line; ordinary lines are left alone."""

from __future__ import annotations

import base64
import json
import logging
import sys
import uuid
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from delegation import redaction
from delegation.redaction import MASK, redact, redact_record

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# What an AS issues: 32+ random base64url characters (oidc-provider: 43; others: 40-200).
opaque_tokens = st.text(alphabet=B64URL, min_size=32, max_size=200).filter(
    lambda t: any(c.isupper() for c in t) and any(c.islower() for c in t)
    and any(c.isdigit() or c in "-_" for c in t))
separators = st.sampled_from([" ", "\n", "'", '"', "(", ")", ",", ": ", "=", "[", "]", "\t"])
prose = st.text(alphabet="abcdefghij klmnop.,:;!", max_size=40)


def _b64url(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    factory = logging.getLogRecordFactory()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.setLogRecordFactory(factory)
    root.handlers[:] = handlers
    root.setLevel(level)


# --- what must go --------------------------------------------------------------------------


@settings(max_examples=300)
@given(token=opaque_tokens, before=prose, after=prose, sep=separators)
def test_an_opaque_token_anywhere_in_a_line_is_redacted(token: str, before: str, after: str,
                                                        sep: str) -> None:
    line = f"{before}{sep}{token}{sep}{after}"
    assert token not in redact(line)


@settings(max_examples=100)
@given(token=opaque_tokens)
def test_its_standard_base64_form_is_redacted_too(token: str) -> None:
    encoded = base64.b64encode(token.encode()).decode()
    if "/" in encoded:  # a run is cut at "/" (paths must survive); check each long piece
        pieces = [p for p in encoded.split("/") if len(p) >= 32]
        result = redact(f"sent {encoded}")
        assert all(p not in result for p in pieces if redact(p) != p)
    else:
        assert encoded not in redact(f"sent {encoded}")


@settings(max_examples=100)
@given(value=st.text(alphabet=B64URL + ".~+/", min_size=8, max_size=80),
       name=st.sampled_from(["access_token", "refresh_token", "id_token", "client_secret",
                             "client_assertion", "code_verifier", "registration_access_token",
                             "password"]),
       style=st.sampled_from(["{n}={v}", "{n}: {v}", '"{n}": "{v}"', "'{n}': '{v}'",
                              "grant_type=x&{n}={v}&scope=a", "{n} = {v}"]))
def test_named_secret_fields_lose_their_value(value: str, name: str, style: str) -> None:
    line = "request body " + style.format(n=name, v=value)
    result = redact(line)
    assert value not in result.removeprefix("request body ").replace(name, "")
    assert name in result and MASK in result


@settings(max_examples=100)
@given(value=st.text(alphabet=B64URL + ".~+/=", min_size=8, max_size=80),
       scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "DPoP"]))
def test_authorization_credentials_are_redacted(value: str, scheme: str) -> None:
    result = redact(f"headers={{'authorization': '{scheme} {value}'}}")
    assert value not in result and scheme in result


def test_basic_credentials_but_not_the_word() -> None:
    creds = base64.b64encode(b"client:s3cret").decode()
    assert creds not in redact(f"Authorization: Basic {creds}")
    assert redact("Basic authentication is required") == "Basic authentication is required"


def test_jwts_are_redacted() -> None:
    jwt = ".".join([_b64url({"alg": "RS256", "kid": "k"}), _b64url({"sub": "alice"}), "c2ln"])
    assert redact(f"id_token {jwt} received") == f"id_token {MASK} received"
    assert "eyJ" not in redact(f"assertion={jwt}")


def test_query_codes_and_states_are_redacted() -> None:
    line = 'GET /oauth/callback?code=Xy12&state=st8t&iss=http%3A%2F%2Fas HTTP/1.1" 303'
    result = redact(line)
    assert "Xy12" not in result and "st8t" not in result and "iss=http%3A%2F%2Fas" in result


def test_pem_private_keys_are_redacted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    result = redact(f"loaded key:\n{pem}and went on")
    body = pem.splitlines()[1]
    assert body not in result and "PRIVATE KEY]" in result and result.endswith("and went on")
    truncated = pem[: len(pem) // 2]  # cut off mid-key (a truncated log line)
    assert body not in redact(truncated)


def test_a_private_jwk_is_redacted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    d = key.private_numbers().d.to_bytes(256, "big")
    jwk = {"kty": "RSA", "kid": uuid.uuid4().hex,
           "d": base64.urlsafe_b64encode(d).rstrip(b"=").decode()}
    assert jwk["d"] not in redact(json.dumps(jwk))


# --- what must stay ------------------------------------------------------------------------


@settings(max_examples=200)
@given(ids=st.lists(st.uuids(), min_size=1, max_size=4), count=st.integers(0, 10**12),
       digest=st.binary(min_size=32, max_size=32))
def test_ordinary_lines_are_left_alone(ids: list[uuid.UUID], count: int, digest: bytes) -> None:
    lines = [
        f"claimed {count} runs: " + ", ".join(str(i) for i in ids),
        f"delegation {ids[0]} refreshed (version {count}); chain head {digest.hex()}",
        f"task worker.run_job[{ids[0]}] received; hex {ids[0].hex} upper {ids[0].hex.upper()}",
        f'127.0.0.1:5000 - "GET /api/grants/{ids[0]}/revoke HTTP/1.1" 200',
        "GET https://api.example.com/v2/reports?page=2&per_page=50 -> 200 in 12.5 ms",
        "audit action delegation:token:refreshed by agent reporting-agent",
        'File "/srv/app/.venv/lib/python3.11/site-packages/sqlalchemy/engine/Base.py"',
        "refresh of delegation due in 240.0 s (skew 60 s); invalid_grant marks it broken",
        "Bearer realm=\"test-api\", error=\"invalid_token\"",
        f"POST http://127.0.0.1:{count % 65536}/token/revocation 200",
    ]
    for line in lines:
        assert redact(line) == line


@settings(max_examples=200)
@given(text=st.text(max_size=300))
def test_redaction_is_idempotent_and_total(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


# --- log records ---------------------------------------------------------------------------


def _record(msg: object, args: object = None, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("t", logging.WARNING, __file__, 1, msg, args,  # type: ignore[arg-type]
                             exc_info)  # type: ignore[arg-type]


TOKEN = "Zt8Qh2Lr5Wm9Xc3Vb7Nj1Kd6Pf4Gs0Ya_Ue-Io2Hx"


class Holder:
    def __init__(self, token: str) -> None:
        self.token = token

    def __repr__(self) -> str:
        return f"Holder(token={self.token!r})"


def test_messages_arguments_and_exceptions_of_a_record_are_redacted() -> None:
    try:
        raise ValueError(f"the AS answered refresh_token={TOKEN}")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("refreshed %s with %r (%d tries)", (TOKEN, Holder(TOKEN), 3), exc_info)
    redact_record(record)
    text = logging.Formatter("%(message)s").format(record)
    assert TOKEN not in text and "3 tries" in text and "ValueError" in text
    mapping = _record("got %(body)s", ({"body": {"access_token": TOKEN}},))
    redact_record(mapping)
    assert TOKEN not in mapping.getMessage()


def test_an_access_log_record_keeps_its_shape() -> None:
    """uvicorn's access formatter unpacks five arguments: they must stay five."""
    record = _record('%s - "%s %s HTTP/%s" %d',
                     ("127.0.0.1:5000", "GET", f"/cb?code={TOKEN}", "1.1", 303))
    redact_record(record)
    assert isinstance(record.args, tuple) and len(record.args) == 5
    assert TOKEN not in record.getMessage() and record.args[4] == 303


def test_install_redacts_every_record_and_disclosed_lets_one_through(
        restore_logging: None, caplog: pytest.LogCaptureFixture) -> None:
    redaction.install()
    redaction.install()  # idempotent: one wrapper
    log = logging.getLogger("test.redaction")
    with caplog.at_level(logging.INFO, logger="test.redaction"):
        log.info("token %s", TOKEN)
        with redaction.disclosed():
            log.info("your link: https://behalf.example/reauth/%s", TOKEN)
        log.info("after %s", TOKEN)
    assert [r.getMessage() for r in caplog.records] == [
        f"token {MASK}", f"your link: https://behalf.example/reauth/{TOKEN}", f"after {MASK}"]


def test_every_role_logs_through_the_redacting_setup(restore_logging: None) -> None:
    from behalf.cli.common import setup_logging

    logging.getLogger().handlers[:] = []
    setup_logging("INFO")
    assert getattr(logging.getLogRecordFactory(), "behalf_redacting", False)
