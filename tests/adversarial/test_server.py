"""A hostile token server, and clear-text traps, against the real daemon (issue 12).

Each test runs ``qwen-refresher run`` as a subprocess against ``HostileServer``: the attacked
profiles (one OpenClaw agent each) get the hostile behaviour, a healthy profile in another
agent is relayed to the real fake server. Every test asserts that the healthy profile keeps
rotating, that no token reaches any output (log, ``state.json``, ``status --json``), that the
store of an attacked profile is byte-identical when the answer was unusable, and that SIGTERM
ends the daemon within 10 s.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from qwen_refresher.state import read_journal
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.adversarial import hostile_server as hs
from tests.adversarial.registry import Case, case, params
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)

PROFILE = "qwen-portal:default"
#: OpenClaw treats a lock older than this as stale and breaks it.
OPENCLAW_LOCK_STALE = 30.0
#: The daemon's peak RSS may not pass this, whatever the server sends (a bomb is 1 GiB).
RSS_LIMIT_MB = 200
SIGTERM_BUDGET = 10.0
THIRTY_DAYS_MS = 30 * 86400 * 1000


@pytest.fixture
def fake() -> Iterator[FakeQwen]:
    # Short lifetimes: the healthy profile rotates every ~2 s while the attack runs.
    with FakeQwen(FakeQwenConfig(lifetime=4)) as server:
        yield server


@pytest.fixture
def hostile(fake: FakeQwen) -> Iterator[hs.HostileServer]:
    with hs.HostileServer(upstream=fake) as server:
        yield server


def seed(oc: OpenClawHome, agent: str, tokens: tuple[str, str, int]) -> tuple[Path, str]:
    access, refresh, expires = tokens
    doc = {"version": 1, "profiles": {PROFILE: qwen_profile(access, refresh, expires)}}
    return oc.write_store(doc, agent=agent), refresh


def descendants(fake: FakeQwen, refresh: str) -> list[str]:
    """Every refresh token the fake issued in the lineage that starts at ``refresh``."""
    chain, head = [], refresh
    by_parent = {i.replaced: i.refresh_token for i in fake.issued if i.replaced}
    while head in by_parent:
        head = by_parent[head]
        chain.append(head)
    return chain


def retried_after_backoff(hostile: hs.HostileServer, refresh: str) -> bool:
    hits = hostile.hits(refresh)
    return len(hits) >= 2 and hits[-1].at - hits[0].at > 0.5


def current(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())["profiles"][PROFILE]  # type: ignore[no-any-return]


class Memory:
    """Samples the daemon's RSS; kills it above a hard ceiling so a failing run cannot take
    the machine down with it."""

    def __init__(self, pid: int, kill_above_mb: int = 4 * RSS_LIMIT_MB) -> None:
        self.pid, self.ceiling, self.peak_mb = pid, kill_above_mb, 0.0
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss_mb(self) -> float:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0.0
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        hwm = fields.get("VmHWM", fields.get("VmRSS", "0 kB")).split()[0]
        return int(hwm) / 1024

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            if self.peak_mb > self.ceiling and not self.killed:
                self.killed = True
                os.kill(self.pid, 9)

    def stop(self) -> float:
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        self._stop.set()
        self._thread.join(2)
        return self.peak_mb


def stop_in_time(daemon: DaemonProcess) -> None:
    started = time.monotonic()
    daemon.stop(timeout=SIGTERM_BUDGET + 5)
    took = time.monotonic() - started
    # Event names only: the failure message must not be a way for a token to leak.
    last = [e.get("event") for e in daemon.events()[-25:]]
    assert took < SIGTERM_BUDGET, f"SIGTERM took {took:.1f}s to end the daemon; last: {last}"


def status_json(oc: OpenClawHome) -> str:
    proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "status", "--json"],
                          cwd=ROOT, env=oc.env(), capture_output=True, text=True, timeout=20)
    return proc.stdout + proc.stderr


def outputs(oc: OpenClawHome, daemon: DaemonProcess) -> list[str]:
    """Every place a token could leak to: the log, our state dir, ``status --json``."""
    texts = [daemon.output, status_json(oc)]
    for path in sorted(oc.our_state.rglob("*")):
        if path.is_file() and path.name != "journal.json":
            texts.append(path.read_text(errors="replace"))
    return texts


def keeps_rotating(fake: FakeQwen, healthy_refresh: str, daemon: DaemonProcess,
                   at_least: int = 2, timeout: float = 15) -> None:
    wait_for(lambda: len(descendants(fake, healthy_refresh)) >= at_least, timeout,
             f"{at_least} rotations of the healthy profile", daemon)


def start(oc: OpenClawHome, server: Any, *args: str, env: dict[str, str] | None = None,
          ) -> DaemonProcess:
    return DaemonProcess(oc, server, "--no-qwen-code", *args, env=env, margin="3")


# -- absurd numbers next to valid tokens: the server HAS rotated, the tokens must be kept ---------

ABSURD = {
    "1e308": "1e308",
    "1e15": "1e15",
    "tiny": "0.2",
    "negative": "-3600",
    "nan": "NaN",
    "string": '"soon"',
    "missing": None,
}
ABSURD_CASES = [
    Case(f"server-expires-in-{name}", "token server",
         f"a 200 with new tokens and expires_in {value or 'absent'} (the old token is spent)",
         "the new tokens are kept and written; the expiry is clamped to a sane range, "
         "with a warning")
    for name, value in ABSURD.items()
]


def _absurd(value: str | None) -> Callable[[dict[str, Any]], str]:
    def edit(body: dict[str, Any]) -> str:
        body.pop("expires_in", None)
        text = json.dumps(body)
        return text if value is None else text[:-1] + f', "expires_in": {value}}}'
    return edit


@pytest.mark.adversarial
def test_absurd_expires_in_after_a_rotation_keeps_the_new_tokens(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    attacked: dict[str, tuple[Path, str]] = {}
    for name, value in ABSURD.items():
        attacked[name] = seed(oc, f"a-{name}", fake.issue_tokens(lifetime=1))
        hostile.attack(attacked[name][1], hs.rotate_then(_absurd(value)))
    _, healthy = seed(oc, "healthy", fake.issue_tokens(lifetime=2))
    with start(oc, hostile) as daemon:
        for name, (path, seed_refresh) in attacked.items():
            wait_for(lambda p=path, s=seed_refresh: current(p)["refresh"] in descendants(fake, s),
                     15, f"the rotation answered with expires_in={name} on disk", daemon)
        keeps_rotating(fake, healthy, daemon)
        now_ms = time.time() * 1000
        for name, (path, _) in attacked.items():
            expires = current(path)["expires"]
            # Readable by our own store rules: not absurd, not in the past by more than a lag.
            assert now_ms - 60_000 < expires <= now_ms + THIRTY_DAYS_MS, (name, expires - now_ms)
        assert fake.reuse_count == 0, "a spent refresh token was sent again"
        assert not daemon.has_event("needs_login")
        assert daemon.proc.poll() is None
        assert "expires_in" in daemon.output  # the clamp is logged
        texts = outputs(oc, daemon)
        stop_in_time(daemon)
    assert_no_secrets(texts, all_tokens(fake))


# -- unusable answers: nothing is written, the token is not hammered, others are served ---------

UNUSABLE: dict[str, tuple[str, str, hs.Behaviour]] = {
    # Unusable access tokens WITHOUT a new refresh token: no rotation, nothing to keep. (With
    # a valid new refresh token the server has rotated: server-rotated-then-garbage.)
    "server-token-oversize": (
        "a 200 whose access_token is 20 kB, and no new refresh_token",
        hs.answer(200, {"access_token": "A" * 20_000, "expires_in": 60})),
    "server-token-spaces": (
        "a 200 whose refresh_token contains spaces",
        hs.answer(200, {"access_token": "A1", "refresh_token": "R 1 x", "expires_in": 60})),
    "server-token-control-chars": (
        "a 200 whose access_token contains control characters, and no new refresh_token",
        hs.answer(200, {"access_token": "A\x1b[2J\x07", "expires_in": 60})),
    "server-token-missing": (
        "a 200 without an access_token, and no new refresh_token",
        hs.answer(200, {"expires_in": 60})),
    "server-token-not-string": (
        "a 200 whose refresh_token is a number",
        hs.answer(200, {"access_token": "A1", "refresh_token": 12345, "expires_in": 60})),
    "server-non-json-200": (
        "a 200 with an HTML body",
        hs.answer(200, "<html>maintenance</html>")),
    "server-json-array-200": (
        "a 200 whose body is a JSON array",
        hs.answer(200, ["access_token", "A1"])),
    "server-huge-headers": (
        "a 200 preceded by 3 MB of response headers",
        hs.huge_headers()),
}
UNUSABLE_DEFENCE = ("typed UnusableAnswer: nothing written (store byte-identical), retried "
                    "after back-off, other profiles served")
UNUSABLE_CASES = [Case(name, "token server", attack, UNUSABLE_DEFENCE)
                  for name, (attack, _) in UNUSABLE.items()]
REDIRECT_CASES = [
    Case(f"server-redirect-{code}", "token server",
         f"the token endpoint answers {code} to another server",
         "redirects are not followed: an error; the other server never sees the token")
    for code in (301, 302, 307, 308)
]


@pytest.mark.adversarial
def test_unusable_answers_and_redirects_write_nothing(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    with hs.Recorder() as elsewhere:
        attacked: dict[str, tuple[Path, str, bytes]] = {}
        behaviours = {name: b for name, (_, b) in UNUSABLE.items()}
        for c in REDIRECT_CASES:
            code = int(c.name.rsplit("-", 1)[1])
            behaviours[c.name] = hs.redirect(code, elsewhere.url + "/api/v1/oauth2/token")
        for name, behaviour in behaviours.items():
            path, refresh = seed(oc, name, fake.issue_tokens(lifetime=1))
            attacked[name] = (path, refresh, path.read_bytes())
            hostile.attack(refresh, behaviour)
        _, healthy = seed(oc, "healthy", fake.issue_tokens(lifetime=2))
        with start(oc, hostile) as daemon:
            for name, (_, refresh, _) in attacked.items():
                wait_for(lambda r=refresh: retried_after_backoff(hostile, r), 20,
                         f"a retry after {name}", daemon)
            keeps_rotating(fake, healthy, daemon)
            for name, (path, refresh, before) in attacked.items():
                assert path.read_bytes() == before, f"{name}: the store was changed"
                hits = [s.at for s in hostile.hits(refresh)]
                # Backed off, not hammered (the daemon may run a family twice at start-up).
                assert len(hits) <= 4, (name, [round(h - hits[0], 2) for h in hits])
            assert elsewhere.requests == [], "a redirect was followed"
            journaled = len(read_journal(oc.our_state))  # a count: the entries hold tokens
            assert journaled == 0, "an unusable answer was journaled"
            assert "unusable" in daemon.output
            assert daemon.proc.poll() is None
            texts = outputs(oc, daemon)
            stop_in_time(daemon)
    sent = [refresh for _, refresh, _ in attacked.values()]
    assert_no_secrets(texts, [*all_tokens(fake), *sent, "A" * 20_000])


@case("server-rotated-then-garbage", "token server",
      "the server rotates (the old token is spent) but answers an access_token with spaces",
      "the valid new refresh token is journaled and spent at once for a usable access token; "
      "the bad access token is never written and the spent token is never sent again")
def test_garbage_after_a_real_rotation_keeps_and_spends_the_new_refresh_token(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    path, refresh = seed(oc, "main", fake.issue_tokens(lifetime=1))

    def garbage(body: dict[str, Any]) -> str:
        body["access_token"] = "not a token"
        return json.dumps(body)

    hostile.attack(refresh, hs.rotate_then(garbage))
    _, healthy = seed(oc, "healthy", fake.issue_tokens(lifetime=2))
    with start(oc, hostile) as daemon:
        wait_for(lambda: len(descendants(fake, refresh)) >= 2
                 and current(path)["refresh"] in descendants(fake, refresh)[1:], 20,
                 "the store to hold a usable rotation", daemon)
        keeps_rotating(fake, healthy, daemon)
        time.sleep(1.0)
        held = current(path)
        issued = {i.refresh_token: i.access_token for i in fake.issued}
        assert held["access"] == issued[held["refresh"]], "the store's access token is not usable"
        assert len(hostile.hits(refresh)) == 1, "the spent token was sent again"
        assert fake.reuse_count == 0
        assert not daemon.has_event("needs_login")
        assert "unusable" in daemon.output
        assert len(read_journal(oc.our_state)) == 0  # a count: the entries hold tokens
        texts = outputs(oc, daemon)
        stop_in_time(daemon)
    assert_no_secrets(texts, [*all_tokens(fake), refresh])


# -- a server that never finishes: deadline, body cap, bounded memory ---------------------------


@case("server-slow-drip", "token server",
      "the server sends one body byte every 2 s, holding the request (and the store lock) open",
      "an overall 15 s deadline per request: the lock is released well under OpenClaw's 30 s "
      "staleness, and SIGTERM still ends the daemon within 10 s")
def test_slow_drip_is_cut_by_an_overall_deadline(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    path, refresh = seed(oc, "main", fake.issue_tokens(lifetime=1))
    before = path.read_bytes()
    hostile.attack(refresh, hs.drip(2.0))
    _, healthy = seed(oc, "healthy", fake.issue_tokens(lifetime=2))
    lock = Path(os.path.realpath(path.parent)) / (path.name + ".lock")
    held: list[tuple[float, float]] = []

    def watch(stop: threading.Event) -> None:
        since: float | None = None
        while not stop.wait(0.01):
            if lock.exists():
                since = since if since is not None else time.monotonic()
            elif since is not None:
                held.append((since, time.monotonic()))
                since = None

    stop_watch = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop_watch,), daemon=True)
    watcher.start()
    try:
        with start(oc, hostile) as daemon:
            wait_for(lambda: len(held) >= 1, OPENCLAW_LOCK_STALE + 5,
                     "the lock to be released", daemon)
            took = held[0][1] - held[0][0]
            print(f"lock held {took:.2f}s around the dripping server")
            assert took < 20, f"the lock was held {took:.1f}s around a dripping server"
            assert len(descendants(fake, healthy)) >= 2, "the healthy profile starved"
            # A second attempt drips too: SIGTERM in the middle of it.
            seen = len(hostile.hits(refresh))
            wait_for(lambda: len(hostile.hits(refresh)) > seen, 10, "the retry", daemon)
            time.sleep(0.5)
            assert path.read_bytes() == before
            texts = outputs(oc, daemon)
            stop_in_time(daemon)
    finally:
        stop_watch.set()
        watcher.join(2)
    assert "timed out" in daemon.output or "deadline" in daemon.output
    assert not lock.exists()
    assert_no_secrets(texts, [*all_tokens(fake), refresh])


ENDLESS_CASES = [
    Case("server-endless-body", "token server",
         "a 200 whose body never ends (no length, streamed at full speed)",
         "the body is cut off at 64 KiB: memory stays bounded, nothing is written"),
    Case("server-gzip-bomb", "token server",
         "a 1 MB gzip body that inflates to 1 GiB",
         "decoded bytes are counted while inflating and cut at 64 KiB: memory stays bounded"),
]


@pytest.mark.adversarial
def test_endless_body_and_gzip_bomb_keep_memory_bounded(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    attacked = {}
    for name, behaviour in (("endless", hs.endless()), ("bomb", hs.gzip_bomb())):
        path, refresh = seed(oc, name, fake.issue_tokens(lifetime=1))
        attacked[name] = (path, refresh, path.read_bytes())
        hostile.attack(refresh, behaviour)
    _, healthy = seed(oc, "healthy", fake.issue_tokens(lifetime=2))
    with start(oc, hostile) as daemon:
        memory = Memory(daemon.proc.pid)
        try:
            for name, (_, refresh, _) in attacked.items():
                wait_for(lambda r=refresh: retried_after_backoff(hostile, r), 20,
                         f"a retry after the {name} answer", daemon)
            keeps_rotating(fake, healthy, daemon)
        finally:
            peak = memory.stop()
        print(f"peak RSS {peak:.1f} MB under an endless body and a 1 GiB gzip bomb")
        assert not memory.killed, f"the daemon passed {memory.ceiling} MB and was killed"
        assert peak < RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB"
        for name, (path, _, before) in attacked.items():
            assert path.read_bytes() == before, name
        texts = outputs(oc, daemon)
        stop_in_time(daemon)
    assert_no_secrets(texts, [*all_tokens(fake), *(r for _, r, _ in attacked.values())])


# -- an error body that echoes the request ------------------------------------------------------


@case("server-echo-encoded", "token server",
      "an error body echoes the refresh token raw, URL-encoded, JSON-escaped and base64",
      "every encoding of the token sent is redacted before the text reaches any output")
def test_error_echoing_the_token_in_every_encoding_is_redacted(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    # Characters that URL-encoding, JSON and base64 all change.
    refresh = "ref+/=\"\\&é" + secrets.token_urlsafe(24)
    access = "acc+/=" + secrets.token_urlsafe(24)
    path, _ = seed(oc, "main", (access, refresh, int(time.time() * 1000) + 1000))
    before = path.read_bytes()
    forms = {refresh, quote(refresh, safe=""), quote_plus(refresh), quote(refresh),
             json.dumps(refresh)[1:-1], json.dumps(refresh, ensure_ascii=False)[1:-1],
             base64.b64encode(refresh.encode()).decode(),
             base64.urlsafe_b64encode(refresh.encode()).decode().rstrip("=")}
    description = "bad request: " + " | ".join(sorted(forms))
    hostile.attack(refresh, hs.answer(400, {"error": "bad_request_echo",
                                            "error_description": description}))
    _, healthy = seed(oc, "healthy", fake.issue_tokens(lifetime=2))
    with start(oc, hostile) as daemon:
        wait_for(lambda: len(hostile.hits(refresh)) >= 2, 15, "a retry", daemon)
        keeps_rotating(fake, healthy, daemon)
        texts = outputs(oc, daemon)
        stop_in_time(daemon)
    assert path.read_bytes() == before
    assert "bad_request_echo" in daemon.output, "the server's error code is still reported"
    assert_no_secrets(texts, [*all_tokens(fake), *forms, access])


# -- Retry-After ------------------------------------------------------------------------------


@case("server-retry-after-day", "token server",
      "a 429 with Retry-After: 86400 for a token that expires in 6 s",
      "the retry is scheduled no later than min(retry_max, time to expiry)")
def test_retry_after_never_pushes_past_the_expiry(
        oc: OpenClawHome, fake: FakeQwen, hostile: hs.HostileServer) -> None:
    path, refresh = seed(oc, "main", fake.issue_tokens(lifetime=6))
    expires_ms = current(path)["expires"]
    hostile.attack(refresh, hs.answer(429, {"error": "slow"}, {"Retry-After": "86400"}))
    with DaemonProcess(oc, hostile, "--no-qwen-code", "--retry-max", "120",
                       margin="30") as daemon:
        event = daemon.wait_event("refresh_failed", 15)
        assert event["retry_in_s"] <= 6.5, event
        # ...and the retry really comes, before the token expires.
        wait_for(lambda: retried_after_backoff(hostile, refresh), 10,
                 "the retry after the back-off", daemon)
        assert hostile.hits(refresh)[-1].at * 1000 <= expires_ms + 500
        stop_in_time(daemon)


# -- clear text --------------------------------------------------------------------------------


@case("clear-proxy-env", "clear text",
      "HTTP_PROXY, HTTPS_PROXY and ALL_PROXY point at another server while the token URL is "
      "http://127.0.0.1",
      "proxies are never used for a loopback token URL: the proxy receives nothing")
def test_proxy_environment_is_never_used_for_a_loopback_token_url(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    path, refresh = seed(oc, "main", fake.issue_tokens(lifetime=1))
    with hs.Recorder() as proxy:
        names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        env = oc.env(**{n: proxy.url for n in names}, **{n.lower(): proxy.url for n in names})
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        with start(oc, fake, env=env) as daemon:
            wait_for(lambda: current(path)["refresh"] in descendants(fake, refresh), 15,
                     "a rotation", daemon)
            stop_in_time(daemon)
        assert proxy.requests == [], "the token request went through the proxy"


LOOKALIKES = {
    "clear-evil-localhost": "http://evil.localhost:9/token",
    "clear-localhost-suffix": "http://localhost.evil.example:9/token",
    "clear-loopback-lookalike-ip": "http://127.0.0.1.nip.io:9/token",
    "clear-bare-localhost": "http://localhost:9/token",
}
LOOKALIKE_CASES = [
    Case(name, "clear text", f"token_url {url} (a name, not a literal loopback address)",
         "refused at start-up (exit 78): http:// only to literal 127.0.0.0/8 or ::1")
    for name, url in LOOKALIKES.items()
]


@pytest.mark.adversarial
@pytest.mark.parametrize("c", params(LOOKALIKE_CASES))
def test_clear_text_only_to_literal_loopback(oc: OpenClawHome, c: Case) -> None:
    url = LOOKALIKES[c.name]
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_refresher", "run", "--once", "--token-url", url],
        cwd=ROOT, env=oc.env(), capture_output=True, text=True, timeout=20)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "clear text" in proc.stdout + proc.stderr

