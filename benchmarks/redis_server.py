"""A throwaway ``redis-server`` on loopback, for the Nango-style lock beside sfrtr's stores.

Debian's ``redis-server`` (``.ci/install-bench-servers`` installs it, as ``nox -s bench``
does); no persistence, a free port, stopped at exit. Redis is not a store sfrtr offers:
it is here only as the lock most teams reach for (``SET key NX PX ttl``), to compare
its waiters' wake-up against the stores' watches.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from types import TracebackType


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def available() -> bool:
    """Whether a redis-server binary and the redis client package are both here."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        return False
    return shutil.which("redis-server") is not None


class LocalRedis:
    """``with LocalRedis() as r: r.url``; the server is killed on exit."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; "
                               "`nox -s bench` runs .ci/install-bench-servers for it)")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> LocalRedis:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self._process.kill()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._process.kill()
        self._process.wait()
