"""The fault proxy of the fault runs: forwards, loses answers after forwarding, delays."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from benchmarks.etcd_proxy import EtcdProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream that records what reached it and answers each chunk."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
            writer.write(b"ok:" + data[:4])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}", received
    server.close()


async def test_forwards_both_ways(echo):
    upstream, received = echo
    proxy = EtcdProxy(upstream)
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"ping")
    assert await reader.read(100) == b"ok:ping"
    writer.close()
    await proxy.aclose()
    assert received == [b"ping"]


async def test_a_lost_answer_was_applied_upstream(echo):
    upstream, received = echo
    proxy = EtcdProxy(upstream)
    proxy.lose_probability, proxy.min_request = 1.0, 10
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"small")  # below min_request: answered
    assert await reader.read(100) == b"ok:smal"
    writer.write(b"x" * 50)
    assert await reader.read(100) == b""  # cut, no answer
    assert received[-1] == b"x" * 50  # but the request arrived
    assert proxy.stats.cuts == 1
    writer.close()
    await proxy.aclose()


async def test_answers_are_delayed(echo):
    upstream, _ = echo
    proxy = EtcdProxy(upstream)
    proxy.delay = 0.3
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    writer.write(b"ping")
    assert await reader.read(100) == b"ok:ping"
    assert time.monotonic() - started >= 0.28
    writer.close()
    await proxy.aclose()
