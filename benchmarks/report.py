"""Printing a benchmark's table and writing its JSON, the same way for every benchmark."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("SFRTR_BENCH_RESULTS") or Path(__file__).parent / "results")
"""Where JSON and charts go: ``benchmarks/results/``, or ``$SFRTR_BENCH_RESULTS`` (a
reference run kept apart from the smoke test's tiny runs in a shared work tree)."""


def machine() -> dict[str, Any]:
    versions = {}
    for dist in ("sfrtr", "aiohttp", "orjson", "anyio", "aetcd"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu model": _cpu_model(),
            "load average (1, 5, 15 min)": [round(x, 2) for x in os.getloadavg()],
            "versions": versions}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def table(title: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text table; columns are the keys of the first row."""
    columns = list(rows[0])
    shown = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in shown)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in shown]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write(name: str, parameters: dict[str, Any], rows: list[dict[str, Any]],
          notes: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({
        "benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "parameters": parameters, "rows": rows, "notes": notes or {},
    }, indent=2))
    return path
