"""Start-up leaves housekeeping for just after READY=1 (issue 16: start to ready), but never
skips it: a temp file an interrupted write left beside a store holds a copy of its tokens and
must be gone within seconds of a start, as the first sweep used to do before READY."""

from __future__ import annotations

import os
import time

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, assert_no_secrets, seed_qwen_store, wait_for


def test_a_stale_temp_file_beside_a_store_is_removed_right_after_start(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    store = seed_qwen_store(oc, fake, 6 * 3600)
    stale = store.parent / f".{store.name}.0123456789ab.tmp"
    stale.write_bytes(store.read_bytes())  # what a write killed half-way leaves: the tokens
    os.chmod(stale, 0o600)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    with DaemonProcess(oc, fake, "--sweep-interval", "3600") as daemon:
        wait_for(lambda: any(e.get("event") == "started" for e in daemon.events()), 20,
                 "start-up", daemon)
        wait_for(lambda: not stale.exists(), 5, "the stale temp file removed", daemon)
        # The line follows the unlink: read once it has arrived, not the instant the file went.
        wait_for(lambda: any(e.get("event") == "temp_file_removed" for e in daemon.events()),
                 5, "the removal logged", daemon)
        removed = [e for e in daemon.events() if e.get("event") == "temp_file_removed"]
        assert len(removed) == 1 and removed[0]["path"] == str(stale), daemon.output[-2000:]
        daemon.stop()
    assert_no_secrets([daemon.output], [t for i in fake.issued
                                         for t in (i.access_token, i.refresh_token)])
