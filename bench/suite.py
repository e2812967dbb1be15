"""`make bench`: every benchmark against real PostgreSQL and Redis, one table, one JSON file.

Each benchmark runs in a child process of its own (fresh imports, its own Celery apps and
mocks, a time limit, and a crash that costs one row, not the table), hands back its raw
result as JSON, and the figures are built here from those results, each beside the baseline
measured in the same run.

    .venv/bin/python -m bench.suite                 # everything, issue sizes (< 15 min)
    .venv/bin/python -m bench.suite --quick         # smoke sizes, a couple of minutes
    .venv/bin/python -m bench.suite refresh kms     # some benchmarks (aliases: memory, e2e)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import Figure, RunInfo, document, render, write  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"
QUICK_RESULTS = ROOT / "bench" / "results-quick.json"


@dataclass(frozen=True)
class Bench:
    """A benchmark module (with `run(**sizes) -> dict` and `figures(dict) -> [Figure]`)."""

    module: str
    full: dict[str, Any]
    quick: dict[str, Any]
    timeout: float = 900.0
    aliases: tuple[str, ...] = field(default=())


BENCHMARKS: dict[str, Bench] = {
    "vault": Bench("bench.vault", {"n": 2000}, {"n": 200}),
    "refresh": Bench("bench.refresh", {"delegations": 100, "rounds": 5, "herds": 20},
                     {"delegations": 20, "rounds": 2, "herds": 3},
                     aliases=("single-flight",)),
    "kms": Bench("bench.kms", {"delegations": 100, "runs": 1000},
                 {"delegations": 20, "runs": 200}),
    "audit": Bench("bench.audit", {"calls": 400, "rounds": 5, "events": 1_000_000,
                                   "chains": 10_000},
                   {"calls": 50, "rounds": 2, "events": 20_000, "chains": 500},
                   aliases=("ctx-http", "verify")),
    "revocation": Bench("bench.revocation", {"revocations": 200, "fallback": 60},
                        {"revocations": 12, "fallback": 4}),
    "scheduler": Bench("bench.scheduler", {"schedules": 1_000_000, "due": 10_000},
                       {"schedules": 20_000, "due": 1_000}),
    # Memory is sampled at the points (1,000 and 5,000 runs) in the end-to-end batch.
    "fleet": Bench("bench.fleet", {"runs": 10_000, "delegations": 10_000,
                                   "sample_at": [1_000, 5_000]},
                   {"runs": 300, "delegations": 300, "sample_at": [100, 250]},
                   timeout=1200, aliases=("e2e", "memory")),
}


def resolve(names: Sequence[str]) -> list[str]:
    """Benchmark names in suite order, aliases allowed; an unknown name is an error."""
    wanted = set()
    for name in names:
        found = [key for key, bench in BENCHMARKS.items()
                 if name == key or name in bench.aliases]
        if not found:
            known = sorted([*BENCHMARKS, *(a for b in BENCHMARKS.values() for a in b.aliases)])
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(known)}")
        wanted.update(found)
    return [key for key in BENCHMARKS if not names or key in wanted]


def figures_for(name: str, raw: dict[str, Any]) -> list[Figure]:
    module = importlib.import_module(BENCHMARKS[name].module)
    make: Callable[[dict[str, Any]], list[Figure]] = module.figures
    return make(raw)


def collect(raw: dict[str, dict[str, Any]]) -> list[Figure]:
    """Every figure of every benchmark that produced a result, in suite order."""
    return [figure for name in BENCHMARKS if name in raw
            for figure in figures_for(name, raw[name])]


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def run_child(name: str, sizes: dict[str, Any], timeout: float, log: Path
              ) -> dict[str, Any]:
    """Run one benchmark in a fresh interpreter; its output goes to `log`."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
    environ["PYTHONPATH"] = str(ROOT)
    try:
        with log.open("wb") as sink:
            done = subprocess.run(
                [sys.executable, "-m", "bench.suite", "--child", name, "--sizes",
                 json.dumps(sizes), "--out", str(out)],
                cwd=ROOT, env=environ, stdout=sink, stderr=subprocess.STDOUT,
                timeout=timeout, start_new_session=True, check=False)
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"exit {done.returncode}: {' / '.join(tail)[-300:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        out.unlink(missing_ok=True)


def child(name: str, sizes: dict[str, Any], out: Path) -> None:
    module = importlib.import_module(BENCHMARKS[name].module)
    result = module.run(**sizes)
    out.write_text(json.dumps(result, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the results (default {RESULTS.name}, "
                             f"or {QUICK_RESULTS.name} with --quick)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.sizes), args.out)
        return 0
    if args.list:
        for name, bench in BENCHMARKS.items():
            aliases = f" (also: {', '.join(bench.aliases)})" if bench.aliases else ""
            print(f"{name}{aliases}: {bench.module}, full {bench.full}, quick {bench.quick}")
        return 0
    try:
        names = resolve(args.names)
    except ValueError as exc:
        parser.error(str(exc))
    logs = Path(tempfile.mkdtemp(prefix="behalf-bench-logs-"))
    raw: dict[str, dict[str, Any]] = {}
    durations: dict[str, float] = {}
    failures: dict[str, str] = {}
    suite_started = time.monotonic()
    for name in names:
        bench = BENCHMARKS[name]
        sizes = bench.quick if args.quick else bench.full
        print(f"[{time.monotonic() - suite_started:5.0f} s] {name} {sizes} ...", flush=True)
        started = time.monotonic()
        try:
            raw[name] = run_child(name, sizes, bench.timeout, logs / f"{name}.log")
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            failures[name] = str(exc)
            print(f"  FAILED ({exc}); log: {logs / f'{name}.log'}", flush=True)
        durations[name] = round(time.monotonic() - started, 1)
    info = RunInfo(date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   cores=os.cpu_count(), commit=git("rev-parse", "--short", "HEAD"),
                   dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                   quick=args.quick, python=platform.python_version(),
                   durations=durations, failures=failures)
    figures = collect(raw)
    print("\n" + render(figures, info))
    path = args.json or (QUICK_RESULTS if args.quick else RESULTS)
    write(path, document(figures, info, raw))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}; "
          f"benchmark logs in {logs}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
