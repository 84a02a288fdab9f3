"""Hot path: ns per ``await manager.token(c)`` with a fresh token.

Measured side by side, in one run, with a bare awaited dict lookup, the same
lookup plus the ``time.monotonic()`` expiry check sfrtr used to make, and an
``asyncio.Lock``-per-call variant. Rounds interleave the variants so drift on
a busy machine hits all alike; best and median over rounds are reported, and
the ratio to the bare lookup is what the reader should trust.

``python -m benchmarks.hot_path --instructions`` counts CPU instructions per
call under ``valgrind --tool=callgrind`` instead (one process per variant, and
one doing no calls, subtracted): a figure the machine's load cannot move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sfrtr import InstanceUrlPolicy, MemoryStore, OAuthClient, OAuthConfig, Secret, TokenManager
from sfrtr.oauth.grant import TokenGrant

_monotonic = time.monotonic

VARIANTS = ("bare awaited dict lookup", "dict lookup + monotonic() check",
            "asyncio.Lock per call", "sfrtr manager.token()")
INSTRUMENTED = "sfrtr manager.token(), OpenTelemetry on"


class _Stamped:
    __slots__ = ("refresh_at", "token")

    def __init__(self, token: str) -> None:
        self.token = token
        self.refresh_at = _monotonic() + 3600


async def _setup(customers: int) -> tuple[TokenManager, dict[str, Callable[[str], Awaitable[str]]]]:
    oauth = OAuthClient(OAuthConfig(client_id="bench", client_secret=Secret("s"),
                                    login_url="http://127.0.0.1:9",
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    manager = TokenManager(oauth, MemoryStore())
    plain: dict[str, str] = {}
    stamped: dict[str, _Stamped] = {}
    locks: dict[str, asyncio.Lock] = {}
    now = time.time()
    for i in range(customers):
        c = f"c{i}"
        grant = TokenGrant(access_token=Secret(f"at-{i}"), refresh_token=Secret(f"rt-{i}"),
                           instance_url="http://127.0.0.1", identity_url="id", issued_at=now,
                           scope="api")
        await manager.connect(c, grant)
        plain[c] = f"at-{i}"
        stamped[c] = _Stamped(f"at-{i}")
        locks[c] = asyncio.Lock()

    async def bare(customer: str) -> str:
        return plain[customer]

    async def checked(customer: str) -> str:
        # What sfrtr's hot path did before: a lookup and a clock read per call.
        entry = stamped.get(customer)
        if entry is not None and _monotonic() < entry.refresh_at:
            return entry.token
        raise AssertionError("not fresh")

    async def locked(customer: str) -> str:
        async with locks[customer]:
            return plain[customer]

    fns = dict(zip(VARIANTS, (bare, checked, locked, manager.token), strict=True))
    instrumented = await _instrumented(customers, now)
    if instrumented is not None:
        fns[INSTRUMENTED] = instrumented.token
        _keep.append(instrumented)
    return manager, fns


_keep: list[TokenManager] = []


async def _instrumented(customers: int, now: float) -> TokenManager | None:
    """The same manager with metrics and traces on (the OpenTelemetry SDK, from the
    bench extra), or None without the SDK."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    from sfrtr.telemetry import instrument

    oauth = OAuthClient(OAuthConfig(client_id="bench", client_secret=Secret("s"),
                                    login_url="http://127.0.0.1:9",
                                    instance_policy=InstanceUrlPolicy.for_emulator()))
    manager = TokenManager(oauth, MemoryStore())
    instrument(manager, meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
               tracer_provider=TracerProvider())
    for i in range(customers):
        await manager.connect(f"c{i}", TokenGrant(
            access_token=Secret(f"at-{i}"), refresh_token=Secret(f"rt-{i}"),
            instance_url="http://127.0.0.1", identity_url="id", issued_at=now, scope="api"))
    return manager


async def _loop(fn: Callable[[str], Awaitable[str]], customer: str, n: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(n):
        await fn(customer)
    return (time.perf_counter_ns() - started) / n


async def run(n: int = 200_000, repeats: int = 7, customers: int = 1000) -> list[dict[str, Any]]:
    manager, fns = await _setup(customers)
    customer = f"c{customers // 2}"
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        names = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in names:
            samples[name].append(await _loop(fns[name], customer, n))
    await manager.aclose()
    while _keep:
        await _keep.pop().aclose()
    base_best = min(samples[VARIANTS[0]])
    base_median = statistics.median(samples[VARIANTS[0]])
    return [{"variant": name, "best ns/call": min(v), "median ns/call": statistics.median(v),
             "ratio to bare (best)": min(v) / base_best,
             "ratio to bare (median)": statistics.median(v) / base_median}
            for name, v in samples.items()]


# -- instruction counts --------------------------------------------------------------


async def _one_variant(name: str, n: int) -> None:
    manager, fns = await _setup(1000)
    fn = fns[name] if name != "none" else fns[VARIANTS[0]]
    await _loop(fn, "c500", 1_000)  # warm up (specialised bytecode) in every process
    if name != "none":
        await _loop(fn, "c500", n)
    await manager.aclose()


def instructions(n: int = 200_000) -> list[dict[str, Any]]:
    """Instructions per call of each variant, by callgrind (minus a no-call run)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    counts: dict[str, int] = {}
    for name in ("none", *VARIANTS):
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, "-m", "benchmarks.hot_path", "--one", name, "--n", str(n)],
            capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        assert found is not None, done.stderr[-2000:]
        counts[name] = int(found.group(1))
    per_call = {name: (counts[name] - counts["none"]) / n for name in VARIANTS}
    base = per_call[VARIANTS[0]]
    return [{"variant": name, "instructions/call": v, "ratio to bare": v / base}
            for name, v in per_call.items()]


def main() -> None:
    from benchmarks import report

    parser = argparse.ArgumentParser(prog="python -m benchmarks.hot_path")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per call under callgrind")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        asyncio.run(_one_variant(args.one, args.n))
        return
    if args.instructions:
        rows = instructions(args.n)
        print(report.table("Hot path: instructions per call (callgrind)", rows))
        path = report.write("hot_path_instructions", {"n": args.n}, rows)
    else:
        rows = asyncio.run(run(n=args.n))
        print(report.table("Hot path: fresh-token call", rows))
        path = report.write("hot_path", {"n": args.n}, rows)
    print(json.dumps(str(path)))


if __name__ == "__main__":
    main()
