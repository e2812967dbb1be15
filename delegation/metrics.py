"""Prometheus metrics of the delegation domain, the scheduler and the rate budgets.

Defined once here (the default registry), so every role exports the same names. Labels are
low-cardinality on purpose: kinds, purposes and outcomes, never user, agent or provider ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUDGET_WAIT_SECONDS = Histogram(
    "behalf_rate_budget_wait_seconds",
    "Time spent waiting on a shared rate budget before a request (0 when admitted at once).",
    ["kind", "purpose"],
    buckets=(0.0, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
BUDGET_EXHAUSTED = Counter(
    "behalf_rate_budget_exhausted_total",
    "Requests refused because the budget had no room within the allowed wait.",
    ["kind", "purpose"],
)

SCHEDULER_SLOTS = Counter(
    "behalf_scheduler_slots_total",
    "Schedule slots accounted for by the scheduler, by outcome.",
    ["outcome"],
)
SCHEDULER_TICK_SECONDS = Histogram(
    "behalf_scheduler_tick_seconds",
    "Duration of one scheduler batch (claim, records, outbox, commit).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RUNS_RECOVERED = Counter(
    "behalf_runs_recovered_total",
    "Running runs whose lease expired, re-queued or failed by the scheduler.",
    ["outcome"],
)
REFRESH_SWEEP = Counter(
    "behalf_refresh_sweep_total",
    "Delegations the refresh sweep looked at, by why and what happened.",
    ["reason", "outcome"],
)
RUNS_REQUEUED = Counter(
    "behalf_runs_requeued_total",
    "Parked runs put back in the queue, by who asked (cli, api, reauth).",
    ["via"],
)
