"""Broken delegation -> mail -> one-click re-authorisation -> parked run resumes, for real.

Real PostgreSQL, the real AS (oidc-provider) and test API, the real app over HTTP, a real SMTP
server (aiosmtpd on 127.0.0.1) and, for the whole loop, a real headless Chromium. The user
revokes the grant at the AS; the next refresh gets invalid_grant; the delegation breaks and
its run parks; the relay mails the user once; she follows the link, signs in, consents; the
same delegation is active again and the parked run succeeds; the link is refused afterwards.
"""

from __future__ import annotations

import random
import re
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import outbox, reauth
from delegation.mail import (
    MailRenderer,
    MailUnavailable,
    SmtpConfig,
    SmtpMailer,
)
from delegation.notify import MAIL_TOPIC, Notifier, NotifyPolicy
from delegation.runs import queue_run
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from models import Agent, AuditEvent, Delegation, JobRun, OutboxMessage, ReauthLink, User
from tests.integration import connect_support
from tests.integration.connect_support import SECRET_KEY, ConnectWorld
from tests.support import browser, smtp
from tests.support.databases import LeakScan
from tests.support.oidc_provider import OidcProvider
from tests.support.smtp import SmtpServer
from worker.jobs import JobRegistry, JobSpec
from worker.runner import Runner, RunnerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

chromium = browser.chromium
page = browser.page
smtp_server = smtp.smtp_server
tls_smtp_server = smtp.tls_smtp_server
JOB = "nightly-report"


@dataclass
class Loop:
    """The connect world plus what the loop needs: a notifier on the SMTP server, a runner."""

    world: ConnectWorld
    smtp: SmtpServer
    notifier: Notifier
    runner: Runner
    leak_scan: LeakScan

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.world.sessions

    def connect(self, username: str = "alice") -> uuid.UUID:
        """`username` connects the agent (httpx); signing in told behalf their verified
        address (the AS's `email` claim), where the mail will go."""
        b = self.world.browser()
        self.world.sign_in(b, username)
        assert self.world.connect(b, username).status_code == 303
        with self.sessions.begin() as s:
            assert s.scalar(select(User.email).where(User.subject == username)) \
                == f"{username}@example.test"
            row = s.scalars(select(Delegation).join(User, Delegation.user_id == User.id)
                            .where(User.subject == username)).one()
        self.world.tokens(row)  # (for the leak scan)
        return row.id

    def break_at_the_as(self, username: str, delegation_id: uuid.UUID) -> uuid.UUID:
        """The user revokes the grant at the AS; the next run meets invalid_grant and parks."""
        with self.sessions.begin() as s:
            row = s.get(Delegation, delegation_id)
            client_id = s.get(Agent, row.agent_id).client_id
            run = queue_run(s, job=JOB, user_id=row.user_id, agent_id=row.agent_id,
                            now=self.world.clock.now())
        assert self.world.provider.revoke_grants(username, client_id) >= 1
        assert self.runner.run(run.id) == "parked"
        with self.sessions() as s:
            assert s.get(Delegation, delegation_id).status == "broken"
        return run.id

    def relay(self) -> int:
        total = 0
        while (n := outbox.relay_once(self.sessions, self.notifier.handlers(),
                                      self.world.clock)):
            total += n
        return total

    def link_of(self, mail: EmailMessage) -> str:
        body = mail.get_body(("plain",))
        assert body is not None
        (url,) = [w for w in body.get_content().split() if "/reauth/" in w]
        assert url.startswith(f"{self.world.url}/reauth/")
        self.leak_scan.register(url.rsplit("/", 1)[1])
        return url

    def make_due(self) -> None:
        """The outbox's backoff has passed."""
        with self.sessions.begin() as s:
            s.execute(update(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
                      .values(available_at=self.world.clock.now()))


def _registry() -> JobRegistry:
    jobs = JobRegistry()
    jobs.add(JobSpec(JOB, "reporter", frozenset({"reports:read"}),
                     lambda ctx: ctx.http.get("/v2/reports").raise_for_status()))
    return jobs


@pytest.fixture
def loop(oidc_provider: OidcProvider, pg_sessions: sessionmaker[Session], tmp_path: Path,
         leak_scan: LeakScan, smtp_server: SmtpServer) -> Iterator[Loop]:
    for world in connect_support.build_world(oidc_provider, pg_sessions, tmp_path, leak_scan):
        clock = world.clock
        notifier = Notifier(
            pg_sessions, clock, NotifyPolicy(), reauth.LinkKeys(SECRET_KEY.encode()),
            MailRenderer(), SmtpMailer(SmtpConfig.from_url(smtp_server.url)),
            public_url=world.url, mail_from="behalf <behalf@example.test>", log_links=False)
        agents = AgentDirectory(pg_sessions, world.vault)
        tokens = TokenSource(store=DelegationStore(pg_sessions, world.vault, clock),
                             agents=agents, oauth=world.oauth, redis=fakeredis.FakeRedis(),
                             clock=clock, rng=random.Random(0))
        runner = Runner(sessions=pg_sessions, tokens=tokens, agents=agents, jobs=_registry(),
                        clock=clock, config=RunnerConfig(worker_id="reauth-test"),
                        transport=httpx.HTTPTransport(), rng=random.Random(0))
        yield Loop(world, smtp_server, notifier, runner, leak_scan)


# --- the whole loop, in a real browser -----------------------------------------------------


def _click_through_the_as(page: Any, world: ConnectWorld, until: str) -> None:
    """Sign in as alice at the AS and allow whatever it asks, until we are back at `until`."""
    for _ in range(6):
        page.wait_for_url(re.compile(
            f"({re.escape(world.provider.issuer)}/interaction/|{re.escape(until)})"))
        if page.url.startswith(until):
            return
        if page.locator("#login").count():
            page.fill("#login", "alice")
            page.fill("#password", "pass")
            page.click("#submit")
        else:
            assert page.inner_text("#account") == "alice"
            page.click("#allow")
    raise AssertionError(f"never got back to {until}: {page.url}")


def test_revoked_at_the_as_mail_link_consent_and_the_parked_run_succeeds(loop: Loop,
                                                                         page: Any) -> None:
    world = loop.world
    # Given alice connected the agent, and then revoked its grant at the AS,
    d_id = loop.connect("alice")
    with loop.sessions() as s:
        version = s.get(Delegation, d_id).version
    run_id = loop.break_at_the_as("alice", d_id)

    # when the outbox is relayed (and relayed again),
    loop.relay()
    loop.relay()

    # then exactly one mail arrives, for her, with a link.
    (mail,) = loop.smtp.wait_for(1)
    assert loop.smtp.envelopes == [("behalf@example.test", ["alice@example.test"])]
    assert mail["Subject"] == "reporter stopped working for you - re-authorise it"
    assert mail.get_body(("html",)) is not None
    url = loop.link_of(mail)

    # She follows it in her browser (not signed in to behalf there),
    page.goto(url)
    assert "Re-authorise reporter" in page.inner_text("#title")
    assert "see your reports" in page.inner_text("#scopes")
    page.click("#reauthorize")
    # signs in and consents at the AS,
    _click_through_the_as(page, world, f"{world.url}/grants")

    # and lands on her grants, where the same delegation is active again;
    assert page.url == f"{world.url}/grants?connected=reporter"
    row = page.locator("tr.grant[data-agent=reporter]")
    assert row.get_attribute("data-status") == "active"
    with loop.sessions() as s:
        after = s.get(Delegation, d_id)
        assert (after.status, after.version) == ("active", version + 2)  # broken, repaired
        assert s.get(JobRun, run_id).status == "queued"
        reauthorized = s.scalars(select(AuditEvent).where(
            AuditEvent.action == "delegation:reauthorized")).one()
        (link,) = s.scalars(select(ReauthLink)).all()
    world.tokens(after)
    assert reauthorized.detail["runs_requeued"] == 1 and reauthorized.actor == "alice"
    assert link.used_at is not None and link.notified_at is not None

    # the parked run runs again, as her, with the new tokens,
    assert loop.runner.run(run_id) == "succeeded"
    # and the link is refused from now on.
    page.goto(url)
    assert "already used" in page.inner_text("#message")
    assert len(loop.smtp.messages) == 1


# --- mails -----------------------------------------------------------------------------------


def test_an_smtp_outage_loses_no_mail_and_sends_none_twice(loop: Loop) -> None:
    d_id = loop.connect("alice")
    loop.smtp.stop()
    loop.break_at_the_as("alice", d_id)

    loop.relay()
    with loop.sessions() as s:
        message = s.scalars(select(OutboxMessage)
                            .where(OutboxMessage.topic == MAIL_TOPIC)).one()
    assert message.sent_at is None and message.attempts == 1
    assert "unavailable" in (message.last_error or "")

    loop.smtp.start()
    loop.make_due()
    loop.relay()
    loop.make_due()
    loop.relay()

    assert len(loop.smtp.wait_for(1)) == 1
    with loop.sessions() as s:
        assert s.scalars(select(ReauthLink.delivery)).one() == "smtp"
    loop.link_of(loop.smtp.messages[0])


def test_breaking_again_within_a_day_sends_no_second_mail(loop: Loop) -> None:
    d_id = loop.connect("alice")
    loop.break_at_the_as("alice", d_id)
    loop.relay()
    loop.link_of(loop.smtp.wait_for(1)[0])
    # She reconnects (repaired another way), and the grant dies at the AS again.
    loop.connect("alice")
    loop.break_at_the_as("alice", d_id)
    loop.relay()
    assert len(loop.smtp.messages) == 1


def test_starttls_and_auth_are_used_when_configured(tls_smtp_server: SmtpServer) -> None:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "behalf@example.test", "a@example.test", "hi"
    mail.set_content("hello")
    config = SmtpConfig.from_url(tls_smtp_server.url)
    assert config.starttls and config.username == smtp.USER

    SmtpMailer(config, ssl_context=tls_smtp_server.client_context).deliver(mail)
    assert [m["Subject"] for m in tls_smtp_server.wait_for(1)] == ["hi"]

    # A wrong password, an untrusted certificate, or no STARTTLS at all: retried, never sent.
    wrong = SmtpConfig.from_url(tls_smtp_server.url.replace("staple", "stable"))
    failures = [
        SmtpMailer(wrong, ssl_context=tls_smtp_server.client_context),
        SmtpMailer(config, ssl_context=ssl.create_default_context),
        SmtpMailer(SmtpConfig.from_url(f"smtp://127.0.0.1:{tls_smtp_server.port}")),
    ]
    for mailer in failures:
        with pytest.raises(MailUnavailable):
            mailer.deliver(mail)
    assert len(tls_smtp_server.messages) == 1


# --- links that must not work ------------------------------------------------------------


@pytest.fixture
def mailed(loop: Loop) -> tuple[uuid.UUID, str]:
    d_id = loop.connect("alice")
    loop.break_at_the_as("alice", d_id)
    loop.relay()
    return d_id, loop.link_of(loop.smtp.wait_for(1)[0])


def test_tampered_expired_and_other_user_links_repair_nothing(
        loop: Loop, mailed: tuple[uuid.UUID, str]) -> None:
    world = loop.world
    d_id, url = mailed
    before = world.snapshot()[0]  # the delegations: (id, version, status, sealed tokens)
    anyone = world.browser()
    token = url.rsplit("/", 1)[1]
    tampered = url[:-1] + ("A" if not token.endswith("A") else "B")
    assert anyone.get(tampered).status_code == 404
    # Bob, signed in, opens alice's link: refused, with the reason.
    bob = world.browser()
    world.sign_in(bob, "bob")
    refused = bob.get(url)
    assert refused.status_code == 403 and "signed in as bob" in refused.text
    # Alice's behalf session, but at the AS she consents as bob: refused at the callback.
    alice = world.browser()
    world.sign_in(alice, "alice")
    assert alice.get(url).status_code == 200
    to_as = alice.get(url + "/start")
    assert to_as.status_code == 303
    elsewhere = world.browser()  # another AS session, alice's behalf session
    elsewhere.cookies.set("behalf_session", alice.cookies["behalf_session"])
    back = world.provider.login_and_consent(elsewhere, to_as.headers["location"], "bob")
    done = elsewhere.get(back)
    assert done.status_code == 403 and "someone other than" in done.text
    assert world.snapshot()[0] == before
    # Expired: refused too.
    with loop.sessions.begin() as s:
        s.execute(update(ReauthLink).values(expires_at=world.clock.now()))
    expired = anyone.get(url)
    assert expired.status_code == 410 and "expired" in expired.text
    with loop.sessions() as s:
        assert s.get(Delegation, d_id).status == "broken"
        assert s.scalars(select(ReauthLink.used_at)).one() is None


def test_a_revoked_delegations_link_is_refused(loop: Loop,
                                               mailed: tuple[uuid.UUID, str]) -> None:
    world = loop.world
    d_id, url = mailed
    alice = world.browser()
    world.sign_in(alice, "alice")
    csrf = alice.get(f"{world.url}/api/grants").json()["csrf_token"]
    assert alice.post(f"{world.url}/api/grants/{d_id}/revoke",
                      headers={"X-CSRF-Token": csrf}).status_code == 200
    refused = alice.get(url)
    assert refused.status_code == 410 and "revoked" in refused.text
