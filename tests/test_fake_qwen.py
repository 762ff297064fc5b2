"""The fake Qwen server itself, over real HTTP: protocol, rotation, faults, control API, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwen_refresher.testing.fake_qwen import (
    DEVICE_GRANT_TYPE,
    QWEN_CLIENT_ID,
    FakeQwen,
    FakeQwenConfig,
    FakeQwenControl,
    FakeQwenProcess,
    pkce_challenge,
)

REJECTION = {"error": "invalid_request", "error_description": "Invalid refresh token or client_id"}
ROOT = Path(__file__).resolve().parents[1]


DEFAULTS = FakeQwenConfig(lifetime=60)


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeQwen]:
    with FakeQwen(DEFAULTS) as server:
        yield server


@pytest.fixture
def fake(shared_fake: FakeQwen) -> FakeQwen:
    """One server per module (starting dozens is slow on a busy box), pristine for each test."""
    shared_fake.reset()
    shared_fake.configure(**dataclasses.asdict(DEFAULTS))
    return shared_fake


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5, trust_env=False) as client:
        yield client


def refresh(http: httpx.Client, fake: FakeQwen, token: str, **extra: str) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": QWEN_CLIENT_ID}
    form.update(extra)
    return http.post(fake.token_url, data=form, headers={"Accept": "application/json"})


# --------------------------------------------------------------------------- tokens


def test_issue_tokens_are_unique_prefixed_and_expire_as_configured(fake: FakeQwen) -> None:
    before = time.time() * 1000
    sets = [fake.issue_tokens() for _ in range(20)]
    access = {a for a, _, _ in sets}
    refreshes = {r for _, r, _ in sets}
    assert len(access) == 20 and len(refreshes) == 20
    assert all(re.fullmatch(r"fakeacc-[A-Za-z0-9_-]{40,}", a) for a in access)
    assert all(re.fullmatch(r"fakeref-[A-Za-z0-9_-]{40,}", r) for r in refreshes)
    _, _, expires_ms = sets[0]
    assert before + 59_000 <= expires_ms <= time.time() * 1000 + 60_000
    _, _, short = fake.issue_tokens(lifetime=1.5)
    assert short - time.time() * 1000 <= 1500
    assert [i.via for i in fake.issued] == ["seed"] * 21


def test_refresh_answers_like_the_real_service(fake: FakeQwen, http: httpx.Client) -> None:
    _, old, _ = fake.issue_tokens()
    response = refresh(http, fake, old)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token",
                         "resource_url"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 60 and isinstance(body["expires_in"], int)
    assert body["resource_url"] == f"127.0.0.1:{fake.port}"
    assert body["refresh_token"].startswith("fakeref-") and body["refresh_token"] != old
    issued = fake.issued[-1]
    assert (issued.access_token, issued.refresh_token, issued.replaced, issued.via) == (
        body["access_token"], body["refresh_token"], old, "refresh")


def test_float_lifetime_and_configurable_resource_url(fake: FakeQwen, http: httpx.Client) -> None:
    fake.configure(lifetime=1.5, resource_url="portal.qwen.ai")
    _, token, _ = fake.issue_tokens()
    body = refresh(http, fake, token).json()
    assert body["expires_in"] == 1.5
    assert body["resource_url"] == "portal.qwen.ai"


def test_rotation_kills_the_old_token_and_counts_reuse(fake: FakeQwen,
                                                       http: httpx.Client) -> None:
    _, first, _ = fake.issue_tokens()
    second = refresh(http, fake, first).json()["refresh_token"]
    reused = refresh(http, fake, first)
    assert reused.status_code == 400
    assert reused.json() == REJECTION
    assert fake.reuse_count == 1
    assert refresh(http, fake, second).status_code == 200
    refresh(http, fake, first)
    assert fake.reuse_count == 2
    assert [r.outcome for r in fake.refresh_requests()] == ["ok", "reused", "ok", "reused"]


def test_no_rotate_keeps_the_refresh_token_alive(http: httpx.Client) -> None:
    with FakeQwen(rotate=False) as fake:
        _, token, _ = fake.issue_tokens()
        for _ in range(3):
            response = refresh(http, fake, token)
            assert response.status_code == 200
            assert response.json()["refresh_token"] == token
        assert fake.reuse_count == 0


@pytest.mark.parametrize("mode", ["omit", "empty"])
def test_refresh_token_missing_from_answer_keeps_old_one_valid(
        fake: FakeQwen, http: httpx.Client, mode: str) -> None:
    fake.configure(refresh_in_response=mode)
    _, token, _ = fake.issue_tokens()
    body = refresh(http, fake, token).json()
    assert ("refresh_token" not in body) if mode == "omit" else body["refresh_token"] == ""
    assert refresh(http, fake, token).status_code == 200


def test_unknown_token_wrong_client_and_non_form_are_rejected(fake: FakeQwen,
                                                             http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    assert refresh(http, fake, "fakeref-nope").json() == REJECTION
    bad_client = refresh(http, fake, token, client_id="someone-else")
    assert bad_client.status_code == 400 and bad_client.json() == REJECTION
    as_json = http.post(fake.token_url, json={"grant_type": "refresh_token",
                                              "refresh_token": token,
                                              "client_id": QWEN_CLIENT_ID})
    assert as_json.status_code == 400
    assert "form-urlencoded" in as_json.json()["error_description"]
    assert http.get(fake.token_url).status_code == 405
    # none of that consumed the token
    assert refresh(http, fake, token).status_code == 200
    assert fake.reuse_count == 0


def test_reject_token_and_reject_configuration(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.reject_token(token)
    for _ in range(2):
        assert refresh(http, fake, token).json() == REJECTION
    assert fake.reuse_count == 0
    fake.configure(reject_status=401, reject_error="invalid_grant")
    response = refresh(http, fake, token)
    assert response.status_code == 401 and response.json()["error"] == "invalid_grant"


def test_refresh_token_lifetime(fake: FakeQwen, http: httpx.Client) -> None:
    fake.configure(refresh_lifetime=0.2)
    _, token, _ = fake.issue_tokens()
    time.sleep(0.25)
    assert refresh(http, fake, token).status_code == 400
    assert fake.refresh_requests()[-1].outcome == "expired"


def test_concurrent_refresh_of_one_token_has_exactly_one_winner(
        fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    statuses: list[int] = []
    barrier = threading.Barrier(12)

    def worker() -> None:
        barrier.wait()
        statuses.append(refresh(http, fake, token).status_code)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [400] * 11
    assert fake.reuse_count == 11


def test_host_header_and_absolute_form_are_ignored(fake: FakeQwen) -> None:
    _, token, _ = fake.issue_tokens()
    body = (f"grant_type=refresh_token&refresh_token={token}&client_id={QWEN_CLIENT_ID}")
    request = (f"POST https://chat.qwen.ai/api/v1/oauth2/token HTTP/1.1\r\n"
               f"Host: chat.qwen.ai\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}")
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")


# --------------------------------------------------------------------------- faults


def test_faults_are_fifo_one_shot_and_only_hit_refresh(fake: FakeQwen,
                                                       http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("503", count=2)
    fake.inject("500")
    # a device-code request does not consume refresh faults
    assert http.post(fake.device_code_url, data={
        "client_id": QWEN_CLIENT_ID, "scope": "x", "code_challenge": "c",
        "code_challenge_method": "S256"}).status_code == 200
    assert [refresh(http, fake, token).status_code for _ in range(4)] == [503, 503, 500, 200]
    assert [r.outcome for r in fake.refresh_requests()] == [
        "fault:503", "fault:503", "fault:500", "ok"]
    assert fake.pending_faults == []


def test_429_sends_retry_after(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("429")
    fake.inject("429", retry_after=7)
    fake.inject("503", retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    assert refresh(http, fake, token).headers["retry-after"] == "1"
    assert refresh(http, fake, token).headers["retry-after"] == "7"
    assert refresh(http, fake, token).headers["retry-after"] == "Wed, 21 Oct 2015 07:28:00 GMT"


def test_drop_and_timeout_hang_up_without_consuming(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, fake, token)
    fake.inject("timeout", delay=0.3)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, fake, token)
    assert time.monotonic() - started >= 0.3
    assert refresh(http, fake, token).status_code == 200
    assert [r.status for r in fake.refresh_requests()] == [None, None, 200]


def test_lost_rotates_the_token_but_the_answer_never_arrives(fake: FakeQwen,
                                                             http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("lost")
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, fake, token)
    assert fake.issued[-1].replaced == token
    assert refresh(http, fake, token).status_code == 400
    assert fake.reuse_count == 1


def test_delay_answers_late_but_normally(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("delay", delay=0.3)
    started = time.monotonic()
    assert refresh(http, fake, token).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_broken_200s_and_injected_reject(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("empty200")
    fake.inject("html200")
    fake.inject("reject")
    empty = refresh(http, fake, token)
    assert empty.status_code == 200 and empty.content == b""
    page = refresh(http, fake, token)
    assert page.status_code == 200 and page.text.startswith("<!DOCTYPE html>")
    assert refresh(http, fake, token).json() == REJECTION
    assert refresh(http, fake, token).status_code == 200  # none of the above consumed it


def test_custom_status_and_body(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    fake.inject("403", body={"error": "waf"})
    fake.inject("502", body="Bad gateway")
    forbidden = refresh(http, fake, token)
    assert forbidden.status_code == 403 and forbidden.json() == {"error": "waf"}
    gateway = refresh(http, fake, token)
    assert gateway.status_code == 502 and gateway.text == "Bad gateway"


def test_bad_fault_arguments_are_refused(fake: FakeQwen) -> None:
    with pytest.raises(ValueError):
        fake.inject("teapot")
    with pytest.raises(ValueError):
        fake.inject("503", count=0)
    with pytest.raises(ValueError):
        fake.inject("503", target="everywhere")
    with pytest.raises(ValueError):
        fake.set_failure_rate(1.5)
    with pytest.raises(ValueError):
        fake.configure(lifetme=3)


def test_failure_rate_is_seeded_and_reproducible(http: httpx.Client) -> None:
    def run(seed: int) -> list[int]:
        with FakeQwen(rotate=False) as fake:
            _, token, _ = fake.issue_tokens()
            fake.set_failure_rate(0.5, kinds=["502", "503"], seed=seed)
            return [refresh(http, fake, token).status_code for _ in range(30)]

    first, again = run(7), run(7)
    assert first == again
    assert {200, 502, 503} == set(first)
    with FakeQwen() as fake:
        _, token, _ = fake.issue_tokens()
        fake.set_failure_rate(1.0, kinds=["500"])
        assert refresh(http, fake, token).status_code == 500
        fake.set_failure_rate(0.0)
        assert refresh(http, fake, token).status_code == 200


def test_request_log_and_max_rate(fake: FakeQwen, http: httpx.Client) -> None:
    _, token, _ = fake.issue_tokens()
    for _ in range(3):
        token = refresh(http, fake, token, ).json()["refresh_token"]
    time.sleep(0.3)
    refresh(http, fake, token)
    records = fake.refresh_requests()
    assert len(records) == 4
    assert records[0].refresh_token is not None and records[0].status == 200
    assert records[0].content_type == "application/x-www-form-urlencoded"
    assert records[0].accept == "application/json"
    assert fake.max_rate(0.25) == 3
    assert fake.max_rate(10) == 4


# --------------------------------------------------------------------------- device flow


def device_code(http: httpx.Client, fake: FakeQwen, verifier: str) -> dict[str, Any]:
    response = http.post(fake.device_code_url, data={
        "client_id": QWEN_CLIENT_ID, "scope": "openid profile email model.completion",
        "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"})
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def poll(http: httpx.Client, fake: FakeQwen, code: str, verifier: str) -> httpx.Response:
    return http.post(fake.token_url, data={
        "grant_type": DEVICE_GRANT_TYPE, "client_id": QWEN_CLIENT_ID, "device_code": code,
        "code_verifier": verifier})


def test_device_flow_pending_then_approved(fake: FakeQwen, http: httpx.Client) -> None:
    verifier = "v" * 43
    answer = device_code(http, fake, verifier)
    assert answer["device_code"].startswith("fakedev-")
    assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", answer["user_code"])
    assert answer["verification_uri_complete"].endswith(answer["user_code"])
    assert answer["interval"] == 2 and answer["expires_in"] == 300
    pending = poll(http, fake, answer["device_code"], verifier)
    assert pending.status_code == 400 and pending.json() == {"error": "authorization_pending"}
    assert [d["user_code"] for d in fake.pending_device_codes()] == [answer["user_code"]]
    fake.approve(answer["user_code"].lower().replace("-", ""))  # typed sloppily, still found
    tokens = poll(http, fake, answer["device_code"], verifier)
    assert tokens.status_code == 200 and tokens.json()["access_token"].startswith("fakeacc-")
    assert fake.issued[-1].via == "device"
    again = poll(http, fake, answer["device_code"], verifier)
    assert again.json()["error"] == "invalid_grant"


def test_device_flow_denied_expired_pkce_and_missing_pkce(fake: FakeQwen,
                                                          http: httpx.Client) -> None:
    verifier = "w" * 43
    denied = device_code(http, fake, verifier)
    fake.deny(denied["user_code"])
    assert poll(http, fake, denied["device_code"], verifier).json()["error"] == "access_denied"
    with pytest.raises(KeyError):
        fake.approve("ZZZZ-ZZZZ")
    with pytest.raises(ValueError):
        fake.approve(denied["user_code"])

    approved = device_code(http, fake, verifier)
    fake.approve(approved["user_code"])
    mismatch = poll(http, fake, approved["device_code"], "x" * 43)
    assert mismatch.status_code == 400 and mismatch.json()["error"] == "invalid_grant"
    assert "PKCE" in mismatch.json()["error_description"]

    fake.configure(device_code_lifetime=0.2)
    expiring = device_code(http, fake, verifier)
    assert expiring["expires_in"] == 0.2
    time.sleep(0.25)
    assert poll(http, fake, expiring["device_code"], verifier).json()["error"] == "expired_token"

    no_pkce = http.post(fake.device_code_url, data={"client_id": QWEN_CLIENT_ID})
    assert no_pkce.status_code == 400


def test_device_flow_auto_approve_and_slow_down(fake: FakeQwen, http: httpx.Client) -> None:
    fake.configure(auto_approve_after=2)
    verifier = "y" * 43
    answer = device_code(http, fake, verifier)
    fake.inject("slow_down")
    slow = poll(http, fake, answer["device_code"], verifier)
    assert slow.status_code == 429 and slow.json()["error"] == "slow_down"
    statuses = [poll(http, fake, answer["device_code"], verifier).status_code for _ in range(3)]
    assert statuses == [400, 400, 200]


def test_authorize_page_approves(fake: FakeQwen, http: httpx.Client) -> None:
    answer = device_code(http, fake, "z" * 43)
    page = http.get(answer["verification_uri_complete"])
    assert page.status_code == 200 and answer["user_code"] in page.text
    http.post(answer["verification_uri"], data={"user_code": answer["user_code"],
                                                "action": "approve"})
    assert poll(http, fake, answer["device_code"], "z" * 43).status_code == 200


# --------------------------------------------------------------------------- chat


def test_chat_completions_checks_the_access_token(fake: FakeQwen, http: httpx.Client) -> None:
    access, _, _ = fake.issue_tokens()
    expired, _, _ = fake.issue_tokens(lifetime=-1)
    request = {"model": "coder-model", "messages": [{"role": "user", "content": "hi"}]}
    ok = http.post(fake.chat_url, json=request, headers={"Authorization": f"Bearer {access}"})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"
    also = http.post(fake.base_url + "/api/v1/chat/completions", json=request,
                     headers={"Authorization": f"Bearer {access}"})
    assert also.status_code == 200
    stream = http.post(fake.chat_url, json={**request, "stream": True},
                       headers={"Authorization": f"Bearer {access}"})
    assert stream.text.rstrip().endswith("data: [DONE]")
    for headers in ({"Authorization": f"Bearer {expired}"},
                    {"Authorization": "Bearer fakeacc-unknown"}, {}):
        assert http.post(fake.chat_url, json=request, headers=headers).status_code == 401
    chats = [r for r in fake.requests if r.endpoint == "chat"]
    assert [r.access_token for r in chats] == [access, access, access, expired,
                                               "fakeacc-unknown", None]
    assert [r.outcome for r in chats][3:] == ["expired_token", "unknown_token", "unknown_token"]


# --------------------------------------------------------------------------- control API


def test_http_control_api_in_process(fake: FakeQwen, http: httpx.Client) -> None:
    control = fake.control
    access, token, expires_ms = control.issue_tokens(lifetime=30)
    assert access.startswith("fakeacc-") and expires_ms > time.time() * 1000
    control.inject("503", count=2, retry_after=3)
    assert len(control.state()["pending_faults"]) == 2
    assert refresh(http, fake, token).headers["retry-after"] == "3"
    control.clear_faults()
    new = refresh(http, fake, token).json()["refresh_token"]
    refresh(http, fake, token)
    assert control.reuse_count == 1
    control.reject_token(new)
    assert refresh(http, fake, new).json() == REJECTION
    assert control.configure(lifetime=2.5)["lifetime"] == 2.5
    control.set_failure_rate(1.0, kinds=["502"], seed=1)
    assert refresh(http, fake, new).status_code == 502
    control.set_failure_rate(0)
    state = control.state()
    assert state["counts"]["refresh"] == 5 and state["counts"]["refresh_ok"] == 1
    assert state["issued"][-1]["replaced"] == token
    assert len(control.refresh_requests()) == 5
    with pytest.raises(ValueError):
        control.inject("teapot")
    with pytest.raises(ValueError):
        control.configure(lifetime="soon")
    with pytest.raises(KeyError):
        control.approve("NOPE-NOPE")
    control.reset()
    after = control.state()
    assert after["requests"] == [] and after["issued"] == [] and after["reuse_count"] == 0
    assert after["config"]["lifetime"] == 2.5  # reset keeps the configuration


def test_http_control_device_approval(fake: FakeQwen, http: httpx.Client) -> None:
    answer = device_code(http, fake, "q" * 43)
    control = fake.control
    assert control.pending_device_codes()[0]["user_code"] == answer["user_code"]
    control.approve(answer["user_code"])
    assert poll(http, fake, answer["device_code"], "q" * 43).status_code == 200
    denied = device_code(http, fake, "q" * 43)
    control.deny(denied["user_code"])
    assert poll(http, fake, denied["device_code"], "q" * 43).json()["error"] == "access_denied"


# --------------------------------------------------------------------------- subprocess


def test_subprocess_prints_one_ready_line_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_refresher.testing.fake_qwen", "--port", "0",
         "--lifetime", "1.5", "--no-rotate"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"READY (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        control = FakeQwenControl(match.group(1))
        config = control.state()["config"]
        assert config["lifetime"] == 1.5 and config["rotate"] is False
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out == ""  # exactly one line on stdout, ever
    assert "Traceback" not in err


def test_subprocess_sigint_exits_cleanly() -> None:
    with FakeQwenProcess() as proc:
        proc.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert proc.process.wait(5) == 0  # type: ignore[union-attr]


def test_subprocess_helper_and_control(http: httpx.Client) -> None:
    with FakeQwenProcess(["--auto-approve-after", "0"], lifetime=30) as proc:
        control = proc.control
        assert control.state()["config"]["lifetime"] == 30
        _, token, _ = control.issue_tokens()
        form = {"grant_type": "refresh_token", "refresh_token": token,
                "client_id": QWEN_CLIENT_ID}
        control.inject("429", retry_after=4)
        limited = http.post(proc.token_url, data=form)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "4"
        ok = http.post(proc.token_url, data=form)
        assert ok.status_code == 200 and ok.json()["expires_in"] == 30
        assert http.post(proc.token_url, data=form).json() == REJECTION
        assert control.reuse_count == 1
        assert [r["status"] for r in control.refresh_requests()] == [429, 200, 400]
        issued = control.issued
        assert issued[-1]["replaced"] == token
        chat = http.post(proc.chat_url, json={"messages": []},
                         headers={"Authorization": f"Bearer {ok.json()['access_token']}"})
        assert chat.status_code == 200
        assert control.state()["requests"][-1]["access_token"] == ok.json()["access_token"]
        pid = proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_subprocess_reports_a_failed_start() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="did not start"):
            FakeQwenProcess(["--port", str(port)], startup_timeout=5).start()


def test_cli_rejects_bad_settings() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "qwen_refresher.testing.fake_qwen", "--lifetime", "soon"],
        capture_output=True, text=True, env=env, timeout=10)
    assert result.returncode == 2 and "lifetime" in result.stderr
    assert result.stdout == ""


def test_stop_cuts_open_keepalive_connections(http: httpx.Client) -> None:
    fake = FakeQwen().start()
    _, token, _ = fake.issue_tokens()
    assert refresh(http, fake, token).status_code == 200  # leaves a keep-alive connection
    url = fake.token_url
    fake.stop()
    with pytest.raises(httpx.TransportError):
        http.post(url, data={"grant_type": "refresh_token"})


def test_stop_closes_idle_connections_at_once() -> None:
    fake = FakeQwen().start()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=3) as idle:
        time.sleep(0.05)  # let a handler thread pick the connection up
        started = time.monotonic()
        fake.stop()
        assert idle.recv(1) == b""
        assert time.monotonic() - started < 2


def test_keepalive_requests_are_fast_enough_for_benchmarks(http: httpx.Client) -> None:
    """Headers and body leave in two writes; with Nagle on, each answer stalls ~40 ms."""
    with FakeQwen(rotate=False) as fake:
        _, token, _ = fake.issue_tokens()
        refresh(http, fake, token)
        started = time.monotonic()
        for _ in range(40):
            refresh(http, fake, token)
        assert time.monotonic() - started < 1.2


def test_state_is_json_serialisable(fake: FakeQwen) -> None:
    fake.issue_tokens()
    fake.inject("503", body={"x": 1})
    json.dumps(fake.state())
