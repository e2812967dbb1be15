"""`behalf audit show | verify | export | checkpoint | prune` on SQLite and the local key file."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from sqlalchemy import select

from behalf.cli import main
from delegation import audit
from models import AuditEvent, User
from models import migrate as migrations
from models.session import make_engine, make_session_factory
from tests.support.audit import call_record, tamper


@pytest.fixture
def cli_db(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    monkeypatch.setenv("BEHALF_DATABASE_URL", url)
    monkeypatch.setenv("BEHALF_LOCAL_KEY_FILE", os.fspath(tmp_path / "key"))
    engine = make_engine(url)
    migrations.upgrade(engine)
    sessions = make_session_factory(engine)
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    users = {}
    with sessions.begin() as s:
        for subject in ("alice", "bob"):
            user = User(issuer="https://as.test", subject=subject, created_at=now)
            s.add(user)
            s.flush()
            users[subject] = user.id
    for n in range(6):
        subject = "alice" if n % 2 == 0 else "bob"
        agent = "reporter" if n < 4 else "planner"
        with sessions.begin() as s:
            audit.append(s, call_record(users[subject], n, user_subject=subject,
                                        agent_name=agent, client_id=f"client-{agent}"),
                         now + dt.timedelta(days=n))
    yield sessions, users
    engine.dispose()


def run(capsys, *args: str, code: int = 0):
    result = main(list(args))
    captured = capsys.readouterr()
    assert result == code, captured.err
    return captured


def test_show_filters_by_user_agent_and_time(cli_db, capsys):
    _, users = cli_db
    everything = json.loads(run(capsys, "audit", "show", "--json").out)
    assert [e["detail"]["n"] for e in everything] == [5, 4, 3, 2, 1, 0]  # newest first

    alice = json.loads(run(capsys, "audit", "show", "--user", "alice", "--json").out)
    assert {e["user"] for e in alice} == {"alice"} and len(alice) == 3
    by_id = json.loads(run(capsys, "audit", "show", "--user", str(users["bob"]), "--json").out)
    assert {e["user"] for e in by_id} == {"bob"}

    planner = json.loads(run(capsys, "audit", "show", "--agent", "client-planner",
                             "--json").out)
    assert [e["agent"] for e in planner] == ["planner", "planner"]
    window = json.loads(run(capsys, "audit", "show", "--since", "2026-03-02",
                            "--until", "2026-03-04T00:00:00+00:00", "--limit", "5",
                            "--json").out)
    assert [e["detail"]["n"] for e in window] == [2, 1]

    table = run(capsys, "audit", "show", "--user", "alice", "--limit", "1").out
    assert "ACTION" in table and "api:call" in table and "method=GET" in table


def test_bad_arguments_exit_2_with_one_line(cli_db, capsys):
    for args in (["audit", "show", "--since", "yesterday"],
                 ["audit", "show", "--user", "nobody"],
                 ["audit", "export", "--user", "nobody"],
                 ["audit", "prune", "--operator", "olga"],
                 ["audit", "prune", "--before", "2026-01-01", "--older-than-days", "3"]):
        err = run(capsys, *args, code=2).err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("behalf:"), err


def test_export_is_the_users_whole_trail_as_json_lines(cli_db, capsys):
    out = run(capsys, "audit", "export", "--user", "alice").out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3]
    assert {e["user"] for e in lines} == {"alice"}
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    assert {"agent", "client_id", "actor_type", "action", "detail", "occurred_at",
            "request_id", "run_id", "delegation_id"} <= set(lines[0])


def test_verify_checkpoint_and_prune(cli_db, capsys):
    sessions, _ = cli_db
    assert "6 events in 2 chains" in run(capsys, "audit", "verify").out

    made = json.loads(run(capsys, "audit", "checkpoint", "--json").out)[0]
    assert made["checkpoint"] == 1 and made["chains"] == 2
    again = json.loads(run(capsys, "audit", "checkpoint", "--json").out)[0]
    assert again["checkpoint"] is None
    report = json.loads(run(capsys, "audit", "verify", "--json").out)
    assert report["ok"] and report["latest_checkpoint"]["digest"] == made["digest"]

    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    pruned = json.loads(run(capsys, "audit", "prune", "--before", tomorrow,
                            "--operator", "olga", "--json").out)[0]
    assert pruned["events_deleted"] == 6 and pruned["through_checkpoint"] == 1
    assert "1 events in 1 chains and 1 checkpoints" in run(capsys, "audit", "verify").out
    err = run(capsys, "audit", "prune", "--older-than-days", "30", "--operator", "olga",
              code=1).err
    assert "no checkpoint at or before" in err
    with sessions() as s:
        assert s.scalars(select(AuditEvent.action)).all() == ["audit:events:pruned"]


def test_verify_exits_1_naming_the_first_bad_event(cli_db, capsys):
    sessions, users = cli_db
    tamper(sessions.kw["bind"], "UPDATE audit_events SET actor = 'mallory' "
                                "WHERE chain = :c AND seq = 2", c=str(users["alice"]))
    captured = run(capsys, "audit", "verify", code=1)
    assert f"altered: chain {users['alice']} seq 2" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("behalf: the audit trail does not verify: altered: chain "
                          f"{users['alice']} seq 2 (event id ")
    report = json.loads(run(capsys, "audit", "verify", "--json", code=1).out)
    assert not report["ok"] and report["problem_count"] == 1


def test_the_cli_registers_the_audit_group():
    import click

    from behalf.cli import cli

    audit = cli.get_command(click.Context(cli), "audit")
    assert isinstance(audit, click.Group)
    assert set(audit.commands) == {"show", "verify", "export", "checkpoint",
                                                    "prune"}

