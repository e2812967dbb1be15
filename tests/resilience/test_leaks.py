"""No secret anywhere: a whole deployment runs a realistic day, then everything it left behind is
searched for every secret that was issued.

The deployment is real processes on real services: `behalf api`, `behalf worker` (two job
processes), `behalf scheduler` (relay, mails, sweep) and one-off CLI commands, on PostgreSQL and
Redis (a locks/pub-sub database and a broker database), in front of the real AS (oidc-provider)
and its API, with SMTP. The story: an operator adds the provider (with sign-in) and registers two
agents (private_key_jwt and client_secret_basic); alice and bob sign in and connect; their jobs
run on the workers with 2-second access tokens, so tokens are refreshed and rotated mid-run;
alice's grant dies at the AS, her run parks, she is mailed, follows the link and re-consents,
and the parked run succeeds; bob revokes his grant from the grants page.

The secrets: everything the AS issued or was shown (its `/_test/issued` log: access, refresh
and ID tokens, authorisation codes, client secrets, registration access tokens, PKCE
verifiers, client assertions), the agents' private keys, behalf's secret key, ops token and
master key, the OAuth states and the users' session cookies, and the re-authorisation link.

The places: a `pg_dump`; every command sent to Redis on both databases during the run (read
with MONITOR, so transient locks, pub/sub messages and broker messages count, not only what is
left at the end) and every key and value left; the Celery messages, decoded (kombu base64s the
body, so searching the raw envelope would miss a token inside it); every log line of every
behalf process (at DEBUG) and of behalf code in this process; the audit trail (rows and `behalf
audit show`); and what the users saw: grants pages, the re-authorisation page, the mail. Each
secret is searched plain, base64 (standard and URL-safe) and hex. The one expected sighting is
the re-authorisation link, in its own mail and on the page it opens. The user's browser (httpx
here) is not scanned: it must see codes in redirects.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from delegation.kms import LocalKeyFile
from delegation.store import AgentDirectory
from delegation.vault import Vault
from models import Agent, Delegation, JobRun, User
from models.session import make_engine, make_session_factory
from tests.support import smtp
from tests.support.databases import BROKER_TEST_URL
from tests.support.oidc_fixtures import OidcProviderFactory
from tests.support.oidc_provider import OidcProvider
from tests.support.processes import Processes
from tests.support.smtp import SmtpServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(170)]

smtp_server = smtp.smtp_server
SECRET_KEY = "leak-scan-secret-key-" + uuid.uuid4().hex + uuid.uuid4().hex
OPS_TOKEN = "ops-" + base64.urlsafe_b64encode(os.urandom(24)).decode()
BEHALF_PACKAGES = ("api", "behalf", "delegation", "worker", "scheduler", "models", "celery",
                   "kombu")


# --- the scan ------------------------------------------------------------------------------


def forms(secret: str) -> set[str]:
    """The shapes a secret may take once written somewhere: plain, base64, base64url, hex."""
    raw = secret.encode()
    out = {secret, raw.hex(), raw.hex().upper()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(raw).decode()
        out.update({encoded, encoded.rstrip("=")})
    return {f for f in out if len(f) >= 12}


@dataclass
class Scan:
    secrets: dict[str, str] = field(default_factory=dict)  # value -> kind
    corpora: dict[str, str] = field(default_factory=dict)  # name -> text
    allowed: set[tuple[str, str]] = field(default_factory=set)  # (value, corpus) expected

    def secret(self, kind: str, value: str | None) -> None:
        if value and len(value) >= 12:
            self.secrets.setdefault(value, kind)

    def add(self, name: str, content: str) -> None:
        self.corpora[name] = self.corpora.get(name, "") + "\n" + content

    def hits(self) -> list[tuple[str, str, str]]:
        """(kind of secret, corpus, form) for every sighting not expected."""
        found = []
        for value, kind in self.secrets.items():
            for name, content in self.corpora.items():
                if (value, name) in self.allowed:
                    continue
                for form in forms(value):
                    if form in content:
                        found.append((kind, name, "plain" if form == value else "encoded"))
                        break
        return found


def decode_message(value: str) -> str:
    """A kombu envelope's decoded body (and headers), so that what Celery carried is searched
    as it was sent, not as base64 at an arbitrary alignment."""
    try:
        envelope = json.loads(value)
    except ValueError:
        return ""
    if not isinstance(envelope, dict) or "body" not in envelope:
        return ""
    parts = [json.dumps(envelope.get("headers", {})), json.dumps(envelope.get("properties", {}))]
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64" and isinstance(body, str):
        try:
            parts.append(base64.b64decode(body).decode("utf-8", "replace"))
        except (binascii.Error, ValueError):
            parts.append(body)
    else:
        parts.append(json.dumps(body))
    return "\n".join(parts)


_MONITOR_LINE = re.compile(r"^[\d.]+ \[(\d+) [^\]]*\] (.*)$", re.DOTALL)


def monitor_args(rest: str) -> list[str]:
    """The quoted arguments of a MONITOR line, unescaped as Redis escaped them (sdscatrepr)."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] != '"':
            i += 1
            continue
        i += 1
        buf = bytearray()
        while i < len(rest) and rest[i] != '"':
            if rest[i] == "\\" and i + 1 < len(rest):
                nxt = rest[i + 1]
                if nxt == "x":
                    buf.append(int(rest[i + 2:i + 4], 16))
                    i += 4
                    continue
                buf.extend({"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a",
                            "b": b"\b"}.get(nxt, nxt.encode()))
                i += 2
                continue
            buf.extend(rest[i].encode())
            i += 1
        args.append(buf.decode("utf-8", "replace"))
        i += 1
    return args


class RedisMonitor:
    """Every command the Redis server receives on the given databases, via MONITOR."""

    def __init__(self, url: str, databases: set[int]) -> None:
        self.databases = databases
        self.commands: list[list[str]] = []
        self._client = redis_lib.Redis.from_url(url)
        self._conn = self._client.connection_pool.get_connection()
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() in (b"OK", "OK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._conn.can_read(timeout=0.2):
                    continue
                line = self._conn.read_response()
            except (redis_lib.ConnectionError, OSError, ValueError):
                return
            text_line = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
            match = _MONITOR_LINE.match(text_line)
            if match and int(match.group(1)) in self.databases:
                self.commands.append(monitor_args(match.group(2)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.disconnect()
        self._client.close()

    def text(self) -> str:
        lines = []
        for args in self.commands:
            lines.append(" ".join(args))
            lines.extend(decode_message(a) for a in args if a.startswith("{"))
        return "\n".join(lines)

    def celery_messages(self) -> list[str]:
        return [decode_message(a) for args in self.commands
                if args and args[0].upper() in ("LPUSH", "RPUSH") for a in args[2:]
                if decode_message(a)]


def redis_snapshot(url: str) -> str:
    """Every key and value left in one Redis database, Celery envelopes decoded."""
    client = redis_lib.Redis.from_url(url, decode_responses=False)
    out: list[str] = []

    def show(value: bytes | str) -> None:
        shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        out.extend([shown, decode_message(shown)])

    try:
        for key in client.scan_iter(count=500):
            show(key)
            kind = client.type(key).decode()
            if kind == "string":
                show(client.get(key) or b"")
            elif kind == "list":
                for item in client.lrange(key, 0, -1):
                    show(item)
            elif kind == "hash":
                for k, v in client.hgetall(key).items():
                    show(k)
                    show(v)
            elif kind == "set":
                for item in client.smembers(key):
                    show(item)
            elif kind == "zset":
                for item, _ in client.zrange(key, 0, -1, withscores=True):
                    show(item)
            elif kind == "stream":
                for _, entry in client.xrange(key):
                    for k, v in entry.items():
                        show(k)
                        show(v)
    finally:
        client.close()
    return "\n".join(out)


def pg_dump(url: str) -> str:
    return subprocess.run(["pg_dump", "--no-owner", url.replace("+psycopg", "")],
                          check=True, capture_output=True, text=True).stdout


# --- the deployment ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Any, timeout: float, what: str, logs: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    if predicate():
        return
    detail = logs()[-4000:] if logs else ""
    pytest.fail(f"timed out waiting for {what}\n{detail}")


@dataclass
class Deployment:
    provider: OidcProvider
    processes: Processes
    sessions: sessionmaker[Session]
    url: str
    env: dict[str, str]
    pages: list[tuple[str, str]] = field(default_factory=list)
    cookies: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    browsers: list[httpx.Client] = field(default_factory=list)

    def cli(self, *args: str) -> str:
        """A one-off `behalf` command (its output is part of the scanned logs)."""
        process = self.processes.start(*args)
        assert process.wait(timeout=60) == 0, self.processes.logs()[-3000:]
        return Path(self.processes.log_dir / f"proc-{len(self.processes.started) - 1}.log"
                    ).read_text()

    def browser(self) -> httpx.Client:
        client = httpx.Client(trust_env=False, follow_redirects=False, timeout=20)
        self.browsers.append(client)
        return client

    def see(self, name: str, response: httpx.Response) -> httpx.Response:
        """A page the user saw (kept for the scan)."""
        self.pages.append((name, response.text))
        return response

    def follow_to_as(self, response: httpx.Response) -> str:
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        state = httpx.URL(location).params.get("state")
        if state:
            self.states.append(state)
        return location

    def sign_in(self, browser: httpx.Client, user: str) -> None:
        to_as = self.follow_to_as(browser.get(f"{self.url}/auth/login"))
        back = self.provider.login_and_consent(browser, to_as, user)
        assert browser.get(back).status_code == 303
        self.cookies.extend(c.value for c in browser.cookies.jar
                            if c.name.startswith("behalf") and c.value)

    def connect(self, browser: httpx.Client, user: str) -> None:
        to_as = self.follow_to_as(browser.get(f"{self.url}/connect/reporter"))
        back = self.provider.login_and_consent(browser, to_as + "&prompt=consent", user)
        done = browser.get(back)
        assert done.status_code == 303, done.text
        self.see(f"grants of {user}", browser.get(f"{self.url}/grants"))

    def delegation(self, user: str) -> Delegation:
        with self.sessions() as s:
            return s.scalars(select(Delegation).join(User, Delegation.user_id == User.id)
                             .where(User.subject == user)).one()

    def run_status(self, run_id: str) -> str:
        with self.sessions() as s:
            run = s.get(JobRun, uuid.UUID(run_id))
            return run.status if run else "missing"

    def queue(self, job: str, user: str) -> str:
        out = self.cli("run", job, "--user", user, "--agent", "reporter", "--json")
        return str(json.loads(out[out.index("["):])[0]["run_id"])


@pytest.fixture
def deployment(pg_database: str, redis_url: str, processes: Processes,
               oidc_provider_factory: OidcProviderFactory, smtp_server: SmtpServer,
               tmp_path: Path) -> Iterator[Deployment]:
    broker = redis_lib.Redis.from_url(BROKER_TEST_URL)
    broker.flushdb()
    provider = oidc_provider_factory(access_token_ttl=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "BEHALF_DATABASE_URL": pg_database,
        "BEHALF_REDIS_URL": redis_url,
        "BEHALF_BROKER_URL": BROKER_TEST_URL,
        "BEHALF_LOCAL_KEY_FILE": str(tmp_path / "master.key"),
        "BEHALF_JOBS_MODULES": "tests.support.sample_jobs",
        "BEHALF_LOG_LEVEL": "DEBUG",
        "BEHALF_PUBLIC_URL": url,
        "BEHALF_SECRET_KEY": SECRET_KEY,
        "BEHALF_OPS_TOKEN": OPS_TOKEN,
        "BEHALF_SMTP_URL": smtp_server.url,
        "BEHALF_MAIL_FROM": "behalf@example.test",
        "SAMPLE_JOB_STRESS_SECONDS": "5",
    }
    processes.base_env = env
    engine = make_engine(pg_database)
    world = Deployment(provider, processes, make_session_factory(engine), url, env)
    try:
        yield world
    finally:
        processes.stop_all()
        for browser in world.browsers:
            browser.close()
        engine.dispose()
        broker.flushdb()
        broker.close()


# --- the test ------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in BEHALF_PACKAGES:
            self.lines.append(self.format(record))


def test_no_secret_issued_during_a_realistic_day_is_found_anywhere(
        deployment: Deployment, redis_url: str, smtp_server: SmtpServer,
        tmp_path: Path) -> None:
    d, provider = deployment, deployment.provider
    collected = _Collect()
    logging.getLogger().addHandler(collected)
    monitor = RedisMonitor(redis_url, {int(redis_url.rsplit("/", 1)[1]),
                                       int(BROKER_TEST_URL.rsplit("/", 1)[1])})
    try:
        # Given an operator who set behalf up against the AS, and its three roles running
        d.cli("provider", "add", "acme", "--issuer", provider.issuer, "--api-base",
              provider.api_base, "--signin", "--operator", "olga")
        d.cli("agent", "register", "reporter", "--provider", "acme", "--scopes",
              "reports:read calendar:read", "--operator", "olga")
        d.cli("agent", "register", "mailer", "--provider", "acme", "--scopes", "reports:read",
              "--auth", "client_secret_basic", "--operator", "olga")
        d.processes.start("api", "--port", d.url.rsplit(":", 1)[1])
        d.processes.start("worker", "--concurrency", "2")
        d.processes.start("scheduler", "--interval", "1s")
        wait_until(lambda: _healthy(d.url), 30, "the api", d.processes.logs)

        # alice and bob sign in and connect the agent
        alice, bob = d.browser(), d.browser()
        for browser, user in ((alice, "alice"), (bob, "bob")):
            d.sign_in(browser, user)
            d.connect(browser, user)

        # When their jobs run on the workers, outliving several 2-second access tokens
        runs = [d.queue("stress", user) for user in ("alice", "bob")]
        wait_until(lambda: all(d.run_status(r) == "succeeded" for r in runs), 60,
                   "the first runs", d.processes.logs)
        refreshes = [r for r in provider.stats()["requests"]
                     if r["grant_type"] == "refresh_token" and r["status"] == 200]
        assert len(refreshes) >= 2, "tokens were refreshed (and rotated) on the workers"

        # alice's grant dies at the AS: her next run parks and she is mailed a link
        with d.sessions() as s:
            client_id = s.scalars(select(Agent.client_id).where(Agent.name == "reporter")).one()
        assert provider.revoke_grants("alice", client_id) >= 1
        parked = d.queue("slow", "alice")
        wait_until(lambda: d.run_status(parked) == "parked", 40, "the parked run",
                   d.processes.logs)
        (mail,) = smtp_server.wait_for(1, timeout=30)
        plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
        assert plain is not None and html is not None
        mail_text = plain.get_content() + "\n" + html.get_content()
        link = next(w for w in plain.get_content().split() if "/reauth/" in w)
        d.see("grants of alice, broken", alice.get(f"{d.url}/grants"))
        # she follows it, re-consents, and the parked run runs again
        d.see("re-authorisation page", alice.get(link))
        to_as = d.follow_to_as(alice.get(link + "/start"))
        back = provider.login_and_consent(alice, to_as, "alice")
        assert alice.get(back).status_code == 303
        wait_until(lambda: d.run_status(parked) == "succeeded", 40, "the repaired run",
                   d.processes.logs)
        d.see("grants of alice, repaired", alice.get(f"{d.url}/grants"))

        # bob revokes from his grants page: revoked at the AS, destroyed here
        listing = d.see("bob's grants (json)", bob.get(f"{d.url}/api/grants"))
        grant = listing.json()["grants"][0]["id"]
        revoked = bob.post(f"{d.url}/api/grants/{grant}/revoke",
                           headers={"X-CSRF-Token": listing.json()["csrf_token"]})
        assert revoked.status_code == 200, revoked.text
        wait_until(lambda: d.delegation("bob").token_blob is None, 30, "bob's tokens destroyed",
                   d.processes.logs)
        wait_until(lambda: provider.stats()["revocation"]["total"] >= 1, 30,
                   "the revocation at the AS", d.processes.logs)
        d.see("grants of bob, revoked", bob.get(f"{d.url}/grants"))
        audit_shown = d.cli("audit", "show", "--json")
        d.cli("delegations", "list", "--json")
        d.processes.stop_all()  # (their last lines are flushed)
    finally:
        monitor.stop()
        logging.getLogger().removeHandler(collected)

    # Then: collect every secret issued during the day...
    scan = Scan()
    for item in provider.issued():
        scan.secret(f"AS {item['kind']}", item["value"])
    kinds = {kind for kind in scan.secrets.values()}
    for expected in ("AS AccessToken", "AS RefreshToken", "AS AuthorizationCode",
                     "AS ClientSecret", "AS response:id_token", "AS request:code_verifier",
                     "AS request:client_assertion", "AS RegistrationAccessToken"):
        assert expected in kinds, f"the harness reported no {expected}"
    vault = Vault(LocalKeyFile(tmp_path / "master.key", warn=False))
    with d.sessions() as s:
        agent_ids = s.scalars(select(Agent.id)).all()
    for agent_id in agent_ids:
        creds = AgentDirectory(d.sessions, vault).get(agent_id).credentials
        scan.secret("agent client secret", creds.secret)
        scan.secret("agent registration access token", creds.registration_access_token)
        for jwk in [creds.private_jwk or {}, *creds.retired_jwks]:
            for part in ("d", "p", "q", "dp", "dq", "qi"):
                scan.secret(f"agent private key ({part})", jwk.get(part))
    scan.secret("behalf secret key", SECRET_KEY)
    scan.secret("behalf ops token", OPS_TOKEN)
    master = (tmp_path / "master.key").read_bytes()
    scan.secret("master key file", master.decode("latin-1").strip())
    scan.secret("master key (hex)", master.hex())
    for cookie in d.cookies:
        scan.secret("behalf session cookie", cookie)
    for state in d.states:
        scan.secret("OAuth state", state)
    reauth_token = link.rsplit("/", 1)[1]
    scan.secret("re-authorisation link", reauth_token)
    # Where it must be: the mail, and the page that link opens (its button goes on to
    # /reauth/<token>/start; the user's address bar holds the same URL).
    scan.allowed |= {(reauth_token, "mail"), (reauth_token, "page: re-authorisation page")}

    # ...and everything the day left behind.
    messages = monitor.celery_messages()
    assert all('"task": "worker.run_job"' in m for m in messages)
    assert all(any(run in m for m in messages) for run in [*runs, parked]), "all captured"
    scan.add("pg_dump", pg_dump(d.env["BEHALF_DATABASE_URL"]))
    scan.add("redis commands (MONITOR)", monitor.text())
    scan.add("celery messages", "\n".join(messages))
    scan.add("redis keys (locks/pub-sub db)", redis_snapshot(redis_url))
    scan.add("redis keys (broker db)", redis_snapshot(BROKER_TEST_URL))
    scan.add("process logs", d.processes.logs())
    scan.add("test-process logs", "\n".join(collected.lines))
    with d.sessions() as s:
        rows = s.execute(text("SELECT row_to_json(e)::text FROM audit_events e")).scalars().all()
    assert len(rows) > 10
    scan.add("audit rows", "\n".join(rows) + "\n" + audit_shown)
    for name, page in d.pages:
        scan.add(f"page: {name}", page)
    scan.add("mail", mail_text)
    assert len(scan.secrets) > 30 and "DEBUG" in scan.corpora["process logs"]

    hits = scan.hits()
    counts: dict[str, int] = {}
    for kind in scan.secrets.values():
        counts[kind] = counts.get(kind, 0) + 1
    print(f"secrets by kind: {dict(sorted(counts.items()))}")
    print(f"leak scan: {len(scan.secrets)} secrets x {len(scan.corpora)} places, "
          f"{sum(len(c) for c in scan.corpora.values())} characters, "
          f"{len(messages)} celery messages, {len(monitor.commands)} redis commands: "
          f"{len(hits)} hits")
    assert hits == [], f"secrets found: {sorted(set(hits))}"
    assert reauth_token in mail_text

    # The scan would have caught one: a refresh token planted base64-encoded in Redis is found.
    planted = next(v for v, k in scan.secrets.items() if k == "AS RefreshToken")
    client = redis_lib.Redis.from_url(redis_url)
    client.set("planted", base64.b64encode(planted.encode()))
    try:
        scan.corpora["redis keys (locks/pub-sub db)"] = redis_snapshot(redis_url)
        assert scan.hits() == [("AS RefreshToken", "redis keys (locks/pub-sub db)", "encoded")]
    finally:
        client.delete("planted")
        client.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_scan_sees_through_celery_envelopes_and_redis_escaping() -> None:
    secret = "Zt8Qh2Lr5Wm9Xc3Vb7Nj1Kd6Pf4Gs0Ya_Ue-Io2Hx"
    body = base64.b64encode(json.dumps([[], {"token": secret}, {}]).encode()).decode()
    envelope = json.dumps({"body": body, "headers": {}, "properties": {"body_encoding": "base64"}})
    assert secret not in envelope and secret in decode_message(envelope)
    escaped = envelope.replace('"', '\\"')
    assert monitor_args(f'"LPUSH" "celery" "{escaped}" "\\xe2\\x82\\xac"') == [
        "LPUSH", "celery", envelope, "\u20ac"]
    scan = Scan()
    scan.secret("token", secret)
    for name, content in (("plain", f"x {secret} y"), ("hex", secret.encode().hex()),
                          ("b64", base64.b64encode(secret.encode()).decode()),
                          ("b64url", base64.urlsafe_b64encode(secret.encode()).decode()
                           .rstrip("="))):
        scan.corpora = {name: content}
        assert len(scan.hits()) == 1, name
    scan.corpora = {"clean": "nothing here"}
    assert scan.hits() == []
