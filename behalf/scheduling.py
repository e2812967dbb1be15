"""The scheduler process: ticks, lease recovery, the outbox relay and the refresh sweep.

One cycle claims due schedules batch after batch (each batch one transaction, see
`scheduler.tick`) while a relay thread hands each committed batch's runs to the broker, so
runs reach the broker while the next batch is claimed; then it recovers runs whose worker
vanished. The refresh sweep runs in its own
thread on its own interval, so a slow authorisation server never delays a tick. `stop()` (the
CLI wires it to SIGTERM and Ctrl-C) ends the loop after the batch in flight.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from behalf.deps import Deps
from behalf.relay import relay_pending
from behalf.runtime import redis_client, token_source
from delegation import checkpoints
from delegation.budget import RateBudget
from scheduler.recovery import recover_expired, redispatch_stale
from scheduler.sweep import RefreshSweep, SweepConfig
from scheduler.tick import tick

log = logging.getLogger(__name__)


class BackgroundRelay:
    """Relays the outbox in a thread while the loop claims the next batch, so the database
    round trips of one overlap the broker round trips of the other. `finish()` makes a last
    pass (after the last commit), waits for it and re-raises what the thread raised."""

    def __init__(self, relay: Callable[[], int]) -> None:
        self._relay = relay
        self._poked = threading.Event()
        self._done = threading.Event()
        self._relayed = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """A batch was committed: relay it."""
        self._poked.set()

    def finish(self) -> int:
        self._done.set()
        self._poked.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._relayed

    def _run(self) -> None:
        try:
            while True:
                self._poked.wait(0.5)
                self._poked.clear()
                last = self._done.is_set()  # read before relaying: no commit is left behind
                self._relayed += self._relay()
                if last:
                    return
        except BaseException as exc:  # handed to the loop's thread by finish()
            self._error = exc


@dataclass(frozen=True)
class LoopConfig:
    interval: float = 1.0
    batch: int = 500
    sweep: bool = True
    sweep_interval: float = 60.0
    checkpoint_interval: float = 300.0
    sweep_config: SweepConfig = field(default_factory=SweepConfig)


@dataclass
class CycleResult:
    claimed: int = 0
    queued: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    relayed: int = 0
    recovered: int = 0
    failed: int = 0


class SchedulerLoop:
    def __init__(self, deps: Deps, config: LoopConfig | None = None) -> None:
        self._deps = deps
        self._config = config or LoopConfig()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_once(self) -> CycleResult:
        """Claim everything due now (batch by batch), relay, recover expired leases."""
        deps, config = self._deps, self._config
        cycle = CycleResult()
        relay = BackgroundRelay(lambda: relay_pending(deps))
        relay.start()
        try:
            while not self._stop.is_set():
                result = tick(deps.sessions, deps.clock, batch=config.batch)
                cycle.claimed += result.claimed
                cycle.queued += result.queued
                for status, n in result.outcomes.items():
                    cycle.outcomes[status] = cycle.outcomes.get(status, 0) + n
                relay.poke()
                if result.claimed < config.batch:
                    break
        finally:
            cycle.relayed += relay.finish()
        recovered = recover_expired(deps.sessions, deps.clock, batch=config.batch)
        cycle.recovered, cycle.failed = recovered.requeued, recovered.failed
        cycle.recovered += redispatch_stale(
            deps.sessions, deps.clock, older_than=deps.settings.redispatch_after_seconds,
            batch=config.batch)
        if cycle.recovered:
            cycle.relayed += relay_pending(deps)
        if cycle.claimed or cycle.recovered or cycle.failed:
            log.info("scheduler: %s schedules claimed %s, %s runs relayed, %s recovered, "
                     "%s failed after lost leases", cycle.claimed, cycle.outcomes,
                     cycle.relayed, cycle.recovered, cycle.failed)
        return cycle

    def run_forever(self) -> None:
        sweeper = None
        if self._config.sweep:
            sweeper = threading.Thread(target=self._sweep_forever, name="refresh-sweep",
                                       daemon=True)
            sweeper.start()
        failures = 0
        last_checkpoint = 0.0
        while not self._stop.is_set():
            try:
                self.run_once()
                failures = 0
                if time.monotonic() - last_checkpoint >= self._config.checkpoint_interval:
                    last_checkpoint = time.monotonic()
                    self._checkpoint()
            except Exception:  # the database or broker blipped: say so, back off, go on
                failures += 1
                log.exception("scheduler cycle failed (%s in a row)", failures)
            self._stop.wait(min(self._config.interval * (2 ** min(failures, 5)), 60.0))
        if sweeper is not None:
            sweeper.join(timeout=self._config.sweep_config.max_seconds + 5)
        log.info("scheduler stopped")

    def _checkpoint(self) -> None:
        """A signed digest of the audit chains that moved (concurrent schedulers: one wins)."""
        try:
            checkpoints.create_checkpoint(self._deps.sessions, self._deps.keys, self._deps.clock)
        except Exception:  # KMS or the database blipped: the next interval tries again
            log.warning("audit checkpoint failed", exc_info=True)

    def sweep(self) -> RefreshSweep:
        deps = self._deps
        return RefreshSweep(
            sessions=deps.sessions, tokens=token_source(deps),
            budget=RateBudget(redis_client(deps), clock=deps.clock, sleep=time.sleep),
            redis=redis_client(deps), clock=deps.clock, config=self._config.sweep_config,
            rng=random.Random(),  # noqa: S311 - jitter, not secrecy
        )

    def _sweep_forever(self) -> None:
        sweep = self.sweep()
        while not self._stop.is_set():
            try:
                result = sweep.run_once(stopping=self._stop.is_set)
                if result.outcomes:
                    log.info("refresh sweep: %s", dict(result.outcomes))
            except Exception:
                log.exception("refresh sweep failed")
            self._stop.wait(self._config.sweep_interval)
