"""The hook dispatcher: a hook runs beside the refresh path, never in it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sfrtr.hooks import Hooks

pytestmark = pytest.mark.anyio


async def test_a_slow_hook_delays_nobody_and_drain_waits_for_it():
    seen: list[tuple[str, int]] = []
    release = asyncio.Event()

    async def on_refreshed(customer: str, generation: int) -> None:
        await release.wait()
        seen.append((customer, generation))

    hooks = Hooks(on_refreshed=on_refreshed)
    hooks.refreshed("acme", 3)  # returns at once: the hook is a task of its own
    await asyncio.sleep(0.01)
    assert seen == []
    release.set()
    await hooks.drain()
    assert seen == [("acme", 3)]


async def test_plain_functions_and_absent_hooks():
    calls: list[tuple[str, str]] = []
    hooks = Hooks(on_reauth_required=lambda c, reason: calls.append((c, reason)))
    hooks.reauth_required("acme", "the refresh token was revoked")
    hooks.lockout_risk("acme", "no answer")  # no hook: nothing happens
    hooks.refreshed("acme", 1)
    await hooks.drain()
    assert calls == [("acme", "the refresh token was revoked")]


async def test_a_failing_hook_is_logged_and_forgotten(caplog: pytest.LogCaptureFixture):
    def broken(customer: str, reason: str) -> None:
        raise RuntimeError("the mail server is down")

    hooks = Hooks(on_lockout_risk=broken)
    with caplog.at_level(logging.ERROR, logger="sfrtr.hooks"):
        hooks.lockout_risk("acme", "a refresh got no answer")
        await hooks.drain()
    assert "hook on_lockout_risk for customer acme raised" in caplog.text
    assert "RuntimeError" in caplog.text


async def test_drain_cancels_what_outlives_its_timeout():
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(customer: str, generation: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    hooks = Hooks(on_refreshed=stuck)
    hooks.refreshed("acme", 1)
    await started.wait()
    await hooks.drain(timeout=0.05)
    assert cancelled.is_set()
