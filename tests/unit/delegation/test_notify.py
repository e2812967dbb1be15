"""Deciding and sending re-authorisation mails, on SQLite with a recording mailer.

The real SMTP server, the real AS and a real browser are in tests/integration/test_reauth.py.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import logging
import random
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import outbox, reauth, revocation
from delegation.clock import FrozenClock
from delegation.kms import LocalKeyFile
from delegation.mail import (
    CHANNEL_LOG,
    CHANNEL_SMTP,
    LogMailer,
    MailConfigError,
    MailRejected,
    MailRenderer,
    MailUnavailable,
    SmtpConfig,
    scope_words,
)
from delegation.notify import (
    BROKEN_TOPIC,
    MAIL_TOPIC,
    NOTIFY_TOPIC,
    WITHHELD,
    NotBroken,
    Notifier,
    NotifyPolicy,
    notifications,
)
from delegation.oauth import Endpoints
from delegation.runs import queue_run
from delegation.store import AgentIdentity, DelegationStore
from delegation.tokens import ClientCredentials
from delegation.vault import Vault
from models import AuditEvent, Delegation, JobRun, OutboxMessage, ReauthLink, User
from tests.support import factories

NOW = dt.datetime(2026, 5, 1, 2, 0, tzinfo=dt.UTC)
SECRET = b"s" * 48
METADATA = {"issuer": "https://as.example", "authorization_endpoint": "https://as.example/a",
            "token_endpoint": "https://as.example/t"}


@dataclass
class RecordingMailer:
    channel: str = CHANNEL_SMTP
    sent: list[EmailMessage] = field(default_factory=list)
    down: int = 0  # the next `down` deliveries fail as if the server were unreachable
    reject: bool = False

    def deliver(self, message: EmailMessage) -> None:
        if self.down:
            self.down -= 1
            raise MailUnavailable("SMTP server 127.0.0.1:25 unavailable: ConnectionRefusedError")
        if self.reject:
            raise MailRejected("the SMTP server refused the recipient for good (550)")
        # What a server would receive: the bytes, parsed back.
        self.sent.append(email.message_from_bytes(message.as_bytes(),  # type: ignore[arg-type]
                                                  policy=email.policy.default))


@dataclass
class Env:
    sessions: sessionmaker[Session]
    clock: FrozenClock
    vault: Vault
    mailer: RecordingMailer
    notifier: Notifier
    keys: reauth.LinkKeys
    agent_id: uuid.UUID = field(default_factory=uuid.uuid4)
    client_id: str = ""

    def delegation(self, subject: str = "alice", *, email_address: str | None = "x",
                   agent_name: str | None = None) -> uuid.UUID:
        with self.sessions.begin() as s:
            user = s.scalars(select(User).where(User.subject == subject)).one_or_none()
            if user is None:
                user = factories.user(s, subject)
                user.email = f"{subject}@example.test" if email_address == "x" else email_address
            agent_id = self.agent_id
            if agent_name is not None:
                prov = s.scalars(select(factories.Provider)).first()
                agent_id = factories.agent(s, prov, name=agent_name,
                                           scopes=["reports:read", "calendar:read"]).id
            agent = s.get(factories.Agent, agent_id)
            return factories.delegation(s, self.vault, user, agent).id

    def break_(self, delegation_id: uuid.UUID, reason: str = "invalid_grant") -> bool:
        store = DelegationStore(self.sessions, self.vault, self.clock)
        state = store.state(delegation_id)
        with self.sessions() as s:
            agent = s.get(factories.Agent, state.agent_id)
            assert agent is not None
            identity = AgentIdentity(
                id=agent.id, name=agent.name, client_id=agent.client_id, status="active",
                endpoints=Endpoints.from_metadata(METADATA), api_base=None,
                credentials=ClientCredentials(client_id=agent.client_id, auth_method="none"))
        return store.mark_broken(state, identity, reason, detail="invalid_grant: gone")

    def repair(self, delegation_id: uuid.UUID) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Delegation).where(Delegation.id == delegation_id)
                      .values(status="active", broken_at=None, version=Delegation.version + 1))
            reauth.invalidate(s, delegation_id, self.clock.now())

    def relay(self) -> int:
        total = 0
        while True:
            n = outbox.relay_once(self.sessions, self.notifier.handlers(), self.clock,
                                  rng=random.Random(0))
            total += n
            if n == 0:
                return total

    def links(self, delegation_id: uuid.UUID | None = None) -> list[ReauthLink]:
        with self.sessions() as s:
            query = select(ReauthLink).order_by(ReauthLink.created_at)
            if delegation_id is not None:
                query = query.where(ReauthLink.delegation_id == delegation_id)
            return list(s.scalars(query))

    def actions(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def make_notifier(sessions: sessionmaker[Session], clock: FrozenClock, mailer: Any, *,
                  policy: NotifyPolicy | None = None, log_links: bool = True,
                  templates: Path | None = None) -> Notifier:
    return Notifier(sessions, clock, policy or NotifyPolicy(), reauth.LinkKeys(SECRET),
                    MailRenderer(templates), mailer, public_url="https://behalf.example/",
                    mail_from="behalf <behalf@example.test>", log_links=log_links)


@pytest.fixture
def env(sqlite_sessions: sessionmaker[Session], tmp_path: Path) -> Env:
    clock = FrozenClock(NOW)
    vault = Vault(LocalKeyFile(tmp_path / "key", warn=False))
    mailer = RecordingMailer()
    e = Env(sqlite_sessions, clock, vault, mailer, make_notifier(sqlite_sessions, clock, mailer),
            reauth.LinkKeys(SECRET))
    with sqlite_sessions.begin() as s:
        prov = factories.provider(s)
        prov.discovered = METADATA
        agent = factories.agent(s, prov, scopes=["reports:read", "calendar:read"])
        e.agent_id, e.client_id = agent.id, agent.client_id
    return e


def link_in(message: EmailMessage) -> str:
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    (line,) = [w for w in text.split() if "/reauth/" in w]
    return line


# --- one mail per break ----------------------------------------------------------------------


def test_a_broken_delegation_mails_its_user_once_with_a_link_stored_only_as_a_hash(env: Env
                                                                                    ) -> None:
    # Given alice's delegation with two runs, which breaks (invalid_grant) and parks them,
    d_id = env.delegation()
    with env.sessions.begin() as s:
        user_id = s.get(Delegation, d_id).user_id
        for _ in range(2):
            queue_run(s, job="nightly-report", user_id=user_id, agent_id=env.agent_id,
                      now=env.clock.now())
    assert env.break_(d_id)

    # when the outbox is relayed (twice: a second relay finds nothing new),
    env.relay()
    env.relay()

    # then exactly one mail went out, to her, about the agent, with a link,
    (mail,) = env.mailer.sent
    assert mail["To"] == "alice@example.test"
    assert mail["Subject"] == "reporter stopped working for you - re-authorise it"
    assert mail["Auto-Submitted"] == "auto-generated"
    body = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    assert "nightly-report: 2 runs waiting" in body and "nightly-report: 2 runs waiting" in html
    assert "Since: 2026-05-01 02:00 UTC" in body
    assert "see your reports (reports:read)" in body and "see your calendar" in html
    assert "no longer accepts its access" in body
    url = link_in(mail)
    assert url.startswith("https://behalf.example/reauth/") and url in html
    token = url.rsplit("/", 1)[1]
    # the link is stored only as its hash, expires in 7 days, and is recorded as sent;
    (link,) = env.links(d_id)
    assert link.token_hash == reauth.digest(token)
    assert (link.kind, link.delivery, link.notified_at) == ("broken", "smtp", NOW)
    assert link.expires_at == NOW + dt.timedelta(days=7)
    assert mail["Message-ID"] == f"<reauth.{link.id}@example.test>"
    with env.sessions() as s:
        dump = " ".join(str(row) for table in ("reauth_links", "outbox", "audit_events")
                        for row in s.execute(text(f"SELECT * FROM {table}")))
    assert token not in dump
    assert "delegation:notified" in env.actions()
    # and the link opens the delegation it was made for.
    with env.sessions() as s:
        assert reauth.find(s, token, NOW).delegation_id == d_id


def test_fifty_failed_runs_break_it_once_and_send_one_mail(env: Env) -> None:
    d_id = env.delegation()
    store = DelegationStore(env.sessions, env.vault, env.clock)
    stale = store.state(d_id)
    assert env.break_(d_id)
    for _ in range(49):  # every other worker's mark_broken loses the compare-and-set
        with env.sessions() as s:
            agent = s.get(factories.Agent, env.agent_id)
        assert not store.mark_broken(stale, AgentIdentity(
            id=agent.id, name=agent.name, client_id=agent.client_id, status="active",
            endpoints=Endpoints.from_metadata(METADATA), api_base=None,
            credentials=ClientCredentials(client_id=agent.client_id, auth_method="none")),
            "invalid_grant", detail="x")
    env.relay()
    assert len(env.mailer.sent) == 1


def test_a_delegation_that_breaks_again_within_a_day_is_not_mailed_again(env: Env) -> None:
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    # repaired an hour later, broken again three hours later: no second mail
    env.clock.advance(3600)
    env.repair(d_id)
    env.clock.advance(3 * 3600)
    env.break_(d_id)
    env.relay()
    assert len(env.mailer.sent) == 1
    # repaired, and broken again more than a day after the mail: a mail again
    env.repair(d_id)
    env.clock.advance(21 * 3600)
    env.break_(d_id)
    env.relay()
    assert len(env.mailer.sent) == 2


def test_a_reminder_after_the_delay_if_still_broken(env: Env) -> None:
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    env.clock.advance(47 * 3600)
    env.relay()
    assert len(env.mailer.sent) == 1
    env.clock.advance(3600 + 1)
    env.relay()
    first, reminder = env.mailer.sent
    assert reminder["Subject"] == "Reminder: reporter is still stopped - re-authorise it"
    assert link_in(reminder) != link_in(first)  # a link of its own; the first still works
    assert [link.kind for link in env.links(d_id)] == ["broken", "reminder"]
    env.clock.advance(7 * 24 * 3600)
    env.relay()
    assert len(env.mailer.sent) == 2  # one reminder, not a series


def test_no_reminder_once_repaired_or_broken_again(env: Env) -> None:
    repaired, rebroken = env.delegation("alice"), env.delegation("bob")
    env.break_(repaired)
    env.break_(rebroken)
    env.relay()
    env.clock.advance(3600)
    env.repair(repaired)
    env.repair(rebroken)
    env.clock.advance(24 * 3600)
    env.break_(rebroken)  # a new break (25 h after the first): its own mail and reminder
    env.relay()
    assert [m["To"] for m in env.mailer.sent] == ["alice@example.test", "bob@example.test",
                                                   "bob@example.test"]
    env.clock.advance(23 * 3600 + 1)  # the first break's reminders are due: none is sent
    env.relay()
    assert len(env.mailer.sent) == 3
    env.clock.advance(25 * 3600)  # the second break's reminder
    env.relay()
    assert [m["To"] for m in env.mailer.sent[3:]] == ["bob@example.test"]


def test_at_most_n_mails_per_user_per_day_the_rest_later_not_lost(env: Env) -> None:
    ids = [env.delegation("alice", agent_name=f"agent-{i}") for i in range(4)]
    for d_id in ids:
        env.break_(d_id)
    env.relay()
    assert len(env.mailer.sent) == 3
    (held,) = [d for d in ids if not env.links(d)]
    env.clock.advance(12 * 3600)
    env.relay()
    assert len(env.mailer.sent) == 3
    env.clock.advance(12 * 3600 + 2)
    env.relay()
    assert len(env.mailer.sent) == 4
    assert [link.kind for link in env.links(held)] == ["broken"]


def test_an_smtp_outage_loses_no_mail_and_sends_none_twice(env: Env) -> None:
    d_id = env.delegation()
    env.mailer.down = 3
    env.break_(d_id)
    env.relay()
    assert env.mailer.sent == []
    with env.sessions() as s:
        message = s.scalars(select(OutboxMessage).where(OutboxMessage.topic == MAIL_TOPIC)).one()
        assert message.sent_at is None and message.attempts == 1
        assert "unavailable" in (message.last_error or "")
    for _ in range(5):  # retried with backoff until the server is back
        env.clock.advance(600)
        env.relay()
    assert len(env.mailer.sent) == 1
    (link,) = env.links(d_id)
    assert link.delivery == "smtp"


def test_a_redelivered_mail_message_sends_nothing(env: Env) -> None:
    # The relay died after the SMTP server accepted the mail, before it marked the outbox
    # message sent: the message comes again.
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    with env.sessions() as s:
        payload = s.scalars(select(OutboxMessage.payload)
                            .where(OutboxMessage.topic == MAIL_TOPIC)).one()
    assert env.notifier.send(payload).delivery is None
    assert len(env.mailer.sent) == 1


def test_the_same_link_renders_the_same_mail(env: Env) -> None:
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    (link,) = env.links(d_id)
    again = env.notifier.render_mail(link.id)
    (sent,) = env.mailer.sent
    assert again.message_id == sent["Message-ID"]
    assert link_in(sent) in again.text


def test_a_mail_for_a_delegation_repaired_before_it_went_out_is_not_sent(env: Env) -> None:
    d_id = env.delegation()
    env.mailer.down = 1
    env.break_(d_id)
    env.relay()
    env.repair(d_id)
    env.clock.advance(600)
    env.relay()
    assert env.mailer.sent == []
    assert env.links(d_id)[0].delivery == "skipped"


def test_no_known_address_is_recorded_not_retried_and_the_log_mailer_still_shows_it(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    d_id = env.delegation("carol", email_address=None)
    env.break_(d_id)
    env.relay()
    assert env.mailer.sent == []
    assert env.links(d_id)[0].delivery == "undeliverable"
    assert "delegation:notification:undeliverable" in env.actions()
    # With no SMTP server (dev), the mail goes to the log anyway, link included.
    logger = logging.getLogger("test.mail")
    dev = make_notifier(env.sessions, env.clock, LogMailer(logger))
    d2 = env.delegation("carol", agent_name="other")
    with caplog.at_level(logging.WARNING, logger="test.mail"):
        env.break_(d2)
        outbox.relay_once(env.sessions, dev.handlers(), env.clock)
        outbox.relay_once(env.sessions, dev.handlers(), env.clock)
    assert "To: (no address known)" in caplog.text
    assert "https://behalf.example/reauth/" in caplog.text
    assert env.links(d2)[0].delivery == CHANNEL_LOG


def test_in_production_without_smtp_the_logged_mail_withholds_the_link(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.mail.prod")
    prod = make_notifier(env.sessions, env.clock, LogMailer(logger), log_links=False)
    d_id = env.delegation()
    with caplog.at_level(logging.WARNING, logger="test.mail.prod"):
        env.break_(d_id)
        for _ in range(2):
            outbox.relay_once(env.sessions, prod.handlers(), env.clock)
    assert WITHHELD in caplog.text and "/reauth/" not in caplog.text


def test_a_permanent_refusal_is_recorded_not_retried(env: Env) -> None:
    env.mailer.reject = True
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    env.clock.advance(3600)
    env.relay()
    assert env.links(d_id)[0].delivery == "rejected"
    with env.sessions() as s:
        assert s.scalar(select(func.count()).select_from(OutboxMessage)
                        .where(OutboxMessage.sent_at.is_(None),
                               OutboxMessage.topic == MAIL_TOPIC)) == 0


def test_an_operator_sends_a_fresh_link_audited_with_their_name(env: Env) -> None:
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    link = env.notifier.request_link(d_id, "carol")  # within the day: operators are not held
    env.relay()
    assert len(env.mailer.sent) == 2
    rows = {r["link_id"]: r for r in notifications(env.sessions(), env.clock.now(),
                                                   delegation_id=d_id)}
    assert rows[str(link.id)]["kind"] == "operator"
    assert rows[str(link.id)]["requested_by"] == "carol"
    assert rows[str(link.id)]["delivery"] == "smtp"
    with env.sessions() as s:
        event = s.scalars(select(AuditEvent).where(
            AuditEvent.action == "delegation:notification:requested")).one()
    assert (event.actor_type, event.actor) == ("operator", "carol")
    env.repair(d_id)
    with pytest.raises(NotBroken):
        env.notifier.request_link(d_id, "carol")


def test_revoking_retires_the_links(env: Env) -> None:
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    token = link_in(env.mailer.sent[0]).rsplit("/", 1)[1]
    revocation.revoke(env.sessions, env.clock, d_id, actor_type="user", actor="alice")
    with env.sessions() as s, pytest.raises(reauth.LinkRefused) as refused:
        reauth.find(s, token, env.clock.now())
    assert refused.value.reason == "delegation_revoked"
    assert env.links(d_id)[0].invalidated_at == NOW


# --- links -----------------------------------------------------------------------------------


def test_link_tokens_are_derived_per_link_and_per_key() -> None:
    keys, other = reauth.LinkKeys(SECRET), reauth.LinkKeys(b"t" * 48)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert keys.token(a) == keys.token(a)
    assert len({keys.token(a), keys.token(b), other.token(a)}) == 3
    assert reauth.valid_syntax(keys.token(a)) and len(keys.token(a)) == 43
    assert "secret" in repr(keys) and SECRET.decode() not in repr(keys)
    with pytest.raises(ValueError):
        reauth.LinkKeys(b"short")


def test_tampered_expired_and_used_links_are_refused(env: Env) -> None:
    d_id = env.delegation()
    env.break_(d_id)
    env.relay()
    token = link_in(env.mailer.sent[0]).rsplit("/", 1)[1]
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    with env.sessions() as s:
        for bad in (tampered, token[:20], "x" * 500, "../../etc", ""):
            with pytest.raises(reauth.LinkRefused) as refused:
                reauth.find(s, bad, NOW)
            assert (refused.value.reason, refused.value.status) == ("unknown_link", 404)
        with pytest.raises(reauth.LinkRefused) as refused:
            reauth.find(s, token, NOW + dt.timedelta(days=7))
        assert refused.value.reason == "link_expired"
    with env.sessions.begin() as s:
        s.execute(update(ReauthLink).values(used_at=NOW))
    with env.sessions() as s, pytest.raises(reauth.LinkRefused) as refused:
        reauth.find(s, token, NOW)
    assert refused.value.reason == "link_used"


def test_reauth_asks_again_for_what_was_granted() -> None:
    assert reauth.reauth_scopes(["reports:read"], ["reports:read", "calendar:read"]) == [
        "reports:read"]
    assert reauth.reauth_scopes(["gone"], ["reports:read"]) == ["reports:read"]


# --- rendering and configuration -------------------------------------------------------------


def test_a_deployment_overrides_templates_and_scope_words(env: Env, tmp_path: Path) -> None:
    custom = tmp_path / "mail"
    custom.mkdir()
    (custom / "reauth.subject.txt").write_text("Action needed\r\nBcc: evil@example.test "
                                               "for {{ agent }}")
    (custom / "scopes.json").write_text('{"reports:read": "read the quarterly reports"}')
    notifier = make_notifier(env.sessions, env.clock, env.mailer, templates=custom)
    d_id = env.delegation()
    env.break_(d_id)
    outbox.relay_once(env.sessions, notifier.handlers(), env.clock)
    outbox.relay_once(env.sessions, notifier.handlers(), env.clock)
    (mail,) = env.mailer.sent
    assert mail["Subject"] == "Action needed Bcc: evil@example.test for reporter"
    assert mail["Bcc"] is None
    assert "read the quarterly reports" in mail.get_body(("plain",)).get_content()
    with pytest.raises(MailConfigError, match="BEHALF_MAIL_TEMPLATES_DIR"):
        MailRenderer(tmp_path / "missing")


def test_scope_words() -> None:
    assert scope_words("reports:read") == "see your reports"
    assert scope_words("calendar:write") == "create and change your calendar"
    assert scope_words("offline_access") == "keep working while you are away"
    assert scope_words("https://x/y") == "https://x/y"


@pytest.mark.parametrize(("url", "expected"), [
    ("smtp://mail.example", ("mail.example", 25, False, False, None)),
    ("smtp://127.0.0.1:2525", ("127.0.0.1", 2525, False, False, None)),
    ("smtp://u%40x:pw%3Ahunter2@mail.example:587?starttls=true",
     ("mail.example", 587, False, True, "u@x")),
    ("smtps://u:hunter2@mail.example", ("mail.example", 465, True, False, "u")),
    ("smtp://u:hunter2@localhost:25", ("localhost", 25, False, False, "u")),
])
def test_smtp_urls(url: str, expected: tuple[Any, ...]) -> None:
    config = SmtpConfig.from_url(url)
    assert (config.host, config.port, config.implicit_tls, config.starttls,
            config.username) == expected
    assert "hunter2" not in repr(config)
    if config.username:
        assert config.password is not None and config.password.endswith("hunter2")


@pytest.mark.parametrize(("url", "words"), [
    ("http://mail.example", "smtp://"),
    ("smtp://u:p@mail.example", "unencrypted"),
    ("smtp://mail.example?starttls=maybe", "starttls"),
    ("smtps://mail.example?starttls=true", "already encrypted"),
    ("smtp://mail.example?foo=1", "unknown parameter"),
    ("smtp://mail.example:notaport", "port"),
    ("smtp://mail.example?timeout=0", "timeout"),
])
def test_bad_smtp_urls_name_the_variable(url: str, words: str) -> None:
    with pytest.raises(MailConfigError, match="BEHALF_SMTP_URL") as error:
        SmtpConfig.from_url(url)
    assert words in str(error.value)


def test_the_reminder_and_broken_topics_are_relayed_by_the_notifier(env: Env) -> None:
    assert set(env.notifier.handlers()) == {BROKEN_TOPIC, NOTIFY_TOPIC, MAIL_TOPIC}
    with env.sessions() as s:
        assert s.scalar(select(func.count()).select_from(JobRun)) == 0
