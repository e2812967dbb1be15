"""The benchmark suite's table and JSON, built from fabricated results (no services, no timing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import suite
from bench.report import Figure, RunInfo, document, markdown_table, number, render, write


def summary(median: float, p99: float, n: int = 100) -> dict[str, float]:
    return {"n": n, "median": median, "p99": p99, "min": median / 2, "max": p99 * 1.2,
            "stdev": 0.001}


def rss(value: float) -> dict[str, Any]:
    return {"at": 0, "pool": [value] * 8, "parents": [value, value]}


RAW: dict[str, dict[str, Any]] = {
    "vault": {"with cache": {"seal_median_us": 8.0, "open_median_us": 7.0, "seal_p99_us": 20.0,
                             "open_p99_us": 21.0, "kms_calls_per_1000_ops": 0.0},
              "without cache": {"seal_median_us": 500.0, "open_median_us": 510.0,
                                "seal_p99_us": 900.0, "open_p99_us": 950.0,
                                "kms_calls_per_1000_ops": 1000.0},
              "n": {"operations": 2000}},
    "refresh": {"throughput": {"delegations": 100, "rounds": 5,
                               "bare_per_second": [2000.0, 2100.0, 1900.0],
                               "whole_per_second": [150.0, 140.0, 160.0],
                               "bare_seconds": summary(0.0005, 0.002),
                               "whole_seconds": summary(0.007, 0.02)},
                "single_flight": {"tasks_per_herd": 50, "herds": 20,
                                  "refresh_requests_per_herd": [1] * 20,
                                  "distinct_tokens_per_herd": [1] * 20, "errors": [],
                                  "slowest_task_seconds": summary(0.3, 0.5, 20)}},
    "kms": {"token_lifetime_seconds": 10, "worker_threads": 4,
            "cached": {"runs": 1000, "delegations": 100, "succeeded": 1000, "kms_total": 101,
                       "kms_calls": {"decrypt": 101}, "token_loads": 500, "refreshes": 200},
            "uncached": {"runs": 1000, "delegations": 100, "succeeded": 1000, "kms_total": 701,
                         "kms_calls": {"decrypt": 701}, "token_loads": 500, "refreshes": 200}},
    "audit": {"per_call": {"calls_per_variant": 2000, "rounds": 5,
                           "bare_httpx": {"median_ms": 0.33, "p99_ms": 1.0,
                                          "round_per_call_ms": [0.4, 0.5],
                                          "ratio_to_bare_httpx": 1.0},
                           "none": {"median_ms": 1.1, "p99_ms": 3.0,
                                    "round_per_call_ms": [1.2, 1.3],
                                    "ratio_to_bare_httpx": 3.3},
                           "runtime": {"median_ms": 2.4, "p99_ms": 9.0,
                                       "round_per_call_ms": [2.6, 3.1],
                                       "ratio_to_bare_httpx": 7.3}},
              "verify": {"events": 1_000_000, "chains": 10_000,
                         "verify_seconds": [4.0, 4.2, 4.1],
                         "verify_events_per_second": 243_902,
                         "command_events_per_second": 180_000}},
    "revocation": {"push": summary(0.0045, 0.047, 200), "fallback": summary(0.033, 0.08, 60),
                   "baseline_terminate": summary(0.0104, 0.063, 200), "processes_killed": 0,
                   "baseline_revokes_missed": 1, "worker_processes": 4},
    "scheduler": {"schedules": 1_000_000, "due": 10_000, "batch": 500,
                  "bare_messages_per_second": 3000.0, "one_scheduler_seconds": 5.0,
                  "two_schedulers_seconds": 3.0, "index_scan": True},
    "fleet": {"workers": 2, "concurrency": 4,
              "behalf": {"runs": 10_000, "delegations": 10_000, "seconds": 200.0,
                         "runs_per_second": 50.0, "statuses": {"succeeded": 10_008},
                         # as read back from results.json: sample keys are strings
                         "rss_samples": {"1000": rss(116.0), "5000": rss(118.0)},
                         "rss_final": rss(119.0)},
              "bare": {"runs": 10_000, "seconds": 50.0, "runs_per_second": 200.0,
                       "rss_samples": {"1000": rss(60.0), "5000": rss(61.0)},
                       "rss_final": rss(61.0)}},
}

INFO = RunInfo(date="2026-12-07 09:00 UTC", cores=2, commit="abc1234", dirty=True,
               quick=False, python="3.11.7", durations={"vault": 3.0},
               failures={"nothing": "fabricated failure"})


def figures() -> list[Figure]:
    return suite.collect(RAW)


def test_every_benchmark_yields_figures_with_targets_judged() -> None:
    produced = figures()
    assert {f.bench for f in produced} == set(suite.BENCHMARKS)
    verdicts = {f.name.split(":")[0]: f.met for f in produced}
    assert verdicts["audit verify"] is True
    assert verdicts["refresh through the whole path (lease, KMS, AS, commit)"] is False
    assert verdicts["end to end"] is False  # 0.25 x bare
    assert verdicts["worker memory"] is False  # 1.93 x bare
    assert verdicts["KMS calls per 1,000 job runs on 100 delegations (data-key cache), one "
                    "worker process"] is False  # 101 > 100
    single = next(f for f in produced if "concurrent tasks" in f.name)
    assert single.met is True and single.median == 1


def test_table_has_one_row_per_figure_and_says_what_missed() -> None:
    produced = figures()
    table = markdown_table(produced)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(produced)
    assert len({len(line) for line in lines}) == 1  # padded: columns line up in a terminal
    noted = [f for f in produced if f.note]
    assert f"[{len(noted)}] {noted[-1].note}" in table  # notes are footnotes, numbered
    assert "NOT met" in table and "| met" in table
    text = render(produced, INFO)
    assert "2 cores" in text and "abc1234 (with uncommitted changes)" in text
    assert "NOT met: fleet: end to end" in text
    assert "FAILED: nothing: fabricated failure" in text


def test_document_is_json_with_the_run_facts(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write(path, document(figures(), INFO, RAW))
    doc = json.loads(path.read_text())
    assert (doc["date"], doc["cores"], doc["commit"], doc["quick"]) == (
        "2026-12-07 09:00 UTC", 2, "abc1234", False)
    assert doc["raw"]["scheduler"]["due"] == 10_000
    results = {f["result"] for f in doc["figures"]}
    assert results <= {"met", "NOT met", "—"} and "NOT met" in results


def test_a_shrunk_batch_says_so() -> None:
    raw = json.loads(json.dumps(RAW["fleet"]))
    raw["behalf"]["runs"] = raw["bare"]["runs"] = 5_000
    end_to_end = suite.figures_for("fleet", raw)[0]
    assert "SHRUNK: the issue's batch is 10,000 runs" in end_to_end.note
    assert "SHRUNK" not in figures()[-2].note


def test_names_and_aliases_resolve_in_suite_order() -> None:
    assert suite.resolve(["memory", "refresh"]) == ["refresh", "fleet"]
    assert suite.resolve([]) == list(suite.BENCHMARKS)
    with pytest.raises(ValueError, match="unknown benchmark"):
        suite.resolve(["nope"])


@pytest.mark.parametrize(("value", "unit", "text"), [
    (None, "ms", "—"), (0.0, "", "0"), (4.5, "ms", "4.5 ms"), (4.0, "", "4"),
    (0.0123, "ms", "0.0123 ms"), (12.34, "", "12.3"), (243_902.0, "/s", "243,902 /s"),
])
def test_numbers_read_well(value: float | None, unit: str, text: str) -> None:
    assert number(value, unit) == text
