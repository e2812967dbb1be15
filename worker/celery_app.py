"""The Celery app factory. Nothing is built at import; messages carry a run id, JSON only.

Settings follow from "the row is the truth": late acks and reject-on-worker-lost so a killed
worker's message comes back, prefetch 1 so one slow job does not hold others hostage, a hard
time limit below the broker's visibility timeout so Redis never redelivers a task that is
still running, and no result backend (outcomes live in the run row).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery

from worker.runner import Runner

RUN_JOB = "worker.run_job"
VISIBILITY_TIMEOUT = 3600
HARD_TIME_LIMIT = 3000
SOFT_TIME_LIMIT = 2900
QUEUE = "behalf.runs"


class RunnerHolder:
    """Builds the process's runner on first use, after the pool has forked."""

    def __init__(self, factory: Callable[[], Runner]) -> None:
        self._factory = factory
        self._runner: Runner | None = None

    def get(self) -> Runner:
        if self._runner is None:
            self._runner = self._factory()
        return self._runner

    def reset(self) -> None:
        self._runner = None


def create_celery(broker_url: str, *, runner: RunnerHolder | None = None,
                  name: str = "behalf") -> Celery:
    app = Celery(name, broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=HARD_TIME_LIMIT,
        task_soft_time_limit=SOFT_TIME_LIMIT,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )

    if runner is None:
        return app  # a publisher: it sends RUN_JOB by name and never runs it

    # not shared: Celery would otherwise offer this task to every app in the process, and which
    # app's copy a worker ends up with would depend on set order
    @app.task(name=RUN_JOB, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def run_job(run_id: str) -> None:
        """Wake-up for run `run_id`; the runner claims it or exits (duplicate delivery)."""
        try:
            parsed = uuid.UUID(str(run_id))
        except ValueError:
            return  # a malformed message is dropped: nothing to claim
        runner.get().run(parsed)

    # A worker runs this one task: Celery's built-ins (chords, chunks, backend cleanup) are
    # dropped, so a crafted message naming one is refused as unregistered.
    for name in [n for n in app.tasks if n != RUN_JOB]:
        app.tasks.unregister(name)
    return app


def publish_run(app: Celery, payload: dict[str, Any]) -> None:
    """Outbox handler for `run.dispatch`: send the run id, nothing else."""
    app.send_task(RUN_JOB, args=[str(payload["run_id"])], queue=QUEUE)
