"""Long simulation runs: ``python -m tests.sim --runs 100000 --jobs 2 [--seed N]``.

``python -m tests.sim --scale [options of tests.sim.scale]`` runs the scale mode
instead (1,000 workers over 1,000,000 customers; see ``scale.py``).

Each job runs a contiguous block of seeds; failing seeds are shrunk and
reported like the pytest test reports them. ``nox -s sim`` runs this.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time

from .runner import report, run, run_block, shrink


def main() -> int:
    if "--scale" in sys.argv[1:]:
        from .scale import main as scale_main
        return scale_main([a for a in sys.argv[1:] if a != "--scale"])
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--show", type=int, default=3, help="failing seeds to shrink and print")
    opts = parser.parse_args()
    first = opts.seed if opts.seed is not None else random.SystemRandom().randrange(10**9)
    print(f"simulation: {opts.runs} schedules from seed {first}, {opts.jobs} jobs", flush=True)
    size = max(1, min(500, opts.runs // (opts.jobs * 4) or 1))
    blocks = [(s, min(size, first + opts.runs - s)) for s in range(first, first + opts.runs, size)]
    started = time.perf_counter()
    done, cpu, failing = 0, 0.0, []
    with multiprocessing.get_context("spawn").Pool(opts.jobs) as pool:
        for count, spent, bad in pool.imap(run_block, blocks):
            done, cpu = done + count, cpu + spent
            failing += bad
    wall = time.perf_counter() - started
    print(f"simulation: {done} schedules in {wall:.1f}s ({done / wall:.1f}/s, "
          f"{cpu / done * 1000:.1f} ms CPU each), {len(failing)} failing")
    for seed in failing[: opts.show]:
        print(report(shrink(run(seed))), "\n")
    if failing:
        print("failing seeds:", " ".join(map(str, failing[:200])))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
