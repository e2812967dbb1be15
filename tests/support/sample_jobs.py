"""Jobs used by tests that start real worker processes (`BEHALF_JOBS_MODULES`)."""

from __future__ import annotations

import os
import time

from worker import agent_job
from worker.context import JobContext


@agent_job("stress", agent="reporter", scopes={"reports:read"})
def stress(ctx: JobContext) -> None:
    """Call the API for a while, needing fresh tokens along the way."""
    until = time.monotonic() + float(os.environ.get("SAMPLE_JOB_STRESS_SECONDS", "10"))
    while time.monotonic() < until:
        ctx.http.get("/v2/reports").raise_for_status()
        ctx.sleep(0.5)


@agent_job("slow", agent="reporter", scopes={"reports:read"})
def slow(ctx: JobContext) -> None:
    """One call, then a pause long enough to be killed in, then another call."""
    ctx.http.get("/v2/reports").raise_for_status()
    ctx.sleep(float(os.environ.get("SAMPLE_JOB_SLOW_SECONDS", "3")))
    ctx.http.get("/v2/calendar").raise_for_status()


@agent_job("loop", agent="reporter", scopes={"reports:read"})
def loop(ctx: JobContext) -> None:
    """Call the API until cancelled (revocation tests)."""
    for _ in range(10_000):
        ctx.http.get("/v2/reports").raise_for_status()
        ctx.sleep(0.05)


@agent_job("stuck", agent="reporter", scopes={"reports:read"})
def stuck(ctx: JobContext) -> None:
    """One call, then a minute in its own code, never looking at cancellation."""
    ctx.http.get("/v2/reports").raise_for_status()
    until = time.monotonic() + 60
    while time.monotonic() < until:
        time.sleep(0.05)
