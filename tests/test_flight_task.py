"""The flight's task holds outside cancels over its critical section (sfrtr.flight_task)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sfrtr import MemoryStore, RefreshPolicy, TokenManager
from sfrtr.emulator import Emulator, TokenState
from sfrtr.flight_task import FlightTask, holding_a_cancel, spawn_flight
from sfrtr.records import Status
from tests.conftest import emulator_grant, emulator_oauth

# -- the task on its own ----------------------------------------------------------------


@contextlib.contextmanager
def _critical(*, deliver: bool = True) -> Iterator[FlightTask[Any]]:
    """The running flight task's critical section, as the manager runs one."""
    task = asyncio.current_task()
    assert isinstance(task, FlightTask)
    task.enter_critical()
    try:
        yield task
    finally:
        task.leave_critical(deliver=deliver)


async def _critical_sleep(seconds: float, log: list[str]) -> str:
    with _critical():
        await asyncio.sleep(seconds)
        log.append("section done")
    await asyncio.sleep(0)  # the held cancel lands here
    log.append("after the section")
    return "finished"


async def test_a_cancel_from_another_task_waits_for_the_section() -> None:
    log: list[str] = []
    task = FlightTask(_critical_sleep(0.2, log), loop=asyncio.get_running_loop())
    await asyncio.sleep(0.05)
    assert task.cancel() is True  # requested, held
    assert task.cancel() is True
    assert task.holds() == 2
    assert task.cancelling() == 0  # not counted while held
    assert not task.done()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["section done"]  # the section ran to its end, the rest did not run
    assert task.cancelled()
    assert task.cancelling() == 2  # each delivered once


async def test_a_cancel_outside_the_section_is_not_held() -> None:
    async def plain() -> None:
        await asyncio.sleep(5)

    task = FlightTask(plain(), loop=asyncio.get_running_loop())
    await asyncio.sleep(0)
    assert task.cancel() is True
    assert task.holds() == 0
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timeout_inside_the_section_still_ends_what_it_bounds() -> None:
    # Timeouts cancel the task from the loop's own callbacks: they go through.
    async def bounded() -> str:
        with _critical():
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.sleep(5)
            except TimeoutError:
                return "timed out"
        return "not timed out"

    task = FlightTask(bounded(), loop=asyncio.get_running_loop())
    assert await asyncio.wait_for(task, 2.0) == "timed out"


async def test_a_task_may_cancel_itself_inside_the_section() -> None:
    async def itself() -> None:
        with _critical() as task:
            task.cancel()
            await asyncio.sleep(5)

    task = FlightTask(itself(), loop=asyncio.get_running_loop())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)


async def test_a_section_that_finished_its_work_may_drop_the_held_cancel() -> None:
    async def section() -> str:
        with _critical(deliver=False):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0)
        return "the token"

    task = FlightTask(section(), loop=asyncio.get_running_loop())
    await asyncio.sleep(0.02)
    task.cancel()
    assert await task == "the token"
    assert task.cancelling() == 0


async def test_holding_a_cancel_is_seen_from_inside_the_task() -> None:
    seen: list[bool] = []

    async def section() -> None:
        with _critical():
            seen.append(holding_a_cancel())
            await asyncio.sleep(0.1)
            seen.append(holding_a_cancel())

    task = FlightTask(section(), loop=asyncio.get_running_loop())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False, True]
    assert not holding_a_cancel()  # not in a flight task at all


def test_a_loop_torn_down_cuts_the_section_off() -> None:
    """A teardown's cancel (the loop not running) goes through: holding it was tried
    and dropped (flights started during the teardown could not be held too; see the
    module's docstring). ``aclose()`` is what lets sections finish."""
    log: list[str] = []

    async def main() -> None:
        spawn_flight(asyncio.get_running_loop(), _critical_sleep(0.2, log))
        await asyncio.sleep(0.05)
        # main returns: asyncio.run cancels every task left, then waits for them

    asyncio.run(main())
    assert log == []


async def test_a_cancel_from_a_loop_callback_goes_through() -> None:
    log: list[str] = []
    task = spawn_flight(asyncio.get_running_loop(), _critical_sleep(5.0, log))
    await asyncio.sleep(0.02)
    asyncio.get_running_loop().call_soon(task.cancel)  # as a timeout's timer would
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert log == []


# -- the manager ---------------------------------------------------------------------------


async def test_a_cancelled_flight_still_stores_its_refresh(emulator: Emulator,
                                                          manager: TokenManager) -> None:
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", latency=0.3)
    caller = asyncio.create_task(manager.refresh("acme", stale=record.access_token.reveal()))
    await asyncio.sleep(0.1)  # the token request is on its way
    flight = manager._flights._calls["acme"].task
    assert isinstance(flight, FlightTask)
    flight.cancel()
    assert flight.holds() == 1
    # The section stored the new token: the cancel had nothing left to stop, and the
    # caller gets the token rather than a CancelledError it never asked for.
    new = await asyncio.wait_for(caller, 5.0)
    assert not flight.cancelled()
    assert flight.holds() == 0
    stored = (await manager.store.read("acme")).record
    assert new.access_token == stored.access_token.reveal()
    assert stored.status is Status.VALID
    assert stored.generation == record.generation + 1
    assert emulator.ledger["redemptions"] == 1
    assert emulator.refresh_token_state(stored.refresh_token.reveal()) is TokenState.LIVE


@pytest.mark.xfail(strict=True, reason=(
    "known limitation: a loop torn down without aclose() cuts a refresh off mid-request "
    "(its cancel is not held: sfrtr/flight_task.py); the record is left 'refreshing' "
    "for recovery. aclose(), or the aiohttp integration's cleanup, lets it finish"))
async def test_a_loop_torn_down_without_aclose_stores_the_refresh_in_flight(
        emulator: Emulator) -> None:
    """``asyncio.run`` returning while a refresh is on its way (no ``aclose()``): the
    teardown cancels every task, the flight's included."""
    store = MemoryStore()
    grant = emulator_grant(emulator, "acme")
    emulator.faults.set("token", latency=0.4)
    started = threading.Event()

    async def app() -> None:
        manager = TokenManager(emulator_oauth(emulator), store, RefreshPolicy(lease_margin=0.5))
        record = await manager.connect("acme", grant)
        asyncio.get_running_loop().create_task(
            manager.refresh("acme", stale=record.access_token.reveal()))
        await asyncio.sleep(0.1)
        started.set()
        # returns with the refresh in flight and the manager never closed

    # Another thread's loop: the emulator keeps serving on this one meanwhile.
    await asyncio.to_thread(asyncio.run, app())
    assert started.is_set()
    stored = (await store.read("acme")).record
    assert stored.status is Status.VALID
    assert stored.generation == 1
    assert emulator.ledger["redemptions"] == 1
    assert emulator.refresh_token_state(stored.refresh_token.reveal()) is TokenState.LIVE
    assert stored.intent is None  # committed, not left locked for a recovery
