"""Overhead of the resilience runtime on the hot path: breaker, rejection, keyed mutex, retry policy.

``python -m bench.bench_resilience [--quick] [--json]``. Every figure is the median of several
repeats; "added" figures are medians of paired differences against a bare ``await f()`` of the
same trivial coroutine measured in the same repeat, so loop overhead cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pybreaker

from resilience.breakers import Breaker
from resilience.clock import SystemClock
from resilience.errors import CircuitOpenError
from resilience.mutex import KeyedMutex
from resilience.retries import RetryPolicy

Loop = Callable[[int], Awaitable[None]]


async def _trivial() -> None:
    return None


def _trivial_sync() -> None:
    return None


async def _timed(loop: Loop, n: int) -> float:
    """Nanoseconds per iteration of ``loop(n)``, with the garbage collector paused."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        await loop(n)
        return (time.perf_counter_ns() - start) / n
    finally:
        gc.enable()


async def _iterations(loop: Loop, seconds: float) -> int:
    """How many iterations of ``loop`` take about ``seconds`` (so every figure costs the same time)."""
    probe = 1_000
    per_iteration_ns = await _timed(loop, probe)
    return max(probe, min(1_000_000, int(seconds * 1e9 / per_iteration_ns)))


async def _median(loop: Loop, seconds: float, repeats: int) -> float:
    """Median ns/iteration of ``loop`` over ``repeats`` runs of about ``seconds`` each."""
    n = await _iterations(loop, seconds)
    return statistics.median([await _timed(loop, n) for _ in range(repeats)])


async def _paired(loop: Loop, bare: Loop, seconds: float, repeats: int) -> tuple[float, float]:
    """Median ns/iteration of ``loop`` and the median of its paired excess over ``bare``."""
    n = await _iterations(loop, seconds)
    totals: list[float] = []
    added: list[float] = []
    for _ in range(repeats):
        base = await _timed(bare, n)
        total = await _timed(loop, n)
        totals.append(total)
        added.append(total - base)
    return statistics.median(totals), statistics.median(added)


async def _bare(n: int) -> None:
    f = _trivial
    for _ in range(n):
        await f()


def _breaker_loop(breaker: Breaker, timeout: float | None = None) -> Loop:
    async def loop(n: int) -> None:
        call, f = breaker.call, _trivial
        if timeout is None:
            for _ in range(n):
                await call(f)
        else:
            for _ in range(n):
                await call(f, timeout=timeout)

    return loop


def _lease_loop(breaker: Breaker) -> Loop:
    async def loop(n: int) -> None:
        admit, f = breaker.admit, _trivial
        for _ in range(n):
            with admit():
                await f()

    return loop


def _rejection_loop(breaker: Breaker) -> Loop:
    async def loop(n: int) -> None:
        call, f = breaker.call, _trivial
        for _ in range(n):
            try:
                await call(f)
            except CircuitOpenError:
                pass

    return loop


def _mutex_loop(mutex: KeyedMutex) -> Loop:
    async def loop(n: int) -> None:
        acquire, f = mutex.acquire, _trivial
        for _ in range(n):
            async with acquire("channel:1", 5.0):
                await f()

    return loop


def _retry_loop(policy: RetryPolicy) -> Loop:
    async def loop(n: int) -> None:
        call, f = policy.call, _trivial
        for _ in range(n):
            await call(f)

    return loop


async def _sync_baseline(seconds: float, repeats: int) -> float:
    """pybreaker's own (synchronous) ``call`` overhead in ns, for comparison."""
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    excess: list[float] = []

    async def bare(k: int) -> None:
        for _ in range(k):
            _trivial_sync()

    async def guarded(k: int) -> None:
        call = cb.call
        for _ in range(k):
            call(_trivial_sync)

    n = await _iterations(guarded, seconds)
    for _ in range(repeats):
        base = await _timed(bare, n)
        excess.append(await _timed(guarded, n) - base)
    return statistics.median(excess)


async def _measure(quick: bool) -> dict[str, Any]:
    # Each timed run lasts about `seconds`; ~90 runs in all keep a full run near 10 s.
    seconds = 0.01 if quick else 0.08
    repeats = 3 if quick else 7
    clock = SystemClock()

    closed = Breaker("bench", clock, fail_max=5, reset_timeout=60.0)
    bare_ns = await _median(_bare, seconds, repeats)
    call_ns, call_added = await _paired(_breaker_loop(closed), _bare, seconds, repeats)
    timeout_ns, timeout_added = await _paired(_breaker_loop(closed, timeout=30.0), _bare, seconds, repeats)
    lease_ns, lease_added = await _paired(_lease_loop(closed), _bare, seconds, repeats)
    pybreaker_added = await _sync_baseline(seconds, repeats)

    opened = Breaker("bench.open", clock, fail_max=1, reset_timeout=3600.0)
    opened.force_open(3600.0, reason="bench")
    reject_ns = await _median(_rejection_loop(opened), seconds, repeats)

    mutex = KeyedMutex(clock=clock)
    mutex_ns, mutex_added = await _paired(_mutex_loop(mutex), _bare, seconds, repeats)

    policy = RetryPolicy("bench", max_attempts=3)
    retry_ns, retry_added = await _paired(_retry_loop(policy), _bare, seconds, repeats)

    return {
        "run": {"seconds_per_timed_run": seconds, "repeats": repeats},
        "bare_await_ns": bare_ns,
        "breaker_call_ns": call_ns,
        "breaker_call_added_us": call_added / 1000,
        "breaker_call_timeout_added_us": timeout_added / 1000,
        "breaker_lease_added_us": lease_added / 1000,
        "pybreaker_sync_call_added_us": pybreaker_added / 1000,
        "breaker_rejection_us": reject_ns / 1000,
        "mutex_acquire_release_us": mutex_added / 1000,
        "mutex_total_ns": mutex_ns,
        "retry_first_try_added_us": retry_added / 1000,
        "retry_total_ns": retry_ns,
        "timeout_total_ns": timeout_ns,
        "lease_total_ns": lease_ns,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run every measurement in a fresh event loop; return the figures plus a ``summary`` table."""
    figures = asyncio.run(_measure(quick))
    pybreaker_us = figures["pybreaker_sync_call_added_us"]
    figures["summary"] = [
        _row("bare await f()", figures["bare_await_ns"], "ns/call"),
        _row("breaker.call(f)", figures["breaker_call_ns"], "ns/call"),
        _row("breaker.call(f) added", figures["breaker_call_added_us"], "us/call", "<= 5", pybreaker_us),
        _row("breaker.call(f, timeout=) added", figures["breaker_call_timeout_added_us"], "us/call"),
        _row("with breaker.admit() added", figures["breaker_lease_added_us"], "us/call", "", pybreaker_us),
        _row("rejection while open", figures["breaker_rejection_us"], "us/rejection"),
        _row("KeyedMutex acquire+release (uncontended)", figures["mutex_acquire_release_us"], "us"),
        _row("RetryPolicy.call first-try success added", figures["retry_first_try_added_us"], "us/call"),
    ]
    return figures


def _row(
    figure: str, value: float, unit: str, target: str = "", baseline: float | str = ""
) -> dict[str, Any]:
    return {"figure": figure, "value": round(value, 3), "unit": unit, "target": target, "baseline": baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_resilience", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(quick=args.quick)
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [("figure", "value", "unit", "target", "baseline (pybreaker sync call)")]
    for row in result["summary"]:
        baseline = row["baseline"]
        rows.append((
            row["figure"], f"{row['value']:,.3f}", row["unit"], row["target"],
            f"{baseline:.3f}" if isinstance(baseline, float) else str(baseline),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"({time.perf_counter() - started:.1f}s, medians of {result['run']['repeats']} repeats)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
