"""Hooks: tell the application when a grant changes, once across the fleet.

A grant's transitions happen in one worker: the one whose commit stored the
rotated token, the one whose commit marked the grant dead, the one that began
recovering an ambiguous outcome. That worker, and only it, calls the hook, so
an application that emails an admin on ``on_reauth_required`` sends one email
per lost grant however many workers saw the failure.

Hooks never receive token values (a customer, a generation, a reason), never
run on the refresh path (each call is a task of its own: a slow or failing hook
delays no caller and loses no token), and a hook that raises is logged and
forgotten. :meth:`Hooks.drain` waits for the calls still running (the manager's
``aclose`` does it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

Hook = Callable[..., Awaitable[None] | None]


@dataclass
class Hooks:
    """The application's callbacks; each may be a plain function or a coroutine function.

    - ``on_refreshed(customer, generation)``: this worker stored a rotated token.
    - ``on_reauth_required(customer, reason)``: this worker marked the grant dead;
      the customer must authorize the app again.
    - ``on_lockout_risk(customer, reason)``: this worker began recovering a refresh
      whose outcome is unknown (a crash or an outage mid-request): if the
      recovery fails, the customer must re-authorize. Worth a warning, not a page.
    """

    on_refreshed: Hook | None = None
    on_reauth_required: Hook | None = None
    on_lockout_risk: Hook | None = None
    _running: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def refreshed(self, customer: str, generation: int) -> None:
        self._fire("on_refreshed", self.on_refreshed, customer, generation)

    def reauth_required(self, customer: str, reason: str) -> None:
        self._fire("on_reauth_required", self.on_reauth_required, customer, reason)

    def lockout_risk(self, customer: str, reason: str) -> None:
        self._fire("on_lockout_risk", self.on_lockout_risk, customer, reason)

    @property
    def running(self) -> bool:
        """Whether a hook call is still running."""
        return bool(self._running)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for hook calls still running; cancel the rest."""
        if not self._running:
            return
        pending = set(self._running)
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    def _fire(self, name: str, hook: Hook | None, *args: object) -> None:
        if hook is None:
            return
        task = asyncio.get_running_loop().create_task(self._call(name, hook, args),
                                                       name=f"sfrtr-{name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    @staticmethod
    async def _call(name: str, hook: Hook, args: tuple[object, ...]) -> None:
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:  # an application's bug must not reach the refresh path
            # The traceback is the application's own (hooks are given no token).
            log.exception("hook %s for customer %s raised", name, args[0])


class Observer(Protocol):
    """What a telemetry backend sees of a manager (``sfrtr.telemetry`` implements it
    on OpenTelemetry). The hot path calls none of it; a manager without one pays
    nothing at all."""

    def span(self, name: str, customer: str) -> AbstractContextManager[object]:
        """A span around a refresh (``sfrtr.refresh``) or a provider call."""

    def provider_call(self, seconds: float, outcome: str) -> None:
        """One token request ended: its duration and outcome kind."""

    def waited(self, seconds: float) -> None:
        """A caller that had no fresh token got one (or an error) after this long."""
