"""Cost of sealing and opening one token blob, with and without the data-key cache.

KMS is moto's in-process KMS (real boto3 request/response path, no network), so the uncached
figures include boto3's own per-call overhead but not a network round trip; KMS calls are
counted, which is what the cache saves in production.

    .venv/bin/python bench/vault.py [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
from moto import mock_aws

from bench.report import Figure, number
from delegation.clock import SystemClock
from delegation.kms import AwsKms
from delegation.vault import DataKeyCache, Vault, delegation_context

TOKENS = json.dumps({"access_token": "a" * 800, "refresh_token": "r" * 64,
                     "expires_at": 1_800_000_000}).encode()


def measure(vault: Vault, n: int) -> dict[str, float]:
    context = delegation_context(uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    sealed = vault.seal(TOKENS, context)
    vault.kms_calls.clear()
    seal_times, open_times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sealed = vault.seal(TOKENS, context, reuse=sealed)
        t1 = time.perf_counter()
        vault.open(sealed, context)
        t2 = time.perf_counter()
        seal_times.append(t1 - t0)
        open_times.append(t2 - t1)
    return {
        "seal_median_us": statistics.median(seal_times) * 1e6,
        "open_median_us": statistics.median(open_times) * 1e6,
        "seal_p99_us": sorted(seal_times)[int(n * 0.99) - 1] * 1e6,
        "open_p99_us": sorted(open_times)[int(n * 0.99) - 1] * 1e6,
        "kms_calls_per_1000_ops": 1000 * sum(vault.kms_calls.values()) / (2 * n),
    }


def run(n: int = 2000) -> dict[str, dict[str, float]]:
    with mock_aws():
        client = boto3.client("kms", region_name="us-east-1", aws_access_key_id="x",
                              aws_secret_access_key="x")
        kms = AwsKms(client, client.create_key()["KeyMetadata"]["Arn"])
        cached = Vault(kms, DataKeyCache(max_entries=1000, max_age=300,
                                         monotonic=SystemClock().monotonic))
        uncached = Vault(kms)
        rows = {"with cache": measure(cached, n), "without cache": measure(uncached, n)}
    return {**rows, "n": {"operations": n}}


def figures(result: dict[str, dict[str, float]]) -> list[Figure]:
    """Context for the KMS figure: what one open costs with and without the data-key cache."""
    cached, uncached = result["with cache"], result["without cache"]
    return [Figure(
        bench="vault", name="vault: open one token blob (seal alike), moto KMS in-process",
        unit="µs", median=cached["open_median_us"], p99=cached["open_p99_us"],
        runs=int(result["n"]["operations"]),
        baseline=f"uncached: {number(uncached['open_median_us'], 'µs')}, "
                 f"{number(uncached['kms_calls_per_1000_ops'])} KMS calls/1k ops",
        ratio=cached["open_median_us"] / uncached["open_median_us"],
        note=f"cached: {number(cached['kms_calls_per_1000_ops'])} KMS calls/1k ops; "
             f"seal {number(cached['seal_median_us'], 'µs')}")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    result = run(args.n)
    rows = {k: result[k] for k in ("with cache", "without cache")}
    print(f"vault: seal+open of a {len(TOKENS)}-byte token blob, n={args.n} each")
    print(f"{'':16}{'seal med':>10}{'seal p99':>10}{'open med':>10}{'open p99':>10}"
          f"{'KMS/1k ops':>12}")
    for name, r in rows.items():
        print(f"{name:16}{r['seal_median_us']:>8.1f}us{r['seal_p99_us']:>8.1f}us"
              f"{r['open_median_us']:>8.1f}us{r['open_p99_us']:>8.1f}us"
              f"{r['kms_calls_per_1000_ops']:>12.1f}")
    ratio = rows["without cache"]["open_median_us"] / rows["with cache"]["open_median_us"]
    print(f"open without cache / with cache: {ratio:.1f}x")

if __name__ == "__main__":
    main()
