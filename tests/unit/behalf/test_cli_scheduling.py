"""`behalf schedule …`, `behalf requeue` and `behalf scheduler` argument handling, on SQLite."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from behalf.cli import main
from behalf.cli import scheduling as scheduling_cli
from delegation.runs import queue_run
from models import AuditEvent, Delegation, JobRun, Schedule
from models import migrate as migrations
from models.session import make_engine, make_session_factory
from tests.support.scheduling import fleet
from worker.jobs import JobRegistry, JobSpec


@pytest.fixture
def cli_db(tmp_path, monkeypatch):
    jobs = JobRegistry()  # the process-wide registry holds whatever other tests imported
    jobs.add(JobSpec(name="nightly", agent="reporter", scopes=frozenset(),
                     function=lambda ctx: None))
    monkeypatch.setattr(scheduling_cli, "registry", jobs)
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    monkeypatch.setenv("BEHALF_DATABASE_URL", url)
    monkeypatch.setenv("BEHALF_LOCAL_KEY_FILE", os.fspath(tmp_path / "key"))
    engine = make_engine(url)
    migrations.upgrade(engine)
    sessions = make_session_factory(engine)
    f = fleet(sessions, 3, now=dt.datetime.now(dt.UTC))
    yield sessions, f
    engine.dispose()


def run_json(capsys, *args: str):
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def one_line_error(capsys, args: list[str], code: int = 2) -> str:
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def add_args(**overrides: str) -> list[str]:
    options = {"--user": "user-0", "--agent": "reporter", "--job": "nightly",
               "--cron": "0 2 * * *", **overrides}
    return ["schedule", "add", *[x for kv in options.items() for x in kv]]


def test_schedule_add_list_pause_resume(cli_db, capsys):
    sessions, _ = cli_db
    [added] = run_json(capsys, *add_args(**{"--tz": "Europe/Paris", "--spread": "2h"}),
                       "--operator", "olga")
    schedule_id = added["schedule_id"]
    local = dt.datetime.fromisoformat(added["next_run_at"]).astimezone(
        ZoneInfo("Europe/Paris"))
    assert added["tz"] == "Europe/Paris" and (local.hour, local.minute) <= (4, 0)

    listed = run_json(capsys, "schedule", "list", "--user", "user-0")
    assert [row["schedule_id"] for row in listed] == [schedule_id]
    assert listed[0]["spread_seconds"] == 7200 and listed[0]["overlap"] == "skip"

    assert run_json(capsys, "schedule", "pause", schedule_id)[0]["changed"] is True
    assert run_json(capsys, "schedule", "pause", schedule_id)[0]["changed"] is False
    assert [r["schedule_id"] for r in run_json(capsys, "schedule", "list", "--state",
                                               "paused")] == [schedule_id]
    assert run_json(capsys, "schedule", "resume", schedule_id)[0]["paused"] is False
    assert run_json(capsys, "schedule", "list", "--state", "paused") == []

    with sessions() as s:
        events = s.execute(select(AuditEvent.action, AuditEvent.actor)
                           .order_by(AuditEvent.id)).all()
    assert events[0] == ("schedule:created", "olga")
    assert [a for a, _ in events] == ["schedule:created", "schedule:paused",
                                      "schedule:resumed"]


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"--job": "weekly"}, "unknown job 'weekly' (known: nightly)"),
    ({"--cron": "0 25 * * *"}, "bad hour field"),
    ({"--cron": "0 2 * *"}, "expected 5 fields"),
    ({"--tz": "Europe/Atlantis"}, "unknown time zone"),
    ({"--spread": "soon"}, "invalid duration"),
    ({"--catch-up": "5s"}, "catch-up window must be at least 1m"),
    ({"--overlap": "queue"}, "'queue' is not one of"),
    ({"--user": "nobody"}, "no user with subject 'nobody'"),
    ({"--agent": "nobody"}, "no agent named 'nobody'"),
])
def test_bad_schedule_arguments_exit_2_and_create_nothing(cli_db, capsys, overrides,
                                                          expected):
    sessions, _ = cli_db
    assert expected in one_line_error(capsys, add_args(**overrides))
    with sessions() as s:
        assert s.scalars(select(Schedule)).all() == []


def test_changes_to_an_unknown_schedule_exit_2(cli_db, capsys):
    missing = str(uuid.uuid4())
    assert "no schedule" in one_line_error(capsys, ["schedule", "pause", missing])
    assert "not a valid UUID" in one_line_error(capsys, ["schedule", "resume", "x"])
    assert "no schedule" in one_line_error(
        capsys, ["schedule", "backfill", missing, "--from", "2026-01-01", "--to", "2026-01-02"])


def test_backfill_reads_bare_dates_in_the_schedule_zone_and_is_idempotent(cli_db, capsys):
    sessions, _ = cli_db
    [added] = run_json(capsys, *add_args(**{"--tz": "America/New_York"}))
    args = ["schedule", "backfill", added["schedule_id"], "--from", "2026-03-07",
            "--to", "2026-03-10"]
    assert run_json(capsys, *args) == [{"schedule_id": added["schedule_id"], "slots": 3,
                                        "queued": 3, "already": 0}]
    assert run_json(capsys, *args)[0]["queued"] == 0
    with sessions() as s:
        slots = sorted(s.scalars(select(JobRun.slot_at)).all())
    # 02:00 on 8 March does not exist in New York: that night runs at 03:00 EDT (07:00 UTC)
    assert [x.strftime("%d %H:%M") for x in slots] == ["07 07:00", "08 07:00", "09 06:00"]

    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).date().isoformat()
    err = one_line_error(capsys, ["schedule", "backfill", added["schedule_id"], "--from",
                                  "2026-03-01", "--to", future])
    assert "must not be in the future" in err
    assert "not an ISO 8601" in one_line_error(
        capsys, ["schedule", "backfill", added["schedule_id"], "--from", "yesterday",
                 "--to", "2026-03-02"])
    with sessions.begin() as s:
        s.execute(update(Delegation).values(status="broken"))
    err = one_line_error(capsys, ["schedule", "backfill", added["schedule_id"], "--from",
                                  "2026-02-01", "--to", "2026-02-03"], code=1)
    assert "re-authorised" in err


def test_requeue_by_agent_shows_progress_and_reports_counts(cli_db, capsys):
    sessions, f = cli_db
    now = dt.datetime.now(dt.UTC)
    with sessions.begin() as s:
        ids = [queue_run(s, job="nightly", user_id=u, agent_id=f.agent_id, now=now).id
               for u in f.users]
        s.execute(update(JobRun).values(status="parked", reason="missing_scope"))
    code = main(["requeue", "--agent", "reporter", "--operator", "pat", "--batch", "2",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out) == [{"matched": 3, "requeued": 3, "superseded": 0,
                                         "already_handled": 0}]
    assert "re-queuing parked runs" in captured.err

    assert main(["requeue", "--run", str(ids[0])]) == 0
    captured = capsys.readouterr()
    assert "is queued, not parked: nothing to re-queue" in captured.err
    with sessions() as s:
        actors = s.scalars(select(AuditEvent.actor).where(
            AuditEvent.action == "run:requeued")).all()
    assert actors == ["pat"] * 3


@pytest.mark.parametrize(("args", "expected"), [
    (["requeue"], "exactly one of --run, --delegation or --agent"),
    (["requeue", "--agent", "reporter", "--run", str(uuid.UUID(int=1))], "exactly one"),
    (["requeue", "--run", str(uuid.UUID(int=1))], "no run"),
    (["requeue", "--delegation", str(uuid.UUID(int=1))], "no delegation"),
    (["requeue", "--agent", "ghost"], "no agent named 'ghost'"),
    (["scheduler", "--once"], "BEHALF_BROKER_URL"),
    (["scheduler", "--interval", "0s"], "BEHALF_BROKER_URL"),
])
def test_bad_requeue_and_scheduler_arguments_exit_2(cli_db, capsys, args, expected):
    assert expected in one_line_error(capsys, args)


def test_the_scheduler_refuses_a_zero_interval(cli_db, capsys, monkeypatch):
    monkeypatch.setenv("BEHALF_BROKER_URL", "redis://127.0.0.1:1/0")
    assert "longer than 0s" in one_line_error(capsys, ["scheduler", "--interval", "0s"])
