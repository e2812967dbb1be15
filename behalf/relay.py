"""Outbox topics and what relays them: the glue between a commit and its side effects."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from behalf.deps import Deps
from behalf.runtime import celery_app
from delegation import outbox
from delegation.outbox import Handler
from worker.celery_app import publish_run

log = logging.getLogger(__name__)


def handlers(deps: Deps) -> Mapping[str, Handler]:
    """Every topic this process can relay. Handlers are idempotent: a relay that crashes after
    delivering but before marking sent delivers again."""
    app = celery_app(deps)
    table: dict[str, Handler] = {
        outbox.RUN_DISPATCH: lambda payload: publish_run(app, payload),
    }
    table.update(deps.extras.get("extra_relay_handlers", {}))
    return table


def relay_pending(deps: Deps, *, topics: list[str] | None = None) -> int:
    """Deliver what is due now (used right after a commit, and by the scheduler's loop)."""
    total = 0
    table = handlers(deps)
    wanted = [t for t in (topics or list(table)) if t in table]
    while True:
        delivered = outbox.relay_once(deps.sessions, table, deps.clock, topics=wanted)
        total += delivered
        if delivered == 0:
            return total


def describe(payload: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in payload.items())
