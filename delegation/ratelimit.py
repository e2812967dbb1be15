"""Per-agent and per-provider request budgets for jobs and refreshes.

`RequestGate.before_request(agent_id, provider_id)` takes one request from the agent's budget
and from the provider's budget (both shared by the whole fleet through Redis, see
`delegation.budget`), sleeping while they are empty. Every wait is observed in the
`behalf_rate_budget_wait_seconds` histogram; a wait that would exceed `max_wait` raises
`BudgetExhausted` (retryable: a job is re-queued with `retry_after`, a refresh is tried later)
and counts in `behalf_rate_budget_exhausted_total`.

A job's API calls (`ctx.http`) and the token source's refreshes go through the same gate, so
the provider's budget covers its authorisation server and its API together.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from delegation import metrics
from delegation.budget import BudgetExhausted, BudgetKind, RateBudget, budget_key


@dataclass(frozen=True)
class Limits:
    """Requests per second; None means no budget of that kind."""

    provider_rate: float | None = None
    agent_rate: float | None = None
    max_wait: float = 30.0

    @staticmethod
    def burst(rate: float) -> int:
        """One second's worth of requests may go at once after a quiet spell."""
        return max(1, math.ceil(rate))


class RequestGate:
    def __init__(self, budget: RateBudget, limits: Limits, *, purpose: str = "request") -> None:
        self._budget = budget
        self._limits = limits
        self._purpose = purpose

    def with_purpose(self, purpose: str) -> RequestGate:
        """The same budgets, reported under another purpose label (e.g. "refresh")."""
        return RequestGate(self._budget, self._limits, purpose=purpose)

    def before_request(self, agent_id: uuid.UUID, provider_id: uuid.UUID | None) -> float:
        """Wait for room in the agent's and the provider's budgets; return seconds waited."""
        waited = 0.0
        checks: tuple[tuple[BudgetKind, uuid.UUID | None, float | None], ...] = (
            ("agent", agent_id, self._limits.agent_rate),
            ("provider", provider_id, self._limits.provider_rate),
        )
        for kind, owner, rate in checks:
            if rate is None or owner is None:
                continue
            try:
                wait = self._budget.acquire(
                    budget_key(kind, str(owner)), rate, Limits.burst(rate),
                    timeout=max(0.0, self._limits.max_wait - waited),
                )
            except BudgetExhausted:
                metrics.BUDGET_EXHAUSTED.labels(kind, self._purpose).inc()
                raise
            metrics.BUDGET_WAIT_SECONDS.labels(kind, self._purpose).observe(wait)
            waited += wait
        return waited
