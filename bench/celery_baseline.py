"""A bare Celery app for the baselines: `revoke(terminate=True)` on a spinning task, and the
same three API calls as `bench-three-calls` with a static token (end to end, worker memory)."""

from __future__ import annotations

import os
import time

import httpx
import redis
from celery import Celery

app = Celery("bench-baseline", broker=os.environ.get("BENCH_BROKER_URL", "memory://"))
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_prefetch_multiplier=1, task_acks_late=True,
                worker_hijack_root_logger=False, task_default_queue="bench.baseline")


@app.task(name="bench.spin")  # type: ignore[untyped-decorator]
def spin(key: str, api: str) -> None:
    """Record our pid, then call the API until killed (what a revoke must stop)."""
    redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]).set(key, os.getpid(), ex=600)
    with httpx.Client() as client:
        for _ in range(100_000):
            client.get(api + "/v2/reports")
            time.sleep(0.02)


@app.task(name="bench.three_calls")  # type: ignore[untyped-decorator]
def three_calls(api: str, token: str) -> None:
    """What `bench-three-calls` does, with a static token: one client per run, as ctx.http."""
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        for path in ("/v2/me", "/v2/reports", "/v2/calendar"):
            client.get(path).raise_for_status()
