"""The loop-stall detector sees a blocked loop and stays quiet on an idle one."""

from __future__ import annotations

import asyncio
import time

import pytest

from sfrtr.loop_stall import LoopStallMonitor

pytestmark = pytest.mark.anyio


async def test_a_blocking_sleep_is_reported():
    async with LoopStallMonitor() as monitor:
        await asyncio.sleep(0.05)

        async def blocker() -> None:
            time.sleep(0.3)  # noqa: ASYNC251 (the stall under test)

        await blocker()
        await asyncio.sleep(0.05)
    assert monitor.max_stall >= 0.25
    assert monitor.max_stall < 1.0
    assert len(monitor.stalls) == 1
    assert monitor.stalls[0][1] >= 0.25
    assert not monitor.running


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
