"""The Celery app factory: a publisher and a worker app can live in one process (dev mode)."""

from __future__ import annotations

import uuid

from worker.celery_app import RUN_JOB, RunnerHolder, create_celery


class RecordingRunner:
    def __init__(self) -> None:
        self.ran: list[uuid.UUID] = []

    def run(self, run_id: uuid.UUID) -> None:
        self.ran.append(run_id)


def test_the_worker_app_runs_its_own_task_whatever_other_apps_exist():
    runner = RecordingRunner()
    for _ in range(5):  # set order once decided which app's copy a worker got
        create_celery("memory://")
        worker = create_celery("memory://", runner=RunnerHolder(lambda: runner))  # type: ignore[arg-type,return-value]
        create_celery("memory://")
        run_id = uuid.uuid4()
        worker.tasks[RUN_JOB](str(run_id))
        assert runner.ran[-1] == run_id


def test_a_publisher_app_has_no_run_job_and_a_malformed_id_is_dropped():
    assert RUN_JOB not in create_celery("memory://").tasks
    runner = RecordingRunner()
    worker = create_celery("memory://", runner=RunnerHolder(lambda: runner))  # type: ignore[arg-type,return-value]
    worker.tasks[RUN_JOB]("not-a-uuid")
    assert runner.ran == []


def test_a_worker_app_offers_no_task_but_run_job():
    worker = create_celery("memory://", runner=RunnerHolder(RecordingRunner))  # type: ignore[arg-type]
    assert list(worker.tasks) == [RUN_JOB]
