"""A real etcd cluster on loopback ports, for the fleet's tests, the benchmark and a demo.

Not used by the daemon. Each member is a real ``etcd`` process (installed by
``scripts/install-etcd.sh``) with its own data dir under a temp dir and random free ports;
members can be stopped (SIGTERM or SIGKILL) and started again on the same ports and data, so
tests can take the quorum away and give it back. ``close()`` kills every member it started and
removes the data, whatever state they are in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-etcd.sh"


class EtcdNotInstalled(RuntimeError):
    """``scripts/install-etcd.sh`` could not provide etcd; the message says why."""


def ensure_etcd() -> tuple[str, str]:
    """(etcd, etcdctl) paths, installing them with scripts/install-etcd.sh when missing."""
    etcd, etcdctl = shutil.which("etcd"), shutil.which("etcdctl")
    if etcd and etcdctl:
        return etcd, etcdctl
    if not INSTALL_SCRIPT.is_file():
        raise EtcdNotInstalled(f"etcd is not on PATH and {INSTALL_SCRIPT} is missing")
    try:
        done = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True,
                              timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise EtcdNotInstalled("scripts/install-etcd.sh took longer than 600 s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise EtcdNotInstalled(f"scripts/install-etcd.sh exited {done.returncode}: "
                               + " | ".join(tail))
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, _, value = line.partition("=")
        found[name] = value
    if not found.get("ETCD") or not found.get("ETCDCTL"):
        raise EtcdNotInstalled("scripts/install-etcd.sh did not name etcd and etcdctl")
    return found["ETCD"], found["ETCDCTL"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member:
    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``size`` real etcd members on 127.0.0.1; a context manager."""

    def __init__(self, size: int = 3, *, root: Path | None = None) -> None:
        self.etcd, self.etcdctl = ensure_etcd()
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="qr-etcd-")) if root is None else root
        self.token = f"qr-test-{os.getpid()}-{time.monotonic_ns()}"
        self.members = [Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}")
                        for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def endpoints(self) -> str:
        return ",".join(self.urls)

    def _start(self, m: Member) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        m.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        m.log = open(self.root / f"{m.name}.log", "ab")  # noqa: SIM115 - closed in _reap
        m.proc = subprocess.Popen(
            [self.etcd, "--name", m.name, "--data-dir", str(m.data_dir),
             "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
             "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
             "--initial-cluster", initial, "--initial-cluster-state", "new",
             "--initial-cluster-token", self.token,
             "--heartbeat-interval", "50", "--election-timeout", "500",
             "--logger", "zap", "--log-level", "warn", "--log-outputs", "stderr"],
            stdout=m.log, stderr=m.log, stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> EtcdCluster:
        for m in self.members:
            self._start(m)
        self.wait_healthy(timeout=30)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until a linearizable read succeeds through every running member (a quorum)."""
        deadline = time.monotonic() + timeout
        last = "no member answered"
        while time.monotonic() < deadline:
            ok = True
            for m in self.members:
                if not m.running:
                    continue
                try:
                    r = httpx.post(f"{m.client_url}/v3/kv/range",
                                   json={"key": "aGVhbHRo"}, timeout=1.0)
                    if r.status_code != 200:
                        ok, last = False, f"{m.name}: HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, last = False, f"{m.name}: {type(exc).__name__}"
            if ok:
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd cluster not healthy within {timeout} s ({last}); logs in "
                           f"{self.root}")

    def stop_member(self, index: int, *, kill: bool = False) -> None:
        m = self.members[index]
        if m.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            m.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            m.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait(timeout=10)
        self._reap(m)

    def start_member(self, index: int) -> None:
        m = self.members[index]
        if not m.running:
            self._start(m)

    def _reap(self, m: Member) -> None:
        m.proc = None
        if m.log is not None:
            m.log.close()
            m.log = None

    def etcdctl_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": self.endpoints})
        return env

    def close(self) -> None:
        for m in self.members:
            if m.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=10)
                self._reap(m)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
