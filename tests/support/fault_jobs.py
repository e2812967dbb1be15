"""The job the fault-injection suite runs (`BEHALF_JOBS_MODULES=tests.support.fault_jobs`).

Every call names its run, its execution (one per time the job body starts) and its step in the
query string, so the test API's call log shows which run's body ran how many times, and when.
"""

from __future__ import annotations

import os
import uuid

from worker import agent_job
from worker.context import JobContext


@agent_job("fault-batch", agent="reporter", scopes={"reports:read"})
def fault_batch(ctx: JobContext) -> None:
    """A few API calls with pauses: long enough to be killed or faulted in the middle."""
    execution = uuid.uuid4().hex[:12]
    steps = int(os.environ.get("FAULT_JOB_STEPS", "3"))
    pause = float(os.environ.get("FAULT_JOB_PAUSE", "0.6"))
    for step in range(steps):
        ctx.http.get("/v2/reports", params={"run": str(ctx.run_id), "exec": execution,
                                            "step": str(step)}).raise_for_status()
        if step < steps - 1:
            ctx.sleep(pause)
