"""Data: tables, sessions and Alembic migrations.

Owns every table of behalf and how to open a session on it. Imports nothing of ours; every other
package imports from here.
"""

from models.base import Base
from models.tables import (
    Agent,
    AuditCheckpoint,
    AuditEvent,
    AuditHead,
    AuthorizationRequest,
    Delegation,
    DelegationStatus,
    JobRun,
    OutboxMessage,
    Provider,
    ReauthLink,
    RunStatus,
    Schedule,
    User,
)

__all__ = [
    "Agent",
    "AuditCheckpoint",
    "AuditEvent",
    "AuditHead",
    "AuthorizationRequest",
    "Base",
    "Delegation",
    "DelegationStatus",
    "JobRun",
    "OutboxMessage",
    "Provider",
    "ReauthLink",
    "RunStatus",
    "Schedule",
    "User",
]
