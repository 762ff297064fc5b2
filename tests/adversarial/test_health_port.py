"""The health port under load it did not ask for: idle sockets by the thousand, slowloris,
oversized requests, many clients at once. In Kubernetes this port listens on the pod network.

Every case runs the real daemon as a subprocess with its health port on 127.0.0.1, a store
whose token falls due a few seconds in, and checks the three things that must survive:
``/healthz`` answers within a second, the daemon's CPU stays low, and the due token is
refreshed on time (a health server that eats the file descriptors or the CPU would stop it).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.health import MAX_CONNECTIONS, REQUEST_TIMEOUT
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.adversarial.registry import case
from tests.harness import DaemonProcess, OpenClawHome, qwen_profile, wait_for

#: The token falls due this long after the daemon starts (margin 3 s, so it expires 3 s later).
DUE_IN = 8.0
#: How long after "due" the refresh may come and still count as on time.
ON_TIME = 4.0
SOCKETS = 1000


@dataclass
class Running:
    daemon: DaemonProcess
    oc: OpenClawHome
    port: int
    due_at: float
    expires_ms: int

    def pid(self) -> int:
        return self.daemon.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon (every thread), from /proc."""
        fields = Path(f"/proc/{self.pid()}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid()}/fd"))

    def healthz(self, timeout: float = 1.0) -> tuple[int, float]:
        """Status of a fresh GET /healthz and how long it took; fails past ``timeout``."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        took = time.monotonic() - started
        return int(data.split(b" ", 2)[1]), took

    def refreshed(self) -> bool:
        doc = json.loads(self.oc.store_path().read_bytes())
        return bool(doc["profiles"]["qwen-portal:default"]["expires"] != self.expires_ms)


@pytest.fixture
def running(tmp_path: Path, fake: FakeQwen) -> Iterator[Running]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SOCKETS + 500:  # our side of the sockets needs descriptors too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    oc = OpenClawHome(tmp_path)
    access, refresh, _ = fake.issue_tokens(lifetime=3600)
    expires_ms = int((time.time() + DUE_IN + 3) * 1000)
    oc.write_store({"version": 1, "profiles": {"qwen-portal:default": qwen_profile(
        access, refresh, expires_ms)}})
    with DaemonProcess(oc, fake, env=oc.env(QWEN_REFRESHER_LISTEN="127.0.0.1:0")) as daemon:
        port = int(daemon.wait_event("health_listening")["address"].rsplit(":", 1)[1])
        daemon.wait_event("started")  # /healthz is 503 until the scheduler runs
        yield Running(daemon, oc, port, expires_ms / 1000 - 3, expires_ms)
        assert daemon.proc.poll() is None, daemon.output[-3000:]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_DONTWAIT) == b""
    except ConnectionResetError:
        return True
    except OSError:  # still connecting, or nothing to read yet
        return False


def flood(port: int, n: int) -> list[socket.socket]:
    """``n`` connections started at once, without waiting for each (an attacker does not)."""
    sockets = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sockets.append(s)
    time.sleep(0.5)
    return sockets


def assert_still_serving(r: Running, cpu_before: float, seconds: float) -> None:
    """/healthz in under a second, low CPU over ``seconds``, the due token refreshed on time."""
    status, took = r.healthz()
    assert status == 200 and took < 1.0, (status, took)
    time.sleep(seconds)
    cpu = r.cpu_seconds() - cpu_before
    assert cpu < 0.25 * seconds + 0.3, f"daemon burnt {cpu:.2f}s of CPU in {seconds}s"
    wait_for(r.refreshed, max(0.0, r.due_at + ON_TIME - time.time()), "the due refresh",
             r.daemon)
    status, took = r.healthz()
    assert status == 200 and took < 1.0


@pytest.mark.adversarial
@case("health-idle-flood", "health port",
      "a thousand TCP connections opened to the health port and left idle",
      "one event loop, a connection cap with oldest-idle eviction and a request deadline: "
      "no fd exhaustion, /healthz answers, refreshes go on")
def test_a_thousand_idle_connections(running: Running) -> None:
    r = running
    cpu_before = r.cpu_seconds()
    sockets = flood(r.port, SOCKETS)
    try:
        assert r.fds() < MAX_CONNECTIONS + 100, f"daemon holds {r.fds()} descriptors"
        assert_still_serving(r, cpu_before, 3.0)
        # Every idle connection is closed by the server, at the latest after its deadline.
        wait_for(lambda: all(closed_by_peer(s) for s in sockets), REQUEST_TIMEOUT + 5,
                 "the server to close every idle connection", r.daemon)
    finally:
        for s in sockets:
            s.close()


@pytest.mark.adversarial
@case("health-slowloris", "health port",
      "200 clients each drip one header byte every half second, forever",
      "a deadline for the whole request head (not per read): dripping clients are cut off")
def test_slowloris(running: Running) -> None:
    r = running
    cpu_before = r.cpu_seconds()
    sockets = flood(r.port, 200)
    stop = threading.Event()

    def drip() -> None:
        n = 0
        while not stop.wait(0.5):
            n += 1
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.send(b"GET /healthz HTTP/1.1\r\nX: " if n == 1 else b"a")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert_still_serving(r, cpu_before, 2.0)
        wait_for(lambda: all(closed_by_peer(s) for s in sockets), REQUEST_TIMEOUT + 5,
                 "the server to cut off every dripping client", r.daemon)
    finally:
        stop.set()
        dripper.join(5)
        for s in sockets:
            s.close()


def _send_and_read(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):  # the server may close before we finish sending
            s.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
        return out


@pytest.mark.adversarial
@case("health-huge-request-line", "health port",
      "a 1 MB request line (GET /aaaa...)",
      "the request head is capped at 8 KiB: 414 and the connection closed, nothing buffered")
def test_huge_request_line(running: Running) -> None:
    r = running
    reply = _send_and_read(r.port, b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\n\r\n")
    assert reply.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 414 "), reply[:100]
    assert r.healthz()[0] == 200


@pytest.mark.adversarial
@case("health-huge-headers", "health port",
      "a request with 10,000 headers (about 1 MB)",
      "431 once the head passes 8 KiB, the connection closed; the server's memory stays flat")
def test_huge_headers(running: Running) -> None:
    r = running
    rss = _rss_kb(r.pid())
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(10_000))
    for _ in range(5):
        reply = _send_and_read(r.port, b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    assert _rss_kb(r.pid()) - rss < 20_000
    assert r.healthz()[0] == 200


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.adversarial
@case("health-many-clients", "health port",
      "40 clients scrape /metrics, /readyz and /healthz in a loop at the same time",
      "every request answered correctly; work is done by a small fixed pool, no thread per client")
def test_many_concurrent_clients(running: Running) -> None:
    r = running
    errors: list[str] = []
    answered = [0]

    def client(n: int) -> None:
        for i in range(10):
            path = ("/metrics", "/readyz", "/healthz")[(n + i) % 3]
            reply = _send_and_read(r.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.") else b"?"
            if status not in (b"200", b"503"):  # /readyz may be 503 early on
                errors.append(f"{path}: {reply[:80]!r}")
            else:
                answered[0] += 1

    # Let the daemon start every thread it will have (the due refresh included) first.
    wait_for(r.refreshed, max(0.0, r.due_at + ON_TIME - time.time()), "the due refresh",
             r.daemon)
    for path in ("/metrics", "/readyz", "/healthz") * 2:
        _send_and_read(r.port, f"GET {path} HTTP/1.1\r\n\r\n".encode())
    time.sleep(0.5)
    threads_before = len(os.listdir(f"/proc/{r.pid()}/task"))
    clients = [threading.Thread(target=client, args=(n,)) for n in range(40)]
    for t in clients:
        t.start()
    peak = threads_before
    while any(t.is_alive() for t in clients):
        peak = max(peak, len(os.listdir(f"/proc/{r.pid()}/task")))
        time.sleep(0.01)
    assert errors == [] and answered[0] == 400
    assert peak <= threads_before + 2, f"{peak - threads_before} threads more under load"


@pytest.mark.adversarial
@case("health-not-http", "health port",
      "binary garbage, a bare newline, an unknown method and an HTTP/0.9 line",
      "400/405/501 answers and a closed connection; the loop never raises")
def test_not_http(running: Running) -> None:
    r = running
    assert _send_and_read(r.port, b"\x00\xff\x16\x03\x01garbage\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert _send_and_read(r.port, b"\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _send_and_read(r.port, b"DELETE /healthz HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 405 ")
    assert _send_and_read(r.port, b"GET /healthz\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert r.healthz()[0] == 200


@pytest.mark.adversarial
@case("health-stuck-state-callback", "health port",
      "/readyz and /metrics callers pile up while the daemon's state lock is held for long",
      "they are built by a fixed pool with a queue cap (503 busy past it); /healthz is "
      "answered by the loop itself and never waits behind them")
def test_healthz_never_waits_behind_a_stuck_callback() -> None:
    from qwen_refresher.health import MAX_PENDING, HealthServer
    from qwen_refresher.metrics import Metrics

    release = threading.Event()

    def stuck() -> list[Any]:
        release.wait(30)
        return []

    server = HealthServer("127.0.0.1", 0, live_fn=lambda: True, profiles_fn=stuck,
                          metrics=Metrics(stuck))
    server.start()
    replies: list[bytes] = []
    try:
        callers = [threading.Thread(target=lambda: replies.append(_send_and_read(
            server.port, b"GET /readyz HTTP/1.1\r\n\r\n"))) for _ in range(MAX_PENDING + 4)]
        for t in callers:
            t.start()
        time.sleep(0.5)
        started = time.monotonic()
        reply = _send_and_read(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 1.0
        wait_for(lambda: len(replies) >= 4, 5, "the callers past the queue cap to get 503")
        assert all(r.startswith(b"HTTP/1.1 503 ") and b"busy" in r for r in replies)
        release.set()
        for t in callers:
            t.join(10)
        assert len(replies) == MAX_PENDING + 4
        assert sum(b'"busy"' in r for r in replies) == 4  # the rest: answered once unblocked
        assert sum(b'"ready": false' in r for r in replies) == MAX_PENDING
    finally:
        release.set()
        server.stop()
