"""systemd notifications read from a real ``NOTIFY_SOCKET`` that the test binds itself.

Both socket flavours systemd uses are covered: a filesystem path and an abstract-namespace name
(``@...``). The last test runs the real daemon with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set,
as systemd would, and checks READY, STATUS, WATCHDOG and STOPPING arrive in that order.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_refresher import sdnotify
from tests.harness import DaemonProcess, OpenClawHome, assert_no_secrets, qwen_profile


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, env_value: str, address: str | bytes) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def recv(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain_until(self, wanted: str, timeout: float) -> list[str]:
        """Every datagram until one containing ``wanted`` (inclusive)."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.recv(max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            got.append(message)
            if wanted in message.splitlines():
                return got
        raise AssertionError(f"no {wanted!r} within {timeout}s; got {got!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[Listener]:
    if request.param == "path":
        directory = tempfile.mkdtemp(prefix="qr-notify-", dir="/tmp")  # sun_path is 108 bytes
        path = os.path.join(directory, "notify.sock")
        lst = Listener(path, path)
    else:
        name = f"qr-notify-test-{uuid.uuid4().hex}"
        lst = Listener("@" + name, b"\0" + name.encode())
    yield lst
    lst.close()
    if request.param == "path":
        Path(lst.env_value).unlink(missing_ok=True)
        Path(lst.env_value).parent.rmdir()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def test_each_message(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    assert sdnotify.ready() is True
    assert listener.recv() == "READY=1"
    assert sdnotify.set_status("2 profiles ok, next refresh in 5h41m")
    assert listener.recv() == "STATUS=2 profiles ok, next refresh in 5h41m"
    assert sdnotify.watchdog_ping()
    assert listener.recv() == "WATCHDOG=1"
    assert sdnotify.stopping()
    assert listener.recv() == "STOPPING=1"


def test_several_lines_go_in_one_datagram(listener: Listener,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    assert sdnotify.notify("READY=1", "STATUS=multi\nline")
    assert listener.recv() == "READY=1\nSTATUS=multi line"  # a newline cannot split a field


def test_no_socket_is_a_quiet_no_op() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.watchdog_interval() is None


def test_unreachable_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/dir/notify.sock")
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@qr-nobody-listens-" + uuid.uuid4().hex)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


def test_real_daemon_notifies_systemd(tmp_path: Path, fake: object) -> None:
    """READY after the first scan, STATUS with the summary, WATCHDOG at half of WATCHDOG_USEC
    from the main loop, STOPPING on SIGTERM; no token in any datagram."""
    name = f"qr-notify-daemon-{uuid.uuid4().hex}"
    lst = Listener("@" + name, b"\0" + name.encode())
    home = OpenClawHome(tmp_path)
    access, refresh, _expires_ms = fake.issue_tokens()  # type: ignore[attr-defined]
    home.write_store({"version": 1, "profiles": {"qwen-portal:default": qwen_profile(
        access, refresh, int((time.time() + 6 * 3600) * 1000))}})
    env = home.env(NOTIFY_SOCKET=lst.env_value, WATCHDOG_USEC="400000")
    try:
        with DaemonProcess(home, fake, env=env, margin="900") as daemon:
            got = lst.drain_until("READY=1", timeout=20)
            got += lst.drain_until("WATCHDOG=1", timeout=5)
            statuses = [m for m in got if m.startswith("STATUS=")]
            assert any(m.startswith("STATUS=1 profile ok, next refresh in")
                       for m in statuses), got
            daemon.signal(signal.SIGTERM)
            got += lst.drain_until("STOPPING=1", timeout=10)
            assert daemon.stop() == 0
        assert_no_secrets(got, [access, refresh])
    finally:
        lst.close()
