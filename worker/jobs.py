"""`@agent_job`: register a plain function as a job an agent runs on behalf of its users."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.context import JobContext

JobFunction = Callable[["JobContext"], Any]


@dataclass(frozen=True)
class JobSpec:
    name: str
    agent: str
    scopes: frozenset[str]
    function: JobFunction


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, JobSpec] = {}

    def add(self, spec: JobSpec) -> None:
        existing = self._jobs.get(spec.name)
        if existing is not None and existing.function is not spec.function:
            raise ValueError(f"two jobs are named {spec.name!r}")
        self._jobs[spec.name] = spec

    def get(self, name: str) -> JobSpec | None:
        return self._jobs.get(name)

    def names(self) -> list[str]:
        return sorted(self._jobs)

    def __contains__(self, name: object) -> bool:
        return name in self._jobs


# Jobs register themselves at import of the modules in BEHALF_JOBS_MODULES (code, not state).
registry = JobRegistry()


def agent_job(name: str, *, agent: str, scopes: Iterable[str] = ()
              ) -> Callable[[JobFunction], JobFunction]:
    """Declare `function(ctx)` as job `name` of `agent`, needing `scopes` of the delegation."""

    def register(function: JobFunction) -> JobFunction:
        registry.add(JobSpec(name=name, agent=agent, scopes=frozenset(scopes),
                             function=function))
        return function

    return register


def load_job_modules(modules: Iterable[str]) -> None:
    for module in modules:
        importlib.import_module(module)
