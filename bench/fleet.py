"""End to end and worker memory: a nightly batch on real worker processes.

Two `behalf worker` processes x prefork concurrency 4 (real PostgreSQL, Redis broker and
revocation listener, local key file) run N runs of `bench-three-calls` (3 `ctx.http` calls
each) against a fast local API; then two bare Celery workers with the same pool run N bare
tasks doing the same 3 calls with a static token (`bench.celery_baseline.three_calls`).
Both arms: the workers are started and warmed (one run per process), the run rows exist
beforehand (the scheduler's part is measured by bench/scheduler.py), and the clock runs from
the first message published until every run is done. While the batch runs, the RSS of every
pool process is sampled as the count of finished runs passes each sample point (1,000 and
5,000 by default): the memory figure comes from the same batch.

    .venv/bin/python bench/fleet.py [--runs 10000] [--delegations 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import redis
from celery import Celery
from sqlalchemy import func, select

from bench.common import (
    ROOT,
    FastApi,
    drop_database,
    make_delegations,
    scratch_database,
    start_worker,
)
from bench.report import Figure, number, spread
from delegation.clock import SystemClock
from delegation.kms import LocalKeyFile
from delegation.runs import queue_run
from delegation.vault import Vault
from models import JobRun
from models.session import make_engine, make_session_factory
from worker.celery_app import RUN_JOB, create_celery

DATABASE = "bench_fleet"
REDIS_URL = "redis://127.0.0.1:6379/4"
BROKER_URL = "redis://127.0.0.1:6379/5"
WORKERS = 2
CONCURRENCY = 4
MIB = 1024 * 1024
ISSUE_BATCH = 10_000


def pool_rss(workers: Sequence[subprocess.Popen[bytes]]) -> dict[str, list[float]]:
    """RSS in MiB of each worker's pool processes and of the worker (parent) processes."""
    children, parents = [], []
    for worker in workers:
        parent = psutil.Process(worker.pid)
        parents.append(parent.memory_info().rss / MIB)
        children += [child.memory_info().rss / MIB for child in parent.children()]
    return {"pool": children, "parents": parents}


def wait_for(done: Callable[[], int], target: int, timeout: float,
             samples: dict[int, Callable[[], Any]] | None = None) -> dict[int, Any]:
    """Poll `done()` until it reaches `target`; call each sampler as its threshold passes."""
    pending = dict(sorted((samples or {}).items()))
    taken: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        count = done()
        for threshold in [t for t in pending if count >= t]:
            taken[threshold] = {"at": count, **pending.pop(threshold)()}
        if count >= target:
            return taken
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count} of {target} runs done after {timeout:.0f} s")
        time.sleep(0.05)


def stop(workers: Sequence[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)  # its own session: the pool goes with it
            worker.wait(10)


def behalf_arm(url: str, key_file: Path, api: FastApi, runs: int, delegations: int,
               sample_at: Sequence[int], workdir: Path) -> dict[str, Any]:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    clock = SystemClock()
    started = time.perf_counter()
    made = make_delegations(sessions, Vault(LocalKeyFile(key_file, warn=False)), api.url,
                            delegations)
    warm_users = made[:WORKERS * CONCURRENCY]
    with sessions.begin() as s:
        warm_ids = [queue_run(s, job="bench-three-calls", user_id=u, agent_id=a,
                              now=clock.now()).id for u, _, a in warm_users]
    run_ids: list[uuid.UUID] = []
    for start in range(0, runs, 1000):
        with sessions.begin() as s:
            run_ids += [queue_run(s, job="bench-three-calls", user_id=made[i % delegations][0],
                                  agent_id=made[i % delegations][2], now=clock.now()).id
                        for i in range(start, min(runs, start + 1000))]
    setup_seconds = time.perf_counter() - started
    env = {"BEHALF_DATABASE_URL": url, "BEHALF_REDIS_URL": REDIS_URL,
           "BEHALF_BROKER_URL": BROKER_URL, "BEHALF_LOCAL_KEY_FILE": str(key_file),
           "BEHALF_JOBS_MODULES": "bench.jobs", "BEHALF_LOG_LEVEL": "WARNING"}
    workers = [start_worker(env, CONCURRENCY, workdir / f"behalf-{i}.log")
               for i in range(WORKERS)]
    publisher = create_celery(BROKER_URL)

    def succeeded() -> int:
        with sessions() as s:
            return int(s.scalar(select(func.count()).select_from(JobRun)
                                .where(JobRun.status == "succeeded")) or 0)

    try:
        for run_id in warm_ids:
            publisher.send_task(RUN_JOB, args=[str(run_id)])
        wait_for(succeeded, len(warm_ids), 120)
        warm = pool_rss(workers)
        t0 = time.perf_counter()
        for run_id in run_ids:
            publisher.send_task(RUN_JOB, args=[str(run_id)])
        published = time.perf_counter() - t0
        target = len(warm_ids) + runs
        samples = wait_for(succeeded, target, 1800,
                           {len(warm_ids) + n: lambda: pool_rss(workers) for n in sample_at})
        elapsed = time.perf_counter() - t0
        final = pool_rss(workers)
        with sessions() as s:
            statuses = dict(s.execute(select(JobRun.status, func.count())
                                      .group_by(JobRun.status)).tuples().all())
    finally:
        stop(workers)
        publisher.close()
        engine.dispose()
    return {"runs": runs, "delegations": delegations, "seconds": elapsed,
            "runs_per_second": runs / elapsed, "publish_seconds": published,
            "setup_seconds": setup_seconds, "statuses": statuses, "rss_warm": warm,
            "rss_samples": {n - len(warm_ids): v for n, v in samples.items()},
            "rss_final": final, "api_requests": api.requests}


def bare_arm(api: FastApi, runs: int, sample_at: Sequence[int], workdir: Path
             ) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
    environ.update({"BENCH_BROKER_URL": BROKER_URL, "BENCH_REDIS_URL": REDIS_URL,
                    "PYTHONPATH": str(ROOT)})
    workers = [subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.celery_baseline", "worker",
         "--concurrency", str(CONCURRENCY), "--pool", "prefork", "--loglevel", "WARNING",
         "-n", f"bare{i}@%h", "--without-heartbeat", "--without-mingle", "--without-gossip"],
        cwd=ROOT, env=environ, stdout=(workdir / f"bare-{i}.log").open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True) for i in range(WORKERS)]
    # a publisher of its own: the baseline module's app may already hold another broker
    publisher = Celery("bench-bare-publisher", broker=BROKER_URL, set_as_current=False)
    publisher.conf.update(task_serializer="json", task_default_queue="bench.baseline")

    def publish() -> None:
        publisher.send_task("bench.three_calls", args=[api.url, token])

    token = "at-static-" + uuid.uuid4().hex
    first = api.requests

    def done() -> int:
        return (api.requests - first) // 3

    try:
        warm_runs = WORKERS * CONCURRENCY
        for _ in range(warm_runs):
            publish()
        wait_for(done, warm_runs, 120)
        warm = pool_rss(workers)
        t0 = time.perf_counter()
        for _ in range(runs):
            publish()
        published = time.perf_counter() - t0
        samples = wait_for(done, warm_runs + runs, 1800,
                           {warm_runs + n: lambda: pool_rss(workers) for n in sample_at})
        elapsed = time.perf_counter() - t0
        final = pool_rss(workers)
    finally:
        stop(workers)
        publisher.close()
    return {"runs": runs, "seconds": elapsed, "runs_per_second": runs / elapsed,
            "publish_seconds": published, "rss_warm": warm,
            "rss_samples": {n - warm_runs: v for n, v in samples.items()}, "rss_final": final}


def run(runs: int = 10_000, delegations: int = 10_000,
        sample_at: Sequence[int] = (1_000, 5_000)) -> dict[str, Any]:
    sample_at = [n for n in sample_at if n <= runs]
    workdir = Path(tempfile.mkdtemp(prefix="behalf-bench-fleet-"))
    url = scratch_database(DATABASE)
    clients = [redis.Redis.from_url(u) for u in (REDIS_URL, BROKER_URL)]
    for client in clients:
        client.flushdb()
    api = FastApi()
    try:
        behalf = behalf_arm(url, workdir / "key", api, runs, delegations, sample_at, workdir)
        for client in clients:
            client.flushdb()
        bare = bare_arm(api, runs, sample_at, workdir)
    finally:
        api.shutdown()
        for client in clients:
            client.flushdb()
        drop_database(DATABASE)
    return {"workers": WORKERS, "concurrency": CONCURRENCY, "sample_at": list(sample_at),
            "behalf": behalf, "bare": bare, "logs": str(workdir)}


def rss_at(arm: dict[str, Any], at: int) -> list[float]:
    """Pool RSS sampled after `at` runs (keys are strings once the result went through JSON)."""
    samples = {int(k): v for k, v in arm["rss_samples"].items()}
    return list(samples[at]["pool"])


def median_pool_rss(arm: dict[str, Any], at: int) -> float:
    return statistics.median(rss_at(arm, at))


def figures(result: dict[str, Any]) -> list[Figure]:
    behalf, bare = result["behalf"], result["bare"]
    shape = f"{result['workers']} workers x concurrency {result['concurrency']}"
    ratio = behalf["runs_per_second"] / bare["runs_per_second"]
    failed = {k: v for k, v in behalf["statuses"].items() if k != "succeeded"}
    out = [Figure(
        bench="fleet",
        name=f"end to end: nightly batch of {behalf['runs']:,} runs (3 API calls each) on "
             f"{shape}, local API",
        unit="runs/s", median=behalf["runs_per_second"], runs=behalf["runs"],
        spread="one batch per arm",
        baseline=f"bare Celery, static token: {number(bare['runs_per_second'], 'runs/s')}",
        ratio=ratio, target="≥ 0.7 x bare", met=ratio >= 0.7 and not failed,
        note=(f"{behalf['delegations']:,} delegations; {behalf['seconds']:.0f} s vs "
              f"{bare['seconds']:.0f} s"
              + (f"; not succeeded: {failed}" if failed else "")
              + (f"; SHRUNK: the issue's batch is {ISSUE_BATCH:,} runs"
                 if behalf["runs"] < ISSUE_BATCH else "")))]
    points = sorted(int(n) for n in behalf["rss_samples"])
    if points:
        first, last = points[0], points[-1]
        mine, theirs = median_pool_rss(behalf, first), median_pool_rss(bare, first)
        end = median_pool_rss(behalf, last)
        growth = (end - mine) / mine
        per_process = rss_at(behalf, first)
        out.append(Figure(
            bench="fleet",
            name=f"worker memory: RSS per pool process after {first:,} runs ({shape})",
            unit="MiB", median=mine, p99=max(per_process), runs=len(per_process),
            spread=spread(per_process, "MiB"),
            baseline=f"bare Celery worker, same pool: {number(theirs, 'MiB')}",
            ratio=mine / theirs,
            target="≤ 1.5 x bare, no growth (≤ 5 %) to the last sample",
            met=mine / theirs <= 1.5 and growth <= 0.05,
            note=(f"after {last:,} runs {number(end, 'MiB')} ({growth:+.1%}); bare "
                  f"{number(median_pool_rss(bare, last), 'MiB')}; worker parents "
                  f"{number(statistics.median(behalf['rss_final']['parents']), 'MiB')} vs "
                  f"{number(statistics.median(bare['rss_final']['parents']), 'MiB')}")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--delegations", type=int, default=10_000)
    parser.add_argument("--sample-at", type=int, nargs="*", default=[1_000, 5_000])
    args = parser.parse_args()
    result = run(args.runs, args.delegations, args.sample_at)
    for figure in figures(result):
        print(f"{figure.name}: {number(figure.median, figure.unit)}; baseline "
              f"{figure.baseline}; ratio {figure.ratio or 0:.2f}; target {figure.target}: "
              f"{'met' if figure.met else 'NOT met'}; {figure.note}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
