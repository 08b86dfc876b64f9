"""`python -m bench` (also `make bench`): run every bench script and print one summary table.

Each ``bench/bench_*.py`` module exposes ``run(quick: bool = False) -> dict``. A module may
return a ``"summary"`` list of rows ``{"figure", "value", "unit", "target", "baseline"}``;
otherwise every numeric leaf of its result is listed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from typing import Any

import structlog

import bench


def _flatten(prefix: str, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        rows: list[dict[str, Any]] = []
        for key, sub in value.items():
            rows.extend(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return rows
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [{"figure": prefix, "value": value, "unit": "", "target": "", "baseline": ""}]
    return []


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("only", nargs="*", help="bench module names to run (default: all)")
    args = parser.parse_args(argv)

    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(names)}")
        names = [n for n in names if n in args.only]

    results: dict[str, Any] = {}
    failed = 0
    for name in names:
        started = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        saved = structlog.get_config()
        try:
            module = importlib.import_module(f"bench.{name}")
            results[name] = module.run(quick=args.quick)
        except Exception as exc:  # a broken bench is reported, the others still run
            failed += 1
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            structlog.configure(**saved)  # one bench's logging set-up must not leak into the next
        print(f"  {name} took {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)

    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 1 if failed else 0

    header = ("bench", "figure", "value", "unit", "target", "baseline")
    rows: list[tuple[str, ...]] = []
    for name, result in results.items():
        if "error" in result:
            rows.append((name, "ERROR", result["error"], "", "", ""))
            continue
        summary = result.get("summary") or _flatten("", result)
        for row in summary:
            rows.append((
                name.removeprefix("bench_"), str(row["figure"]), _fmt(row["value"]), str(row.get("unit", "")),
                str(row.get("target", "")), _fmt(row.get("baseline", "")),
            ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
