"""Secrets stay out of every output, even when everything around the daemon echoes them.

Every other reliability suite checks its own outputs (daemon log, ``status`` text and JSON,
``/metrics``, exception texts) for every token the fake issued, whole or in 16-character pieces.
This suite goes after the paths where a token is most likely to slip out: a server whose error
bodies quote the refresh token it was sent (5xx, 429, a rejection), an ``on_rotate`` hook that
prints a token it read from the store and fails, debug logging, ``/readyz`` reasons, and the
published ``state.json``.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.harness import OpenClawHome, qwen_profile
from tests.reliability.conftest import Figures
from tests.reliability.support import (
    Daemon,
    assert_no_leaks,
    fake_secrets,
    status_outputs,
    wait_for,
)


def hook_script(directory: Path, filler: int) -> Path:
    """An on_rotate hook that prints the store's refresh token, then ``filler`` zeros, and
    fails: its output ends up in the ``on_rotate_failed`` log event."""
    script = directory / "leaky-hook.sh"
    script.write_text(
        "#!/bin/sh\n"
        "tok=$(grep -o '\"refresh\": \"[^\"]*\"' \"$QWEN_REFRESHER_STORE\" | head -n1 "
        "| cut -d'\"' -f4)\n"
        "printf 'token=%s\\n' \"$tok\"\n"
        f"printf '%0{filler}d\\n' 0\n"
        "exit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def current_refresh(path: Path) -> str:
    return str(json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"])


@pytest.mark.timeout(90)
def test_tokens_echoed_by_the_server_and_a_hook_stay_secret(
        oc: OpenClawHome, tmp_path: Path, figures: Figures) -> None:
    with FakeQwen(FakeQwenConfig(lifetime=3.0)) as fake:
        access, refresh, expires = fake.issue_tokens(lifetime=3.0)
        path = oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}})
        echo = f"upstream refused refresh_token={refresh} access_token={access}"
        fake.inject("503", body={"error": "server_error", "error_description": echo})
        fake.inject("429", retry_after=1, body=echo)
        fake.inject("html200", body=f"<html>{echo}</html>")
        hook = hook_script(tmp_path, filler=10)
        args = ("--margin", "2", "--jitter", "0", "--retry-max", "1", "--log-level", "debug",
                "--on-rotate", str(hook))
        texts: list[str] = []
        with Daemon(oc, fake, *args) as daemon:
            daemon.wait_event("on_rotate_failed", timeout=30)
            texts += [daemon.http_get(p)[1] for p in ("/metrics", "/readyz", "/healthz")]
            texts += status_outputs(oc)
            # Now a rejection whose description quotes the token it rejects.
            token = current_refresh(path)
            fake.inject("reject", body={"error": "invalid_grant",
                                        "error_description": f"refresh token {token} revoked"})
            daemon.wait_event("needs_login", timeout=30)
            wait_for(lambda: "needs_login" in json.dumps(status_outputs(oc)), 10,
                     "status to show the login", daemon)
            texts += [daemon.http_get(p)[1] for p in ("/metrics", "/readyz", "/healthz")]
            texts += status_outputs(oc)
        state = (oc.our_state / "state.json").read_text()
        events = {name: daemon.count(name) for name in
                  ("refresh_failed", "rotated", "on_rotate_failed", "needs_login")}
        checked = assert_no_leaks([daemon.output, state, *texts], fake_secrets(fake))
    figures("secrets", {"tokens_checked": checked, "outputs_checked": len(texts) + 2,
                        "events": events})
    assert events["refresh_failed"] >= 3, "the echoing failures were not exercised"
    assert events["on_rotate_failed"] >= 1 and events["needs_login"] == 1
    assert "[redacted]" in daemon.output, "the hook's token should show up redacted"
    assert daemon.tracebacks()[0] == 0, "an unexpected exception was logged"


@pytest.mark.timeout(60)
def test_a_token_cut_by_the_hook_output_limit_stays_secret(
        oc: OpenClawHome, tmp_path: Path) -> None:
    """Found by this suite: hooks.run_hook clipped the hook's output to its last 400 characters
    before redacting, so a token cut by the clip was no longer matched and its tail was logged.
    Fixed in 94fd15a."""
    with FakeQwen(FakeQwenConfig(lifetime=3.0)) as fake:
        access, refresh, expires = fake.issue_tokens(lifetime=3.0)
        oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}})
        # 380 zeros after the token: the 400-character tail starts inside the token.
        hook = hook_script(tmp_path, filler=380)
        with Daemon(oc, fake, "--margin", "2", "--jitter", "0", "--on-rotate",
                    str(hook)) as daemon:
            daemon.wait_event("on_rotate_failed", timeout=30)
        assert_no_leaks([daemon.output], fake_secrets(fake))
