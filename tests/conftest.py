"""Shared fixtures: the emulator over a real socket, an HTTP session, etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sfrtr import (
    InstanceUrlPolicy,
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    RefreshPolicy,
    Secret,
    TokenGrant,
    TokenManager,
)
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.oauth.grant import parse_grant


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


def emulator_oauth(em: Emulator, **overrides: object) -> OAuthClient:
    """An OAuth client for the emulator's default app."""
    options: dict[str, object] = {
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": Secret(DEFAULT_CLIENT_SECRET),
        "login_url": em.base_url,
        "instance_policy": InstanceUrlPolicy.for_emulator(),
        "timeout": 5.0,
        "connect_timeout": 1.0,
    }
    options.update(overrides)
    return OAuthClient(OAuthConfig(**options))  # type: ignore[arg-type]


def emulator_grant(em: Emulator, customer: str, client_id: str = DEFAULT_CLIENT_ID,
                   secret: str = DEFAULT_CLIENT_SECRET) -> TokenGrant:
    """A fresh grant for ``customer`` as the code exchange would have returned it."""
    return parse_grant(em.grant(customer, client_id), policy=InstanceUrlPolicy.for_emulator(),
                       client_secret=Secret(secret))


@pytest.fixture
async def manager(emulator: Emulator) -> AsyncIterator[TokenManager]:
    mgr = TokenManager(emulator_oauth(emulator), MemoryStore(),
                       RefreshPolicy(recovery_grace=0.2, busy_backoff=0.05))
    yield mgr
    await mgr.aclose()
