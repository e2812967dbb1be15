"""`behalf delegations notify` and `behalf delegations notifications`, on SQLite, no SMTP."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from sqlalchemy import select, update

from behalf.cli import main
from models import AuditEvent, Delegation
from models import migrate as migrations
from models.session import make_engine, make_session_factory
from tests.support.scheduling import fleet


@pytest.fixture
def broken(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    monkeypatch.setenv("BEHALF_DATABASE_URL", url)
    monkeypatch.setenv("BEHALF_LOCAL_KEY_FILE", os.fspath(tmp_path / "key"))
    monkeypatch.setenv("BEHALF_PUBLIC_URL", "http://127.0.0.1:8000")
    engine = make_engine(url)
    migrations.upgrade(engine)
    sessions = make_session_factory(engine)
    f = fleet(sessions, 2, now=dt.datetime.now(dt.UTC))
    broken_id, active_id = (f.delegations[u] for u in f.users)
    with sessions.begin() as s:
        s.execute(update(Delegation).where(Delegation.id == broken_id).values(
            status="broken", status_reason="invalid_grant", broken_at=dt.datetime.now(dt.UTC)))
    yield sessions, broken_id, active_id
    engine.dispose()


def run_json(capsys, *args: str):
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_an_operator_sends_a_fresh_link_and_sees_who_was_notified_when(broken, capsys):
    sessions, broken_id, _ = broken
    (sent,) = run_json(capsys, "delegations", "notify", "--delegation", str(broken_id),
                       "--operator", "pat")
    assert sent["delivery"] == "log" and sent["notified_at"]

    (row,) = run_json(capsys, "delegations", "notifications", "--delegation", str(broken_id))
    assert (row["kind"], row["requested_by"], row["state"]) == ("operator", "pat", "live")
    assert row["user"] == "user-0" and row["agent"] == "reporter"
    with sessions() as s:
        actors = set(s.execute(select(AuditEvent.action, AuditEvent.actor)).tuples())
    assert ("delegation:notification:requested", "pat") in actors
    assert ("delegation:notified", "notifier") in actors

    # In dev with no SMTP server, the outbox is the mailbox: the mail can be read back.
    assert main(["delegations", "notifications", "--mail", row["link_id"]]) == 0
    out = capsys.readouterr().out
    assert "Subject: reporter stopped working for you" in out
    assert "http://127.0.0.1:8000/reauth/" in out


def test_bad_notify_arguments_exit_2_with_one_line(broken, capsys):
    _, _, active_id = broken
    for args in (["--delegation", str(active_id)], ["--delegation", "nope"],
                 ["--delegation", "00000000-0000-0000-0000-000000000000"]):
        assert main(["delegations", "notify", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("behalf:"), err


def test_reading_a_mail_back_is_for_the_embedded_default_only(broken, capsys, monkeypatch):
    _, broken_id, _ = broken
    (sent,) = run_json(capsys, "delegations", "notify", "--delegation", str(broken_id))
    monkeypatch.setenv("BEHALF_SMTP_URL", "smtp://127.0.0.1:1")
    assert main(["delegations", "notifications", "--mail", sent["link_id"]]) == 2
    assert "embedded default" in capsys.readouterr().err


def test_a_bad_mail_setting_holds_mails_back_but_no_other_topic(tmp_path, caplog):
    from behalf import relay
    from behalf.deps import Deps
    from behalf.settings import load
    from delegation.mail import MailConfigError
    from delegation.notify import MAIL_TOPIC

    deps = Deps.from_settings(load({
        "BEHALF_DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3",
        "BEHALF_LOCAL_KEY_FILE": os.fspath(tmp_path / "key"),
        "BEHALF_SMTP_URL": "smtp://user:hunter2@mail.example"}))
    try:
        table = relay.handlers(deps)
        assert "run.dispatch" in table
        with pytest.raises(MailConfigError, match="BEHALF_SMTP_URL: credentials"):
            table[MAIL_TOPIC]({"link_id": "00000000-0000-0000-0000-000000000000"})
        assert "hunter2" not in caplog.text
    finally:
        deps.close()
