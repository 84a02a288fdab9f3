"""Shared fixtures: the emulator over a real socket, an HTTP session, etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sfrtr.emulator import Emulator


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """An emulator served on a free loopback port; ``emulator.base_url`` is its URL."""
    em = Emulator(rng_seed=1)
    async with em.serve():
        yield em


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
