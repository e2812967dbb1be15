"""Wire the re-authorisation notifier (`delegation.notify`) from the settings.

`BEHALF_SMTP_URL` set: mails go to that server (`SmtpMailer`). Empty (the embedded default):
they are written to the log (`LogMailer`) and their links are in the log only in dev; in
production the logged mail carries a placeholder instead of its link.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from behalf.deps import Deps
from delegation.mail import (
    LogMailer,
    MailConfigError,
    Mailer,
    MailRenderer,
    SmtpConfig,
    SmtpMailer,
)
from delegation.notify import BROKEN_TOPIC, MAIL_TOPIC, NOTIFY_TOPIC, Notifier, NotifyPolicy
from delegation.reauth import LinkKeys

log = logging.getLogger("behalf.mail")


def policy(deps: Deps) -> NotifyPolicy:
    settings = deps.settings
    return NotifyPolicy(
        link_ttl=dt.timedelta(days=settings.reauth_link_days),
        reminder_after=dt.timedelta(hours=settings.reminder_hours)
        if settings.reminder_hours else None,
        per_user_per_day=settings.mails_per_user_per_day,
    )


def mailer(deps: Deps) -> Mailer:
    if deps.settings.smtp_url:
        return SmtpMailer(SmtpConfig.from_url(deps.settings.smtp_url))
    return LogMailer(log)


def notifier(deps: Deps) -> Notifier:
    """The process's notifier (built once; a bad mail setting raises `MailConfigError`)."""
    found: Notifier | None = deps.extras.get("notifier")
    if found is None:
        from behalf.web import secret_key  # (behalf.web imports the relay, which imports us)

        settings = deps.settings
        templates = Path(settings.mail_templates_dir) if settings.mail_templates_dir else None
        found = Notifier(
            deps.sessions, deps.clock, policy(deps),
            LinkKeys(secret_key(settings).encode()), MailRenderer(templates),
            deps.extras.get("mailer") or mailer(deps),
            public_url=settings.public_url, mail_from=settings.mail_from,
            log_links=not settings.production,
        )
        deps.extras["notifier"] = found
    return found


def relay_handlers(deps: Deps) -> dict[str, Callable[[dict[str, Any]], None]]:
    """The notifier's outbox handlers. A bad mail setting fails only these (each message
    records the error and is retried), never the relay of other topics."""
    try:
        return notifier(deps).handlers()
    except Exception as exc:  # a setting (SMTP URL, templates dir, secret key) is wrong
        reason = str(exc) if isinstance(exc, MailConfigError) else \
            f"the notifier cannot start: {type(exc).__name__}: {exc}"
        if not deps.extras.get("mail_config_error_logged"):
            deps.extras["mail_config_error_logged"] = True
            log.error("notification mails are held back: %s", reason)

        def held(_payload: dict[str, Any]) -> None:
            raise MailConfigError(reason)

        return {BROKEN_TOPIC: held, NOTIFY_TOPIC: held, MAIL_TOPIC: held}
