"""A throwaway PostgreSQL server for the tests and benchmarks: initdb, pg_ctl, a
loopback port, a temporary directory, trust authentication.

Postgres refuses to run as root, so as root the server runs as the ``postgres``
user (Debian's package creates it) or ``nobody``, via ``runuser``. No server
binaries is an error, never a skip: ``.ci/run`` installs Debian's ``postgresql``
when ``initdb`` is missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest


def find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    raise RuntimeError(f"PostgreSQL's {name} is not installed: the Postgres tests need a real "
                       "server (apt-get install postgresql; .ci/run does it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalPostgres:
    """``start()``, ``dsn``, ``stop(mode)``, ``restart()``, ``close()``."""

    def __init__(self, *, durable: bool = False, max_connections: int = 400) -> None:
        self.initdb = find_binary("initdb")
        self.pg_ctl = find_binary("pg_ctl")
        self.durable = durable
        self.max_connections = max_connections
        self.port = _free_port()
        self.root = tempfile.mkdtemp(prefix="sfrtr-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam(name)
                    self.user = name
                    os.chown(self.root, entry.pw_uid, entry.pw_gid)
                    break
            if self.user is None:
                raise RuntimeError("running as root with no 'postgres' or 'nobody' user")
        os.chmod(self.root, 0o700)

    @property
    def dsn(self) -> str:
        return f"postgresql://sfrtr@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]} {self.tail()}")
        return done.stdout

    def tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log, encoding="utf-8",
                                                errors="replace") as f:
            return f.read()[-2000:]
        return ""

    def start(self) -> None:
        if not os.path.exists(self.data):
            self._run(self.initdb, "-D", self.data, "-U", "sfrtr", "--auth=trust",
                      "-E", "UTF8", "--no-sync", "--locale=C")
        options = [f"-p {self.port}", f"-k {self.root}", "-c listen_addresses=127.0.0.1",
                   f"-c max_connections={self.max_connections}", "-c shared_buffers=32MB"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off",
                        "-c full_page_writes=off"]
        self._run(self.pg_ctl, "-D", self.data, "-l", self.log, "-w", "-t", "60",
                  "-o", " ".join(options), "start")
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"Postgres did not come up on port {self.port}: {self.tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (clean) or ``immediate`` (a crash: recovery at the next start)."""
        self._run(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- fixtures, for the test modules that declare ``pytest_plugins = ["tests.postgres_server"]``

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """A real PostgreSQL for the whole session. Never skipped: missing server
    binaries fail the tests that need it."""
    server = LocalPostgres()
    server.start()
    yield server
    server.close()


@pytest.fixture
def pg_schema() -> str:
    """A schema of its own for each test, so tests share one server safely."""
    return f"t_{uuid.uuid4().hex[:12]}"
