"""KMS calls per 1,000 job runs on 100 delegations, with the data-key cache and without.

One worker runtime in this process, wired like `behalf worker --pool threads --concurrency 4`
(one `Runner`, `TokenSource`, `AgentDirectory` and `Vault`, four threads taking runs), runs
`bench-three-calls` (3 `ctx.http` calls to a fast local API) 10 times per delegation,
interleaved. KMS is moto's in-process KMS behind a wrapper that counts every call.

Access tokens come from a fast local token endpoint and live 10 s, so delegations refresh
during the batch (as in the runtime issue's soak test with short tokens): a refresh loads the
tokens and re-seals them under the delegation's data key, which is where an uncached vault
calls KMS again. Both arms run the same batch; the counts they report are of calls made.

    .venv/bin/python bench/kms.py [--delegations 100] [--runs 1000] [--token-lifetime 10]
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import httpx
import redis
from moto import mock_aws
from sqlalchemy import func, select

from bench.common import (
    TOKEN_CLIENT,
    FastApi,
    TokenEndpoint,
    drop_database,
    make_delegations,
    scratch_database,
)
from bench.jobs import three_calls
from bench.report import Figure, number
from delegation.clock import SystemClock
from delegation.kms import AwsKms, Context, DataKey, KeyProvider
from delegation.oauth import OAuthClient
from delegation.runs import queue_run
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from delegation.vault import DataKeyCache, Vault
from models import JobRun
from models.session import make_engine, make_session_factory
from worker.jobs import JobRegistry, JobSpec
from worker.runner import Runner, RunnerConfig

DATABASE = "bench_kms"
REDIS_URL = "redis://127.0.0.1:6379/4"
THREADS = 4


class CountingKms:
    """A `KeyProvider` that counts the calls reaching the real one (what KMS would bill)."""

    def __init__(self, inner: KeyProvider) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    @property
    def key_id(self) -> str:
        return self._inner.key_id

    def generate_data_key(self, context: Context) -> DataKey:
        self.calls["generate_data_key"] += 1
        return self._inner.generate_data_key(context)

    def decrypt(self, wrapped: bytes, key_id: str, context: Context) -> bytes:
        self.calls["decrypt"] += 1
        return self._inner.decrypt(wrapped, key_id, context)

    def rewrap(self, wrapped: bytes, key_id: str, context: Context, new_key_id: str) -> bytes:
        self.calls["rewrap"] += 1
        return self._inner.rewrap(wrapped, key_id, context, new_key_id)


class CountingStore(DelegationStore):
    """Counts token loads (each opens the sealed tokens once: one unwrap when uncached)."""

    loads = 0

    def load(self, delegation_id: Any) -> Any:
        self.loads += 1
        return super().load(delegation_id)


def batch(*, cached: bool, kms: KeyProvider, url: str, delegations: int, runs: int,
          endpoint: TokenEndpoint, api: FastApi) -> dict[str, Any]:
    """One fresh world and one fresh worker runtime; returns what the batch cost in KMS."""
    engine = make_engine(url, pool_size=THREADS + 2)
    sessions = make_session_factory(engine)
    with engine.begin() as conn:  # a clean slate: the previous arm's world goes
        conn.exec_driver_sql("TRUNCATE providers, agents, users, delegations, job_runs, "
                             "outbox, audit_events, audit_heads CASCADE")
    setup_vault = Vault(kms)
    made = make_delegations(sessions, setup_vault, api.url, delegations, ttl=-60,
                            metadata=endpoint.metadata, credentials=TOKEN_CLIENT)
    with sessions.begin() as s:
        run_ids = [queue_run(s, job="bench-three-calls", user_id=made[i % delegations][0],
                             agent_id=made[i % delegations][2], now=SystemClock().now()).id
                   for i in range(runs)]
    counting = CountingKms(kms)
    clock = SystemClock()
    cache = DataKeyCache(max_entries=10_000, max_age=300, monotonic=clock.monotonic) \
        if cached else None
    vault = Vault(counting, cache)
    store = CountingStore(sessions, vault, clock)
    agents = AgentDirectory(sessions, vault, monotonic=clock.monotonic)
    http, redis_client = httpx.Client(timeout=10), redis.Redis.from_url(REDIS_URL)
    tokens = TokenSource(store=store, agents=agents, oauth=OAuthClient(http, clock),
                         redis=redis_client, clock=clock, rng=random.Random(0))
    jobs = JobRegistry()
    jobs.add(JobSpec("bench-three-calls", "bench-agent", frozenset({"reports:read"}),
                     three_calls))
    runner = Runner(sessions=sessions, tokens=tokens, agents=agents, jobs=jobs, clock=clock,
                    config=RunnerConfig(worker_id=f"bench-kms-{cached}"))
    pending: queue.Queue[Any] = queue.Queue()
    for run_id in run_ids:
        pending.put(run_id)
    statuses: Counter[str] = Counter()
    statuses_lock = threading.Lock()

    def take_runs() -> None:
        while True:
            try:
                run_id = pending.get_nowait()
            except queue.Empty:
                return
            status = runner.run(run_id) or "not claimed"
            with statuses_lock:
                statuses[status] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=take_runs) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    elapsed = time.perf_counter() - started
    with sessions() as s:
        succeeded = s.scalar(select(func.count()).select_from(JobRun)
                             .where(JobRun.status == "succeeded"))
    engine.dispose()
    http.close()
    redis_client.close()
    return {"cached": cached, "runs": runs, "delegations": delegations,
            "succeeded": succeeded, "statuses": dict(statuses),
            "kms_calls": dict(counting.calls), "kms_total": sum(counting.calls.values()),
            "token_loads": store.loads, "refreshes": tokens.refreshes,
            "seconds": elapsed}


def run(delegations: int = 100, runs: int = 1000, token_lifetime: int = 10) -> dict[str, Any]:
    url = scratch_database(DATABASE)
    redis_client = redis.Redis.from_url(REDIS_URL)
    redis_client.flushdb()
    endpoint = TokenEndpoint()
    endpoint.issue_lifetime(token_lifetime)
    api = FastApi()
    try:
        with mock_aws():
            client = boto3.client("kms", region_name="us-east-1", aws_access_key_id="x",
                                  aws_secret_access_key="x")
            kms = AwsKms(client, client.create_key()["KeyMetadata"]["Arn"])
            arms = {name: batch(cached=name == "cached", kms=kms, url=url,
                                delegations=delegations, runs=runs, endpoint=endpoint,
                                api=api)
                    for name in ("cached", "uncached")}
    finally:
        api.shutdown()
        endpoint.close()
        redis_client.flushdb()
        drop_database(DATABASE)
    return {"token_lifetime_seconds": token_lifetime, "worker_threads": THREADS, **arms}


def per_thousand(arm: dict[str, Any]) -> float:
    return float(arm["kms_total"]) * 1000 / float(arm["runs"])


def figures(result: dict[str, Any]) -> list[Figure]:
    cached, uncached = result["cached"], result["uncached"]
    value, base = per_thousand(cached), per_thousand(uncached)
    scale = 1000 / cached["runs"]
    return [Figure(
        bench="kms",
        name=f"KMS calls per 1,000 job runs on {cached['delegations']} delegations "
             "(data-key cache), one worker process",
        unit="calls", median=value, runs=cached["runs"], spread="one batch per arm",
        baseline=f"uncached: {number(base)} calls ({uncached['token_loads']:,} token loads, "
                 f"{uncached['refreshes']:,} refreshes)",
        ratio=value / base if base else None,
        target=f"≤ {cached['delegations'] * scale:,.0f}",
        met=value <= cached["delegations"] * scale and cached["succeeded"] == cached["runs"],
        note=(f"{result['token_lifetime_seconds']} s access tokens: {cached['refreshes']:,} "
              f"refreshes, {cached['token_loads']:,} token loads; calls "
              + ", ".join(f"{k} {v}" for k, v in sorted(cached["kms_calls"].items()))
              + "; each worker process keeps its own cache"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delegations", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--token-lifetime", type=int, default=10)
    args = parser.parse_args()
    result = run(args.delegations, args.runs, args.token_lifetime)
    for name in ("cached", "uncached"):
        arm = result[name]
        print(f"{name:9} {arm['kms_total']:5} KMS calls for {arm['runs']} runs "
              f"({per_thousand(arm):.0f} per 1,000; {arm['kms_calls']}), "
              f"{arm['token_loads']} token loads, {arm['refreshes']} refreshes, "
              f"{arm['succeeded']} succeeded in {arm['seconds']:.1f} s")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
