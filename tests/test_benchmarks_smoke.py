"""The benchmark suite runs at a tiny size, so it never rots (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmarks_run_and_write_json():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Hot path" in done.stdout
    results = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(results, "singleflight_storm.json")) as f:
        storm = json.load(f)
    # sfrtr's storm redeemed once, and the two floors beside it ran their own refresh.
    assert storm["notes"]["sfrtr redemptions per storm"] == 1
    assert storm["notes"]["reuse"] == 0
    assert [r["variant"] for r in storm["rows"]][-1] == "sfrtr manager.token()"
    assert storm["machine"]["versions"]["sfrtr"]
    with open(os.path.join(results, "expiry_storm.json")) as f:
        rows = {r["variant"]: r for r in json.load(f)["rows"]}
    ours = rows["sfrtr client.query()"]
    assert ours["failed calls"] == 0
    assert ours["customers locked out"] == 0
    assert ours["redemptions"] == ours["customers"]
    with open(os.path.join(results, "refresh_cpu.json")) as f:
        variants = [r["variant"] for r in json.load(f)["rows"]]
    assert "sfrtr manager.token(), etcd store" in variants
    with open(os.path.join(results, "query_throughput.json")) as f:
        assert any(r["variant"].startswith("sfrtr") for r in json.load(f)["rows"])


def test_the_stores_benchmark_runs():
    done = subprocess.run([sys.executable, "-m", "benchmarks.stores", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(ROOT, "benchmarks", "results", "stores-quick.json")) as f:
        rows = json.load(f)["rows"]
    from benchmarks import redis_server

    stores = {"memory", "sqlite", "postgres", "etcd"}
    if redis_server.available():  # the Nango-style lock, where redis-server is installed
        stores.add("redis SET NX, 50 ms poll (Nango-style)")
    assert {r["store"] for r in rows if r["kind"] == "wake"} == stores


def test_the_scale_and_watcher_benchmarks_run():
    for args in (["benchmarks.scale", "--sizes", "300", "--serve", "50"],
                 ["benchmarks.watchers", "--customers", "300", "--writes", "30"]):
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(ROOT, "benchmarks", "results", "watchers.json")) as f:
        rows = json.load(f)["rows"]
    # One worker following all customers hears every write; one following 1% of them
    # hears only those (the point of the served mirror).
    assert rows[1]["events_received"] == 30
    assert rows[2]["events_received"] < 30
    with open(os.path.join(ROOT, "benchmarks", "results", "scale.json")) as f:
        assert {r["mirror"] for r in json.load(f)["rows"]} == {"namespace", "served"}
