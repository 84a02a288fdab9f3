"""Adversarial review of the flight task that holds outside cancels over the critical
section (commit 2b5066b: sfrtr/flight_task.py, the manager's ``_run_section``).

Of the review's four findings, three were about a loop torn down without
``aclose()`` while a section held its cancel: holding a teardown's cancel was
dropped after a second review (see ``sfrtr/flight_task.py``), and their tests with
it. The fourth (a late joiner) is fixed and its test passes; the others pin what
was found to hold. Everything runs against the emulator over real sockets and
real stores; loops torn down without ``aclose()`` run in a thread of their own
(``asyncio.run``) while the emulator serves on the test's loop.
"""

from __future__ import annotations

import asyncio

import pytest

from sfrtr import MemoryStore, RefreshPolicy, TokenManager
from sfrtr.emulator import Emulator, TokenState
from sfrtr.flight_task import FlightTask
from sfrtr.records import Status
from tests.conftest import emulator_grant, emulator_oauth

_SHORT = {"timeout": 2.0, "connect_timeout": 1.0, "head_grace": 0.1, "answer_grace": 0.4}


# -- findings (fixed) -------------------------------------------------------------------


# Found by review; fixed. What it found:
# a cancel of the flight's task is held, but the doomed flight stays the
# customer's call in the singleflight group: a caller arriving afterwards joins
# it and gets CancelledError, though it was never cancelled and the refresh was
# stored (before the change it started a new flight, which waited for the
# section and used its result)
async def test_a_caller_joining_a_flight_whose_cancel_is_held_gets_the_token(
        emulator: Emulator, manager: TokenManager) -> None:
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", latency=0.4)
    stale = record.access_token.reveal()
    first = asyncio.create_task(manager.refresh("acme", stale=stale))
    await asyncio.sleep(0.1)
    flight = manager._flights._calls["acme"].task
    assert isinstance(flight, FlightTask)
    flight.cancel()  # e.g. a shutdown routine cancelling asyncio.all_tasks()
    assert flight.holds() == 1
    later = asyncio.create_task(manager.refresh("acme", stale=stale))  # a new request
    done, _ = await asyncio.wait({first, later}, timeout=5.0)
    assert first in done
    assert later in done
    stored = (await manager.store.read("acme")).record
    assert stored.status is Status.VALID
    assert stored.generation == 1
    assert not later.cancelled(), "a caller nobody cancelled got CancelledError"
    assert later.result().access_token == stored.access_token.reveal()


# -- what holds ------------------------------------------------------------------------


async def test_a_deadline_inside_the_section_is_a_timeout_while_an_outside_cancel_is_held(
        emulator: Emulator) -> None:
    """The request deadline fires (a loop callback: it goes through) while a cancel
    from another task is held: settle() reads it as the deadline's (the held cancel
    is not counted in cancelling()), the outcome is unknown and stored as such, and
    the held cancel is delivered afterwards, once."""
    store = MemoryStore()
    manager = TokenManager(emulator_oauth(emulator, **_SHORT), store,
                           RefreshPolicy(lease_margin=0.5))
    try:
        record = await manager.connect("acme", emulator_grant(emulator, "acme"))
        emulator.faults.set("token", latency=3.5)  # past timeout + graces (2.5 s)
        caller = asyncio.create_task(manager.refresh("acme",
                                                     stale=record.access_token.reveal()))
        await asyncio.sleep(0.2)
        flight = manager._flights._calls["acme"].task
        assert isinstance(flight, FlightTask)
        flight.cancel()
        assert flight.holds() == 1
        assert flight.cancelling() == 0
        done, _ = await asyncio.wait({flight}, timeout=5.0)
        assert flight in done
        assert flight.holds() == 0
        # The section ended with the deadline's TimeoutError classified as unknown,
        # not with a CancelledError: the record says so (introspect recovery).
        stored = (await store.read("acme")).record
        assert stored.status is Status.INDETERMINATE
        assert stored.intent is not None
        assert "TimeoutError" in stored.reason
        with pytest.raises(BaseException):  # noqa: B017,PT011 - cancelled or the error
            await caller
    finally:
        emulator.faults.clear()
        for timer in [*manager._retries.values(), *manager._settlers.values()]:
            timer.cancel()
        await manager.aclose()


async def test_held_cancels_over_a_section_that_stored_its_token_are_dropped(
        emulator: Emulator, manager: TokenManager) -> None:
    """Two cancels held over the section (reviewed as "delivered once"; since the fix
    of the late joiner, a section that stored a token drops them): the flight ends
    with the token, not cancelled; the outcome is stored and the lock released."""
    record = await manager.connect("acme", emulator_grant(emulator, "acme"))
    emulator.faults.set("token", latency=0.3)
    caller = asyncio.create_task(manager.refresh("acme", stale=record.access_token.reveal()))
    await asyncio.sleep(0.1)
    flight = manager._flights._calls["acme"].task
    assert isinstance(flight, FlightTask)
    assert flight.cancel()
    assert flight.cancel()
    assert flight.holds() == 2
    done, _ = await asyncio.wait({flight}, timeout=3.0)
    assert flight in done
    assert not flight.cancelled()
    assert flight.cancelling() == 0  # dropped, never delivered
    stored = (await manager.store.read("acme")).record
    assert stored.status is Status.VALID
    assert stored.intent is None
    assert emulator.refresh_token_state(stored.refresh_token.reveal()) is TokenState.LIVE
    assert emulator.ledger["redemptions"] == 1
    assert (await caller).access_token == stored.access_token.reveal()
    assert not manager._flights.in_flight("acme")
