"""The runtime: Celery app factory, `@agent_job` and the job context, the runner, thin tasks and
the revocation listener.

May import `models` and `delegation`; never `scheduler`, `api` or `behalf`.
"""

from worker.jobs import agent_job

__all__ = ["agent_job"]
