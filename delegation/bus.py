"""The revocation bus: a Redis channel that tells running work to look at a delegation now.

A message is only a hint. Listeners act on the durable state they re-read, never on the
message's word, so a forged or replayed message changes nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

CHANNEL = "behalf:delegations:stop"


def publish_stop(redis: Any, delegation_id: uuid.UUID, reason: str) -> int:
    """Publish a stop hint; returns how many listeners received it."""
    message = json.dumps({"delegation_id": str(delegation_id), "reason": reason})
    return int(redis.publish(CHANNEL, message))


def parse(raw: bytes | str) -> uuid.UUID | None:
    """The delegation id in a message, or None for anything malformed."""
    try:
        doc = json.loads(raw)
        return uuid.UUID(str(doc["delegation_id"]))
    except (ValueError, KeyError, TypeError):
        return None
