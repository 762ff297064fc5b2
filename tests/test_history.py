"""In-process tests of ``TokenHistory``: lineage links, observations, rejections, the newest
credentials, and the append-only lineage log on a real file (compacted on load)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qwen_refresher import history as history_module
from qwen_refresher.history import TokenHistory
from qwen_refresher.models import Credentials


def creds(n: int) -> Credentials:
    return Credentials(access=f"acc-{n}", refresh=f"ref-{n}", expires_ms=1_000 * n)


def test_links_lead_to_the_newest_token_of_a_lineage() -> None:
    h = TokenHistory()
    h.link("a", "b")
    h.link("b", "c")
    assert h.newest("a") == "c"
    assert h.newest("b") == "c"
    assert h.newest("c") == "c"
    assert h.is_superseded("a") and h.is_superseded("b")
    assert not h.is_superseded("c")
    assert h.links() == {"a": "b", "b": "c"}
    assert h.superseded() == ["a", "b"]


def test_a_self_link_is_ignored_and_a_cycle_does_not_hang() -> None:
    h = TokenHistory()
    h.link("a", "a")
    assert h.links() == {}
    h.link("a", "b")
    h.link("b", "a")  # a corrupted log could say this; following it must end
    assert h.newest("a") in {"a", "b"}
    assert h.heirs("a") == []


def test_heirs_follow_observations_then_lineage_nearest_first() -> None:
    h = TokenHistory()
    h.link("a", "b")
    h.observe("b", "x")  # a sibling's store replaced b with x
    h.link("x", "y")  # x itself rotated to y
    h.observe("y", "z")
    assert h.heirs("a") == ["y", "z"]
    assert h.heirs("z") == []
    h.observe("q", "q")
    assert h.heirs("q") == []


def test_remember_keeps_only_lineage_heads_and_their_issue_time() -> None:
    h = TokenHistory()
    h.remember("a", creds(1), issued_at=100.0)
    assert h.credentials("a") == creds(1)
    assert h.issued_at("a") == 100.0
    h.link("a", "b")
    h.remember("b", creds(2), issued_at=200.0)
    # a is superseded: its (dead) secret is dropped from memory the moment b is remembered
    assert h.credentials("a") is None
    assert h.issued_at("a") is None
    assert h.credentials("b") == creds(2)
    assert h.issued_at("b") == 200.0


def test_rejections_are_kept_and_reloadable() -> None:
    h = TokenHistory()
    assert h.rejection("a") is None
    h.reject("a", "invalid_grant")
    at, reason = h.rejection("a") or (0.0, "")
    assert reason == "invalid_grant" and at > 0
    other = TokenHistory()
    other.load_rejected(h.rejected())
    assert other.rejection("a") == (at, "invalid_grant")


def test_rejections_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_LINKS", 3)
    h = TokenHistory()
    for i in range(5):
        h.reject(f"fp{i}", "no")
    assert list(h.rejected()) == ["fp2", "fp3", "fp4"]


def test_the_log_is_append_only_private_and_survives_a_restart(tmp_path: Path) -> None:
    log = tmp_path / "lineage.log"
    h = TokenHistory(log)
    h.link("a", "b")
    h.link("a", "b")  # the same link again writes nothing
    h.observe("b", "c")
    assert log.read_text() == "a b\nobs b c\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    again = TokenHistory(log)
    again.load()
    assert again.newest("a") == "b"
    assert again.heirs("a") == ["c"]
    assert log.read_text() == "a b\nobs b c\n"  # nothing to compact: not rewritten


def test_load_compacts_the_log_to_the_newest_links(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_LINKS", 2)
    log = tmp_path / "lineage.log"
    log.write_text("a b\nb c\nc d\nnot a link line at all\nx x\nobs c q\n")
    h = TokenHistory(log)
    h.load()
    assert h.links() == {"b": "c", "c": "d"}  # the oldest link fell off the cap
    assert log.read_text() == "b c\nc d\nobs c q\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_links_in_memory_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_LINKS", 2)
    h = TokenHistory()
    h.link("a", "b")
    h.link("c", "d")
    h.link("e", "f")
    assert h.links() == {"c": "d", "e": "f"}


def test_each_lineage_keeps_its_newest_links_however_fast_another_churns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Links are bounded per lineage (``LINKS_PER_LINEAGE``), not only in all: a family
    rotated every 2 seconds stops adding memory, and does not push out the links of a family
    rotated once a day. A restart keeps the same links, and the log is compacted to them."""
    monkeypatch.setattr(history_module, "LINKS_PER_LINEAGE", 3)
    log = tmp_path / "lineage.log"
    h = TokenHistory(log)
    h.link("slow0", "slow1")
    for i in range(10):
        h.link(f"fast{i}", f"fast{i + 1}")
    kept = {"slow0": "slow1", "fast7": "fast8", "fast8": "fast9", "fast9": "fast10"}
    assert h.links() == kept
    assert h.newest("fast7") == "fast10" and h.newest("slow0") == "slow1"
    assert not h.is_superseded("fast6")  # beyond the bound: a lineage of its own now
    h.link("fast10", "fast11")  # the lineage goes on from where it was
    assert h.newest("fast8") == "fast11" and not h.is_superseded("fast7")
    again = TokenHistory(log)
    again.load()
    assert again.links() == h.links()
    assert len(log.read_text().splitlines()) == 4  # compacted: 12 lines were appended
    again.link("slow1", "slow2")
    again.link("x", "slow2")  # a token joining a lineage at its head: one lineage, one bound
    assert again.newest("x") == "slow2"
    again.link("slow2", "slow3")
    assert again.newest("slow0") == "slow3" and not again.is_superseded("x")


def test_a_running_daemon_compacts_its_log(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Appended to at every rotation, the log is rewritten as the links kept once it is
    ``LOG_GROWTH`` times longer (plus ``LOG_SLACK``), not only at start: it never grows to
    what ``load`` refuses to read (which would forget every lineage)."""
    monkeypatch.setattr(history_module, "LINKS_PER_LINEAGE", 2)
    monkeypatch.setattr(history_module, "LOG_SLACK", 3)
    log = tmp_path / "lineage.log"
    h = TokenHistory(log)
    h.observe("o1", "o2")
    for i in range(200):
        h.link(f"t{i}", f"t{i + 1}")
        lines = log.read_text().splitlines()
        assert len(lines) <= history_module.LOG_GROWTH * 3 + 3
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    again = TokenHistory(log)
    again.load()
    assert again.links() == h.links() == {"t198": "t199", "t199": "t200"}
    assert again.heirs("o1") == ["o2"]


def test_a_symlink_at_the_log_path_is_never_appended_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = tmp_path / "lineage.log"
    log.symlink_to(victim)
    h = TokenHistory(log)
    h.link("a", "b")  # in memory still
    assert h.newest("a") == "b"
    assert victim.read_text() == "precious\n"
    h.load()  # a symlink is not read either
    assert victim.read_text() == "precious\n"


def test_a_fifo_at_the_log_path_does_not_hang_load_or_link(tmp_path: Path) -> None:
    log = tmp_path / "lineage.log"
    os.mkfifo(log)
    h = TokenHistory(log)
    h.load()
    h.link("a", "b")
    assert h.newest("a") == "b"
