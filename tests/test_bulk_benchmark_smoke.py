"""The bulk benchmark runs at a tiny size, so it never rots (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_bulk_benchmark_runs_and_counts_api_calls():
    done = subprocess.run([sys.executable, "-m", "benchmarks.bulk", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(ROOT, "benchmarks", "results", "bulk-quick.json")) as f:
        rows = {r["way"].split(" (")[0]: r for r in json.load(f)["rows"] if r["rows"] != 500}
    assert rows["sObject Collections create"]["api_calls"] == 3  # 450 rows, 200 per call
    assert rows["single-record create"]["api_calls"] == 50
    bulk = rows["Bulk API 2.0 insert + results"]
    assert bulk["jobs"] == 1
    # create, upload, close, at least one status read, one results download
    assert 5 <= bulk["api_calls"] < 50
    assert bulk["peak_py_alloc_mb"] > 0
