"""Faults survived (issue #11, part 1): a nightly batch on real processes, one fault at a time.

One test bed for the module: a private PostgreSQL and Redis (so restarting them disturbs no one
else), moto's KMS behind a switch that makes it fail, the real AS + API (oidc-provider, 4-second
access tokens so every run refreshes), an SMTP server, two `behalf worker` processes (two job
processes each) and a `behalf scheduler`. Each test creates one schedule per connected user with
a slot that is due now, injects one kind of fault while the scheduler and workers run the batch,
waits for every run to end, and checks:

- every (schedule, slot) has exactly one run and it ended in an explicit state (succeeded,
  failed with a reason, parked, cancelled): runs lost = 0;
- no run's job body completed twice, and no two executions of one run overlapped: duplicate
  executions = 0 (a body re-started after its worker was lost mid-run is a retry, counted);
- a delegation is broken only by an `invalid_grant` the AS really answered, and one broken by a
  refresh whose answer was lost says so (`refresh_response_lost`) in the trail: false broken = 0;
- every call the API received has its `api:call:attempted` record;
- no re-authorisation mail went out twice.

The figures per fault kind are printed at the end of the session and written to
`fault-counts.json` in pytest's base temporary directory.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis as redis_lib
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from delegation.kms import AwsKms
from delegation.vault import DataKeyCache, Vault
from models import AuditEvent, Delegation, JobRun, User
from models import migrate as migrations
from models.session import make_engine, make_session_factory
from tests.support.oidc_provider import OidcProvider, OidcProviderSettings
from tests.support.private_services import FaultyKms, PrivatePostgres, PrivateRedis
from tests.support.processes import Processes
from tests.support.real_world import connect_user, make_world, register_agent
from tests.support.scheduling import Fleet, add_schedules
from tests.support.services import unavailable
from tests.support.smtp import SmtpServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

USERS = 8
STEPS = 3  # API calls per execution of the job body (see tests/support/fault_jobs.py)
ACCESS_TOKEN_TTL = 4  # seconds: refreshed 2 s after issue, so every batch refreshes
TERMINAL = {"succeeded", "failed", "parked", "cancelled"}


# --- the figures -------------------------------------------------------------------------------


@dataclass
class Figures:
    faults_injected: int = 0
    runs: int = 0
    runs_affected: int = 0
    runs_lost: int = 0
    duplicate_executions: int = 0
    false_broken: int = 0
    broken_explained: int = 0
    audit_missing: int = 0
    duplicate_mails: int = 0
    retried_executions: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    broken_reasons: dict[str, int] = field(default_factory=dict)


class FaultReport:
    """Collects the figures of every fault kind; printed and saved when the session ends."""

    def __init__(self) -> None:
        self.kinds: dict[str, Figures] = {}

    def as_json(self) -> dict[str, Any]:
        return {kind: vars(figures) for kind, figures in self.kinds.items()}

    def lines(self) -> list[str]:
        head = (f"{'fault kind':<24}{'injected':>9}{'runs':>6}{'affected':>9}{'lost':>6}"
                f"{'dup exec':>9}{'false broken':>13}{'explained':>10}{'no audit':>9}"
                f"{'dup mail':>9}  outcomes")
        rows = [head]
        for kind, f in self.kinds.items():
            rows.append(f"{kind:<24}{f.faults_injected:>9}{f.runs:>6}{f.runs_affected:>9}"
                        f"{f.runs_lost:>6}{f.duplicate_executions:>9}{f.false_broken:>13}"
                        f"{f.broken_explained:>10}{f.audit_missing:>9}{f.duplicate_mails:>9}"
                        f"  {json.dumps(f.outcomes, sort_keys=True)}")
        return rows


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultReport]:
    report = FaultReport()
    yield report
    if not report.kinds:
        return
    path = tmp_path_factory.getbasetemp() / "fault-counts.json"
    path.write_text(json.dumps(report.as_json(), indent=2, sort_keys=True))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even when every test passed
        print(f"\nfault injection figures (also in {path}):")
        for line in report.lines():
            print(line)


# --- the test bed ------------------------------------------------------------------------------


@dataclass
class Bed:
    pg: PrivatePostgres
    redis: PrivateRedis
    kms: FaultyKms
    provider: OidcProvider
    smtp: SmtpServer
    sessions: sessionmaker[Session]
    world: Any
    procs: Processes
    users: dict[str, tuple[uuid.UUID, uuid.UUID]]  # subject -> (user, delegation)
    scheduler: Any = None
    workers: list[Any] = field(default_factory=list)
    mails_seen: int = 0

    # processes

    def start_scheduler(self) -> None:
        self.scheduler = self.procs.start("scheduler", "--interval", "1s", "--no-sweep")

    def start_worker(self) -> Any:
        worker = self.procs.start("worker", "--concurrency", "2")
        self.workers.append(worker)
        return worker

    def running_runs(self, schedule_ids: list[uuid.UUID]) -> list[tuple[uuid.UUID, str]]:
        with self.sessions() as s:
            rows = s.execute(select(JobRun.id, JobRun.lease_owner).where(
                JobRun.schedule_id.in_(schedule_ids), JobRun.status == "running")).all()
        return [(run_id, owner) for run_id, owner in rows if owner]

    # the batch

    def active_users(self) -> list[uuid.UUID]:
        with self.sessions() as s:
            return list(s.scalars(select(Delegation.user_id).where(
                Delegation.status == "active", Delegation.agent_id == self.world.agent_id)))

    def queue_batch(self) -> list[uuid.UUID]:
        """One schedule per active user, its slot (1 January) due now with catch-up."""
        now = dt.datetime.now(dt.UTC)
        slot = dt.datetime(now.year, 1, 1, tzinfo=dt.UTC)
        fleet = Fleet(self.sessions, self.world.provider_id, self.world.agent_id)
        return add_schedules(fleet, cron="0 0 1 1 *", now=slot - dt.timedelta(days=1),
                             catch_up=dt.timedelta(days=366), job="fault-batch",
                             users=self.active_users())

    def batch_runs(self, schedule_ids: list[uuid.UUID]) -> list[Any]:
        with self.sessions() as s:
            return list(s.execute(select(
                JobRun.id, JobRun.schedule_id, JobRun.slot_at, JobRun.status, JobRun.reason,
                JobRun.attempts, JobRun.delegation_id,
            ).where(JobRun.schedule_id.in_(schedule_ids))).all())

    def wait_for_batch(self, schedule_ids: list[uuid.UUID], timeout: float = 100) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                rows = self.batch_runs(schedule_ids)
            except Exception:  # the private database is being restarted by the test
                rows = []
            if len(rows) >= len(schedule_ids) and all(r.status in TERMINAL for r in rows):
                return rows
            if time.monotonic() > deadline:
                return rows
            time.sleep(0.3)

    def wait_for_calls(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.provider.api_calls()) < count:
            assert time.monotonic() < deadline, self.procs.logs()[-3000:]
            time.sleep(0.05)


def _free_of_behalf_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}


@pytest.fixture(scope="module")
def bed(private_postgres: PrivatePostgres, private_redis: PrivateRedis, faulty_kms: FaultyKms,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    from tests.support.oidc_provider import OidcProviderUnavailable

    try:
        provider = OidcProvider.start(OidcProviderSettings(access_token_ttl=ACCESS_TOKEN_TTL))
    except OidcProviderUnavailable as exc:
        unavailable(str(exc))
    smtp = SmtpServer()
    smtp.start()
    database = private_postgres.create_database("behalf_faults")
    engine = make_engine(database)
    migrations.upgrade(engine)
    sessions = make_session_factory(engine)
    kms_client = faulty_kms.client()
    key_arn = kms_client.create_key(Description="behalf fault tests")["KeyMetadata"]["Arn"]
    vault = Vault(AwsKms(kms_client, key_arn),
                  DataKeyCache(max_entries=100, max_age=300, monotonic=time.monotonic))
    world = make_world(sessions, vault, private_redis.url(0), provider)
    credentials, endpoints = register_agent(world, provider)
    users = {}
    for i in range(USERS):
        subject = f"night{i}"
        user_id, delegation_id, _ = connect_user(world, provider, credentials, endpoints,
                                                 subject)
        users[subject] = (user_id, delegation_id)
    with sessions.begin() as s:
        s.execute(update(User).values(email=User.subject + "@example.test"))
    log_dir = tmp_path_factory.mktemp("fault-processes")
    procs = Processes({
        "BEHALF_DATABASE_URL": database,
        "BEHALF_REDIS_URL": private_redis.url(0),
        "BEHALF_BROKER_URL": private_redis.url(1),
        "BEHALF_KMS_KEY_ID": key_arn,
        "BEHALF_KMS_ENDPOINT_URL": faulty_kms.url,
        # a short data-key cache, so the workers really ask KMS during a batch
        "BEHALF_DATA_KEY_CACHE_SECONDS": "2",
        "BEHALF_JOBS_MODULES": "tests.support.fault_jobs",
        "BEHALF_RUN_LEASE_SECONDS": "3",
        "BEHALF_REDISPATCH_AFTER_SECONDS": "5",  # a lost wake-up is re-sent quickly
        "BEHALF_SMTP_URL": smtp.url,
        "BEHALF_SECRET_KEY": "fault-tests-" + uuid.uuid4().hex,
        "BEHALF_LOG_LEVEL": "WARNING",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "FAULT_JOB_STEPS": str(STEPS),
    }, log_dir)
    bed = Bed(private_postgres, private_redis, faulty_kms, provider, smtp, sessions, world,
              procs, users)
    try:
        bed.start_worker()
        bed.start_worker()
        bed.start_scheduler()
        yield bed
    finally:
        procs.stop_all()
        world.redis.close()
        engine.dispose()
        smtp.stop()
        provider.stop()


# --- checking a batch --------------------------------------------------------------------------


def _query(call: dict[str, Any]) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(call.get("query") or "").items()}


def check_batch(bed: Bed, kind: str, schedule_ids: list[uuid.UUID], rows: list[Any],
                report: FaultReport, *, faults_injected: int,
                broken_allowed: int = 0) -> Figures:
    figures = Figures(faults_injected=faults_injected, runs=len(rows))
    # every slot has exactly one run, in an explicit state
    slots = Counter((r.schedule_id, r.slot_at) for r in rows)
    duplicate_slots = sum(n - 1 for n in slots.values())
    without_run = len(set(schedule_ids) - {r.schedule_id for r in rows})
    unfinished = [r for r in rows if r.status not in TERMINAL]
    unexplained = [r for r in rows if r.status != "succeeded" and not r.reason]
    figures.runs_lost = without_run + len(unfinished) + len(unexplained)
    figures.outcomes = dict(Counter(r.status if r.status == "succeeded"
                                    else f"{r.status}:{r.reason}" for r in rows))

    # what the API received, run by run and execution by execution
    calls = bed.provider.api_calls()
    by_run: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for call in calls:
        query = _query(call)
        if "run" in query:
            by_run[query["run"]][query.get("exec", "?")].append(call)
    duplicates = 0
    affected = set()
    for run_id, executions in by_run.items():
        completed = [e for e, cs in executions.items()
                     if any(_query(c).get("step") == str(STEPS - 1) and c["status"] == 200
                            for c in cs)]
        duplicates += max(0, len(completed) - 1)
        spans = sorted((min(c["time"] for c in cs),
                        max(c["time"] + (c["duration_ms"] or 0) / 1000 for c in cs))
                       for cs in executions.values())
        duplicates += sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
        figures.retried_executions += len(executions) - 1
        if len(executions) > 1 or any(c["fault"] or c["aborted"] for cs in executions.values()
                                      for c in cs):
            affected.add(run_id)
    for r in rows:
        if r.status == "succeeded" and str(r.id) not in by_run:
            figures.runs_lost += 1  # "succeeded" without the API ever seeing its body
        if r.attempts > 1 or r.status != "succeeded":
            affected.add(str(r.id))
    figures.duplicate_executions = duplicates + duplicate_slots
    figures.runs_affected = len(affected)

    # every call the API received is in the trail (attempted before it left)
    run_ids = [r.id for r in rows]
    with bed.sessions() as s:
        attempted = Counter(str(run_id) for run_id in s.scalars(
            select(AuditEvent.run_id).where(AuditEvent.run_id.in_(run_ids),
                                            AuditEvent.action == "api:call:attempted")))
    received = Counter(run for run, executions in by_run.items()
                       for cs in executions.values() for _ in cs)
    figures.audit_missing = sum(max(0, n - attempted[run]) for run, n in received.items())

    # broken delegations: only after an invalid_grant the AS answered, explained when lost
    delegation_ids = {r.delegation_id for r in rows}
    with bed.sessions() as s:
        broken = s.execute(select(Delegation.id, Delegation.status_reason).where(
            Delegation.id.in_(delegation_ids), Delegation.status == "broken")).all()
        explained_in_trail = set(s.scalars(select(AuditEvent.delegation_id).where(
            AuditEvent.delegation_id.in_([b.id for b in broken]),
            AuditEvent.action.in_(["delegation:token:refresh_unconfirmed",
                                   "delegation:token:refresh_started"]))))
    refused = [r for r in bed.provider.stats()["requests"]
               if r.get("grant_type") == "refresh_token" and r["status"] == 400]
    figures.broken_reasons = dict(Counter(str(reason) for _, reason in broken))
    for delegation_id, reason in broken:
        if reason == "refresh_response_lost" and delegation_id in explained_in_trail:
            figures.broken_explained += 1
        else:
            figures.false_broken += 1
    if len(refused) < len(broken) or len(broken) > broken_allowed:
        figures.false_broken = max(figures.false_broken, len(broken) - broken_allowed, 1)

    # one mail per break, never two (the scheduler's relay sends them)
    expected_mails = bed.mails_seen + len(broken)
    deadline = time.monotonic() + 20
    while len(bed.smtp.messages) < expected_mails and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    per_recipient = Counter(str(m["To"]) for m in bed.smtp.messages)
    figures.duplicate_mails = sum(n - 1 for n in per_recipient.values() if n > 1)
    bed.mails_seen = len(bed.smtp.messages)

    report.kinds[kind] = figures
    return figures


def assert_survived(figures: Figures, bed: Bed) -> None:
    logs = bed.procs.logs()[-4000:]
    assert figures.runs_lost == 0, (figures, logs)
    # a fault is retried or explained, never a crash of the runner itself
    assert not [o for o in figures.outcomes if o.endswith(":runner_error")], (figures, logs)
    assert figures.duplicate_executions == 0, figures
    assert figures.false_broken == 0, figures
    assert figures.audit_missing == 0, figures
    assert figures.duplicate_mails == 0, figures


# --- faults ------------------------------------------------------------------------------------


def as_refresh_fault(**fault: Any) -> Callable[[Bed], None]:
    def inject(bed: Bed) -> None:
        bed.provider.set_fault("token", grant_type="refresh_token", **fault)
    return inject


def api_fault(**fault: Any) -> Callable[[Bed], None]:
    def inject(bed: Bed) -> None:
        bed.provider.set_api_fault(path="/v2/reports", **fault)
    return inject


def faulted_requests(bed: Bed) -> int:
    as_faults = sum(1 for r in bed.provider.stats()["requests"] if r.get("fault"))
    return as_faults + sum(1 for c in bed.provider.api_calls() if c.get("fault"))


PROTOCOL_FAULTS = {
    "as_500": as_refresh_fault(status=500, count=4),
    "as_503_retry_after": as_refresh_fault(status=503, retry_after=1, count=4),
    "as_429_retry_after": as_refresh_fault(status=429, retry_after=2, count=4),
    "as_hang": as_refresh_fault(mode="hang", seconds=3, count=3),
    "as_drop": as_refresh_fault(mode="drop", count=4),
    "api_5xx": api_fault(status=502, count=5),
    "api_429": api_fault(status=429, retry_after=1, count=5),
}


@pytest.mark.parametrize("kind", list(PROTOCOL_FAULTS))
def test_authorisation_server_and_api_faults(bed: Bed, fault_report: FaultReport,
                                             kind: str) -> None:
    # Given the AS or the API failing the next few requests
    bed.provider.reset()
    PROTOCOL_FAULTS[kind](bed)
    # When the nightly batch runs
    schedule_ids = bed.queue_batch()
    rows = bed.wait_for_batch(schedule_ids)
    # Then every fault was met, and nothing was lost, doubled, falsely broken or unaudited
    figures = check_batch(bed, kind, schedule_ids, rows, fault_report,
                          faults_injected=faulted_requests(bed))
    assert figures.faults_injected > 0, "the fault never triggered"
    assert_survived(figures, bed)


def test_refresh_rotated_but_response_lost(bed: Bed, fault_report: FaultReport) -> None:
    # Given an AS that rotates the refresh token of the next refresh and loses its answer
    bed.provider.reset()
    bed.provider.set_fault("token", mode="lose_response", count=1, grant_type="refresh_token")
    schedule_ids = bed.queue_batch()
    rows = bed.wait_for_batch(schedule_ids)
    # Then that delegation broke on the AS's invalid_grant, explained as a lost response;
    # its run is parked, every other run ran
    figures = check_batch(bed, "as_lose_response", schedule_ids, rows, fault_report,
                          faults_injected=faulted_requests(bed), broken_allowed=1)
    assert figures.broken_explained == 1, figures
    assert figures.outcomes.get("parked:delegation_broken") == 1, figures
    assert_survived(figures, bed)


def test_redis_restarted_mid_batch(bed: Bed, fault_report: FaultReport) -> None:
    bed.provider.reset()
    schedule_ids = bed.queue_batch()
    bed.wait_for_calls(2)
    bed.redis.restart(down_for=1.0)  # locks, budgets, broker queue and pub/sub all go away
    rows = bed.wait_for_batch(schedule_ids)
    figures = check_batch(bed, "redis_restart", schedule_ids, rows, fault_report,
                          faults_injected=1)
    assert_survived(figures, bed)


def test_postgresql_restarted_mid_batch(bed: Bed, fault_report: FaultReport) -> None:
    bed.provider.reset()
    schedule_ids = bed.queue_batch()
    bed.wait_for_calls(2)
    bed.pg.restart(down_for=1.5)  # every connection cut, the server gone for a moment
    rows = bed.wait_for_batch(schedule_ids)
    figures = check_batch(bed, "postgresql_restart", schedule_ids, rows, fault_report,
                          faults_injected=1)
    assert_survived(figures, bed)


def test_kms_failing_for_a_while(bed: Bed, fault_report: FaultReport) -> None:
    bed.provider.reset()
    failures_before = bed.kms.failures
    time.sleep(2.5)  # the workers' cached data keys age out
    bed.kms.fail_for(4.0)
    schedule_ids = bed.queue_batch()
    rows = bed.wait_for_batch(schedule_ids)
    figures = check_batch(bed, "kms_failing", schedule_ids, rows, fault_report,
                          faults_injected=bed.kms.failures - failures_before)
    assert figures.faults_injected > 0
    assert_survived(figures, bed)


def _sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def test_worker_sigkilled_mid_run_repeatedly(bed: Bed, fault_report: FaultReport) -> None:
    bed.provider.reset()
    schedule_ids = bed.queue_batch()
    kills = 0
    killed: set[uuid.UUID] = set()
    # When, three times, a job process is SIGKILLed while a run it holds is half-way (a
    # different run each time, so no run loses all its attempts)
    deadline = time.monotonic() + 40
    while kills < 3 and time.monotonic() < deadline:
        started = Counter(_query(c).get("run") for c in bed.provider.api_calls())
        for run_id, owner in bed.running_runs(schedule_ids):
            if run_id not in killed and 0 < started[str(run_id)] < STEPS:
                killed.add(run_id)
                kills += _sigkill(int(owner.rsplit(":", 1)[1]))
                break
        time.sleep(0.05)
    rows = bed.wait_for_batch(schedule_ids)
    figures = check_batch(bed, "worker_sigkill_mid_run", schedule_ids, rows, fault_report,
                          faults_injected=kills)
    assert kills >= 2
    assert_survived(figures, bed)


def test_worker_sigkilled_mid_refresh(bed: Bed, fault_report: FaultReport) -> None:
    # Given refreshes that the AS holds for 3 s and then carries out (rotating the token)
    bed.provider.reset()
    bed.provider.set_fault("token", mode="hang", seconds=3, then="process", count=2,
                           grant_type="refresh_token")
    schedule_ids = bed.queue_batch()
    # When the job processes are SIGKILLed while those refreshes are in flight
    deadline = time.monotonic() + 30
    while not any(r.get("fault") == "hang" for r in bed.provider.stats()["requests"]):
        assert time.monotonic() < deadline, bed.procs.logs()[-3000:]
        time.sleep(0.05)
    time.sleep(0.3)
    kills = sum(_sigkill(int(owner.rsplit(":", 1)[1]))
                for _, owner in bed.running_runs(schedule_ids))
    rows = bed.wait_for_batch(schedule_ids)
    # Then a delegation whose rotated token died with its worker is broken only by the AS's
    # invalid_grant, and the trail explains it (refresh_response_lost)
    figures = check_batch(bed, "worker_sigkill_mid_refresh", schedule_ids, rows,
                          fault_report, faults_injected=kills, broken_allowed=2)
    assert kills >= 1
    assert_survived(figures, bed)


def _waiting_on_outbox(bed: Bed, engine: Any) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%INSERT INTO outbox%'")).scalars())


def test_scheduler_sigkilled_mid_tick(bed: Bed, fault_report: FaultReport) -> None:
    bed.provider.reset()
    engine = bed.sessions.kw["bind"]
    # Given the scheduler's tick held inside its transaction (its outbox insert waits on a lock)
    blocker = engine.connect()
    blocker.execute(text("LOCK TABLE outbox IN SHARE MODE"))
    try:
        schedule_ids = bed.queue_batch()
        deadline = time.monotonic() + 30
        while not _waiting_on_outbox(bed, engine):
            assert time.monotonic() < deadline, bed.procs.logs()[-3000:]
            time.sleep(0.05)
        # When it is SIGKILLed there
        os.killpg(bed.scheduler.pid, signal.SIGKILL)
        bed.scheduler.wait(timeout=10)
    finally:
        blocker.rollback()
        blocker.close()
    # And another one starts
    bed.start_scheduler()
    rows = bed.wait_for_batch(schedule_ids)
    figures = check_batch(bed, "scheduler_sigkill_mid_tick", schedule_ids, rows,
                          fault_report, faults_injected=1)
    assert_survived(figures, bed)


def test_the_fleet_is_still_healthy(bed: Bed) -> None:
    """After every fault: the processes still run, nothing is left running or queued."""
    assert all(w.poll() is None for w in bed.workers), bed.procs.logs()[-3000:]
    assert bed.scheduler.poll() is None
    with bed.sessions() as s:
        left = s.scalar(select(func.count()).select_from(JobRun).where(
            JobRun.status.in_(["queued", "running"])))
    assert left == 0
    client = redis_lib.Redis.from_url(bed.redis.url(0))
    try:
        assert not client.keys("behalf:refresh:*")  # no refresh lease left behind
    finally:
        client.close()
