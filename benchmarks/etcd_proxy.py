"""A loopback TCP proxy in front of etcd that can lose or delay etcd's answers.

gRPC is HTTP/2: many requests share one connection, in frames the proxy does
not parse. So "an answer lost" is done the simplest honest way: forward the
client's bytes (the request reaches etcd and is applied), then cut the
connection before a byte of the reply is forwarded. Only client chunks of at
least ``min_request`` bytes are candidates: a Txn carrying a token record
(acquire, commit, put, rescue) is several hundred bytes, a keepalive or a
small read is not. "Delayed" holds every server-to-client byte for
``delay`` seconds before forwarding it, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    """Connections cut right after forwarding a request, its answer dropped."""
    delayed_chunks: int = 0


class EtcdProxy:
    """``127.0.0.1:port`` forwarding to ``upstream``; switch faults on and off live."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.rng = random.Random(seed)
        self.lose_probability = 0.0
        """Chance that a forwarded request chunk has its connection cut before the answer."""
        self.min_request = 300
        self.delay = 0.0
        """Seconds every server-to-client chunk is held (0: forwarded at once)."""
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port)
        except OSError:
            writer.close()
            return
        doomed = asyncio.Event()
        pumps = [self._spawn(self._client_to_server(reader, up_writer, doomed)),
                 self._spawn(self._server_to_client(up_reader, writer, doomed))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def _client_to_server(self, reader: asyncio.StreamReader,
                                up: asyncio.StreamWriter, doomed: asyncio.Event) -> None:
        while chunk := await reader.read(65536):
            up.write(chunk)
            await up.drain()
            if len(chunk) >= self.min_request and self.lose_probability > 0 and \
                    self.rng.random() < self.lose_probability:
                doomed.set()  # from now on nothing goes back to the client
                self.stats.cuts += 1
                await asyncio.sleep(0.05)  # let etcd receive and apply it
                return

    async def _server_to_client(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                doomed: asyncio.Event) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, chunk = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if doomed.is_set():
                    return
                writer.write(chunk)
                await writer.drain()

        sender = self._spawn(send())
        try:
            while chunk := await up.read(65536):
                if doomed.is_set():
                    return
                if self.delay > 0:
                    self.stats.delayed_chunks += 1
                queue.put_nowait((loop.time() + self.delay, chunk))
            queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()
