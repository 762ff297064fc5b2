"""QwenOAuthClient against the fake server over real HTTP: every answer classified correctly."""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from qwen_refresher import __version__, errors
from qwen_refresher.models import Credentials
from qwen_refresher.qwen import (
    MAX_BODY,
    MAX_REQUEST_SECONDS,
    SCOPE,
    STOP_GRACE,
    DeviceAuthorization,
    QwenOAuthClient,
    SlowDown,
    TokenGrant,
    parse_retry_after,
    proxy_for,
)
from qwen_refresher.stores.base import (
    FALLBACK_EXPIRES_IN,
    MAX_EXPIRES_IN,
    MIN_EXPIRES_IN,
    check_expires_ms,
)
from qwen_refresher.testing.fake_qwen import QWEN_CLIENT_ID, FakeQwen, FakeQwenConfig
from tests.adversarial import hostile_server as hs

REJECTION_REASON = (
    "server rejected the refresh token: invalid_request: Invalid refresh token or client_id")


DEFAULTS = FakeQwenConfig(lifetime=60, device_interval=0.05)


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
def client(shared_fake: FakeQwen) -> Iterator[QwenOAuthClient]:
    with QwenOAuthClient(shared_fake.token_url, shared_fake.device_code_url, QWEN_CLIENT_ID,
                         timeout=2.0) as oauth:
        yield oauth


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """Nothing a log line could print from this exception contains a token."""
    shown = [str(exc), repr(exc), *map(str, exc.args)]
    shown += [str(getattr(exc, "reason", ""))]
    for text in shown:
        for secret in secrets:
            assert secret not in text, f"token leaked into {text!r}"
    assert exc.__cause__ is None


# --------------------------------------------------------------------------- success


def test_refresh_returns_a_grant_and_sends_what_qwen_expects(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    access, refresh, _ = fake.issue_tokens()
    grant = client.refresh(refresh)
    issued = fake.issued[-1]
    assert grant.access_token == issued.access_token
    assert grant.refresh_token == issued.refresh_token != refresh
    assert grant.expires_in == 60.0
    assert grant.token_type == "Bearer"
    assert grant.resource_url == f"127.0.0.1:{fake.port}"
    record = fake.refresh_requests()[-1]
    assert record.refresh_token == refresh
    assert record.user_agent == f"qwen-refresher/{__version__}"
    assert record.accept == "application/json"
    assert record.content_type == "application/x-www-form-urlencoded"
    text = repr(grant)
    assert issued.access_token not in text and issued.refresh_token not in text
    assert access not in text


def test_grant_to_credentials() -> None:
    grant = TokenGrant(access_token="A", refresh_token="R2", expires_in=1.5,
                       resource_url="portal.qwen.ai")
    assert grant.to_credentials(1_000, "R1") == Credentials(
        access="A", refresh="R2", expires_ms=2_500, resource_url="portal.qwen.ai")
    kept = dataclasses.replace(grant, refresh_token=None).to_credentials(0, "R1")
    assert kept.refresh == "R1" and isinstance(kept.expires_ms, int)
    assert dataclasses.replace(grant, refresh_token="").to_credentials(0, "R1").refresh == "R1"


@pytest.mark.parametrize("mode", ["omit", "empty"])
def test_missing_refresh_token_in_answer_keeps_the_old_one(
        fake: FakeQwen, client: QwenOAuthClient, mode: str) -> None:
    fake.configure(refresh_in_response=mode)
    _, refresh, _ = fake.issue_tokens()
    grant = client.refresh(refresh)
    assert grant.refresh_token is None
    creds = grant.to_credentials(int(time.time() * 1000), refresh)
    assert creds.refresh == refresh
    assert client.refresh(creds.refresh).access_token  # and the server agrees it still works


def test_fractional_lifetime(fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.configure(lifetime=1.5)
    _, refresh, _ = fake.issue_tokens()
    assert client.refresh(refresh).expires_in == 1.5


@pytest.mark.parametrize("lifetime", [0, -5])
def test_non_positive_expires_in_keeps_the_rotated_tokens(
        fake: FakeQwen, client: QwenOAuthClient, lifetime: float) -> None:
    # The server has rotated: the old token is spent, so the new ones must not be dropped.
    fake.configure(lifetime=lifetime)
    _, refresh, _ = fake.issue_tokens()
    grant = client.refresh(refresh)
    assert grant.access_token == fake.issued[-1].access_token
    assert grant.refresh_token == fake.issued[-1].refresh_token
    assert grant.expires_in == FALLBACK_EXPIRES_IN


def test_rotated_token_then_works_and_old_one_is_rejected(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, first, _ = fake.issue_tokens()
    second = client.refresh(first).refresh_token
    assert second is not None
    with pytest.raises(errors.RefreshTokenRejected) as caught:
        client.refresh(first)
    assert caught.value.status == 400
    assert caught.value.reason == REJECTION_REASON
    assert caught.value.exit_code == errors.EX_NEEDS_LOGIN
    assert fake.reuse_count == 1
    assert_no_secret(caught.value, first, second)
    assert client.refresh(second).access_token


def test_shared_client_is_thread_safe(fake: FakeQwen, client: QwenOAuthClient) -> None:
    tokens = [fake.issue_tokens()[1] for _ in range(16)]
    results: list[TokenGrant] = []
    failures: list[BaseException] = []

    def worker(token: str) -> None:
        try:
            results.append(client.refresh(token))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len({g.access_token for g in results}) == 16
    assert fake.reuse_count == 0


# --------------------------------------------------------------------------- rejections


def test_injected_and_permanent_rejections(fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject("reject")
    with pytest.raises(errors.RefreshTokenRejected):
        client.refresh(refresh)
    fake.reject_token(refresh)
    with pytest.raises(errors.RefreshTokenRejected):
        client.refresh(refresh)


def test_401_invalid_grant_is_a_rejection(fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.configure(reject_status=401, reject_error="invalid_grant",
                   reject_description="Refresh token expired")
    with pytest.raises(errors.RefreshTokenRejected) as caught:
        client.refresh("fakeref-unknown")
    assert caught.value.status == 401
    assert caught.value.reason == (
        "server rejected the refresh token: invalid_grant: Refresh token expired")


@pytest.mark.parametrize("error", ["invalid_token", "unauthorized_client"])
def test_other_rejection_codes(fake: FakeQwen, client: QwenOAuthClient, error: str) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject("400", body={"error": error})
    with pytest.raises(errors.RefreshTokenRejected, match=error):
        client.refresh(refresh)


def test_unknown_400_code_naming_the_refresh_token_is_a_rejection(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject("400", body={"error": "token_revoked",
                             "error_description": "The refresh_token has been revoked"})
    with pytest.raises(errors.RefreshTokenRejected, match="revoked"):
        client.refresh(refresh)


def test_server_echoing_our_token_is_redacted_and_clipped(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    description = f"refresh token {refresh} is not valid. " + "x" * 500
    fake.inject("400", body={"error": "invalid_grant", "error_description": description})
    with pytest.raises(errors.RefreshTokenRejected) as caught:
        client.refresh(refresh)
    assert "[redacted]" in caught.value.reason
    assert len(caught.value.reason) < 300
    assert_no_secret(caught.value, refresh, refresh[:30])


def test_token_straddling_the_clip_does_not_leak(fake: FakeQwen,
                                                 client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    description = "y" * 180 + refresh  # a clip before redaction would leave half the token
    fake.inject("401", body={"error": "invalid_token", "error_description": description})
    with pytest.raises(errors.RefreshTokenRejected) as caught:
        client.refresh(refresh)
    assert refresh[:15] not in caught.value.reason


# --------------------------------------------------------------------------- transient


@pytest.mark.parametrize("kind", ["500", "502", "503", "504"])
def test_5xx_is_transient_without_retry_after(fake: FakeQwen, client: QwenOAuthClient,
                                              kind: str) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject(kind)
    with pytest.raises(errors.TransientOAuthError) as caught:
        client.refresh(refresh)
    assert type(caught.value) is errors.ServerError
    assert caught.value.metric_label == "http_5xx"
    assert caught.value.reason == f"HTTP {kind} from token endpoint"
    assert caught.value.retry_after is None
    assert client.refresh(refresh).access_token  # the token survived


def test_429_retry_after_seconds(fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject("429", retry_after=7)
    with pytest.raises(errors.TransientOAuthError) as caught:
        client.refresh(refresh)
    assert type(caught.value) is errors.RateLimited
    assert caught.value.metric_label == "http_429"
    assert caught.value.retry_after == 7.0
    assert "429" in caught.value.reason


def test_503_retry_after_http_date(fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake.inject("503", retry_after=when)
    with pytest.raises(errors.TransientOAuthError) as caught:
        client.refresh(refresh)
    assert caught.value.retry_after is not None
    assert 27 <= caught.value.retry_after <= 31


@pytest.mark.parametrize(("header", "expected"), [
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: clamp
    ("soon", None),
    ("-3", 0.0),
])
def test_odd_retry_after_values(fake: FakeQwen, client: QwenOAuthClient, header: str,
                                expected: float | None) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject("429", retry_after=header)
    with pytest.raises(errors.TransientOAuthError) as caught:
        client.refresh(refresh)
    assert caught.value.retry_after == expected


def test_parse_retry_after_directly() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after(" 12 ") == 12.0
    assert parse_retry_after("nan") is None
    assert parse_retry_after("1e999") is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0) == 60.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40", now=40.0) == 60.0


def test_read_timeout_is_transient_and_fast() -> None:
    with FakeQwen() as fake, QwenOAuthClient(fake.token_url, fake.device_code_url,
                                             QWEN_CLIENT_ID, timeout=0.3) as client:
        _, refresh, _ = fake.issue_tokens()
        fake.inject("timeout", delay=5)
        started = time.monotonic()
        with pytest.raises(errors.TransientOAuthError, match="timed out") as caught:
            client.refresh(refresh)
        assert type(caught.value) is errors.RequestTimeout
        assert time.monotonic() - started < 2
        assert caught.value.retry_after is None
        assert_no_secret(caught.value, refresh)
        assert client.refresh(refresh).access_token


def test_dropped_connection_is_transient(fake: FakeQwen, client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    client.refresh(fake.issue_tokens()[1])  # warm a keep-alive connection first
    fake.inject("drop")
    with pytest.raises(errors.TransientOAuthError, match="closed the connection") as caught:
        client.refresh(refresh)
    assert type(caught.value) is errors.NetworkError
    assert_no_secret(caught.value, refresh)
    assert client.refresh(refresh).access_token


def test_lost_answer_is_transient_and_the_retry_is_rejected(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    """The rotating-token hazard: the server rotated, we never heard. Retrying cannot help."""
    _, refresh, _ = fake.issue_tokens()
    fake.inject("lost")
    with pytest.raises(errors.TransientOAuthError):
        client.refresh(refresh)
    with pytest.raises(errors.RefreshTokenRejected):
        client.refresh(refresh)


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/v1/oauth2/token"
    with QwenOAuthClient(url, url, QWEN_CLIENT_ID, timeout=1) as client:
        with pytest.raises(errors.TransientOAuthError, match="cannot connect") as caught:
            client.refresh("fakeref-secret-value")
    assert type(caught.value) is errors.NetworkError
    assert caught.value.metric_label == "network"
    assert_no_secret(caught.value, "fakeref-secret-value")


@pytest.mark.parametrize(("kind", "match"), [("empty200", "empty body"),
                                             ("html200", "non-JSON body")])
def test_broken_200_is_transient(fake: FakeQwen, client: QwenOAuthClient, kind: str,
                                 match: str) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject(kind)
    with pytest.raises(errors.TransientOAuthError, match=match) as caught:
        client.refresh(refresh)
    assert type(caught.value) is errors.UnusableAnswer
    assert caught.value.metric_label == "bad_response"
    assert client.refresh(refresh).access_token


@pytest.mark.parametrize(("body", "problem"), [
    ({"token_type": "Bearer", "expires_in": 60}, "access_token is missing"),
    ({"access_token": "", "expires_in": 60}, "access_token is empty"),
    ({"access_token": 5, "expires_in": 60}, "access_token is a int"),
    ({"access_token": "A" * 20_000, "expires_in": 60}, "longer than any real token"),
    ({"access_token": "A b", "expires_in": 60}, "whitespace or control"),
    ({"access_token": "A\x1b[2J", "expires_in": 60}, "whitespace or control"),
    ({"access_token": "A\ud800", "expires_in": 60}, "lone surrogate"),
    ({"access_token": "A1", "refresh_token": "R\n1", "expires_in": 60},
     "refresh_token contains whitespace"),
    ({"access_token": "A1", "refresh_token": ["R"], "expires_in": 60},
     "refresh_token is a list"),
    (["access_token"], "not an object"),
])
def test_tokens_failing_the_store_rules_are_an_unusable_answer(
        fake: FakeQwen, client: QwenOAuthClient, body: object, problem: str) -> None:
    # The same rules a store value passes (check_token): our own store must never hold a
    # token it would then refuse to read.
    _, refresh, _ = fake.issue_tokens()
    fake.inject("200", body=body)
    with pytest.raises(errors.UnusableAnswer, match="HTTP 200") as caught:
        client.refresh(refresh)
    assert problem in caught.value.reason
    assert "A" * 50 not in str(caught.value) and "R\n1" not in str(caught.value)
    assert isinstance(caught.value, errors.TransientOAuthError)  # nothing is dropped for it


@pytest.mark.parametrize(("expires_in", "expected"), [
    ("soon", FALLBACK_EXPIRES_IN),
    (float("inf"), FALLBACK_EXPIRES_IN),
    (float("nan"), FALLBACK_EXPIRES_IN),
    (True, FALLBACK_EXPIRES_IN),
    (None, FALLBACK_EXPIRES_IN),
    (1e308, FALLBACK_EXPIRES_IN),
    (1e15, FALLBACK_EXPIRES_IN),
    (10**400, FALLBACK_EXPIRES_IN),  # beyond float and beyond Python's int-parse limit
    (-3600, FALLBACK_EXPIRES_IN),
    (0.2, MIN_EXPIRES_IN),
    (7200, 7200),
])
def test_absurd_expires_in_next_to_valid_tokens_is_clamped_not_fatal(
        fake: FakeQwen, client: QwenOAuthClient, expires_in: object, expected: float,
        caplog: pytest.LogCaptureFixture) -> None:
    body: dict[str, object] = {"access_token": "acc-1", "refresh_token": "ref-1"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    fake.inject("200", body=body)
    grant = client.refresh("fakeref-x")
    assert (grant.access_token, grant.refresh_token) == ("acc-1", "ref-1")
    assert grant.expires_in == expected
    now_ms = int(time.time() * 1000)
    creds = grant.to_credentials(now_ms, "old")  # must not overflow
    assert now_ms < creds.expires_ms <= now_ms + MAX_EXPIRES_IN * 1000
    assert check_expires_ms(creds.expires_ms, "expires") == (creds.expires_ms, None)
    assert ("expires_in" in caplog.text) == (expected != 7200)


def test_odd_resource_url_and_token_type_are_left_out(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.inject("200", body={"access_token": "acc-1", "expires_in": 60,
                             "resource_url": "x" * 5000, "token_type": "Bearer\r\nX: y"})
    grant = client.refresh("fakeref-x")
    assert grant.resource_url is None and grant.token_type == "Bearer"


def test_numeric_string_expires_in_is_accepted(fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.inject("200", body={"access_token": "A", "expires_in": "3600"})
    grant = client.refresh("fakeref-x")
    assert grant.expires_in == 3600.0 and grant.refresh_token is None
    assert grant.resource_url is None and grant.token_type == "Bearer"


@pytest.mark.parametrize("kind", ["403", "404", "409", "418"])
def test_other_4xx_is_transient_and_names_the_status(fake: FakeQwen, client: QwenOAuthClient,
                                                     kind: str) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject(kind)
    with pytest.raises(errors.TransientOAuthError, match=f"HTTP {kind}") as caught:
        client.refresh(refresh)
    assert type(caught.value) is errors.UnexpectedStatus
    assert caught.value.metric_label == "http_4xx"


def test_400_with_an_unrelated_error_is_transient(fake: FakeQwen,
                                                  client: QwenOAuthClient) -> None:
    _, refresh, _ = fake.issue_tokens()
    fake.inject("400", body={"error": "temporarily_unavailable"})
    with pytest.raises(errors.TransientOAuthError, match=r"HTTP 400.*temporarily_unavailable"):
        client.refresh(refresh)
    fake.inject("400", body="<html>bad request</html>")
    with pytest.raises(errors.TransientOAuthError, match="unexpected HTTP 400"):
        client.refresh(refresh)


def test_wrong_path_is_transient(fake: FakeQwen) -> None:
    with QwenOAuthClient(fake.base_url + "/oauth/token", fake.device_code_url, QWEN_CLIENT_ID,
                         timeout=2) as client:
        with pytest.raises(errors.TransientOAuthError, match="HTTP 404"):
            client.refresh(fake.issue_tokens()[1])


def test_failure_rate_only_ever_yields_transient_or_success(fake: FakeQwen) -> None:
    fake.configure(rotate=False)
    _, refresh, _ = fake.issue_tokens()
    fake.set_failure_rate(0.6, seed=3)
    outcomes: set[str] = set()
    with QwenOAuthClient(fake.token_url, fake.device_code_url, QWEN_CLIENT_ID,
                         timeout=2) as client:
        for _ in range(40):
            try:
                client.refresh(refresh)
                outcomes.add("ok")
            except errors.TransientOAuthError:
                outcomes.add("transient")
    assert outcomes == {"ok", "transient"}


# --------------------------------------------------------------------------- device flow


def test_start_device_flow_uses_pkce(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    assert len(auth.code_verifier) == 43 and "=" not in auth.code_verifier
    assert base64.urlsafe_b64decode(auth.code_verifier + "=") != b""
    pending = fake.pending_device_codes()
    assert pending[0]["user_code"] == auth.user_code
    assert auth.verification_uri == fake.base_url + "/authorize"
    assert auth.verification_uri_complete is not None
    assert auth.user_code in auth.verification_uri_complete
    assert auth.interval == 0.05 and auth.expires_in == 300
    text = repr(auth)
    assert auth.device_code not in text and auth.code_verifier not in text
    assert auth.user_code in text
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(auth.code_verifier.encode()).digest()).rstrip(b"=").decode()
    assert fake._devices[auth.device_code].challenge == challenge
    assert SCOPE == "openid profile email model.completion"


def test_poll_pending_slow_down_then_approved(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    assert client.poll_device_token(auth) is None
    fake.inject("slow_down")
    with pytest.raises(SlowDown):
        client.poll_device_token(auth)
    fake.approve(auth.user_code)
    grant = client.poll_device_token(auth)
    assert grant is not None and grant.access_token == fake.issued[-1].access_token
    assert grant.refresh_token == fake.issued[-1].refresh_token
    assert client.refresh(grant.refresh_token).access_token  # a device login makes a family


def test_poll_denied(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    fake.deny(auth.user_code)
    with pytest.raises(errors.DeviceFlowError) as caught:
        client.poll_device_token(auth)
    assert str(caught.value) == "the login was denied in the browser"
    assert_no_secret(caught.value, auth.device_code, auth.code_verifier)


def test_poll_expired(fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.configure(device_code_lifetime=0.2)
    auth = client.start_device_flow()
    time.sleep(0.25)
    with pytest.raises(errors.DeviceFlowError, match="expired"):
        client.poll_device_token(auth)


def test_pkce_mismatch_is_refused(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    fake.approve(auth.user_code)
    forged = dataclasses.replace(auth, code_verifier="A" * 43)
    with pytest.raises(errors.DeviceFlowError, match="PKCE") as caught:
        client.poll_device_token(forged)
    assert_no_secret(caught.value, auth.device_code, "A" * 43)
    assert client.poll_device_token(auth) is not None  # the right verifier still works


def test_poll_5xx_is_transient(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    fake.inject("503", target="device_token")
    with pytest.raises(errors.TransientOAuthError) as caught:
        client.poll_device_token(auth)
    assert not isinstance(caught.value, SlowDown)
    assert type(caught.value) is errors.ServerError


def test_start_device_flow_failures(fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.inject("503", target="device_code")
    with pytest.raises(errors.TransientOAuthError):
        client.start_device_flow()
    fake.configure(client_id="another-client")
    with pytest.raises(errors.DeviceFlowError, match="client_id"):
        client.start_device_flow()


def test_wait_for_device_token_auto_approved(fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.configure(auto_approve_after=2)
    auth = client.start_device_flow()
    started = time.monotonic()
    grant = client.wait_for_device_token(auth)
    assert grant.access_token.startswith("fakeacc-")
    assert time.monotonic() - started >= 0.15  # three polls, each after one interval
    polls = [r for r in fake.requests if r.grant_type is not None and "device" in r.grant_type]
    assert [r.outcome for r in polls] == ["pending", "pending", "ok"]


def test_wait_slows_down_by_half_and_caps(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    fake.inject("slow_down", count=3)
    fake.inject("503", target="device_token")  # transient: keep polling at the same pace
    fake.configure(auto_approve_after=0)
    waits: list[float] = []
    grant = client.wait_for_device_token(auth, sleep=waits.append)
    assert grant.access_token
    assert waits == pytest.approx([0.05, 0.075, 0.1125, 0.16875, 0.16875])

    slow = dataclasses.replace(client.start_device_flow(), interval=8.0)
    fake.inject("slow_down", count=2)
    waits.clear()
    client.wait_for_device_token(slow, sleep=waits.append)
    assert waits == [8.0, 10.0, 10.0]

    slower = dataclasses.replace(client.start_device_flow(), interval=15.0)
    fake.inject("slow_down")
    waits.clear()
    client.wait_for_device_token(slower, sleep=waits.append)
    assert waits == [15.0, 15.0]  # the cap never makes us poll faster than the server asked


def test_wait_raises_on_denial(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = client.start_device_flow()
    fake.deny(auth.user_code)
    with pytest.raises(errors.DeviceFlowError, match="denied"):
        client.wait_for_device_token(auth)


def test_wait_honours_the_code_expiry(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = dataclasses.replace(client.start_device_flow(), expires_in=0.3)
    started = time.monotonic()
    with pytest.raises(errors.DeviceFlowError, match="expired"):
        client.wait_for_device_token(auth)
    assert 0.25 <= time.monotonic() - started < 1.5


def test_wait_never_sleeps_past_the_expiry(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = dataclasses.replace(client.start_device_flow(), interval=5.0, expires_in=0.3)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    with pytest.raises(errors.DeviceFlowError, match="expired"):
        client.wait_for_device_token(auth, sleep=sleep)
    assert len(waits) == 1 and waits[0] <= 0.3


def test_wait_stops_when_asked(fake: FakeQwen, client: QwenOAuthClient) -> None:
    auth = dataclasses.replace(client.start_device_flow(), interval=5.0)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(errors.DeviceFlowError, match="cancelled"):
        client.wait_for_device_token(auth, stop=stop)
    assert time.monotonic() - started < 1.5
    stop_now = threading.Event()
    stop_now.set()
    with pytest.raises(errors.DeviceFlowError, match="cancelled"):
        client.wait_for_device_token(auth, stop=stop_now, sleep=lambda _: None)


def test_device_authorization_defaults() -> None:
    auth = DeviceAuthorization(device_code="D", user_code="U", verification_uri="V",
                               verification_uri_complete=None, expires_in=10,
                               code_verifier="C")
    assert auth.interval == 2
    assert auth.deadline == pytest.approx(time.monotonic() + 10, abs=1)


# --------------------------------------------------------------------------- end to end


def test_refreshed_access_token_works_for_chat_until_it_expires(
        fake: FakeQwen, client: QwenOAuthClient) -> None:
    fake.configure(lifetime=0.3)
    _, refresh, _ = fake.issue_tokens()
    grant = client.refresh(refresh)
    chat = {"model": "coder-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {grant.access_token}"}
    with httpx.Client(trust_env=False, timeout=2) as http:
        assert http.post(fake.chat_url, json=chat, headers=headers).status_code == 200
        time.sleep(0.35)
        assert http.post(fake.chat_url, json=chat, headers=headers).status_code == 401
    used = [r.access_token for r in fake.requests if r.endpoint == "chat"]
    assert used == [grant.access_token] * 2


def test_user_agent_is_required() -> None:
    with pytest.raises(ValueError):
        QwenOAuthClient("http://x", "http://x", QWEN_CLIENT_ID, user_agent="")


def test_httpx_logging_is_quiet() -> None:
    import logging

    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING


# --------------------------------------------------------------------------- bounded answers


@pytest.fixture
def hostile() -> Iterator[hs.HostileServer]:
    with hs.HostileServer() as server:
        yield server


def hostile_client(server: hs.HostileServer, timeout: float = 15.0) -> QwenOAuthClient:
    return QwenOAuthClient(server.token_url, server.device_code_url, QWEN_CLIENT_ID,
                           timeout=timeout)


def test_a_dripping_answer_is_cut_by_the_overall_deadline(hostile: hs.HostileServer) -> None:
    # One byte every 0.3 s never trips a 1.5 s per-read timeout: only a deadline ends it.
    hostile.attack("R", hs.drip(0.3))
    with hostile_client(hostile, timeout=1.5) as client:
        started = time.monotonic()
        with pytest.raises(errors.UnusableAnswer, match="timed out"):
            client.refresh("R")
        assert time.monotonic() - started < 2.5


def test_the_overall_deadline_never_exceeds_the_ceiling() -> None:
    client = QwenOAuthClient("http://127.0.0.1:9/t", "http://127.0.0.1:9/d", QWEN_CLIENT_ID,
                             timeout=120)
    assert client.deadline == MAX_REQUEST_SECONDS < 30  # OpenClaw's lock staleness
    client.close()


def test_stop_cuts_a_request_in_flight_after_a_short_grace(hostile: hs.HostileServer) -> None:
    hostile.attack("R", hs.drip(0.3))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with hostile_client(hostile, timeout=15) as client:
        started = time.monotonic()
        with pytest.raises(errors.TransientOAuthError):
            client.refresh("R", stop=stop)
        assert time.monotonic() - started < 0.3 + STOP_GRACE + 1


@pytest.mark.parametrize("behaviour", ["endless", "gzip_bomb"])
def test_an_endless_or_inflating_body_is_cut_at_the_cap_with_bounded_memory(
        hostile: hs.HostileServer, behaviour: str) -> None:
    import tracemalloc

    hostile.attack("R", getattr(hs, behaviour)())
    with hostile_client(hostile) as client:
        tracemalloc.start()
        try:
            started = time.monotonic()
            with pytest.raises(errors.UnusableAnswer, match="larger than 64 KiB"):
                client.refresh("R")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert time.monotonic() - started < 3
    # The hostile server runs in this process and holds a 1 MiB block of its own.
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes (the bomb is 1 GiB)"


def test_a_small_gzip_answer_is_still_read(hostile: hs.HostileServer) -> None:
    import gzip

    body = gzip.compress(b'{"access_token": "acc-1", "expires_in": 60}')
    hostile.attack("R", hs.answer(200, body, {"Content-Encoding": "gzip"}))
    with hostile_client(hostile) as client:
        assert client.refresh("R").access_token == "acc-1"


def test_an_unknown_content_encoding_is_unusable(hostile: hs.HostileServer) -> None:
    hostile.attack("R", hs.answer(200, b"\x00\x01", {"Content-Encoding": "br"}))
    with hostile_client(hostile) as client, pytest.raises(errors.UnusableAnswer,
                                                         match="Content-Encoding"):
        client.refresh("R")


def test_a_big_error_body_is_transient_not_unusable(hostile: hs.HostileServer) -> None:
    hostile.attack("R", hs.answer(400, b"x" * (MAX_BODY + 1)))
    with hostile_client(hostile) as client, pytest.raises(errors.TransientOAuthError) as caught:
        client.refresh("R")
    assert not isinstance(caught.value, errors.UnusableAnswer)
    assert "HTTP 400" in caught.value.reason


def test_huge_headers_are_transient_and_fast(hostile: hs.HostileServer) -> None:
    hostile.attack("R", hs.huge_headers())
    with hostile_client(hostile) as client:
        started = time.monotonic()
        with pytest.raises(errors.TransientOAuthError):
            client.refresh("R")
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(hostile: hs.HostileServer, status: int) -> None:
    with hs.Recorder() as elsewhere:
        hostile.attack("R", hs.redirect(status, elsewhere.url + "/token"))
        with hostile_client(hostile) as client, pytest.raises(errors.TransientOAuthError,
                                                             match=f"HTTP {status}"):
            client.refresh("R")
        assert elsewhere.requests == []


def test_an_error_echoing_the_token_in_any_encoding_is_redacted(
        hostile: hs.HostileServer) -> None:
    from urllib.parse import quote, quote_plus

    token = 'ref+/="&é' + "x" * 30
    forms = [token, quote(token, safe=""), quote_plus(token), json.dumps(token)[1:-1],
             base64.b64encode(token.encode()).decode()]
    hostile.attack(token, hs.answer(400, {"error": "echo",
                                          "error_description": " ".join(forms)}))
    with hostile_client(hostile) as client, pytest.raises(errors.TransientOAuthError) as caught:
        client.refresh(token)
    shown = str(caught.value)
    assert "echo" in shown
    for n, form in enumerate(forms):
        assert form[:20] not in shown, f"form #{n} leaked"


def test_proxy_environment_is_ignored_for_loopback(
        hostile: hs.HostileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hostile.attack("R", hs.answer(200, {"access_token": "acc-1", "expires_in": 60}))
    with hs.Recorder() as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with hostile_client(hostile) as client:
            assert client.refresh("R").access_token == "acc-1"
        assert proxy.requests == []


def test_proxy_environment_still_applies_to_a_remote_https_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert proxy_for("https://chat.qwen.ai/t", "https://chat.qwen.ai/d") == \
        "http://proxy.example:3128"
    assert proxy_for("http://127.0.0.1:8/t", "http://127.0.0.1:8/d") is None
    monkeypatch.setenv("NO_PROXY", "chat.qwen.ai")
    assert proxy_for("https://chat.qwen.ai/t", "https://chat.qwen.ai/d") is None


# ------------------------------------------------------------- one home for Qwen's facts


def test_qwens_urls_and_client_id_live_in_one_place() -> None:
    """The endpoints and client id are written once (``qwen/constants.py``); the settings'
    defaults, the client and the fake server read them from there."""
    import subprocess
    import sys
    from pathlib import Path

    from qwen_refresher import config, qwen
    from qwen_refresher.qwen import constants
    from qwen_refresher.testing import fake_qwen

    assert config.QWEN_CLIENT_ID == qwen.QWEN_CLIENT_ID == fake_qwen.QWEN_CLIENT_ID \
        == constants.CLIENT_ID
    assert config.QWEN_TOKEN_URL == qwen.DEFAULT_TOKEN_URL == constants.TOKEN_URL
    package = Path(qwen.__file__).parent.parent
    literals = (constants.CLIENT_ID, constants.TOKEN_URL, constants.DEVICE_CODE_URL)
    holders = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if any(text in p.read_text(encoding="utf-8") for text in literals))
    assert holders == ["qwen/constants.py"]
    # The fake server (stdlib only) reads them without importing httpx, and a daemon built
    # (client included) imports it only for its first request or ``warm``: ~80 ms of start-up.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, qwen_refresher.testing.fake_qwen; print('httpx' in sys.modules)\n"
         "from qwen_refresher.runtime import daemon; from qwen_refresher.qwen import "
         "QwenOAuthClient as C\nc = C('http://127.0.0.1:1/t', 'http://127.0.0.1:1/d', 'x')\n"
         "print('httpx' in sys.modules); c.warm(); print('httpx' in sys.modules); c.close()"],
        capture_output=True, text=True, timeout=60, check=True)
    assert probe.stdout.split() == ["False", "False", "True"]
