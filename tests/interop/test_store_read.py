"""Scenario 1: a store written by qwen-refresher is one OpenClaw reads as healthy."""

from __future__ import annotations

import stat

import pytest

from qwen_refresher.models import Credentials
from qwen_refresher.stores.openclaw import OpenClawStore
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import OpenClawHome
from tests.interop.openclaw import DEFAULT_PROFILE, QWEN, OpenClaw, oauth_profile

pytestmark = pytest.mark.interop


def test_openclaw_reads_our_store_as_ok_with_our_expiry(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    # A store as OpenClaw left it, with another provider's profile and bookkeeping...
    oc.write_store({
        "version": 1,
        "profiles": {"anthropic:default": {"type": "api_key", "provider": "anthropic",
                                           "key": "sk-ant-interop"}},
        "order": {"anthropic": ["anthropic:default"]},
        "lastGood": {"anthropic": "anthropic:default"},
    })
    # ...into which qwen-refresher writes a qwen-portal profile, as the daemon and login do.
    access, refresh, expires_ms = fake.issue_tokens(lifetime=6 * 3600)
    store = OpenClawStore(openclaw.store_path)
    written = store.write(store.read(), {DEFAULT_PROFILE: Credentials(access, refresh, expires_ms)})

    report = openclaw.status()

    profile = oauth_profile(report, DEFAULT_PROFILE)
    # "ok" alone proves little: OpenClaw says "ok" for any OAuth profile that has a refresh
    # token, expired or not. The expiry is what shows it read our write.
    assert profile["status"] == "ok"
    assert profile["remainingMs"] > 5 * 3600 * 1000
    assert profile["type"] == "oauth"
    assert profile["source"] == "store"
    assert profile["expiresAt"] == expires_ms
    assert report["auth"]["storePath"] == str(openclaw.store_path)
    providers = {p["provider"]: p for p in report["auth"]["providers"]}
    assert providers[QWEN]["profiles"]["labels"] == [f"{DEFAULT_PROFILE}=OAuth"]
    assert providers["anthropic"]["profiles"]["apiKey"] == 1
    # `models status` without --probe only reads: our bytes and mode are still there.
    assert openclaw.store_path.read_bytes() == written
    assert stat.S_IMODE(openclaw.store_path.stat().st_mode) == 0o600
    assert fake.requests == []
