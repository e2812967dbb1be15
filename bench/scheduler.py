"""How fast schedulers claim due schedules and hand their runs to the broker.

A scratch PostgreSQL database (`behalf_bench`, dropped at the end) holds 1,000,000 schedules,
of which 10,000 are due; the broker is the real Redis (database 14, purged before and after).
Measured in one run:

1. the bare publish rate: `apply_async` of `worker.run_job` for 10,000 run ids;
2. one scheduler (`behalf.scheduling.SchedulerLoop.run_once`: claim batches with
   SKIP LOCKED, run rows + outbox in one transaction, relay the outbox to the broker) until all
   10,000 runs are published;
3. the same with two scheduler processes started together;

then prints the EXPLAIN (ANALYZE, BUFFERS) plan of the claim query.

    .venv/bin/python bench/scheduler.py [--schedules 1000000] [--due 10000] [--batch 500]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# This file is bench/scheduler.py: run as a script, its folder comes first on sys.path and
# would shadow the `scheduler` package. The repository root goes first instead.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from behalf.deps import Deps
from behalf.relay import relay_pending
from behalf.scheduling import LoopConfig, SchedulerLoop
from behalf.settings import Settings
from bench.report import Figure, number
from delegation.clock import FrozenClock
from models import migrate
from models.session import make_engine
from scheduler.tick import claim_query
from worker.celery_app import QUEUE, RUN_JOB, create_celery

ADMIN_URL = os.environ.get("BEHALF_BENCH_PG_ADMIN_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "behalf_bench"
BROKER_URL = "redis://127.0.0.1:6379/14"
# A moment just after a nightly 02:00 Europe/Paris slot (01:00 UTC in winter).
SLOT = dt.datetime(2026, 12, 1, 1, 0, tzinfo=dt.UTC)
NOW = SLOT + dt.timedelta(minutes=5)


def database_url() -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + DATABASE


def admin(sql: str) -> None:
    engine = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def populate(schedules: int, due: int) -> None:
    """Users, one agent, delegations for the due users, and the schedules, all in SQL."""
    engine = make_engine(database_url())
    migrate.upgrade(engine)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO providers (id, name, issuer, discovered, api_base, created_at)
            VALUES ('00000000-0000-0000-0000-000000000001', 'bench', 'https://as.bench',
                    '{}', 'https://api.bench', now());
            INSERT INTO agents (id, name, environment, provider_id, client_id, auth_method,
                                scopes, required_scopes, status, created_at, updated_at)
            VALUES ('00000000-0000-0000-0000-000000000002', 'reporter', 'bench',
                    '00000000-0000-0000-0000-000000000001', 'client-bench', 'none',
                    '[]', '[]', 'active', now(), now());
        """))
        conn.execute(text("""
            INSERT INTO users (id, issuer, subject, created_at)
            SELECT md5('user' || i)::uuid, 'https://as.bench', 'user-' || i, now()
            FROM generate_series(1, :n) AS i
        """), {"n": schedules})
        conn.execute(text("""
            INSERT INTO delegations (id, user_id, agent_id, requested_scopes, granted_scopes,
                                     status, version, granted_at, created_at, updated_at)
            SELECT md5('delegation' || i)::uuid, md5('user' || i)::uuid,
                   '00000000-0000-0000-0000-000000000002', '[]', '[]', 'active', 1, now(),
                   now(), now()
            FROM generate_series(1, :due) AS i
        """), {"due": due})
        # Due: the first `due` schedules, slot SLOT (spread offsets inside the last 5 min).
        # Not due: the rest, next runs spread over the coming day.
        conn.execute(text("""
            INSERT INTO schedules (id, user_id, agent_id, job, cron, timezone, spread_seconds,
                                   catch_up_seconds, overlap, requeue_all, paused,
                                   next_slot_at, next_run_at, last_slot_at, created_at,
                                   updated_at)
            SELECT md5('schedule' || i)::uuid, md5('user' || i)::uuid,
                   '00000000-0000-0000-0000-000000000002', 'nightly', '0 2 * * *',
                   'Europe/Paris', 0, 3600, 'skip', false, false,
                   CASE WHEN i <= :due THEN :slot ELSE :slot + interval '1 day' END,
                   CASE WHEN i <= :due THEN :slot - (i % 300) * interval '1 second'
                        ELSE :slot + interval '1 day' + (i % 7200) * interval '1 second'
                   END,
                   NULL, now(), now()
            FROM generate_series(1, :n) AS i
        """), {"n": schedules, "due": due, "slot": SLOT})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    print(f"populated {schedules:,} schedules ({due:,} due) in "
          f"{time.perf_counter() - started:.1f}s")


def reset() -> None:
    engine = make_engine(database_url())
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE job_runs, outbox, audit_events, audit_heads"))
        conn.execute(text("""
            UPDATE schedules
            SET next_slot_at = :slot, last_slot_at = NULL,
                next_run_at = :slot - (abs(hashtext(id::text)) % 300) * interval '1 second'
            WHERE user_id IN (SELECT user_id FROM delegations)
        """), {"slot": SLOT})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE schedules, job_runs, outbox"))
    engine.dispose()


def purge_broker() -> int:
    client = redis.Redis.from_url(BROKER_URL)
    n = int(client.llen(QUEUE))
    client.delete(QUEUE)
    client.close()
    return n


def bare_publish(n: int) -> float:
    app = create_celery(BROKER_URL)
    ids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(n)]
    app.send_task(RUN_JOB, args=[ids[0]], queue=QUEUE)  # connect before timing
    started = time.perf_counter()
    for run_id in ids:
        app.send_task(RUN_JOB, args=[run_id], queue=QUEUE)
    elapsed = time.perf_counter() - started
    assert purge_broker() == n + 1
    return n / elapsed


def scheduler_deps(key_dir: str) -> Deps:
    settings = replace(Settings(), database_url=database_url(), broker_url=BROKER_URL,
                       redis_url=BROKER_URL, local_key_file=Path(key_dir) / "key",
                       log_level="WARNING")
    return Deps.from_settings(settings, clock=FrozenClock(NOW))


def one_scheduler(batch: int, key_dir: str, start: Any = None, result: Any = None) -> float:
    deps = scheduler_deps(key_dir)
    loop = SchedulerLoop(deps, LoopConfig(batch=batch, sweep=False))
    relay_pending(deps)  # warm: a database connection and the Celery app (nothing pending)
    if start is not None:
        start.wait()
    started = time.perf_counter()
    claimed = 0
    while True:
        cycle = loop.run_once()
        claimed += cycle.claimed
        if cycle.claimed == 0 and cycle.relayed == 0:
            break
    elapsed = time.perf_counter() - started
    deps.close()
    if result is not None:
        result.put((claimed, elapsed))
    return elapsed


def counts() -> tuple[int, int, int]:
    engine = make_engine(database_url())
    with engine.connect() as conn:
        runs = conn.scalar(text("SELECT count(*) FROM job_runs"))
        distinct = conn.scalar(text("SELECT count(DISTINCT (schedule_id, slot_at)) FROM job_runs"))
        unsent = conn.scalar(text("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
    engine.dispose()
    return int(runs or 0), int(distinct or 0), int(unsent or 0)


def explain(batch: int) -> str:
    engine = make_engine(database_url())
    statement = claim_query(NOW, batch).compile(dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
                                                compile_kwargs={"literal_binds": True})
    with engine.begin() as conn:
        rows = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {statement}")).scalars().all()
    engine.dispose()
    return f"{statement}\n\n" + "\n".join(rows)


def run(schedules: int = 1_000_000, due: int = 10_000, batch: int = 500) -> dict[str, Any]:
    """Populate, then time the bare publish, one scheduler and two schedulers; every run once."""
    admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{DATABASE}"')
    purge_broker()
    try:
        populate(schedules, due)
        bare = bare_publish(due)
        with tempfile.TemporaryDirectory() as key_dir:
            reset()
            single = one_scheduler(batch, key_dir)
            runs, distinct, unsent = counts()
            published = purge_broker()
            assert runs == distinct == published == due and unsent == 0, (
                runs, distinct, published, unsent)

            reset()
            context = multiprocessing.get_context("spawn")
            start, results = context.Event(), context.Queue()
            workers = [context.Process(target=one_scheduler,
                                       args=(batch, key_dir, start, results))
                       for _ in range(2)]
            for worker in workers:
                worker.start()
            time.sleep(3)  # both processes are up and warm
            start.set()
            per_process = [results.get(timeout=600) for _ in workers]
            for worker in workers:
                worker.join()
            double = max(elapsed for _, elapsed in per_process)
            runs, distinct, unsent = counts()
            published = purge_broker()
            assert runs == distinct == published == due and unsent == 0, (
                runs, distinct, published, unsent)
        reset()
        plan = explain(batch)
    finally:
        purge_broker()
        client = redis.Redis.from_url(BROKER_URL)
        client.delete(*(client.keys("_kombu.binding*") or [b"_"]))  # kombu's queue metadata
        client.close()
        admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    return {"schedules": schedules, "due": due, "batch": batch,
            "bare_messages_per_second": bare, "one_scheduler_seconds": single,
            "two_schedulers_seconds": double,
            "claimed_per_process": [c for c, _ in per_process],
            "runs": runs, "distinct_slots": distinct, "messages": published,
            "index_scan": "Index Scan using ix_schedules_due" in plan
                          or "Bitmap Index Scan on ix_schedules_due" in plan,
            "plan": plan}


def figures(result: dict[str, Any]) -> list[Figure]:
    due, bare = result["due"], result["bare_messages_per_second"]
    one = due / result["one_scheduler_seconds"]
    two = due / result["two_schedulers_seconds"]
    index = "index scan" if result["index_scan"] else "NO index scan"
    return [Figure(
        bench="scheduler",
        name=f"scheduler: {due:,} due of {result['schedules']:,} schedules claimed and handed "
             "to the broker, one scheduler",
        unit="runs/s", median=one, runs=1, spread="one batch",
        baseline=f"bare apply_async: {number(bare, 'msg/s')}", ratio=one / bare,
        target="≥ 0.5 x bare; index scan", met=one / bare >= 0.5 and result["index_scan"],
        note=f"two schedulers {number(two, 'runs/s')} = {two / bare:.2f} x bare; {index}")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    result = run(args.schedules, args.due, args.batch)
    due, bare = result["due"], result["bare_messages_per_second"]
    single, double = result["one_scheduler_seconds"], result["two_schedulers_seconds"]
    print(f"\n{result['schedules']:,} schedules, {due:,} due, batch {result['batch']}")
    print(f"  bare apply_async:   {bare:8,.0f} messages/s")
    print(f"  one scheduler:      {due / single:8,.0f} runs/s "
          f"({single:.2f}s, {due / single / bare:.0%} of bare)")
    print(f"  two schedulers:     {due / double:8,.0f} runs/s "
          f"({double:.2f}s, {due / double / bare:.0%} of bare; claimed "
          f"{' + '.join(str(c) for c in result['claimed_per_process'])})")
    print("  every run exactly once: "
          f"{result['runs']:,} runs, {result['distinct_slots']:,} distinct slots, "
          f"{result['messages']:,} messages\n")
    print("claim query plan:\n" + result["plan"])

if __name__ == "__main__":
    main()
