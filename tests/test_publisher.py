"""``runtime.publisher``: the coalesced ``state.json`` writes, on real threads and real files.

The writes are made by one long-lived thread: a ``threading.Timer`` per write started ~8
threads a second under token churn, and their births and deaths fragmented the heap (issue 16).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from qwen_refresher.config import Settings, load_settings
from qwen_refresher.history import TokenHistory
from qwen_refresher.runtime.memory import Memory
from qwen_refresher.runtime.publisher import PUBLISH_DELAY, Publisher
from qwen_refresher.state import STATE_FILE

DEADLINE = 5.0


class Recording(Publisher):
    """The real publisher, noting which thread made each write and failing on request."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(Memory(), TokenHistory(), log=structlog.get_logger(),
                         settings=lambda: settings, hooks=dict, next_sweep=lambda: None)
        self.settings = settings
        self.writers: list[int] = []
        self.wrote = threading.Semaphore(0)
        self.fail_next = False

    def publish_now(self, *, force: bool = False) -> None:
        self.writers.append(threading.get_native_id())
        if self.fail_next:
            self.fail_next = False
            self.wrote.release()
            raise RuntimeError("disk on fire")
        super().publish_now(force=True)  # every write lands: the digest is not under test
        self.wrote.release()

    def wait_write(self) -> None:
        assert self.wrote.acquire(timeout=DEADLINE), "no state.json write within the deadline"


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Recording]:
    settings = load_settings(env={"HOME": str(tmp_path),
                                  "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    pub = Recording(settings)
    yield pub
    pub.close()


def test_every_write_is_made_by_one_thread_however_many_there_are(
        publisher: Recording) -> None:
    for _ in range(20):
        publisher.publish()
        publisher.wait_write()
    # A timer per write would have been 20 threads, each with its own (never reused) TID.
    assert len(publisher.writers) == 20
    assert len(set(publisher.writers)) == 1
    assert publisher.writers[0] != threading.get_native_id()  # not the caller's thread


def test_a_burst_of_changes_is_one_write_after_the_delay(publisher: Recording) -> None:
    started = time.monotonic()
    for _ in range(200):
        publisher.publish()
    publisher.wait_write()
    assert time.monotonic() - started >= PUBLISH_DELAY * 0.9
    time.sleep(5 * PUBLISH_DELAY)
    assert len(publisher.writers) == 1
    state = json.loads((publisher.settings.state_dir / STATE_FILE).read_text())
    assert state["daemon"]["pid"] > 0


def test_a_failed_write_is_logged_and_the_next_change_is_written(
        publisher: Recording) -> None:
    publisher.fail_next = True
    with capture_logs() as logs:
        publisher.publish()
        publisher.wait_write()
        publisher.publish()
        publisher.wait_write()
    assert len(publisher.writers) == 2 and len(set(publisher.writers)) == 1
    failed = [e for e in logs if e["event"] == "state_publish_failed"]
    assert len(failed) == 1 and "disk on fire" in failed[0]["error"]


def test_close_stops_the_thread_and_later_changes_write_nothing(publisher: Recording) -> None:
    publisher.publish()
    publisher.wait_write()
    thread = publisher._thread
    assert thread is not None and thread.is_alive()
    publisher.close()
    assert not thread.is_alive()
    publisher.publish()
    assert not publisher.wrote.acquire(timeout=5 * PUBLISH_DELAY)
    assert len(publisher.writers) == 1


def test_close_drops_a_pending_write_at_once(publisher: Recording) -> None:
    publisher.publish()  # due in PUBLISH_DELAY; closed before
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < PUBLISH_DELAY
    assert not publisher.wrote.acquire(timeout=3 * PUBLISH_DELAY)
    assert publisher.writers == []
