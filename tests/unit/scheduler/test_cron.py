"""Schedule arithmetic, with the daylight-saving rules spelled out as tests.

The rules (see `scheduler.cron`): a nominal wall time that falls in a spring-forward gap runs
once, at the first instant after the gap; one that occurs twice in a fall-back runs at its
first occurrence only; every nominal wall time yields at most one run.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.cron import (
    CatchUp,
    ScheduleError,
    catch_up,
    next_slot,
    parse_duration,
    slots_between,
    spread_offset,
    validate,
)

NEW_YORK = "America/New_York"
PARIS = "Europe/Paris"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local_day(tz: str, day: date) -> tuple[datetime, datetime]:
    """[start, end) of a local calendar day, as UTC instants."""
    zone = ZoneInfo(tz)
    start = datetime.combine(day, time(), zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(), zone).astimezone(UTC)
    return start, end


def runs_on(cron: str, tz: str, day: date) -> list[datetime]:
    """The runs of `cron` on a local calendar day, as aware local datetimes."""
    start, end = local_day(tz, day)
    return [slot.astimezone(ZoneInfo(tz)) for slot in slots_between(cron, tz, start, end)]


def gaps(runs: list[datetime]) -> list[timedelta]:
    """Elapsed time between successive runs (in UTC: aware datetimes sharing one tzinfo
    subtract as wall times, which is exactly the mistake these tests look for)."""
    return [b.astimezone(UTC) - a.astimezone(UTC) for a, b in pairwise(runs)]


def wall(moment: datetime) -> str:
    return moment.strftime("%H:%M%z")


# (zone, spring-forward day, fall-back day, repeated wall hour on the fall-back day)
TRANSITIONS = [
    pytest.param(NEW_YORK, date(2026, 3, 8), date(2026, 11, 1), 1, id="new-york-2026"),
    pytest.param(NEW_YORK, date(2027, 3, 14), date(2027, 11, 7), 1, id="new-york-2027"),
    pytest.param(PARIS, date(2026, 3, 29), date(2026, 10, 25), 2, id="paris-2026"),
    pytest.param(PARIS, date(2027, 3, 28), date(2027, 10, 31), 2, id="paris-2027"),
]


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_the_test_dates_are_the_real_transitions(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    # Guard the fixtures: each day is 23 or 25 hours long in that zone's tz database.
    for day, hours in ((spring, 23), (fall, 25)):
        start, end = local_day(tz, day)
        assert end - start == timedelta(hours=hours)


# --- daily jobs across transitions ----------------------------------------------------------------


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_daily_0230_runs_once_at_the_end_of_the_gap_on_spring_forward(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    # Given a daily 02:30 job, when 02:00 jumps to 03:00, 02:30 never happens on the clock:
    runs = runs_on("30 2 * * *", tz, spring)
    # Then it runs once, at the first instant after the gap (03:00 summer time).
    assert [wall(r) for r in runs] == [wall(runs[0].replace(hour=3, minute=0))]
    assert runs[0].hour == 3
    assert runs[0].minute == 0
    # And the day before and after run at 02:30 as usual.
    for other in (spring - timedelta(days=1), spring + timedelta(days=1)):
        assert [(r.hour, r.minute) for r in runs_on("30 2 * * *", tz, other)] == [(2, 30)]


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_daily_job_in_the_repeated_hour_runs_once_at_the_first_occurrence(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    # Given a daily job at HH:30 where HH:30 happens twice on the fall-back day,
    cron = f"30 {repeated_hour} * * *"
    runs = runs_on(cron, tz, fall)
    # Then it runs exactly once, at the first (summer-time) occurrence.
    assert len(runs) == 1
    assert (runs[0].hour, runs[0].minute) == (repeated_hour, 30)
    summer = runs_on(cron, tz, spring + timedelta(days=7))[0].utcoffset()
    assert runs[0].utcoffset() == summer


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_daily_0230_runs_once_on_both_transition_days(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    assert len(runs_on("30 2 * * *", tz, spring)) == 1
    assert len(runs_on("30 2 * * *", tz, fall)) == 1


def test_paris_0230_on_fall_back_is_the_first_of_the_two():
    # 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:30 is at 00:30 UTC and again at 01:30 UTC.
    assert next_slot("30 2 * * *", PARIS, utc(2026, 10, 24, 12)) == utc(2026, 10, 25, 0, 30)
    assert next_slot("30 2 * * *", PARIS, utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 26, 1, 30)


def test_new_york_0230_on_spring_forward_is_at_0300_edt():
    assert next_slot("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 12)) == utc(2026, 3, 8, 7)
    assert next_slot("30 2 * * *", NEW_YORK, utc(2026, 3, 8, 7)) == utc(2026, 3, 9, 6, 30)


# --- hourly and */15 across transitions -----------------------------------------------------------


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_hourly_on_spring_forward_runs_each_existing_hour_once(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    runs = runs_on("0 * * * *", tz, spring)
    # 02:00 does not exist in either zone; its run is the 03:00 run.
    assert [r.hour for r in runs] == [h for h in range(24) if h != 2]
    assert len(set(runs)) == 23


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_hourly_on_fall_back_runs_each_wall_clock_hour_once(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    # Given a 25-hour day, when the job is hourly,
    runs = runs_on("0 * * * *", tz, fall)
    # Then each wall-clock hour runs once (24 runs, not 25) ...
    assert [r.hour for r in runs] == list(range(24))
    # ... and the repeated hour runs at its first occurrence, so two hours pass before the next.
    elapsed = gaps(runs)
    assert elapsed[repeated_hour] == timedelta(hours=2)
    assert all(g == timedelta(hours=1) for i, g in enumerate(elapsed) if i != repeated_hour)


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_every_15_minutes_across_spring_forward(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    runs = runs_on("*/15 * * * *", tz, spring)
    # The four nominal times inside the gap collapse into the 03:00 run that exists anyway.
    assert len(runs) == 96 - 4
    assert len(set(runs)) == len(runs)
    assert set(gaps(runs)) == {timedelta(minutes=15)}


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated_hour"), TRANSITIONS)
def test_every_15_minutes_across_fall_back_pauses_for_the_repeated_hour(
    tz: str, spring: date, fall: date, repeated_hour: int
) -> None:
    runs = runs_on("*/15 * * * *", tz, fall)
    assert len(runs) == 96
    assert len({r.replace(tzinfo=None) for r in runs}) == 96  # every wall time once
    elapsed = gaps(runs)
    assert sorted(set(elapsed)) == [timedelta(minutes=15), timedelta(minutes=75)]
    assert elapsed.count(timedelta(minutes=75)) == 1


def test_gap_that_is_not_an_hour_long():
    # Australia/Lord_Howe moves by 30 minutes: 02:00 -> 02:30 on 2026-10-04.
    runs = runs_on("*/10 2 * * *", "Australia/Lord_Howe", date(2026, 10, 4))
    assert [wall(r) for r in runs] == ["02:30+1100", "02:40+1100", "02:50+1100"]


def test_gap_at_midnight():
    # America/Santiago jumps from 00:00 to 01:00 on 2026-09-06.
    runs = runs_on("30 0 * * *", "America/Santiago", date(2026, 9, 6))
    assert [wall(r) for r in runs] == ["01:00-0300"]


def test_a_whole_skipped_day_still_gives_its_nominal_run():
    # Samoa skipped 2011-12-30 entirely: that day's noon run happens at the first instant of
    # 12-31, and 12-31 has its own noon run too (one run per nominal day, none lost).
    start = datetime(2011, 12, 29, 12, 30, tzinfo=ZoneInfo("Pacific/Apia"))
    end = datetime(2011, 12, 31, 23, 0, tzinfo=ZoneInfo("Pacific/Apia"))
    runs = [
        s.astimezone(ZoneInfo("Pacific/Apia"))
        for s in slots_between("0 12 * * *", "Pacific/Apia", start, end)
    ]
    assert [r.isoformat() for r in runs] == [
        "2011-12-31T00:00:00+14:00",
        "2011-12-31T12:00:00+14:00",
    ]


# --- next_slot basics -----------------------------------------------------------------------------


def test_next_slot_is_strictly_after_and_utc():
    slot = next_slot("0 2 * * *", "UTC", utc(2026, 1, 1, 2))
    assert slot == utc(2026, 1, 2, 2)
    assert slot.tzinfo is UTC
    assert next_slot("0 2 * * *", "UTC", utc(2026, 1, 1, 1, 59, 59)) == utc(2026, 1, 1, 2)


def test_next_slot_accepts_any_aware_datetime():
    after = datetime(2026, 6, 1, 8, 0, tzinfo=ZoneInfo(PARIS))  # 06:00 UTC
    assert next_slot("0 * * * *", "UTC", after) == utc(2026, 6, 1, 7)


def test_next_slot_refuses_naive_datetimes():
    with pytest.raises(ValueError, match="timezone-aware"):
        next_slot("0 * * * *", "UTC", datetime(2026, 1, 1))


def test_next_slot_from_inside_the_second_occurrence_of_the_repeated_hour():
    # 01:20 EST on 2026-11-01 (06:20 UTC): 01:30 and 01:45 already ran at their first
    # occurrence (EDT), so the next run is 02:00 EST.
    assert next_slot("*/15 * * * *", NEW_YORK, utc(2026, 11, 1, 6, 20)) == utc(2026, 11, 1, 7)


@pytest.mark.parametrize(
    ("cron", "after"), [("0 0 * * *", utc(9999, 12, 31, 12)), ("0 0 29 2 *", utc(9999, 3, 1))]
)
def test_no_slot_left_before_year_10000(cron: str, after: datetime) -> None:
    with pytest.raises(ScheduleError, match="has no slot after"):
        next_slot(cron, "UTC", after)


def test_day_of_week_and_aliases():
    # 2026-01-01 is a Thursday.
    assert next_slot("0 9 * * MON", "UTC", utc(2026, 1, 1)) == utc(2026, 1, 5, 9)
    assert next_slot("0 9 * * 7", "UTC", utc(2026, 1, 1)) == utc(2026, 1, 4, 9)  # Sunday
    assert next_slot("@daily", "UTC", utc(2026, 1, 1, 5)) == utc(2026, 1, 2)
    assert next_slot("@HOURLY", "UTC", utc(2026, 1, 1, 5)) == utc(2026, 1, 1, 6)
    assert next_slot("  0   9  * *  MON ", "UTC", utc(2026, 1, 1)) == utc(2026, 1, 5, 9)


# --- validate -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cron",
    [
        "0 2 * * *",
        "*/15 * * * *",
        "0 9-17 * * MON-FRI",
        "0 0 1,15 * *",
        "0 0 L * *",
        "0 0 * * 5#2",
        "0 0 29 2 *",
        "@weekly",
        "@yearly",
    ],
)
def test_valid_crons(cron: str) -> None:
    validate(cron, "Europe/Paris")


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 25 * * *", r"bad hour field '25' \(allowed: 0-23"),
        ("60 * * * *", "bad minute field '60'"),
        ("0 0 32 * *", "bad day-of-month field '32'"),
        ("0 0 * 13 *", "bad month field '13'"),
        ("0 0 * * 8", "bad day-of-week field '8'"),
        ("*/0 * * * *", "bad minute field"),
        ("x * * * *", "bad minute field 'x'"),
        ("* * * *", "expected 5 fields .* got 4"),
        ("0 * * * * *", "expected 5 fields .* got 6"),
        ("", "got 0"),
        ("@reboot", "got 1"),
        ("R * * * *", "random"),
        ("0 H * * *", "hashed"),
        ("H/5 * * * *", "deterministic"),
        ("0 0 31 2 *", "never fires"),
    ],
)
def test_invalid_crons(cron: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message) as caught:
        validate(cron, "UTC")
    assert "\n" not in str(caught.value)


def test_names_containing_h_or_r_are_not_mistaken_for_hashes():
    validate("0 0 * MAR,APR THU,FRI", "UTC")


@pytest.mark.parametrize(
    "tz",
    [
        "Mars/Olympus_Mons",
        "utc",
        "Europe/Paris ",
        "",
        "/etc/passwd",
        "../etc",
        "Europe",
        "localtime",
        "\x00",
    ],
)
def test_unknown_zones(tz: str) -> None:
    with pytest.raises(ScheduleError, match="unknown time zone"):
        validate("0 * * * *", tz)


def test_long_bad_input_gives_a_short_message():
    with pytest.raises(ScheduleError) as caught:
        validate("0 " * 5000, "UTC")
    assert len(str(caught.value)) < 200


def test_every_function_validates_its_schedule():
    with pytest.raises(ScheduleError):
        next_slot("0 25 * * *", "UTC", utc(2026, 1, 1))
    with pytest.raises(ScheduleError):
        slots_between("0 * * * *", "Nowhere/Special", utc(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(ScheduleError):
        catch_up("nope", "UTC", None, utc(2026, 1, 1), timedelta(hours=1))


# --- slots_between --------------------------------------------------------------------------------


def test_slots_between_is_half_open():
    slots = list(slots_between("0 * * * *", "UTC", utc(2026, 1, 1, 1), utc(2026, 1, 1, 4)))
    assert slots == [utc(2026, 1, 1, 1), utc(2026, 1, 1, 2), utc(2026, 1, 1, 3)]


def test_slots_between_empty_or_reversed_interval():
    assert list(slots_between("0 * * * *", "UTC", utc(2026, 1, 1, 1), utc(2026, 1, 1, 1))) == []
    assert list(slots_between("0 * * * *", "UTC", utc(2026, 1, 2), utc(2026, 1, 1))) == []


def test_slots_between_is_bounded_and_all_or_nothing():
    start, end = utc(2026, 1, 1), utc(2026, 1, 2)
    assert len(list(slots_between("* * * * *", "UTC", start, end, max_slots=1440))) == 1440
    with pytest.raises(ScheduleError, match="more than 1439 slots"):
        slots_between("* * * * *", "UTC", start, end, max_slots=1439)


# --- spread_offset --------------------------------------------------------------------------------


def test_spread_offset_is_stable_across_processes_and_versions():
    # Golden values: changing them reshuffles every schedule in the fleet.
    window = timedelta(hours=2)
    assert spread_offset(uuid.UUID(int=0), window) == timedelta(seconds=2616, microseconds=189638)
    assert spread_offset("schedule-42", window) == timedelta(seconds=6264, microseconds=347949)


def test_spread_offset_takes_a_uuid_or_its_text():
    schedule_id = uuid.UUID("6f1c1d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f")
    window = timedelta(minutes=30)
    assert spread_offset(schedule_id, window) == spread_offset(str(schedule_id), window)


def test_spread_offset_spreads_evenly():
    # Given 10,000 schedule ids and a 2 h window, no tenth of the window holds more than 20 %.
    window = timedelta(hours=2)
    rng = random.Random(0)
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(10_000)]
    deciles = Counter(int(spread_offset(i, window) / window * 10) for i in ids)
    assert set(deciles) == set(range(10))
    assert max(deciles.values()) <= 2_000
    assert min(deciles.values()) >= 500


def test_spread_offset_zero_and_negative_windows():
    assert spread_offset("x", timedelta(0)) == timedelta(0)
    with pytest.raises(ValueError, match="negative"):
        spread_offset("x", timedelta(seconds=-1))


@given(
    schedule_id=st.one_of(st.uuids(), st.text()),
    window=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=30)),
)
def test_spread_offset_is_within_the_window(
    schedule_id: uuid.UUID | str, window: timedelta
) -> None:
    assert timedelta(0) <= spread_offset(schedule_id, window) < window


# --- catch_up -------------------------------------------------------------------------------------


def test_catch_up_nothing_due():
    result = catch_up(
        "0 * * * *", "UTC", utc(2026, 1, 1, 3), utc(2026, 1, 1, 3, 59), timedelta(hours=1)
    )
    assert result == CatchUp(missed=(), run=None)
    assert result.watermark is None


def test_catch_up_runs_the_latest_slot_and_misses_the_rest():
    # Given an hourly schedule last done at 01:00 and a scheduler back at 04:10,
    result = catch_up(
        "0 * * * *", "UTC", utc(2026, 1, 1, 1), utc(2026, 1, 1, 4, 10), timedelta(minutes=30)
    )
    # Then 02:00 and 03:00 are recorded missed and 04:00 runs.
    assert result == CatchUp(
        missed=(utc(2026, 1, 1, 2), utc(2026, 1, 1, 3)), run=utc(2026, 1, 1, 4)
    )
    assert result.watermark == utc(2026, 1, 1, 4)


def test_catch_up_misses_everything_when_the_latest_slot_is_too_old():
    result = catch_up(
        "0 * * * *", "UTC", utc(2026, 1, 1, 1), utc(2026, 1, 1, 4, 40), timedelta(minutes=30)
    )
    assert result == CatchUp(
        missed=(utc(2026, 1, 1, 2), utc(2026, 1, 1, 3), utc(2026, 1, 1, 4)), run=None
    )
    assert result.watermark == utc(2026, 1, 1, 4)


def test_catch_up_window_is_inclusive():
    now = utc(2026, 1, 1, 4, 30)
    result = catch_up("0 * * * *", "UTC", utc(2026, 1, 1, 3), now, timedelta(minutes=30))
    assert result.run == utc(2026, 1, 1, 4)


def test_catch_up_slot_exactly_now_runs():
    result = catch_up("0 * * * *", "UTC", utc(2026, 1, 1, 3), utc(2026, 1, 1, 4), timedelta(0))
    assert result == CatchUp(missed=(), run=utc(2026, 1, 1, 4))


def test_catch_up_for_a_schedule_that_never_ran():
    now = utc(2026, 1, 1, 4, 10)
    assert catch_up("0 * * * *", "UTC", None, now, timedelta(minutes=30)) == CatchUp(
        missed=(), run=utc(2026, 1, 1, 4)
    )
    assert catch_up("0 * * * *", "UTC", None, now, timedelta(minutes=5)) == CatchUp(
        missed=(), run=None
    )
    # A long window over a frequent cron still finds the latest slot.
    assert catch_up("* * * * *", "UTC", None, now, timedelta(days=365)).run == utc(
        2026, 1, 1, 4, 10
    )
    # A sparse cron with a long window looks back far enough.
    assert catch_up("0 0 1 1 *", "UTC", None, now, timedelta(days=400)).run == utc(2026, 1, 1)
    assert catch_up("0 0 1 1 *", "UTC", None, utc(2026, 6, 1), timedelta(days=100)).run is None


def test_catch_up_clock_behind_the_last_slot_does_nothing():
    result = catch_up(
        "0 * * * *", "UTC", utc(2026, 1, 1, 5), utc(2026, 1, 1, 4), timedelta(hours=1)
    )
    assert result == CatchUp(missed=(), run=None)


def test_catch_up_in_batches_accounts_for_every_slot_once():
    # Given a minutely schedule down for 2,500 minutes and batches of 1,000,
    last: datetime | None = utc(2026, 1, 1)
    now = last + timedelta(minutes=2500, seconds=30)
    missed: list[datetime] = []
    run = None
    for _ in range(10):
        result = catch_up("* * * * *", "UTC", last, now, timedelta(minutes=1), max_missed=1000)
        missed.extend(result.missed)
        run = result.run
        assert len(result.missed) <= 1000
        assert result.run is None or not result.more
        if not result.more:
            break
        last = result.watermark
    # Then every due slot is recorded missed once, and only the latest runs.
    expected = list(slots_between("* * * * *", "UTC", utc(2026, 1, 1, 0, 1), now))
    assert missed == expected[:-1]
    assert run == expected[-1]


def test_catch_up_batch_cut_when_nothing_runs():
    # Exactly max_missed + 1 due slots, none recent enough: a full batch, then one more.
    result = catch_up(
        "0 * * * *", "UTC", utc(2026, 1, 1), utc(2026, 1, 1, 3, 30), timedelta(0), max_missed=2
    )
    assert result == CatchUp(missed=(utc(2026, 1, 1, 1), utc(2026, 1, 1, 2)), run=None, more=True)
    rest = catch_up("0 * * * *", "UTC", result.watermark, utc(2026, 1, 1, 3, 30), timedelta(0))
    assert rest == CatchUp(missed=(utc(2026, 1, 1, 3),), run=None)


def test_catch_up_rejects_bad_arguments():
    with pytest.raises(ValueError, match="negative"):
        catch_up("0 * * * *", "UTC", None, utc(2026, 1, 1), timedelta(seconds=-1))
    with pytest.raises(ValueError, match="max_missed"):
        catch_up("0 * * * *", "UTC", None, utc(2026, 1, 1), timedelta(0), max_missed=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        catch_up("0 * * * *", "UTC", datetime(2026, 1, 1), utc(2026, 1, 1), timedelta(0))


# --- parse_duration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", timedelta(hours=2)),
        ("30m", timedelta(minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(minutes=90)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        (" 2H ", timedelta(hours=2)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "2", "h", "2x", "-1h", "1.5h", "30m1h", "1h 30m", "2hh", "\uff11h", "1w"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ScheduleError, match=r"invalid duration .* expected whole numbers"):
        parse_duration(text)


def test_parse_duration_too_long():
    with pytest.raises(ScheduleError, match="too long"):
        parse_duration("1000000000d")
    with pytest.raises(ScheduleError, match="too long") as caught:
        parse_duration("9" * 5000 + "s")
    assert len(str(caught.value)) < 200


@given(st.integers(0, 10_000), st.integers(0, 100), st.integers(0, 1000), st.integers(0, 10**6))
def test_parse_duration_round_trips(days: int, hours: int, minutes: int, seconds: int) -> None:
    text = f"{days}d{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == timedelta(
        days=days, hours=hours, minutes=minutes, seconds=seconds
    )


@given(st.text(max_size=20))
def test_parse_duration_never_fails_any_other_way(text: str) -> None:
    with contextlib.suppress(ScheduleError):
        assert parse_duration(text) >= timedelta(0)


# --- properties: a brute-force reference for the DST rules ----------------------------------------

PROPERTY_ZONES = [
    NEW_YORK,
    PARIS,
    "America/Santiago",  # transitions at midnight
    "Australia/Lord_Howe",  # 30-minute daylight saving
    "Australia/Sydney",  # southern hemisphere
    "Asia/Kolkata",  # no DST, half-hour offset
    "UTC",
]


def _transitions(tz: str, year: int) -> list[datetime]:
    """Instants at which the zone's offset changes in `year` (hourly scan, then by minute)."""
    zone = ZoneInfo(tz)
    found = []
    moment = utc(year, 1, 1)
    while moment.year == year:
        later = moment + timedelta(hours=1)
        if moment.astimezone(zone).utcoffset() != later.astimezone(zone).utcoffset():
            probe = moment
            while probe.astimezone(zone).utcoffset() == moment.astimezone(zone).utcoffset():
                probe += timedelta(minutes=1)
            found.append(probe)
        moment = later
    return found


TRANSITION_INSTANTS = {tz: _transitions(tz, 2026) + _transitions(tz, 2027) for tz in PROPERTY_ZONES}


@st.composite
def schedules(draw: st.DrawFn) -> tuple[str, set[int], set[int]]:
    """A cron over minutes and hours only, with its fields as sets for a direct matcher."""
    minutes = draw(st.sets(st.integers(0, 59), min_size=1, max_size=4))
    hours = draw(
        st.one_of(st.sets(st.integers(0, 23), min_size=1, max_size=3), st.just(set(range(24))))
    )
    hour_field = "*" if len(hours) == 24 else ",".join(map(str, sorted(hours)))
    return f"{','.join(map(str, sorted(minutes)))} {hour_field} * * *", minutes, hours


@st.composite
def moments(draw: st.DrawFn, tz: str) -> datetime:
    """An instant near one of the zone's transitions (or anywhere, for zones without any)."""
    anchors = TRANSITION_INSTANTS[tz] or [utc(2026, 6, 1)]
    anchor = draw(st.sampled_from(anchors))
    shift = draw(st.integers(-36 * 3600, 12 * 3600))
    return anchor + timedelta(seconds=shift, microseconds=draw(st.integers(0, 999_999)))


def reference_next(minutes: set[int], hours: set[int], tz: str, after: datetime) -> datetime:
    """The next slot found minute by minute from the rules as stated, without croniter."""
    zone = ZoneInfo(tz)

    def matches(w: datetime) -> bool:
        return w.minute in minutes and w.hour in hours

    candidate = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while True:
        here = candidate.astimezone(zone)
        before = (candidate - timedelta(minutes=1)).astimezone(zone).replace(tzinfo=None)
        now_wall = here.replace(tzinfo=None)
        if here.fold == 0:  # fold=1 marks the second occurrence of a repeated wall time
            if matches(now_wall):
                return candidate
            # A jump of the wall clock: the skipped wall times run here, at the gap's end.
            skipped = before + timedelta(minutes=1)
            while skipped < now_wall:
                if matches(skipped):
                    return candidate
                skipped += timedelta(minutes=1)
        candidate += timedelta(minutes=1)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), tz=st.sampled_from(PROPERTY_ZONES), schedule=schedules())
def test_next_slot_agrees_with_a_minute_by_minute_reference(
    data: st.DataObject, tz: str, schedule: tuple[str, set[int], set[int]]
) -> None:
    cron, minutes, hours = schedule
    after = data.draw(moments(tz))
    assert next_slot(cron, tz, after) == reference_next(minutes, hours, tz, after)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), tz=st.sampled_from(PROPERTY_ZONES), schedule=schedules())
def test_next_slot_is_strictly_increasing_and_matches_slots_between(
    data: st.DataObject, tz: str, schedule: tuple[str, set[int], set[int]]
) -> None:
    cron = schedule[0]
    start = data.draw(moments(tz))
    chain = [next_slot(cron, tz, start)]
    for _ in range(30):
        chain.append(next_slot(cron, tz, chain[-1]))
    assert all(a < b for a, b in pairwise(chain))
    assert list(slots_between(cron, tz, chain[0], chain[-1])) == chain[:-1]


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    tz=st.sampled_from(PROPERTY_ZONES),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
)
def test_daily_crons_run_once_a_day_at_a_real_distinct_local_time(
    data: st.DataObject, tz: str, hour: int, minute: int
) -> None:
    zone = ZoneInfo(tz)
    start = data.draw(moments(tz)) - timedelta(days=3)
    runs = []
    slot = start
    for _ in range(8):
        slot = next_slot(f"{minute} {hour} * * *", tz, slot)
        runs.append(slot)
    local = [r.astimezone(zone) for r in runs]
    walls = [r.replace(tzinfo=None) for r in local]
    # Never the same local wall time twice, and each run's wall time exists (round-trips).
    assert len(set(walls)) == len(walls)
    for moment, w in zip(runs, walls, strict=True):
        assert w.replace(tzinfo=zone).astimezone(UTC) == moment
    # One run per nominal day: at the nominal time, or at the end of the gap that ate it.
    for moment, r in zip(runs, local, strict=True):
        nominal = datetime.combine(r.date(), time(hour, minute))
        just_before = (moment - timedelta(seconds=1)).astimezone(zone)
        assert r.replace(tzinfo=None) == nominal or (
            r.utcoffset() != just_before.utcoffset()  # the run is at a transition
            and r.replace(tzinfo=None) > nominal
        )
    assert all(timedelta(hours=22) <= b - a <= timedelta(hours=26) for a, b in pairwise(runs))


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    tz=st.sampled_from(PROPERTY_ZONES),
    schedule=schedules(),
    down=st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=30)),
    window=st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=3)),
)
def test_catch_up_accounts_for_every_due_slot(
    data: st.DataObject,
    tz: str,
    schedule: tuple[str, set[int], set[int]],
    down: timedelta,
    window: timedelta,
) -> None:
    cron = schedule[0]
    last = next_slot(cron, tz, data.draw(moments(tz)))
    now = last + down
    due = list(
        slots_between(cron, tz, last + timedelta(microseconds=1), now + timedelta(microseconds=1))
    )
    result = catch_up(cron, tz, last, now, window, max_missed=10_000)
    assert not result.more
    accounted = [*result.missed, *([result.run] if result.run else [])]
    assert accounted == due
    if due:
        assert (result.run is not None) == (now - due[-1] <= window)
