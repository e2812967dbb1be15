"""Build what is impure once per process, at the entry point, and hand it down.

Nothing here runs at import time: `Deps.from_settings` is called by the CLI command that
starts a process, and tests build their own `Deps` with fakes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from behalf.settings import MEMORY_URL, Settings
from delegation.clock import Clock, SystemClock
from delegation.kms import AwsKms, KeyProvider, LocalKeyFile, aws_kms_client
from delegation.vault import DataKeyCache, Vault
from models.session import make_engine, make_session_factory

log = logging.getLogger(__name__)


@dataclass
class Deps:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    clock: Clock
    keys: KeyProvider
    vault: Vault
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock | None = None) -> Deps:
        clock = clock or SystemClock()
        engine = make_engine(settings.database_url)
        keys = key_provider(settings)
        cache = DataKeyCache(
            max_entries=settings.data_key_cache_size,
            max_age=settings.data_key_cache_seconds,
            monotonic=clock.monotonic,
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            clock=clock,
            keys=keys,
            vault=Vault(keys, cache),
        )

    def close(self) -> None:
        self.engine.dispose()


def key_provider(settings: Settings) -> KeyProvider:
    if settings.uses_local_key:
        return LocalKeyFile(settings.local_key_file)
    client = aws_kms_client(settings.kms_region, settings.kms_endpoint_url or None)
    kms = AwsKms(client, settings.kms_key_id)
    return AwsKms(client, kms.resolve(settings.kms_key_id))


def uses_memory_redis(settings: Settings) -> bool:
    return settings.redis_url == MEMORY_URL
