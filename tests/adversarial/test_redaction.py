"""Redaction by value, in every encoding, on every way out of the daemon.

A hostile (or merely chatty) token server echoes what we sent it: the request form, so our
refresh token URL-encoded (``+`` -> ``%2B``, ``/`` -> ``%2F``, upper or lower-case hex), or
base64 at any alignment, or JSON-escaped inside a text body. The daemon repeats server text in
its log, in ``last_error`` (``state.json``, ``status``, ``status --json``), in the needs-login
notice (apprise: a webhook here) and in the ``on_needs_login`` hook's environment; a hook may
print a token it read from a store. Each case runs the real daemon as a subprocess against a
small hostile token server written here (on 127.0.0.1), with a second, healthy profile that
must keep being refreshed, and asserts that no token, in any of the encodings computed *here*
(independently of ``logsetup.secret_forms``), shows up in any of those outputs, while the
echo itself visibly arrived masked.

Tokens carry ``+ / = ~``, so that every encoding differs from the raw token.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus

import pytest

from tests.adversarial.registry import Case, params
from tests.harness import ROOT, DaemonProcess, OpenClawHome, qwen_profile, wait_for
from tests.test_notify import Recorder

MASK = "[redacted]"
TOKEN_PATH = "/api/v1/oauth2/token"


def hostile_token(kind: str) -> str:
    """A token whose URL, JSON and base64 forms all differ from itself."""
    return (f"fake{kind}-{secrets.token_urlsafe(18)}+/={secrets.token_hex(3)}"
            f"~{secrets.token_urlsafe(9)}")


# --- every way a token can be spelled, computed independently of the code under test ----------


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def _base64_inner(data: bytes, urlsafe: bool) -> list[str]:
    """For each alignment of ``data`` inside a longer base64 payload, the run of characters
    that encodes only bytes of ``data`` (what a reader could decode the token from)."""
    out = []
    for offset in range(3):
        payload = b"\x00" * offset + data + b"\x00\x00\x00"
        encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(payload).decode()
        first = -(-offset // 3)  # first group made of token bytes only
        last = (offset + len(data)) // 3  # groups before this one end inside the token
        out.append(encoded[first * 4:last * 4])
    return out


def spellings(token: str) -> dict[str, str]:
    data = token.encode()
    forms = {
        "raw": token,
        "url": quote(token, safe=""),
        "url-lower-hex": _lower_hex(quote(token, safe="")),
        "url-plus": quote_plus(token),
        "url-plus-lower-hex": _lower_hex(quote_plus(token)),
        "json": json.dumps(token)[1:-1],
        "json-escaped-slash": json.dumps(token)[1:-1].replace("/", "\\/"),
        "base64": base64.b64encode(data).decode(),
        "base64-unpadded": base64.b64encode(data).decode().rstrip("="),
        "base64url": base64.urlsafe_b64encode(data).decode(),
        "base64url-unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "hex": data.hex(),
    }
    for urlsafe in (False, True):
        for n, inner in enumerate(_base64_inner(data, urlsafe)):
            forms[f"base64{'url' if urlsafe else ''}-in-payload-at-{n}"] = inner
        # a dump of our request body: the token URL-encoded, then base64
        for n, inner in enumerate(_base64_inner(quote_plus(token).encode(), urlsafe)):
            forms[f"base64{'url' if urlsafe else ''}-of-request-form-at-{n}"] = inner
    return forms


def assert_clean(outputs: dict[str, str], tokens: list[str]) -> None:
    """Fail naming the output, the token's number and the spelling, never the token."""
    for name, text in outputs.items():
        for n, token in enumerate(tokens):
            for kind, form in spellings(token).items():
                if form in text:
                    raise AssertionError(f"token #{n} leaked {kind}-encoded into {name} "
                                         f"(offset {text.index(form)})")


# --- the hostile token server ---------------------------------------------------------------


#: (status, content type, body) for one refresh request: (raw form bytes, refresh token,
#: the access token that went with it).
Attack = Callable[[bytes, str, str], tuple[int, str, bytes]]


class EchoServer:
    """Rotates the refresh tokens in ``good`` like Qwen does (new hostile tokens each time);
    answers any other refresh token with ``attack``. ``token_url``/``device_code_url`` look
    like a FakeQwen's so that ``DaemonProcess`` takes it."""

    def __init__(self, attack: Attack) -> None:
        self.attack = attack
        self.good: set[str] = set()
        self.access_of: dict[str, str] = {}  # refresh token -> its access token
        self.issued: list[str] = []
        self.attacked: list[str] = []  # bodies served to the victim
        self.rotations = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 16)
                raw = self.rfile.read(length)
                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                status, ctype, body = server.answer(raw, form.get("refresh_token", ""))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def seed(self, *, good: bool) -> tuple[str, str]:
        access, refresh = hostile_token("acc"), hostile_token("ref")
        with self._lock:
            self.issued += [access, refresh]
            self.access_of[refresh] = access
            if good:
                self.good.add(refresh)
        return access, refresh

    def answer(self, raw: bytes, refresh: str) -> tuple[int, str, bytes]:
        with self._lock:
            if refresh in self.good:
                self.good.discard(refresh)
                access, new_refresh = hostile_token("acc"), hostile_token("ref")
                self.issued += [access, new_refresh]
                self.access_of[new_refresh] = access
                self.good.add(new_refresh)
                self.rotations += 1
                return 200, "application/json", json.dumps({
                    "access_token": access, "refresh_token": new_refresh,
                    "token_type": "Bearer", "expires_in": 3600,
                    "resource_url": "portal.qwen.ai"}).encode()
            access = self.access_of.get(refresh, "")
        status, ctype, body = self.attack(raw, refresh, access)
        with self._lock:
            self.attacked.append(body.decode(errors="replace"))
        return status, ctype, body

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def device_code_url(self) -> str:
        return self.base_url + "/api/v1/oauth2/device/code"

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the attacks ----------------------------------------------------------------------------


def _json_error(status: int, error: str, description: str) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(
        {"error": error, "error_description": description}).encode()


def echo_form(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    return _json_error(400, "invalid_grant", "bad request: " + raw.decode())


def echo_form_lower_hex(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    return _json_error(400, "invalid_grant", "bad request: " + _lower_hex(raw.decode()))


def echo_base64_shifted(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    dumps = [base64.b64encode(b"#" * shift + raw).decode() for shift in range(3)]
    return _json_error(400, "invalid_request", "request dump " + " ".join(dumps))


def echo_base64url_access(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    return _json_error(401, "invalid_grant",
                       f"session {base64.urlsafe_b64encode(access.encode()).decode().rstrip('=')}"
                       f" revoked, refresh {base64.urlsafe_b64encode(refresh.encode()).decode()}")


def echo_json_escaped_text(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    """The description quotes a JSON dump (slashes escaped, PHP-style): once the body is
    parsed, the text holds the tokens JSON-escaped."""
    dump = json.dumps({"refresh_token": refresh, "access_token": access}).replace("/", "\\/")
    return _json_error(400, "invalid_grant", f"upstream refused {dump}")


def echo_in_403_waf(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    """A web application firewall's 403: says nothing about the token (a transient failure,
    retried), but quotes the blocked request, as sent and base64."""
    return _json_error(403, "request_blocked",
                       f"blocked {raw.decode()} / {base64.b64encode(raw).decode()}")


def echo_in_409_base64url(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    dumps = [base64.urlsafe_b64encode(b"%" * shift + raw).decode().rstrip("=")
             for shift in range(3)]
    return _json_error(409, "conflict", "replay of " + ",".join(dumps))


def echo_hex_dump(raw: bytes, refresh: str, access: str) -> tuple[int, str, bytes]:
    return _json_error(400, "invalid_grant",
                       f"token {refresh.encode().hex()} / {access.encode().hex().upper()} revoked")


@dataclass(frozen=True)
class Scenario:
    case: Case
    attack: Attack
    needs_login: bool  # the answer is a rejection (notice, hook) rather than a transient failure


SCENARIOS = [
    Scenario(Case("redaction-echo-form-urlencoded", "redaction",
                  "a 400 whose description echoes our request form, refresh token URL-encoded",
                  "every URL-encoded form of every known token is masked on every way out"),
             echo_form, True),
    Scenario(Case("redaction-echo-form-lowercase-hex", "redaction",
                  "the request form echoed with lower-case percent escapes (%2b%2f)",
                  "percent forms are registered in upper and lower-case hex"),
             echo_form_lower_hex, True),
    Scenario(Case("redaction-echo-base64-any-alignment", "redaction",
                  "a base64 dump of the request at three byte alignments in the description",
                  "the alignment-stable inner base64 runs of each token are masked"),
             echo_base64_shifted, True),
    Scenario(Case("redaction-echo-base64url-access-token", "redaction",
                  "a 401 quoting our access token base64url (unpadded) and the refresh token",
                  "URL-safe base64, padded or not, is masked for access tokens as for refresh"),
             echo_base64url_access, True),
    Scenario(Case("redaction-echo-json-escaped-text", "redaction",
                  "a 400 whose description quotes a JSON dump of the tokens, slashes escaped",
                  "JSON-escaped forms (with and without \\/) are masked in raw server text"),
             echo_json_escaped_text, True),
    Scenario(Case("redaction-echo-hex-dump", "redaction",
                  "a 400 quoting the refresh token as lower-case hex, the access token upper",
                  "hex forms are masked too"),
             echo_hex_dump, True),
    Scenario(Case("redaction-echo-403-waf-retrying", "redaction",
                  "a firewall's 403 quoting the blocked request form and its base64",
                  "a transient failure's last_error (state.json, status) is scrubbed too"),
             echo_in_403_waf, False),
    Scenario(Case("redaction-echo-409-base64url-request", "redaction",
                  "a 409 quoting the request body base64url, unpadded, at three alignments",
                  "base64 of the URL-encoded token is masked at every alignment"),
             echo_in_409_base64url, False),
]


# --- the run --------------------------------------------------------------------------------


def env_dump_hook(tmp_path: Path, name: str, *, read_store: Path | None = None) -> tuple[str, Path]:
    """A hook that records its whole environment and argv (raw bytes, base64, one JSON line
    per run). With ``read_store`` it also prints the store's tokens URL-encoded, base64 and
    JSON-escaped, and fails: the daemon logs a failing hook's output."""
    out = tmp_path / f"{name}.jsonl"
    script = tmp_path / f"{name}.py"
    printing = ""
    if read_store is not None:
        printing = (
            "import base64, urllib.parse\n"
            f"doc = json.load(open({str(read_store)!r}))\n"
            "for p in doc['profiles'].values():\n"
            "    for t in (p.get('access'), p.get('refresh')):\n"
            "        if isinstance(t, str):\n"
            "            print('reload failed for', urllib.parse.quote_plus(t),\n"
            "                  base64.b64encode(t.encode()).decode(), json.dumps(t))\n"
            "sys.exit(3)\n")
    script.write_text(
        "import json, os, sys\n"
        "env = {k.decode('latin-1'): v.decode('latin-1') for k, v in os.environb.items()}\n"
        f"with open({str(out)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps({'argv': sys.argv, 'env': env}) + '\\n')\n" + printing)
    return f"{sys.executable} {script}", out


def status_output(env: dict[str, str], state_dir: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "qwen_refresher", "status", "--no-color",
                           "--state-dir", str(state_dir), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


def read_state(oc: OpenClawHome) -> str:
    path = oc.our_state / "state.json"
    return path.read_text() if path.exists() else ""


def profile_states(oc: OpenClawHome) -> dict[str, dict[str, Any]]:
    text = read_state(oc)
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return {Path(p["store"]).parent.parent.name: p for p in doc.get("profiles", [])}


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


@pytest.mark.adversarial
@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.case.name) for s in SCENARIOS])
def test_an_echoed_token_never_leaves_in_any_encoding(
        scenario: Scenario, tmp_path: Path, recorder: Recorder) -> None:
    oc = OpenClawHome(tmp_path / "oc")
    with EchoServer(scenario.attack) as server:
        soon = int((time.time() + 2) * 1000)  # due at once (margin 3 s)
        victim = oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(*server.seed(good=False), soon)}}, agent="victim")
        healthy = oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(*server.seed(good=True), soon)}}, agent="healthy")
        needs_hook, needs_out = env_dump_hook(tmp_path, "on_needs_login")
        rotate_hook, rotate_out = env_dump_hook(tmp_path, "on_rotate")
        env = oc.env(QWEN_REFRESHER_NOTIFY_URLS=json.dumps([recorder.url]),
                     QWEN_REFRESHER_ON_NEEDS_LOGIN=needs_hook,
                     QWEN_REFRESHER_ON_ROTATE=rotate_hook,
                     QWEN_REFRESHER_NOTIFY_DESKTOP="false")
        with DaemonProcess(oc, server, "--store", str(victim), "--store", str(healthy),
                           env=env) as daemon:
            wait_for(lambda: rotate_out.exists(), 20, "the healthy profile's rotation", daemon)
            if scenario.needs_login:
                wait_for(lambda: profile_states(oc).get("victim", {}).get("state")
                         == "needs_login", 20, "needs_login published", daemon)
                wait_for(lambda: needs_out.exists() and len(recorder.posts) >= 1, 20,
                         "the on_needs_login hook and the webhook", daemon)
            else:
                wait_for(lambda: (profile_states(oc).get("victim", {}).get("last_error")
                                  or "") != "", 20, "the failure published", daemon)
            published = read_state(oc)
            status_text = status_output(env, oc.our_state)
            status_json = status_output(env, oc.our_state, "--json")
            assert daemon.stop() == 0, "SIGTERM not honoured; events: " + ", ".join(
                str(e.get("event")) for e in daemon.events()[-15:])
        # once stopped, status reads the stores itself
        status_after = status_output(env, oc.our_state, "--json")
        outputs = {
            "the daemon's log": daemon.output,
            "state.json": published,
            "state.json after stop": read_state(oc),
            "status": status_text,
            "status --json": status_json,
            "status --json (daemon stopped)": status_after,
            "the webhook": json.dumps(recorder.posts),
            "the on_needs_login hook's env and argv": needs_out.read_text()
            if needs_out.exists() else "",
            "the on_rotate hook's env and argv": rotate_out.read_text(),
        }
        tokens = list(server.issued)

    assert server.attacked, "the victim's refresh never reached the hostile server"
    assert server.rotations >= 1, "the healthy profile was not refreshed"
    assert_clean(outputs, tokens)
    # the echo did arrive and was shown masked, not dropped: the test can fail
    victim_state = json.loads(published)["profiles"]
    assert any(MASK in (p.get("last_error") or "") for p in victim_state), \
        "no masked echo in state.json: the attack's text never reached an output"
    if scenario.needs_login:
        assert MASK in recorder.posts[0]["message"]
        reasons = [json.loads(line)["env"].get("QWEN_REFRESHER_REASON", "")
                   for line in needs_out.read_text().splitlines()]
        assert any(MASK in r for r in reasons)


HOOK_CASE = Case("redaction-hook-prints-encoded-tokens", "redaction",
                 "an on_rotate hook reads the store and prints its tokens URL-encoded, base64 "
                 "and JSON-escaped, then fails",
                 "the hook's output is logged through the redactor, every form masked")


@pytest.mark.adversarial
@pytest.mark.parametrize("hook_case", params([HOOK_CASE]))
def test_a_hook_printing_encoded_tokens_is_logged_masked(
        hook_case: Case, tmp_path: Path) -> None:
    oc = OpenClawHome(tmp_path / "oc")
    with EchoServer(echo_form) as server:
        soon = int((time.time() + 2) * 1000)
        healthy = oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(*server.seed(good=True), soon)}}, agent="healthy")
        hook, out = env_dump_hook(tmp_path, "on_rotate", read_store=healthy)
        env = oc.env(QWEN_REFRESHER_ON_ROTATE=hook, QWEN_REFRESHER_NOTIFY_DESKTOP="false")
        with DaemonProcess(oc, server, "--store", str(healthy), env=env) as daemon:
            wait_for(lambda: any("reload failed" in line and MASK in line
                                 for line in daemon.lines), 20,
                     "the failing hook's output in the log", daemon)
            assert daemon.stop() == 0
        tokens = list(server.issued)
    assert_clean({"the daemon's log": daemon.output, "state.json": read_state(oc)}, tokens)
