"""The critical section's own task: its end always reaches the flight waiting on it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest

from sfrtr import TokenManager
from sfrtr.emulator import Emulator
from sfrtr.records import Status
from tests.conftest import emulator_grant


async def test_a_section_task_cancelled_before_its_first_step_ends_the_flight(
        emulator: Emulator, manager: TokenManager) -> None:
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop,
                coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
                **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if getattr(coro, "__qualname__", "").endswith("._section"):
            task.cancel()  # its coroutine never runs: nothing in it can settle anything
        return task

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(manager.refresh("acme", stale=record.access_token.reveal()),
                                   5.0)
    finally:
        loop.set_task_factory(None)
    assert not manager._sections
    stored = (await manager.store.read("acme")).record
    assert stored.status is Status.VALID  # never acquired: nothing to settle
    assert emulator.ledger["redemptions"] == 0
    new = await manager.refresh("acme", stale=record.access_token.reveal())
    assert new.access_token != record.access_token.reveal()
