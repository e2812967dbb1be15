"""What the deployment files may name: the CLI commands and the settings variables.

Each is one constant so it can be replaced by introspection of the real Click CLI
(`behalf.cli`) and settings (`behalf.settings.KNOWN_VARIABLES`) once those exist.
"""

from __future__ import annotations

KNOWN_COMMANDS: frozenset[str] = frozenset(
    {
        "dev",
        "api",
        "worker",
        "scheduler",
        "migrate",
        "sandbox",
        "provider",
        "agent",
        "schedule",
        "run",
        "delegations",
        "revoke",
        "runs",
        "requeue",
        "audit",
        "keys",
    }
)

KNOWN_VARIABLES: frozenset[str] = frozenset(
    {
        "BEHALF_ENV",
        "BEHALF_DATABASE_URL",
        "BEHALF_REDIS_URL",
        "BEHALF_BROKER_URL",
        "BEHALF_KMS_KEY_ID",
        "BEHALF_KMS_ENDPOINT_URL",
        "BEHALF_KMS_REGION",
        "BEHALF_LOCAL_KEY_FILE",
        "BEHALF_PUBLIC_URL",
        "BEHALF_SECRET_KEY",
        "BEHALF_SMTP_URL",
        "BEHALF_MAIL_FROM",
        "BEHALF_JOBS_MODULES",
        "BEHALF_REFRESH_SKEW_SECONDS",
        "BEHALF_OPS_TOKEN",
        "BEHALF_LOG_LEVEL",
    }
)
