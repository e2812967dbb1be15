"""Key rotation: re-wrap every data key under a new KMS key, leaving sealed blobs untouched.

Resumable by construction: each batch commits rows whose `key_id` is already the new one, and
the next run only selects rows still under an old key.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from delegation.vault import Vault, agent_context, delegation_context
from models import Agent, Delegation


def pending_count(sessions: sessionmaker[Session], new_key_id: str) -> int:
    with sessions() as session:
        delegations = session.scalar(
            select(func.count()).select_from(Delegation).where(
                Delegation.wrapped_key.is_not(None), Delegation.key_id != new_key_id
            )
        )
        agents = session.scalar(
            select(func.count()).select_from(Agent).where(
                Agent.credential_wrapped_key.is_not(None),
                or_(Agent.credential_key_id.is_(None), Agent.credential_key_id != new_key_id),
            )
        )
        return int(delegations or 0) + int(agents or 0)


def rotate(
    sessions: sessionmaker[Session],
    vault: Vault,
    new_key_id: str,
    *,
    batch_size: int = 200,
    progress: Callable[[int], None] = lambda _n: None,
) -> int:
    """Re-wrap all data keys under `new_key_id`; returns how many were re-wrapped."""
    done = 0
    while True:
        with sessions.begin() as session:
            rows = session.scalars(
                select(Delegation)
                .where(Delegation.wrapped_key.is_not(None), Delegation.key_id != new_key_id)
                .order_by(Delegation.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                assert row.wrapped_key is not None and row.key_id is not None
                context = delegation_context(row.user_id, row.id, row.agent_id)
                row.wrapped_key = vault.rewrap(row.wrapped_key, row.key_id, context, new_key_id)
                row.key_id = new_key_id
        done += len(rows)
        progress(len(rows))
        if len(rows) < batch_size:
            break
    while True:
        with sessions.begin() as session:
            agents = session.scalars(
                select(Agent)
                .where(Agent.credential_wrapped_key.is_not(None),
                       Agent.credential_key_id != new_key_id)
                .order_by(Agent.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for agent in agents:
                assert agent.credential_wrapped_key is not None
                assert agent.credential_key_id is not None
                agent.credential_wrapped_key = vault.rewrap(
                    agent.credential_wrapped_key, agent.credential_key_id,
                    agent_context(agent.id), new_key_id,
                )
                agent.credential_key_id = new_key_id
        done += len(agents)
        progress(len(agents))
        if len(agents) < batch_size:
            break
    return done
