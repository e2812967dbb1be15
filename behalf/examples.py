"""The example agent job `behalf dev` runs: a nightly report read as the user.

It is deliberately slow (a few seconds of API calls) so that, in dev, you can revoke while it
runs and watch it stop.
"""

from __future__ import annotations

from worker import agent_job
from worker.context import JobContext

EXAMPLE_AGENT = "reporting-agent"
EXAMPLE_JOB = "nightly-report"
EXAMPLE_SCOPES = ("reports:read", "calendar:read")


@agent_job(EXAMPLE_JOB, agent=EXAMPLE_AGENT, scopes={"reports:read"})
def nightly_report(ctx: JobContext) -> None:
    """Read the user's reports, then take a while summarising them (API calls on the way)."""
    me = ctx.http.get("/v2/me").json()
    reports = ctx.http.get("/v2/reports").json()
    ctx.log.info("report run for %s: %d reports", me.get("sub"), len(reports.get("reports", [])))
    for _ in range(5):
        ctx.http.get("/v2/slow", params={"ms": 1000}).raise_for_status()
        ctx.check_cancelled()
