"""What a job function receives: who it acts for, `http` bound to the API, cancellation."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import httpx

from worker.cancel import CancelToken


@dataclass
class JobContext:
    run_id: uuid.UUID
    job: str
    user_subject: str
    agent: str
    client_id: str
    delegation_id: uuid.UUID
    scopes: frozenset[str]
    http: httpx.Client
    log: logging.Logger
    _cancel: CancelToken

    def check_cancelled(self) -> None:
        """Raise `RunCancelled` if the delegation was revoked or broken meanwhile."""
        self._cancel.raise_if_cancelled()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once (and raising) if the run is cancelled."""
        if self._cancel.wait(seconds):
            self._cancel.raise_if_cancelled()
