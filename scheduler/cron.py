"""Schedule arithmetic: pure functions of aware datetimes (no clock reads, no I/O).

A schedule is a five-field cron expression read in the *local wall time* of an IANA zone
("30 2 * * *" in Europe/Paris means 02:30 on the clocks in Paris). croniter only enumerates
the nominal wall-clock times that match the fields; turning a wall time into an instant,
which is where daylight-saving time bites, is done here, by these rules:

* **Every nominal wall-clock time yields at most one run.**
* **A wall time that does not exist** (skipped by a spring-forward gap) runs at the first
  instant after the gap, i.e. the transition itself: a daily 02:30 job in New York runs at
  03:00 EDT on the day clocks jump from 02:00 to 03:00. Several nominal times inside the same
  gap (an hourly or ``*/15`` job) collapse into that one run; since 03:00 is itself a nominal
  time of such crons, an hourly job runs 23 times on that day.
* **A wall time that occurs twice** (repeated by a fall-back) runs at its *first* occurrence
  only. A daily 01:30 job in New York runs at 01:30 EDT, not again at 01:30 EST. The same rule
  is applied to every cron, so ``0 * * * *`` gives each wall-clock hour once: 24 runs in the
  25-hour day, with two hours between the 01:00 EDT and 02:00 EST runs; ``*/15`` likewise
  pauses for the repeated hour. We chose "each wall-clock time once" over "keep the elapsed
  interval" because it is the one rule that is right for daily jobs, it makes a slot's
  identity (its local wall time) unique, and it never runs a job twice for one nominal time.

Instants are returned as aware UTC datetimes. Inputs may be aware in any zone; naive inputs
are refused.

Errors: a bad cron field, an unknown zone or a bad duration raise `ScheduleError`
(a `ValueError`) with a one-line message fit for the command line.
"""

from __future__ import annotations

import hashlib
import re
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from croniter import croniter

__all__ = [
    "CatchUp",
    "ScheduleError",
    "catch_up",
    "next_slot",
    "parse_duration",
    "slots_between",
    "spread_offset",
    "validate",
]


class ScheduleError(ValueError):
    """A cron expression, time zone or duration that cannot be used; the message says why."""


_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-6 or SUN-SAT"),
)

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# croniter's "R" (random) and "H" (hashed) values: a schedule must mean the same thing in
# every process, and spreading load is `spread_offset`'s job.
_NONDETERMINISTIC = re.compile(r"^[HR](?:\(|/|$)", re.IGNORECASE)

# Zone keys that resolve to something machine-specific rather than an IANA zone.
_MACHINE_ZONES = frozenset({"localtime", "posixrules"})

_ONE_MICROSECOND = timedelta(microseconds=1)

# A fixed naive wall time for parsing checks, so validation never reads the clock.
_REFERENCE_WALL = datetime(2000, 1, 1)  # noqa: DTZ001 - a wall time, deliberately naive


# --- validation ---------------------------------------------------------------------------


def validate(cron: str, tz: str) -> None:
    """Raise `ScheduleError` unless `cron` is a usable five-field expression and `tz` a zone."""
    _zone(tz)
    _expression(cron)


@lru_cache(maxsize=1024)
def _expression(cron: str) -> str:
    """Normalise and check a cron expression; return the five fields joined by one space."""
    text = " ".join(cron.split())
    text = _ALIASES.get(text.lower(), text)
    fields = text.split(" ") if text else []
    if len(fields) != len(_FIELDS):
        raise ScheduleError(
            f"invalid cron expression {_shown(cron)}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    for index, ((name, allowed), value) in enumerate(zip(_FIELDS, fields, strict=True)):
        if any(_NONDETERMINISTIC.match(part) for part in value.split(",")):
            raise ScheduleError(
                f"invalid cron expression {_shown(cron)}: {name} field {_shown(value)} uses "
                "a random (R) or hashed (H) value; schedules must be deterministic"
            )
        probe = " ".join(value if i == index else "*" for i in range(len(_FIELDS)))
        try:
            croniter(probe, _REFERENCE_WALL)
        except ValueError as exc:  # croniter's errors are ValueErrors
            raise ScheduleError(
                f"invalid cron expression {_shown(cron)}: bad {name} field {_shown(value)} "
                f"(allowed: {allowed}, with *, ranges, lists and steps)"
            ) from exc
    try:
        croniter(text, _REFERENCE_WALL).get_next(datetime)
    except ValueError as exc:
        raise ScheduleError(f"invalid cron expression {_shown(cron)}: it never fires") from exc
    return text


@lru_cache(maxsize=1024)
def _zone(tz: str) -> zoneinfo.ZoneInfo:
    if tz in _MACHINE_ZONES or tz not in _known_zones():
        raise ScheduleError(
            f"unknown time zone {_shown(tz)}: expected an IANA name such as 'Europe/Paris' or 'UTC'"
        )
    return zoneinfo.ZoneInfo(tz)


@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _shown(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message, cut short if it is long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")
    return value.astimezone(UTC)


# --- wall time to instant -----------------------------------------------------------------


def _local(instant: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The naive wall-clock time shown in `zone` at `instant`."""
    return instant.astimezone(zone).replace(tzinfo=None)


def _resolve(wall: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The UTC instant at which nominal wall time `wall` runs (see the module rules).

    Monotone non-decreasing in `wall`, so iterating wall times in order yields instants in
    order; equal instants (several wall times in one gap) are de-duplicated by the caller.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)  # fold=0: earlier occurrence
    if _local(first, zone) == wall:
        return first
    return _gap_end(wall, zone)


def _gap_end(wall: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The first instant after the gap that swallowed `wall` (the transition instant).

    For a wall time in a gap, PEP 495 gives two readings, one with the offset before the
    transition and one with the offset after; the transition lies between them. Bisect on
    whole seconds (zone transitions fall on whole seconds) for the first instant whose
    local time is past `wall`.
    """
    a = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    b = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low, high = min(a, b), max(a, b)  # _local(low) < wall < _local(high)
    span = int((high - low).total_seconds())
    lo, hi = 0, span
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _local(low + timedelta(seconds=mid), zone) > wall:
            hi = mid
        else:
            lo = mid
    return low + timedelta(seconds=hi)


def _instants(expression: str, zone: zoneinfo.ZoneInfo, after: datetime) -> Iterator[datetime]:
    """Every run instant strictly after `after` (UTC), in order, without duplicates. Endless."""
    walls = croniter(expression, _local(after, zone), ret_type=datetime)
    last = after
    while True:
        try:
            wall = walls.get_next(datetime)
        except (ValueError, OverflowError) as exc:  # croniter gives up, or runs past 9999
            raise ScheduleError(
                f"cron expression {expression!r} has no slot after {last.isoformat()}"
            ) from exc
        instant = _resolve(wall, zone)
        # Skips the wall times of a repeated hour already passed (when `after` lies in the
        # second occurrence) and the extra wall times of a gap that map to the same instant.
        if instant > last:
            last = instant
            yield instant


# --- public arithmetic --------------------------------------------------------------------


def next_slot(cron: str, tz: str, after: datetime) -> datetime:
    """The first run instant strictly after `after`, as an aware UTC datetime."""
    return next(_instants(_expression(cron), _zone(tz), _aware(after, "after")))


def slots_between(
    cron: str, tz: str, start: datetime, end: datetime, *, max_slots: int = 10_000
) -> Iterator[datetime]:
    """Run instants in the half-open interval [start, end), oldest first (for backfills).

    All or nothing: the slots are computed before the first is yielded, and more than
    `max_slots` of them raise `ScheduleError`, so a caller never acts on half a backfill.
    """
    expression, zone = _expression(cron), _zone(tz)
    start, end = _aware(start, "start"), _aware(end, "end")
    slots: list[datetime] = []
    if start < end:
        for instant in _instants(expression, zone, start - _ONE_MICROSECOND):
            if instant >= end:
                break
            if len(slots) == max_slots:
                raise ScheduleError(
                    f"more than {max_slots} slots of {_shown(cron)} between {start.isoformat()} "
                    f"and {end.isoformat()}; narrow the interval"
                )
            slots.append(instant)
    return iter(slots)


def spread_offset(schedule_id: str | uuid.UUID, window: timedelta) -> timedelta:
    """A deterministic offset in [0, window) for `schedule_id`, to spread runs of one slot.

    SHA-256 of the id (a UUID as its canonical lower-case hyphenated text), so the value is
    the same in every process and Python version. A zero window gives a zero offset.
    """
    if window < timedelta(0):
        raise ValueError(f"window must not be negative, got {window}")
    span = window // _ONE_MICROSECOND
    digest = hashlib.sha256(
        b"behalf:spread:" + str(schedule_id).encode("utf-8", "surrogatepass")
    ).digest()
    fraction = int.from_bytes(digest[:8], "big")  # uniform in [0, 2**64)
    return timedelta(microseconds=fraction * span >> 64)


@dataclass(frozen=True)
class CatchUp:
    """What to do about slots that came due while nobody was looking.

    `missed`: slots to record as missed, oldest first. `run`: the one slot to run now, if any.
    `more`: the missed list was cut at `max_missed`; record it, then ask again from
    `watermark` (the latest slot accounted for) to get the rest.
    """

    missed: tuple[datetime, ...]
    run: datetime | None
    more: bool = False

    @property
    def watermark(self) -> datetime | None:
        if self.run is not None:
            return self.run
        return self.missed[-1] if self.missed else None


def catch_up(
    cron: str,
    tz: str,
    last_slot_done: datetime | None,
    now: datetime,
    window: timedelta,
    *,
    max_missed: int = 1000,
) -> CatchUp:
    """Decide which due slots (after `last_slot_done`, at or before `now`) to run or miss.

    The latest due slot runs if it is at most `window` old; every other due slot is missed.
    `last_slot_done=None` (a schedule that never ran) records nothing as missed: it only
    runs the latest slot within the window. Seed it with the schedule's creation time to
    keep a new schedule from running a slot that predates it.
    """
    expression, zone = _expression(cron), _zone(tz)
    now = _aware(now, "now")
    if window < timedelta(0):
        raise ValueError(f"window must not be negative, got {window}")
    if max_missed < 1:
        raise ValueError(f"max_missed must be at least 1, got {max_missed}")
    oldest_runnable = now - window

    if last_slot_done is None:
        return CatchUp(missed=(), run=_latest(expression, zone, oldest_runnable, now))

    due: list[datetime] = []
    for instant in _instants(expression, zone, _aware(last_slot_done, "last_slot_done")):
        if instant > now:
            break
        if len(due) > max_missed:  # a batch is full and more slots are due after it
            return CatchUp(missed=tuple(due[:max_missed]), run=None, more=True)
        due.append(instant)
    run = due.pop() if due and due[-1] >= oldest_runnable else None
    if len(due) > max_missed:  # max_missed + 1 due slots, none recent enough to run
        return CatchUp(missed=tuple(due[:max_missed]), run=None, more=True)
    return CatchUp(missed=tuple(due), run=run)


def _latest(
    expression: str, zone: zoneinfo.ZoneInfo, not_before: datetime, now: datetime
) -> datetime | None:
    """The latest slot in [not_before, now], looking back in doubling steps (cheap for
    frequent crons with long windows)."""
    step = timedelta(hours=1)
    while True:
        low = max(now - step, not_before)
        latest = None
        for instant in _instants(expression, zone, low - _ONE_MICROSECOND):
            if instant > now:
                break
            latest = instant
        if latest is not None or low == not_before:
            return latest
        step *= 2


# --- durations ----------------------------------------------------------------------------

_DURATION = re.compile(
    r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?"
)


def parse_duration(text: str) -> timedelta:
    """Parse "90s", "30m", "2h", "1d" or a combination in that order ("1h30m")."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or not any(match.groups()):
        raise ScheduleError(
            f"invalid duration {_shown(text)}: expected whole numbers with units d, h, m or s, "
            "largest first (e.g. 90s, 30m, 2h, 1d, 1h30m)"
        )
    try:
        days, hours, minutes, seconds = (int(group or 0) for group in match.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except (OverflowError, ValueError) as exc:  # ValueError: more digits than int() takes
        raise ScheduleError(f"invalid duration {_shown(text)}: too long") from exc
