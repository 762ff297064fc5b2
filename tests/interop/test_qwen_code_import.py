"""Scenario 4: Qwen Code's file, kept fresh by the daemon, is what OpenClaw imports as
``qwen-portal:qwen-cli``."""

from __future__ import annotations

import pytest

from qwen_refresher.models import Credentials
from qwen_refresher.stores.qwen_code import PROFILE_ID, QwenCodeStore
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, all_tokens, assert_no_secrets
from tests.interop.openclaw import QWEN, QWEN_CLI_PROFILE, OpenClaw, oauth_profile

pytestmark = pytest.mark.interop


def test_openclaw_imports_the_rotated_qwen_code_tokens(
        openclaw: OpenClaw, oc: OpenClawHome, fake: FakeQwen) -> None:
    access, refresh, expires_ms = fake.issue_tokens(lifetime=30)  # inside the 60 s margin
    creds_file = QwenCodeStore(openclaw.qwen_creds)
    creds_file.write(creds_file.read(allow_missing=True),
                     {PROFILE_ID: Credentials(access, refresh, expires_ms)})

    # The daemon finds ~/.qwen/oauth_creds.json on its own (HOME is the test's) and rotates it.
    daemon = DaemonProcess(oc, fake, "--once", margin="60")
    assert daemon.proc.wait(60) == 0, daemon.output
    daemon.stop()
    rotated = fake.issued[-1]
    assert rotated.replaced == refresh
    kept = creds_file.read().records[PROFILE_ID].creds
    assert kept is not None
    assert (kept.access, kept.refresh) == (rotated.access_token, rotated.refresh_token)
    assert not openclaw.store_path.exists()

    report = openclaw.status()

    profile = oauth_profile(report, QWEN_CLI_PROFILE)
    assert profile["status"] == "ok"
    assert profile["expiresAt"] == kept.expires_ms
    # OpenClaw saved the import into its own store (without its lock: a plain load does it).
    imported = oc.read_store()["profiles"][QWEN_CLI_PROFILE]
    assert imported == {"type": "oauth", "provider": QWEN, "access": kept.access,
                        "refresh": kept.refresh, "expires": kept.expires_ms}
    assert len(fake.refresh_requests()) == 1  # the daemon's; OpenClaw only read the file
    assert_no_secrets([daemon.output], all_tokens(fake))
