"""Small helpers the etcd store's tests share: a started store, and waiting for state
that the store's own tasks (watches, keepalives) move."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sfrtr.store.etcd import EtcdStore
from sfrtr.store.etcd_client import EtcdSettings
from sfrtr.store.etcd_launcher import LocalEtcd


async def store_of(server: LocalEtcd, namespace: str, *, lease_ttl: int = 3,
                   **options: object) -> EtcdStore:
    """A started ``EtcdStore`` on ``server`` (its own lease: a process, as etcd sees it)."""
    store = EtcdStore(EtcdSettings(endpoints=[server.endpoint]), namespace=namespace,
                      lease_ttl=lease_ttl, **options)  # type: ignore[arg-type]
    await store.start()
    return store


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until ``condition()`` holds (raises ``TimeoutError`` after ``timeout`` s)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (state set by the store's own tasks)
            await asyncio.sleep(0.005)


async def stop_following(store: EtcdStore) -> None:
    """Stop the store's watch stream (as a broken connection would), after every
    watcher it owes was sent; ``store._tasks[1] = ...(store._watch_task())`` resumes."""
    await until(lambda: not store._to_add)
    follow = store._tasks[1]
    follow.cancel()
    await asyncio.gather(follow, return_exceptions=True)
