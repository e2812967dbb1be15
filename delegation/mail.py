"""Notification mails: rendering them (plain text + HTML) and handing them to SMTP or the log.

Rendering: Jinja2 templates `<name>.subject.txt`, `<name>.txt` and `<name>.html` from
`delegation/templates/mail/`; a directory given as `templates_dir` (`BEHALF_MAIL_TEMPLATES_DIR`)
is searched first, file by file, so a deployment overrides only what it wants. The HTML is
autoescaped, the text is not; an unknown variable in a template is an error (loud, retried by
the outbox), not a silently blank mail. Scopes are put in words by `scope_words`: a
`scopes.json` (`{"scope": "words"}`) in that directory wins over the built-in phrasing.

Delivery (`BEHALF_SMTP_URL`):

    smtp://host[:25]                                plain SMTP
    smtp://user:password@host:587?starttls=true     STARTTLS (required), then AUTH
    smtps://user:password@host[:465]                implicit TLS, then AUTH
    ...&timeout=30                                  seconds per SMTP command

Certificates are verified (the system's trust store). Credentials are refused on a connection
that is not encrypted, except to a loopback address. Errors:

    BehalfError
    ├── MailConfigError             the URL is wrong (names BEHALF_SMTP_URL)
    ├── MailRejected                the recipient or the message refused for good (5xx but
    │                               53x): retrying cannot help
    └── RetryableError
        └── MailUnavailable         connection, TLS, 4xx, 53x, timeouts, authentication, our
                                    sender refused: retry later (an operator may fix it)

No error carries the mail's body (which holds the link).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr, parseaddr
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    select_autoescape,
)

from delegation import redaction
from delegation.errors import BehalfError, RetryableError

log = logging.getLogger(__name__)

CHANNEL_SMTP = "smtp"
CHANNEL_LOG = "log"


class MailConfigError(BehalfError):
    pass


class MailRejected(BehalfError):
    """The SMTP server refused the mail for good (5xx)."""


class MailUnavailable(RetryableError):
    pass


# --- the mail ----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Mail:
    """A rendered mail. Not printed by `repr`: its body holds a live link."""

    to: str | None
    subject: str
    text: str
    html: str
    message_id: str

    def __repr__(self) -> str:
        return f"Mail(to={self.to!r}, subject={self.subject!r}, message_id={self.message_id!r})"

    def message(self, sender: str) -> EmailMessage:
        message = EmailMessage()
        message["From"] = sender
        if self.to:
            message["To"] = self.to
        message["Subject"] = self.subject
        message["Message-ID"] = self.message_id
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
        message.set_content(self.text)
        message.add_alternative(self.html, subtype="html")
        return message


def message_id(kind: str, ident: str, sender: str) -> str:
    """A Message-ID that is the same every time the same mail is rendered (a re-send after a
    crash carries the same one, so receiving systems can tell it is the same mail)."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "behalf.invalid"
    return f"<{kind}.{ident}@{domain}>"


def one_line(value: str, limit: int = 200) -> str:
    return " ".join(value.split())[:limit]


# --- rendering -----------------------------------------------------------------------------


_ACTIONS = {
    "read": "see your {}",
    "write": "create and change your {}",
    "delete": "delete your {}",
    "admin": "manage your {}",
}
_KNOWN = {
    "openid": "know who you are",
    "profile": "see your name",
    "email": "see your e-mail address",
    "offline_access": "keep working while you are away",
}


def scope_words(scope: str, overrides: dict[str, str] | None = None) -> str:
    """A scope in words: `reports:read` -> "see your reports"."""
    if overrides and scope in overrides:
        return overrides[scope]
    if scope in _KNOWN:
        return _KNOWN[scope]
    resource, _, action = scope.rpartition(":")
    if resource and action in _ACTIONS:
        return _ACTIONS[action].format(resource.replace("_", " ").replace(".", " "))
    return scope


class MailRenderer:
    def __init__(self, templates_dir: Path | None = None) -> None:
        loaders: list[Any] = []
        self._overrides: dict[str, str] = {}
        if templates_dir is not None:
            if not templates_dir.is_dir():
                raise MailConfigError(f"BEHALF_MAIL_TEMPLATES_DIR: {templates_dir} is not a "
                                      "directory")
            loaders.append(FileSystemLoader(str(templates_dir)))
            words = templates_dir / "scopes.json"
            if words.exists():
                try:
                    loaded = json.loads(words.read_text())
                except (OSError, ValueError) as exc:
                    raise MailConfigError(f"BEHALF_MAIL_TEMPLATES_DIR: {words} is not a JSON "
                                          f"object of scope -> words ({exc})") from None
                if not isinstance(loaded, dict):
                    raise MailConfigError(f"BEHALF_MAIL_TEMPLATES_DIR: {words} is not a JSON "
                                          "object of scope -> words")
                self._overrides = {str(k): str(v) for k, v in loaded.items()}
        loaders.append(PackageLoader("delegation", "templates/mail"))
        self._env = Environment(
            loader=ChoiceLoader(loaders), autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self._env.filters["when"] = _when
        self._env.filters["words"] = self.words

    def words(self, scope: str) -> str:
        return scope_words(scope, self._overrides)

    def render(self, name: str, context: dict[str, Any], *, to: str | None,
               message_id: str) -> Mail:
        subject = one_line(self._env.get_template(f"{name}.subject.txt").render(**context))
        text = self._env.get_template(f"{name}.txt").render(**context)
        html = self._env.get_template(f"{name}.html").render(**context)
        return Mail(to=to, subject=subject, text=text, html=html, message_id=message_id)


def _when(value: Any) -> str:
    if value is None:
        return "-"
    return str(value.strftime("%Y-%m-%d %H:%M UTC"))


# --- delivery ------------------------------------------------------------------------------


class Mailer(Protocol):
    channel: str

    def deliver(self, message: EmailMessage) -> None: ...


@dataclass(frozen=True, repr=False)
class SmtpConfig:
    host: str
    port: int
    implicit_tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0

    def __repr__(self) -> str:
        return (f"SmtpConfig(host={self.host!r}, port={self.port}, tls={self.implicit_tls}, "
                f"starttls={self.starttls}, auth={self.username is not None})")

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        def bad(why: str) -> MailConfigError:
            return MailConfigError(f"BEHALF_SMTP_URL: {why}")

        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise bad("expected smtp:// or smtps://")
        try:
            port = parts.port
        except ValueError:
            raise bad("the port is not a number") from None
        if not parts.hostname:
            raise bad("no host")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - {"starttls", "timeout"})
        if unknown:
            raise bad(f"unknown parameter {unknown[0]!r} (known: starttls, timeout)")
        starttls_raw = query.get("starttls", "false").lower()
        if starttls_raw not in ("true", "false", "1", "0", "yes", "no"):
            raise bad("starttls must be true or false")
        starttls = starttls_raw in ("true", "1", "yes")
        try:
            timeout = float(query.get("timeout", "30"))
        except ValueError:
            raise bad("timeout must be a number of seconds") from None
        if not 0 < timeout <= 600:
            raise bad("timeout must be between 0 and 600 seconds")
        implicit = parts.scheme == "smtps"
        if implicit and starttls:
            raise bad("smtps:// is already encrypted; drop starttls")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if username is not None and not (implicit or starttls) and not _loopback(parts.hostname):
            raise bad("credentials would be sent unencrypted; use smtps:// or ?starttls=true")
        return cls(host=parts.hostname, port=port or (465 if implicit else 25),
                   implicit_tls=implicit, starttls=starttls, username=username,
                   password=password, timeout=timeout)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refusal(code: int, what: str) -> BehalfError:
    """5xx is for good, except 53x (authentication or TLS required: our configuration)."""
    if 500 <= code < 600 and not 530 <= code < 540:
        return MailRejected(f"the SMTP server refused the {what} for good ({code})")
    return MailUnavailable(f"the SMTP server refused the {what} for now ({code})")


class SmtpMailer:
    """One SMTP connection per mail (notifications are rare; nothing to keep open)."""

    channel = CHANNEL_SMTP

    def __init__(self, config: SmtpConfig, *,
                 ssl_context: Callable[[], ssl.SSLContext] = ssl.create_default_context
                 ) -> None:
        self._config = config
        self._ssl_context = ssl_context

    def deliver(self, message: EmailMessage) -> None:
        c = self._config
        try:
            smtp: smtplib.SMTP
            if c.implicit_tls:
                smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout,
                                        context=self._ssl_context())
            else:
                smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
            with smtp:
                smtp.ehlo()
                if c.starttls:
                    smtp.starttls(context=self._ssl_context())
                    smtp.ehlo()
                if c.username is not None:
                    smtp.login(c.username, c.password or "")
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise _refusal(min(codes) if codes else 550, "recipient") from None
        except smtplib.SMTPSenderRefused as exc:  # our From or our session: ours to fix
            raise MailUnavailable(f"the SMTP server refused the sender ({exc.smtp_code}); "
                                  "check BEHALF_MAIL_FROM and BEHALF_SMTP_URL") from None
        except smtplib.SMTPDataError as exc:
            raise _refusal(exc.smtp_code, "message") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise MailUnavailable(f"SMTP authentication failed ({exc.smtp_code}); check the "
                                  "credentials in BEHALF_SMTP_URL") from None
        except smtplib.SMTPNotSupportedError:
            raise MailUnavailable("the SMTP server does not offer what BEHALF_SMTP_URL asks "
                                  "for (STARTTLS or AUTH)") from None
        except (smtplib.SMTPException, OSError) as exc:  # OSError: refused, TLS, timeouts
            raise MailUnavailable(f"SMTP server {c.host}:{c.port} unavailable: "
                                  f"{type(exc).__name__}") from None


class LogMailer:
    """No SMTP configured: the mail goes to the log (the embedded default)."""

    channel = CHANNEL_LOG

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    def deliver(self, message: EmailMessage) -> None:
        body = message.get_body(("plain",))
        text = body.get_content() if body is not None else ""
        # The log is the mailbox here: its link must stay usable, so it is not redacted (in
        # production the notifier already put a placeholder in place of the link).
        with redaction.disclosed():
            self._log.warning(
                "mail not sent (BEHALF_SMTP_URL is empty), written here instead:\n"
                "From: %s\nTo: %s\nSubject: %s\nMessage-ID: %s\n\n%s",
                message["From"], message["To"] or "(no address known)", message["Subject"],
                message["Message-ID"], text)


def address(name: str | None, email: str) -> str:
    return formataddr((name or "", email))
