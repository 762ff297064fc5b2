"""``/healthz``, ``/readyz`` and ``/metrics`` on a real ephemeral port, fetched with urllib."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen_refresher.health import HealthServer, readiness
from qwen_refresher.metrics import Metrics
from qwen_refresher.state import ProfileStatus
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, qwen_profile, wait_for

STORE = "/home/u/.openclaw/agents/main/agent/auth-profiles.json"
#: Token-looking strings a careless implementation might put into labels or errors.
SECRETS = ("ACCESS-0f1e2d3c4b5a", "REFRESH-9a8b7c6d5e4f")


def profile(state: str = "ok", *, profile_id: str = "qwen-portal:default",
            expires_in: float | None = 3600.0, **extra: Any) -> ProfileStatus:
    now = time.time()
    row: dict[str, Any] = {
        "store": STORE, "store_kind": "openclaw", "agent": "main", "profile": profile_id,
        "family": "fam", "state": state,
        "expires_at": None if expires_in is None else now + expires_in,
        "next_refresh_at": now + 1800, "last_refresh_at": now - 60, "attempts": 0,
        "last_error": None, "login_command": "openclaw models auth login --provider qwen-portal",
    }
    row.update(extra)
    return row  # type: ignore[return-value]


class App:
    """What the daemon hands the server: a liveness flag and a profile list, both mutable."""

    def __init__(self) -> None:
        self.alive = True
        self.profiles: list[ProfileStatus] = [profile()]
        self.metrics = Metrics(lambda: self.profiles)
        self.server = HealthServer("127.0.0.1", 0, live_fn=lambda: self.alive,
                                   profiles_fn=lambda: self.profiles, metrics=self.metrics)

    def get(self, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
        url = f"http://127.0.0.1:{self.server.port}{path}"
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.fixture
def app() -> Iterator[App]:
    a = App()
    a.server.start()
    yield a
    a.server.stop()


def test_ephemeral_port_is_reported(app: App) -> None:
    assert app.server.port != 0


def test_healthz_follows_the_main_loop(app: App) -> None:
    status, body, headers = app.get("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "alive"})
    assert headers["Content-Type"] == "application/json"
    app.alive = False
    assert app.get("/healthz")[0] == 503


def test_healthz_is_503_when_the_liveness_check_breaks(app: App) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    app.server.live_fn = broken
    assert app.get("/healthz")[0] == 503


def test_readyz_ready(app: App) -> None:
    app.profiles = [profile("ok"), profile("due", profile_id="b"),
                    profile("refreshing", profile_id="c"), profile("retrying", profile_id="d")]
    status, body, _ = app.get("/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True})


@pytest.mark.parametrize(("profiles", "reason"), [
    ([], "no qwen-portal profile found"),
    ([profile("needs_login")],
     "qwen-portal:default in /home/u/.openclaw/agents/main/agent/auth-profiles.json: "
     "needs_login"),
    ([profile("ok"), profile("expired", profile_id="b", expires_in=-5)], "b in"),
    ([profile("invalid_store", expires_in=None)], "invalid_store"),
    ([profile("retrying", expires_in=-1)], "token expired"),  # retrying past expiry
    ([profile("ok", expires_in=None)], "token expired"),
])
def test_readyz_not_ready(app: App, profiles: list[ProfileStatus], reason: str) -> None:
    app.profiles = profiles
    status, body, _ = app.get("/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["ready"] is False
    assert any(reason in r for r in doc["reasons"]), doc
    assert len(body) < 1000  # short


def test_readiness_is_pure() -> None:
    now = 1_000_000.0
    ok = profile("ok")
    ok["expires_at"] = now + 1
    assert readiness([ok], now) == (True, [])
    ok["expires_at"] = now
    assert readiness([ok], now)[0] is False


def test_metrics_parse_and_carry_the_profile_state(app: App) -> None:
    app.profiles = [profile("ok"), profile("needs_login", profile_id="qwen-portal:b")]
    app.metrics.refresh_finished("rotated", 0.4)
    app.metrics.refresh_finished("transient", 15.0, "http_5xx")
    app.metrics.refresh_finished("rejected", 0.2, "rejected")
    app.metrics.store_error(STORE)
    status, body, headers = app.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    default = {"store": STORE, "profile": "qwen-portal:default"}
    b = {"store": STORE, "profile": "qwen-portal:b"}
    assert value("qwen_refresher_refresh_total", result="rotated") == 1
    assert value("qwen_refresher_refresh_total", result="adopted") == 0  # present from start
    assert value("qwen_refresher_refresh_failures_total", reason="http_5xx") == 1
    assert value("qwen_refresher_refresh_failures_total", reason="rejected") == 1
    assert value("qwen_refresher_store_errors_total", store=STORE) == 1
    assert value("qwen_refresher_refresh_duration_seconds_count") == 3
    assert value("qwen_refresher_refresh_duration_seconds_bucket", le="0.5") == 2
    assert value("qwen_refresher_needs_login", **default) == 0
    assert value("qwen_refresher_needs_login", **b) == 1
    assert value("qwen_refresher_profile_state", state="needs_login", **b) == 1
    assert value("qwen_refresher_profile_state", state="ok", **b) == 0
    expiry = value("qwen_refresher_token_expiry_timestamp_seconds", **default)
    assert expiry == pytest.approx(app.profiles[0]["expires_at"])
    assert value("qwen_refresher_next_refresh_timestamp_seconds", **default) > time.time()
    assert value("qwen_refresher_last_success_timestamp_seconds", **default) < time.time()
    # The gauges are read at scrape time: no stale series once a profile is gone.
    app.profiles = []
    assert "qwen-portal:b" not in app.get("/metrics")[1]


def test_no_token_reaches_metrics_or_readyz(app: App) -> None:
    """Labels come from closed sets; a daemon bug passing a token as a result or reason must
    not put it on the wire."""
    app.profiles = [profile("needs_login", last_error="server said no")]
    app.metrics.refresh_finished(SECRETS[0], 1.0, SECRETS[1])
    bodies = [app.get(path)[1] for path in ("/metrics", "/readyz", "/healthz", "/nope")]
    for secret in SECRETS:
        assert all(secret not in body for body in bodies)
    text = bodies[0]
    assert 'qwen_refresher_refresh_total{result="other"} 1.0' in text
    assert 'qwen_refresher_refresh_failures_total{reason="other"} 1.0' in text


def test_own_registry(app: App) -> None:
    """Never the global registry: two daemons in one process must not collide."""
    second = Metrics(lambda: [])
    second.refresh_finished("rotated", 1.0)
    assert "qwen_refresher_refresh_total" not in prometheus_client.generate_latest().decode()
    assert app.metrics.registry is not second.registry


def test_unknown_path_and_head(app: App) -> None:
    assert app.get("/nope")[0] == 404
    assert app.get("/healthz?verbose=1")[0] == 200
    status, body, headers = app.get("/readyz", method="HEAD")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 0


def test_broken_profiles_callback_answers_500(app: App) -> None:
    def broken() -> list[ProfileStatus]:
        raise RuntimeError("boom")

    app.server.profiles_fn = broken
    assert app.get("/readyz")[0] == 500
    assert app.get("/healthz")[0] == 200  # liveness does not depend on it


def test_access_log_stays_quiet(app: App, capfd: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        app.get("/healthz")
    app.get("/nope")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_stop_frees_the_port() -> None:
    a = App()
    a.server.start()
    port = a.server.port
    a.server.stop()
    a.server.stop()  # idempotent
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    a = App()
    a.server.host = "::1"
    try:
        a.server.start()
    except OSError:
        pytest.skip("::1 not available")
    try:
        url = f"http://[::1]:{a.server.port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
    finally:
        a.server.stop()


def test_real_daemon_endpoints_when_a_login_is_needed(tmp_path: Path, fake: FakeQwen) -> None:
    """The daemon wires live_fn/profiles_fn/metrics as promised: a refresh token the server
    refuses turns /readyz to 503 naming the profile, counts a rejection, and leaks nothing."""
    oc = OpenClawHome(tmp_path)
    access, refresh = "ACCESS-never-issued-" + uuid.uuid4().hex, "REFRESH-" + uuid.uuid4().hex
    oc.write_store({"version": 1, "profiles": {"qwen-portal:default": qwen_profile(
        access, refresh, int((time.time() + 120) * 1000))}})  # due now (margin 900 s)
    with DaemonProcess(oc, fake, env=oc.env(QWEN_REFRESHER_LISTEN="127.0.0.1:0"),
                       margin="900") as daemon:
        port = daemon.wait_event("health_listening")["address"].rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        # (Right after start-up it is 503 "no profile found", then 200 while the token is valid.)
        wait_for(lambda: "needs_login" in get("/readyz")[1], 20, "readyz: needs_login", daemon)
        assert get("/healthz")[0] == 200  # alive: restarting would not help
        status, body = get("/readyz")
        assert status == 503 and "qwen-portal:default in ~/.openclaw/agents/main" in body
        metrics = get("/metrics")[1]
        assert 'qwen_refresher_needs_login{profile="qwen-portal:default"' in metrics
        assert 'qwen_refresher_refresh_total{result="rejected"} 1.0' in metrics
        for secret in (access, refresh):
            assert secret not in body and secret not in metrics
            assert secret not in daemon.output
