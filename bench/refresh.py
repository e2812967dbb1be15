"""Refresh cost and single-flight, against a fast local token endpoint (a process of its own).

(a) Throughput, one thread, rounds interleaved: `TokenSource.current()` on delegations whose
    tokens are due, i.e. the whole path (Redis lease, vault open/seal under the data-key
    cache with moto's KMS behind it, the AS round trip with client authentication, the
    PostgreSQL compare-and-set commit with its audit event), against bare `httpx` POSTs of
    the same refresh grant to the same endpoint. The endpoint rotates refresh tokens and
    refuses a spent one, and issues tokens with `expires_in: 0` during (a), so each call
    refreshes again.
(b) Single-flight: 50 threads, each with its own `TokenSource` (no shared in-memory cache,
    like 50 worker processes), call `current()` on one expired delegation at once; the
    endpoint counts the refresh requests that reach it. Repeated on fresh delegations.

    .venv/bin/python bench/refresh.py [--delegations 100] [--rounds 5] [--herds 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import httpx
import redis
from moto import mock_aws

from bench.common import (
    TOKEN_CLIENT,
    FastApi,
    TokenEndpoint,
    drop_database,
    make_delegations,
    scratch_database,
    summary,
)
from bench.report import Figure, number, ratio, spread
from delegation.clock import SystemClock
from delegation.kms import AwsKms
from delegation.oauth import OAuthClient
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from delegation.vault import DataKeyCache, Vault
from models.session import make_engine, make_session_factory

DATABASE = "bench_refresh"
REDIS_URL = "redis://127.0.0.1:6379/4"
HERD = 50


def token_source(sessions: Any, vault: Vault, redis_client: Any, http: httpx.Client
                 ) -> TokenSource:
    """A token source wired as `behalf.runtime.token_source` wires it (minus the rate gate)."""
    clock = SystemClock()
    return TokenSource(store=DelegationStore(sessions, vault, clock),
                       agents=AgentDirectory(sessions, vault),
                       oauth=OAuthClient(http, clock), redis=redis_client,
                       clock=clock, rng=random.Random(0))


def bare_round(client: httpx.Client, endpoint: TokenEndpoint, tokens: list[str]
               ) -> list[float]:
    """One refresh grant per slot, rotating each slot's token as the answer says."""
    timings = []
    for i, token in enumerate(tokens):
        started = time.perf_counter()
        response = client.post(endpoint.token_url,
                               data={"grant_type": "refresh_token", "refresh_token": token},
                               auth=(TOKEN_CLIENT.client_id, TOKEN_CLIENT.secret or ""))
        response.raise_for_status()
        tokens[i] = response.json()["refresh_token"]
        timings.append(time.perf_counter() - started)
    return timings


def whole_path_round(source: TokenSource, delegations: list[uuid.UUID]) -> list[float]:
    timings = []
    for delegation_id in delegations:
        started = time.perf_counter()
        source.current(delegation_id)
        timings.append(time.perf_counter() - started)
    return timings


def throughput(sessions: Any, vault: Vault, redis_client: Any, endpoint: TokenEndpoint,
               delegations: list[uuid.UUID], rounds: int) -> dict[str, Any]:
    source = token_source(sessions, vault, redis_client, httpx.Client(timeout=10))
    endpoint.issue_lifetime(0)
    bare_tokens = [f"rt-bare-{uuid.uuid4().hex}" for _ in delegations]
    before = endpoint.stats()
    bare_rates, whole_rates, bare_times, whole_times = [], [], [], []
    with httpx.Client(timeout=10) as client:
        for round_ in range(rounds + 1):  # round 0 warms connections, caches and plans
            got_bare = bare_round(client, endpoint, bare_tokens)
            got_whole = whole_path_round(source, delegations)
            if round_:
                bare_rates.append(len(got_bare) / sum(got_bare))
                whole_rates.append(len(got_whole) / sum(got_whole))
                bare_times += got_bare
                whole_times += got_whole
    after = endpoint.stats()
    endpoint.issue_lifetime(3600)
    expected = 2 * len(delegations) * (rounds + 1)
    assert after["refresh"] - before["refresh"] == expected, (before, after, expected)
    assert after["reused"] == before["reused"], "a refresh token was spent twice"
    return {
        "delegations": len(delegations), "rounds": rounds,
        "bare_per_second": bare_rates, "whole_per_second": whole_rates,
        "bare_seconds": summary(bare_times), "whole_seconds": summary(whole_times),
        "whole_path_refreshes": source.refreshes, "kms_calls": dict(vault.kms_calls),
    }


def herd(sessions: Any, vault: Vault, endpoint: TokenEndpoint,
         delegations: list[uuid.UUID]) -> dict[str, Any]:
    """Per delegation: HERD threads at once, each its own token source and Redis client."""
    requests_per_herd, distinct_tokens, errors, waits = [], [], [], []
    for delegation_id in delegations:
        clients = [(redis.Redis.from_url(REDIS_URL), httpx.Client(timeout=10))
                   for _ in range(HERD)]
        sources = [token_source(sessions, vault, r, h) for r, h in clients]
        barrier = threading.Barrier(HERD)
        seen: list[str] = []
        failed: list[str] = []
        elapsed: list[float] = []

        def task(source: TokenSource, delegation_id: uuid.UUID = delegation_id,
                 seen: list[str] = seen, failed: list[str] = failed,
                 elapsed: list[float] = elapsed, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            started = time.perf_counter()
            try:
                seen.append(source.current(delegation_id).value)
            except Exception as exc:  # counted and reported, never hidden
                failed.append(type(exc).__name__)
            elapsed.append(time.perf_counter() - started)

        before = endpoint.stats()
        threads = [threading.Thread(target=task, args=(s,)) for s in sources]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for redis_client, http in clients:
            redis_client.close()
            http.close()
        after = endpoint.stats()
        requests_per_herd.append(after["refresh"] - before["refresh"]
                                 + after["reused"] - before["reused"])
        distinct_tokens.append(len(set(seen)))
        errors += failed
        waits.append(max(elapsed))
    return {"tasks_per_herd": HERD, "herds": len(delegations),
            "refresh_requests_per_herd": requests_per_herd,
            "distinct_tokens_per_herd": distinct_tokens, "errors": errors,
            "slowest_task_seconds": summary(waits)}


def run(delegations: int = 100, rounds: int = 5, herds: int = 20) -> dict[str, Any]:
    url = scratch_database(DATABASE)
    redis_client = redis.Redis.from_url(REDIS_URL)
    redis_client.flushdb()
    endpoint = TokenEndpoint()
    engine = make_engine(url, pool_size=10, max_overflow=10)
    try:
        with mock_aws():
            kms_client = boto3.client("kms", region_name="us-east-1", aws_access_key_id="x",
                                      aws_secret_access_key="x")
            kms = AwsKms(kms_client, kms_client.create_key()["KeyMetadata"]["Arn"])
            vault = Vault(kms, DataKeyCache(max_entries=10_000, max_age=300,
                                            monotonic=time.monotonic))
            sessions = make_session_factory(engine)
            api = FastApi()
            made = make_delegations(sessions, vault, api.url, delegations + herds, ttl=-60,
                                    metadata=endpoint.metadata, credentials=TOKEN_CLIENT)
            api.shutdown()
            ids = [d for _, d, _ in made]
            result = {"throughput": throughput(sessions, vault, redis_client, endpoint,
                                               ids[:delegations], rounds),
                      "single_flight": herd(sessions, vault, endpoint, ids[delegations:])}
    finally:
        endpoint.close()
        engine.dispose()
        redis_client.flushdb()
        drop_database(DATABASE)
    return result


def figures(result: dict[str, Any]) -> list[Figure]:
    out = []
    tp = result.get("throughput")
    if tp:
        whole = statistics.median(tp["whole_per_second"])
        bare = statistics.median(tp["bare_per_second"])
        r = ratio(whole, bare)
        out.append(Figure(
            bench="refresh", name="refresh through the whole path (lease, KMS, AS, commit)",
            unit="refreshes/s", median=whole, p99=None,
            runs=tp["rounds"] * tp["delegations"], spread=spread(tp["whole_per_second"], "/s"),
            baseline=f"bare httpx POST: {number(bare, '/s')}", ratio=r, target="≥ 0.7 x bare",
            met=None if r is None else r >= 0.7,
            note=(f"per refresh median {number(tp['whole_seconds']['median'] * 1e3, 'ms')}, "
                  f"p99 {number(tp['whole_seconds']['p99'] * 1e3, 'ms')}; bare median "
                  f"{number(tp['bare_seconds']['median'] * 1e3, 'ms')}")))
    sf = result.get("single_flight")
    if sf:
        counts = sf["refresh_requests_per_herd"]
        exact = all(c == 1 for c in counts) and all(
            t == 1 for t in sf["distinct_tokens_per_herd"]) and not sf["errors"]
        out.append(Figure(
            bench="refresh", name=f"{sf['tasks_per_herd']} concurrent tasks on one expired "
                                  "delegation: refresh requests at the AS",
            unit="", median=statistics.median(counts), p99=float(max(counts)),
            runs=sf["herds"], spread=f"{min(counts)}-{max(counts)}", target="exactly 1",
            met=exact,
            note=(f"{len(sf['errors'])} task errors; slowest task median "
                  f"{number(sf['slowest_task_seconds']['median'] * 1e3, 'ms')}")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delegations", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--herds", type=int, default=20)
    args = parser.parse_args()
    result = run(args.delegations, args.rounds, args.herds)
    for figure in figures(result):
        print(f"{figure.name}: {number(figure.median, figure.unit)} "
              f"(baseline {figure.baseline}; ratio "
              f"{'—' if figure.ratio is None else f'{figure.ratio:.2f}'}; target "
              f"{figure.target}) {figure.note}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
