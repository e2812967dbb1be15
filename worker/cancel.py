"""Cooperative cancellation of one run: a flag the job context and its HTTP client check."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from delegation.errors import RunCancelled


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._reason: str | None = None
        self.cancelled_at: float | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def cancel(self, reason: str) -> None:
        """Set the flag once and run the abort callbacks (e.g. close in-flight connections)."""
        with self._lock:
            if self._event.is_set():
                return
            self._reason = reason
            self.cancelled_at = time.monotonic()
            self._event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            reason = self._reason or "cancelled"
            raise RunCancelled(f"run cancelled: {reason}", reason=reason)

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)
