"""The audit trail's costs, on a scratch PostgreSQL database created and dropped here.

(a) Per-call cost: N `ctx.http.get` calls by a job run through the real `Runner` (real
    `DelegatedBearerAuth`, token source and transport) to a fast local API, beside the same
    calls from a bare `httpx.Client` (the baseline of `ctx.http` as a whole), recorded three
    ways: no-op recorder (the baseline of the trail alone), today's runtime recorder
    (`Runner._record_call`: two transactions per call), and the batched `AuditWriter` wiring
    proposed for the runtime (`write_now` for `api:call:attempted`, `write_later` for the
    completion), durable (the default) and with `synchronous_commit=False`. Rounds are
    interleaved; each call is timed inside the job.
(b) `verify` throughput: 1,000,000 events over 10,000 chains with real chained hashes
    (inserted with COPY), one checkpoint over all chains, then `audit_verify.verify` in-process
    and `behalf audit verify` as a command.

    .venv/bin/python bench/audit.py [--calls 400] [--rounds 5] [--events 1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.server
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fakeredis
import httpx
from sqlalchemy import text

from bench.common import ROOT, drop_database, make_delegations, scratch_database, summary
from bench.report import Figure, number, spread
from delegation import audit, audit_verify, checkpoints
from delegation.clock import SystemClock
from delegation.kms import LocalKeyFile
from delegation.oauth import OAuthClient
from delegation.runs import queue_run
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from delegation.vault import DataKeyCache, Vault
from models.session import make_engine, make_session_factory
from worker.http import CallRecord
from worker.jobs import JobRegistry, JobSpec
from worker.runner import Runner, RunnerConfig

DATABASE = "behalf_bench_audit"


class QuickApi(http.server.ThreadingHTTPServer):
    """A local API answering 200 with one write per response and TCP_NODELAY, so a call
    costs what the client and the audit trail cost, not a 40 ms delayed-ACK stall."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # headers and body leave in one segment
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class NoAuditRunner(Runner):
    """The baseline: the same runtime, recording nothing."""

    def _record_call(self, claimed: Any, agent_name: str, client_id: str,
                     call: CallRecord) -> None:
        return None


class BatchedRunner(Runner):
    """The runtime with the proposed `AuditWriter` wiring (docs/audit.md)."""

    synchronous_commit = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit = audit.AuditWriter(self._sessions, self._clock,
                                       synchronous_commit=self.synchronous_commit)

    def _record_call(self, claimed: Any, agent_name: str, client_id: str,
                     call: CallRecord) -> None:
        action = {"attempted": "api:call:attempted", "completed": "api:call",
                  "failed": "api:call:failed", "refused": "api:call:refused"}[call.outcome]
        detail: dict[str, Any] = {"method": call.method, "path": call.path,
                                  "call_id": str(call.call_id)}
        if call.status is not None:
            detail["status"] = call.status
        record = audit.AuditRecord(
            action=action, actor_type="agent", actor=agent_name, user_id=claimed.user_id,
            user_subject=claimed.user_subject, agent_name=agent_name, client_id=client_id,
            delegation_id=claimed.delegation_id, run_id=claimed.run_id,
            request_id=str(call.call_id), detail=detail)
        if call.outcome == "attempted":
            self.audit.write_now(record)
        else:
            self.audit.write_later(record)

    def _execute(self, claimed: Any) -> str:
        try:
            return super()._execute(claimed)
        finally:
            self.audit.flush()


class RelaxedBatchedRunner(BatchedRunner):
    """The same, committing without waiting for the WAL flush (see `AuditWriter`)."""

    synchronous_commit = False


def per_call(url: str, calls: int, rounds: int) -> dict[str, Any]:
    engine = make_engine(url, pool_size=10)
    sessions = make_session_factory(engine)
    clock = SystemClock()
    with tempfile.TemporaryDirectory() as tmp:
        vault = Vault(LocalKeyFile(Path(tmp) / "key", warn=False),
                      DataKeyCache(max_entries=100, max_age=3600, monotonic=time.monotonic))
        api = QuickApi()
        [(user_id, _delegation_id, agent_id)] = make_delegations(sessions, vault, api.url, 1)
        timings: dict[str, list[float]] = {"bare_httpx": [], "none": [], "runtime": [],
                                           "batched": [], "batched_async_commit": []}
        totals: dict[str, list[float]] = {k: [] for k in timings}

        current: list[list[float]] = [[]]  # where the running job puts its call timings

        def job(ctx: Any) -> None:
            out = current[0]
            for _ in range(calls):
                started = time.perf_counter()
                ctx.http.get("/v2/reports").raise_for_status()
                out.append(time.perf_counter() - started)

        jobs = JobRegistry()
        jobs.add(JobSpec("bench-calls", "bench-agent", frozenset({"reports:read"}), job))
        agents = AgentDirectory(sessions, vault)
        tokens = TokenSource(store=DelegationStore(sessions, vault, clock), agents=agents,
                             oauth=OAuthClient(httpx.Client(), clock),
                             redis=fakeredis.FakeRedis(), clock=clock, rng=random.Random(0))
        kinds = {"none": NoAuditRunner, "runtime": Runner, "batched": BatchedRunner,
                 "batched_async_commit": RelaxedBatchedRunner}
        for round_ in range(rounds + 1):  # round 0 warms up
            # the baseline of `ctx.http` itself: a bare client to the same API, one per run
            with httpx.Client(base_url=api.url) as bare_client:
                got_bare = []
                started = time.perf_counter()
                for _ in range(calls):
                    call_started = time.perf_counter()
                    bare_client.get("/v2/reports").raise_for_status()
                    got_bare.append(time.perf_counter() - call_started)
                elapsed = time.perf_counter() - started
            if round_:
                timings["bare_httpx"] += got_bare
                totals["bare_httpx"].append(elapsed / calls)
            for name, kind in kinds.items():
                runner = kind(sessions=sessions, tokens=tokens, agents=agents, jobs=jobs,
                              clock=clock, config=RunnerConfig(worker_id=f"bench-{name}"))
                with sessions.begin() as s:
                    run_id = queue_run(s, job="bench-calls", user_id=user_id,
                                       agent_id=agent_id, now=clock.now()).id
                got: list[float] = []
                current[0] = got
                started = time.perf_counter()
                status = runner.run(run_id)
                elapsed = time.perf_counter() - started
                assert status == "succeeded", status
                if round_:
                    timings[name] += got
                    totals[name].append(elapsed / calls)
        with engine.connect() as conn:
            events = conn.scalar(text("SELECT count(*) FROM audit_events "
                                      "WHERE action LIKE 'api:call%'"))
        api.shutdown()
    engine.dispose()
    base = statistics.median(timings["none"])
    bare = statistics.median(timings["bare_httpx"])
    out: dict[str, Any] = {"calls_per_variant": calls * rounds, "rounds": rounds,
                           "audit_events": events}
    for name in timings:
        med = statistics.median(timings[name])
        mean = statistics.fmean(timings[name])
        out[name] = {"median_ms": round(med * 1000, 3), "mean_ms": round(mean * 1000, 3),
                     "p99_ms": round(summary(timings[name])["p99"] * 1000, 3),
                     "run_per_call_ms": round(statistics.median(totals[name]) * 1000, 3),
                     "round_per_call_ms": [round(t * 1000, 3) for t in totals[name]],
                     "ratio_median": round(med / base, 2),
                     "ratio_to_bare_httpx": round(med / bare, 2),
                     "overhead_median_ms": round((med - base) * 1000, 3)}
    return out


def load_events(url: str, n: int, chains: int) -> float:
    """n chained events over `chains` users, via COPY (text format), heads included."""
    engine = make_engine(url)
    started = time.perf_counter()
    rng = random.Random(0)
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(chains)]
    heads: dict[str, tuple[int, str]] = {str(u): (0, audit.GENESIS) for u in users}
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    sha = hashlib.sha256
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        columns = ("chain, seq, occurred_at, action, user_id, user_subject, agent_name, "
                   "client_id, actor_type, actor, delegation_id, run_id, request_id, detail, "
                   "prev_hash, hash")
        with cursor.copy(f"COPY audit_events ({columns}) FROM STDIN") as copy:
            buffer = io.StringIO()
            for i in range(n):
                user = users[rng.randrange(chains)]
                chain = str(user)
                seq, prev = heads[chain]
                seq += 1
                when = base + dt.timedelta(microseconds=i * 997)
                call = uuid.UUID(int=rng.getrandbits(128), version=4)
                detail = {"method": "GET", "path": "/v2/reports/{id}", "status": 200,
                          "call_id": str(call)}
                action = "api:call:attempted" if i % 2 == 0 else "api:call"
                subject = f"user-{chain[:8]}"
                values: list[Any] = [chain, str(seq), when, action, chain, subject,
                          "reporter", "client-reporter", "agent", "reporter", chain, str(call),
                          str(call), audit.render_json(detail), prev]
                pre = audit.preimage(
                    chain=chain, seq=seq, occurred_at=when, action=action, user_id=user,
                    user_subject=subject, agent_name="reporter", client_id="client-reporter",
                    actor_type="agent", actor="reporter", delegation_id=user, run_id=call,
                    request_id=str(call), detail=detail, prev_hash=prev)
                digest = sha(pre.encode()).hexdigest()
                values[2] = when.isoformat()
                buffer.write("\t".join([*values, digest]).replace("\\", "\\\\") + "\n")
                heads[chain] = (seq, digest)
                if i % 20_000 == 19_999:
                    copy.write(buffer.getvalue())
                    buffer = io.StringIO()
            copy.write(buffer.getvalue())
        with cursor.copy("COPY audit_heads (chain, seq, hash, checkpointed_seq) FROM STDIN") \
                as copy:
            for chain, (seq, digest) in heads.items():
                copy.write_row((chain, seq, digest, 0))
        raw.commit()
    finally:
        raw.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE audit_events"))
    engine.dispose()
    return time.perf_counter() - started


def verify_throughput(url: str, n: int, chains: int) -> dict[str, Any]:
    loaded = load_events(url, n, chains)
    engine = make_engine(url)
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key"
        keys = LocalKeyFile(key_file, warn=False)
        started = time.perf_counter()
        info = checkpoints.create_checkpoint(make_session_factory(engine), keys, SystemClock())
        checkpoint_s = time.perf_counter() - started
        assert info is not None and info.chains == chains
        runs = []
        for _ in range(3):
            report = audit_verify.verify(engine, keys)
            assert report.ok, report.problems[:3]
            assert report.events == n
            runs.append(report.seconds)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
        env.update({"BEHALF_DATABASE_URL": url, "BEHALF_LOCAL_KEY_FILE": str(key_file),
                    "BEHALF_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "behalf.cli", "audit", "verify"],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        command_s = time.perf_counter() - started
        assert done.returncode == 0, done.stderr[-2000:]
    engine.dispose()
    best = min(runs)
    return {"events": n, "chains": chains, "load_seconds": round(loaded, 1),
            "checkpoint_seconds": round(checkpoint_s, 2),
            "verify_seconds": [round(r, 2) for r in runs],
            "verify_events_per_second": round(n / statistics.median(runs)),
            "verify_seconds_per_million": round(statistics.median(runs) * 1e6 / n, 2),
            "command_seconds": round(command_s, 2),
            "command_events_per_second": round(n / command_s),
            "command_output": done.stdout.strip().splitlines()[-1],
            "best_events_per_second": round(n / best)}


def run(calls: int = 400, rounds: int = 5, events: int = 1_000_000, chains: int = 10_000,
        *, skip_calls: bool = False, skip_verify: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {}
    try:
        if not skip_calls:
            url = scratch_database(DATABASE)
            results["per_call"] = per_call(url, calls, rounds)
            drop_database(DATABASE)
        if not skip_verify:
            url = scratch_database(DATABASE)
            results["verify"] = verify_throughput(url, events, chains)
    finally:
        drop_database(DATABASE)
    return results


def figures(result: dict[str, Any]) -> list[Figure]:
    out = []
    calls = result.get("per_call")
    if calls:
        runtime, bare, none = calls["runtime"], calls["bare_httpx"], calls["none"]
        ratio = runtime["median_ms"] / bare["median_ms"]
        out.append(Figure(
            bench="audit", name="ctx.http per call (auth, origin check, cancellation gate, "
                                "audit), loopback API",
            unit="ms", median=runtime["median_ms"], p99=runtime["p99_ms"],
            runs=calls["calls_per_variant"], spread=spread(runtime["round_per_call_ms"], "ms"),
            baseline=f"bare httpx.Client: {number(bare['median_ms'], 'ms')}", ratio=ratio,
            target="≤ 1.3 x bare", met=ratio <= 1.3,
            note=(f"without the trail {number(none['median_ms'], 'ms')} = "
                  f"{none['ratio_to_bare_httpx']:.2f} x bare; spread = per-round means")))
    verify = result.get("verify")
    if verify:
        rate = verify["verify_events_per_second"]
        out.append(Figure(
            bench="audit", name="audit verify", unit="events/s", median=rate,
            runs=len(verify["verify_seconds"]),
            spread=spread([verify["events"] / s for s in verify["verify_seconds"]], "/s"),
            target="≥ 200,000 events/s", met=rate >= 200_000,
            note=(f"{verify['events']:,} events, {verify['chains']:,} chains; "
                  f"`behalf audit verify` command {number(verify['command_events_per_second'])}"
                  "/s incl. start-up")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--chains", type=int, default=10_000)
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--skip-calls", action="store_true")
    args = parser.parse_args()
    results = run(args.calls, args.rounds, args.events, args.chains,
                  skip_calls=args.skip_calls, skip_verify=args.skip_verify)
    print(json.dumps({"cpus": os.cpu_count(), **results}, indent=2))


if __name__ == "__main__":
    main()
