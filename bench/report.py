"""One row per figure, one table for the whole suite, one JSON document per run.

Pure formatting (no services, no clocks of its own), so it is unit-tested on fabricated
results: what a reviewer reads must not depend on a benchmark having run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One measured figure beside its baseline from the same run.

    `met` is None when the figure has no target (a context figure); `note` says what was
    shrunk or how to read the figure.
    """

    bench: str
    name: str
    unit: str
    median: float | None
    p99: float | None = None
    runs: int | None = None
    spread: str = ""
    baseline: str = "—"
    ratio: float | None = None
    target: str = "—"
    met: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class RunInfo:
    """Where and when the figures were measured (absolute values only compare on one machine)."""

    date: str
    cores: int | None
    commit: str
    dirty: bool
    quick: bool
    python: str
    durations: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def number(value: float | None, unit: str = "") -> str:
    """A value with a sensible number of digits: 3 significant below 100, thousands split."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1 or magnitude == 0:
        text = f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "—"}[met]


COLUMNS = ("figure", "median", "p99", "runs", "spread", "baseline (same run)", "ratio",
           "target", "result")


def row(figure: Figure, mark: str = "") -> tuple[str, ...]:
    return (
        figure.name + mark,
        number(figure.median, figure.unit),
        number(figure.p99, figure.unit) if figure.p99 is not None else "—",
        f"{figure.runs:,}" if figure.runs is not None else "—",
        figure.spread or "—",
        figure.baseline,
        f"{figure.ratio:.2f} x" if figure.ratio is not None else "—",
        figure.target,
        verdict(figure.met),
    )


def markdown_table(figures: Sequence[Figure]) -> str:
    """A Markdown table (what the README shows), columns padded so it also reads in a
    terminal; each figure's note becomes a numbered footnote under it."""
    marks: dict[int, str] = {}
    for figure in figures:
        if figure.note:
            marks[id(figure)] = f" [{len(marks) + 1}]"
    rows = [COLUMNS, *(row(f, marks.get(id(f), "")) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows[1:]]
    notes = [f"{marks[id(f)].strip()} {f.note}" for f in figures if id(f) in marks]
    return "\n".join(out + (["", *notes] if notes else []))


def header(info: RunInfo) -> str:
    commit = info.commit + (" (with uncommitted changes)" if info.dirty else "")
    mode = "quick (smoke sizes: figures are not the issue's)" if info.quick else "full"
    return (f"behalf benchmarks, {info.date}, {info.cores} cores, commit {commit}, "
            f"Python {info.python}, {mode}")


def closing(figures: Sequence[Figure], info: RunInfo) -> str:
    judged = [f for f in figures if f.met is not None]
    missed = [f for f in judged if f.met is False]
    lines = [f"{len(judged) - len(missed)} of {len(judged)} targets met."]
    lines += [f"NOT met: {f.bench}: {f.name}" for f in missed]
    lines += [f"FAILED: {name}: {reason}" for name, reason in info.failures.items()]
    if info.durations:
        lines.append("durations: " + ", ".join(f"{name} {seconds:.0f} s"
                                               for name, seconds in info.durations.items()))
    return "\n".join(lines)


def render(figures: Sequence[Figure], info: RunInfo) -> str:
    return "\n\n".join([header(info), markdown_table(figures), closing(figures, info)])


def document(figures: Sequence[Figure], info: RunInfo, raw: dict[str, Any]) -> dict[str, Any]:
    """The JSON written to bench/results.json: the table's rows plus each benchmark's raw dict."""
    return {
        **asdict(info),
        "figures": [asdict(f) | {"result": verdict(f.met)} for f in figures],
        "raw": raw,
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


def spread(values: Sequence[float], unit: str = "") -> str:
    """min-max of per-round values: how far apart the rounds of a noisy machine landed."""
    if not values:
        return ""
    if len(values) == 1:
        return "one round"
    return f"{number(min(values))}-{number(max(values), unit)}"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base
