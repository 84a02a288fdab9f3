"""The loop-stall detector sees a blocked loop and stays quiet on an idle one."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfrtr.loop_stall import LoopStallMonitor

pytestmark = pytest.mark.anyio

ROOT = str(Path(__file__).resolve().parent.parent)


async def test_a_blocking_sleep_is_reported():
    async with LoopStallMonitor() as monitor:
        await asyncio.sleep(0.05)

        async def blocker() -> None:
            time.sleep(0.3)  # noqa: ASYNC251 (the stall under test)

        await blocker()
        await asyncio.sleep(0.05)
    assert monitor.max_stall >= 0.25
    assert monitor.max_stall < 1.0
    # On a loaded machine the OS may make other ticks late too; the blocking call's
    # stall is the one that is the loop's own.
    stall = max(monitor.stalls, key=lambda s: s.own)
    assert stall.seconds >= 0.25
    # The thread slept in the kernel: it ran (almost) nothing during the stall, and the
    # stall is the loop's own (a blocking call) whatever the machine's load: the thread
    # was not waiting for a core while it slept.
    assert stall.busy < 0.1
    assert stall.own >= 0.28
    assert monitor.max_own_stall == stall.own
    assert not monitor.running


async def test_a_stall_of_the_loops_own_work_is_told_from_time_it_did_not_run():
    async with LoopStallMonitor() as monitor:
        await asyncio.sleep(0.05)

        async def spinner() -> None:
            # 0.3 s of the thread's own CPU, however long that takes on a busy machine.
            until = time.thread_time() + 0.3
            while time.thread_time() < until:
                pass

        await spinner()
        await asyncio.sleep(0.05)
    stall = max(monitor.stalls, key=lambda s: s.busy)  # the OS may add stalls of its own
    assert stall.busy >= 0.3
    assert stall.seconds >= stall.busy - 0.02  # a window's CPU fits in it (tick jitter)
    # Spinning is the loop's own work: only time spent waiting for a core is not.
    assert stall.own == pytest.approx(stall.seconds - stall.waited)
    assert stall.own >= stall.busy - 0.02


WATCHER = """
import asyncio, json, os, sys
from sfrtr.loop_stall import LoopStallMonitor
os.sched_setaffinity(0, {int(sys.argv[1])})
os.nice(19)  # the least share of the core: the burners beside it get it first

async def watch():
    async with LoopStallMonitor(threshold=0.0, keep=100_000) as monitor:
        await asyncio.sleep(1.0)
    return monitor

m = asyncio.run(watch())
print(json.dumps({"late": sum(s.seconds for s in m.stalls),
                  "waited": sum(s.waited for s in m.stalls),
                  "own": sum(s.own for s in m.stalls)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's schedstat")
def test_time_the_machine_kept_the_loop_from_a_core_is_not_its_own():
    """A loop at the lowest priority, pinned to one core with three CPU burners: its
    ticks run late because the core is taken, and the monitor says so (run-queue
    waits), not that the loop stalled itself. In a child process (``nice`` is one way)."""
    burn = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"
    core = min(os.sched_getaffinity(0))
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(3)]
    try:
        for b in burners:
            os.sched_setaffinity(b.pid, {core})
        done = subprocess.run([sys.executable, "-c", WATCHER, str(core)], capture_output=True,
                              text=True, timeout=60, check=True, cwd=ROOT)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    figures = json.loads(done.stdout)
    assert figures["late"] > 0.2  # the ticker ran late, for want of the core...
    assert figures["waited"] > 0.5 * figures["late"]  # ...which the monitor tells apart
    assert figures["own"] < 0.5 * figures["late"]


async def test_a_stall_still_in_progress_at_stop_counts():
    monitor = LoopStallMonitor()
    monitor.start()
    await asyncio.sleep(0.02)
    time.sleep(0.3)  # noqa: ASYNC251 (the stall under test)
    assert monitor.stop() >= 0.25


async def test_an_awaiting_loop_shows_no_stall():
    async with LoopStallMonitor(interval=0.005) as monitor:
        await asyncio.gather(*(asyncio.sleep(0.001 * (i % 10)) for i in range(200)))
        await asyncio.sleep(0.2)
    assert monitor.ticks > 10
    assert monitor.max_stall < 0.1
    assert monitor.snapshot()["stalls_over_threshold"] == 0


async def test_start_twice_and_stop_twice_are_harmless():
    monitor = LoopStallMonitor()
    monitor.start()
    monitor.start()
    await asyncio.sleep(0.02)
    monitor.stop()
    monitor.stop()
    assert not monitor.running


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        LoopStallMonitor(interval=0)
