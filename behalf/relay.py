"""Outbox topics and what relays them: the glue between a commit and its side effects."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from behalf import notifications
from behalf.deps import Deps
from behalf.runtime import agent_directory, celery_app, oauth_client, redis_client
from delegation import bus, outbox, revocation
from delegation.outbox import Handler
from worker.celery_app import publish_run

log = logging.getLogger(__name__)


def handlers(deps: Deps) -> Mapping[str, Handler]:
    """Every topic this process can relay. Handlers are idempotent: a relay that crashes after
    delivering but before marking sent delivers again."""
    app = celery_app(deps)

    def stop(payload: dict[str, Any]) -> None:
        bus.publish_stop(redis_client(deps), uuid.UUID(payload["delegation_id"]),
                         payload.get("reason", "delegation_revoked"))

    def revoke_at_provider(payload: dict[str, Any]) -> None:
        revocation.revoke_at_provider(deps.sessions, deps.vault, agent_directory(deps),
                                      oauth_client(deps), deps.clock,
                                      uuid.UUID(payload["delegation_id"]))

    table: dict[str, Handler] = {
        outbox.RUN_DISPATCH: lambda payload: publish_run(app, payload),
        revocation.STOP_TOPIC: stop,
        revocation.REVOKE_AT_PROVIDER_TOPIC: revoke_at_provider,
    }
    table.update(notifications.relay_handlers(deps))  # re-authorisation mails (issue #7)
    table.update(deps.extras.get("extra_relay_handlers", {}))
    return table


def _reachable_topics(deps: Deps, table: Mapping[str, Handler]) -> list[str]:
    """Topics this process can really deliver: a CLI process next to `behalf dev` has its own
    in-memory broker and Redis, so it leaves those messages to the dev server's relay."""
    owns_memory = bool(deps.extras.get("owns_in_process_services"))
    skipped = set()
    if deps.settings.broker_url == "memory://" and not owns_memory:
        skipped.add(outbox.RUN_DISPATCH)
    if deps.settings.redis_url == "memory://" and not owns_memory:
        skipped.add(revocation.STOP_TOPIC)
    return [t for t in table if t not in skipped]


def relay_pending(deps: Deps, *, topics: list[str] | None = None) -> int:
    """Deliver what is due now (used right after a commit, and by the scheduler's loop)."""
    total = 0
    table = handlers(deps)
    reachable = _reachable_topics(deps, table)
    wanted = [t for t in (topics or reachable) if t in reachable]
    if not wanted:
        return 0
    while True:
        delivered = outbox.relay_once(deps.sessions, table, deps.clock, topics=wanted)
        total += delivered
        if delivered == 0:
            return total


def publish_stop_now(deps: Deps, delegation_id: uuid.UUID, reason: str) -> None:
    """The fast path after a revoke commit: push at once (the outbox entry is the backstop)."""
    try:
        bus.publish_stop(redis_client(deps), delegation_id, reason)
    except Exception:  # Redis down: the durable state and the heartbeat still stop the runs
        log.warning("could not publish the stop of %s; running work stops by heartbeat",
                    delegation_id, exc_info=True)
