"""A bare Celery app for the revocation baseline: `revoke(terminate=True)` on a spinning task."""

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


@app.task(name="bench.spin")
def spin(key: str, api: str) -> None:
    """Record our pid, then call the API until killed (what a revoke must stop)."""
    redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]).set(key, os.getpid(), ex=600)
    with httpx.Client() as client:
        for _ in range(100_000):
            client.get(api + "/v2/reports")
            time.sleep(0.02)
