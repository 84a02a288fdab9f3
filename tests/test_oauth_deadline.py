"""The token request's deadline: it runs in the caller's task, keeps an answer that
arrived while the process was paused, gives a started answer its grace, and tells
its own expiry apart from a cancellation the caller asked for."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from sfrtr import OAuthClient, Secret
from sfrtr.oauth.outcome import OutcomeKind

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ERROR = orjson.dumps({"error": "invalid_grant", "error_description": "expired"})


@pytest.fixture
def serve(token_endpoint: Callable[..., Awaitable[OAuthClient]]
          ) -> Callable[[Handler], Awaitable[OAuthClient]]:
    """The shared token endpoint with this file's short deadline (0.4 s, graces)."""
    return functools.partial(token_endpoint, timeout=0.4, connect_timeout=0.2,
                             head_grace=0.2, answer_grace=0.4)


async def _rejected(request: web.Request) -> web.Response:
    return web.Response(status=400, body=ERROR, content_type="application/json")


async def test_an_answer_in_time_is_classified_and_the_task_is_left_as_it_was(serve) -> None:
    oauth = await serve(_rejected)
    outcome = await oauth.refresh(Secret("rt"))
    assert outcome.kind is OutcomeKind.REJECTED
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0.5)  # no timer left behind to cancel this task later


async def test_no_head_by_the_deadline_and_its_grace_is_indeterminate(serve) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(status=400, body=ERROR)

    oauth = await serve(silent)
    started = time.monotonic()
    outcome = await oauth.refresh(Secret("rt"))
    took = time.monotonic() - started
    assert outcome.kind is OutcomeKind.INDETERMINATE
    assert outcome.error == "TimeoutError"
    assert 0.55 <= took < 1.0  # timeout + head_grace
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # the deadline's cancellation was withdrawn, not left pending


async def test_a_started_answer_gets_its_grace(serve) -> None:
    async def slow_body(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await asyncio.sleep(0.6)  # past the timeout, within timeout + answer_grace
        await resp.write(ERROR)
        await resp.write_eof()
        return resp

    oauth = await serve(slow_body)
    assert (await oauth.refresh(Secret("rt"))).kind is OutcomeKind.REJECTED


async def test_a_started_answer_past_its_grace_is_indeterminate(serve) -> None:
    async def stalled_body(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await asyncio.sleep(3)
        return resp

    oauth = await serve(stalled_body)
    started = time.monotonic()
    outcome = await oauth.refresh(Secret("rt"))
    assert outcome.kind is OutcomeKind.INDETERMINATE
    assert 0.75 <= time.monotonic() - started < 1.2  # timeout + answer_grace


async def test_a_head_in_the_head_grace_gets_the_answer_grace(serve) -> None:
    async def late_head(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(0.5)  # after the timeout, inside head_grace
        resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await asyncio.sleep(0.3)  # past timeout + head_grace, inside the answer's grace
        await resp.write(ERROR)
        await resp.write_eof()
        return resp

    oauth = await serve(late_head)
    assert (await oauth.refresh(Secret("rt"))).kind is OutcomeKind.REJECTED


async def test_an_answer_that_came_while_the_process_was_paused_is_kept(serve) -> None:
    oauth = await serve(_rejected)
    loop = asyncio.get_running_loop()
    # The process stops right after sending: the answer and the expired timer are
    # both ready when it wakes.
    loop.call_later(0.01, time.sleep, 0.7)
    assert (await oauth.refresh(Secret("rt"))).kind is OutcomeKind.REJECTED


async def test_a_callers_cancellation_stays_a_cancellation(serve) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(status=400, body=ERROR)

    oauth = await serve(silent)
    call = asyncio.ensure_future(oauth.refresh(Secret("rt")))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_a_cancellation_in_the_deadlines_grace_stays_a_cancellation(serve) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(status=400, body=ERROR)

    oauth = await serve(silent)
    call = asyncio.ensure_future(oauth.refresh(Secret("rt")))
    # The deadline's and the caller's cancellation land in one loop iteration.
    await asyncio.sleep(0.6 - 0.001)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
