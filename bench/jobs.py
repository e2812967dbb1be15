"""Jobs the benchmarks run in real worker processes (`BEHALF_JOBS_MODULES=bench.jobs`)."""

from __future__ import annotations

from worker import agent_job
from worker.context import JobContext


@agent_job("bench-loop", agent="bench-agent", scopes={"reports:read"})
def loop(ctx: JobContext) -> None:
    """Call the API until cancelled."""
    for _ in range(100_000):
        ctx.http.get("/v2/reports").raise_for_status()
        ctx.sleep(0.02)


@agent_job("bench-three-calls", agent="bench-agent", scopes={"reports:read"})
def three_calls(ctx: JobContext) -> None:
    for path in ("/v2/me", "/v2/reports", "/v2/calendar"):
        ctx.http.get(path).raise_for_status()
