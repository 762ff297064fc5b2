"""Hostile file-system fixtures against the real daemon: files that are not plain files, symlinked
and foreign-owned directories, a tampered state dir, stores found wider than 0600.

Every daemon case keeps a healthy agent beside the attacked file and asserts that the healthy
agent keeps being refreshed, that the attacked file is byte-identical afterwards, that no token
shows in the output, and that SIGTERM ends the daemon within 10 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.adversarial.registry import case
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_store_doc,
    stop_within,
    wait_for,
)

NOBODY = 65534
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")


@pytest.fixture
def fast() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=6)) as server:
        yield server



def healthy(oc: OpenClawHome, fake: FakeQwen) -> Path:
    """The main agent's store, due every few seconds: the profile that must keep being served."""
    return oc.write_store(qwen_store_doc(fake, 6), agent="main")


def refreshes_of(fake: FakeQwen, path: Path) -> Callable[[], int]:
    """How many times the lineage of the store at ``path`` has been refreshed so far."""
    start = json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"]

    def count() -> int:
        successor = {i.replaced: i.refresh_token for i in fake.issued if i.replaced}
        n, token = 0, start
        while token in successor:
            n += 1
            token = successor[token]
        return n

    return count


def keeps_refreshing(daemon: DaemonProcess, fake: FakeQwen, path: Path, times: int = 2) -> None:
    count = refreshes_of(fake, path)
    wait_for(lambda: count() >= times, 40, f"{times} refreshes of the healthy store", daemon)



def events(daemon: DaemonProcess, name: str) -> list[dict[str, object]]:
    return [e for e in daemon.events() if e.get("event") == name]


def never_sent(fake: FakeQwen, token: str) -> None:
    assert all(r.refresh_token != token for r in fake.refresh_requests()), \
        "the attacked store's refresh token was sent to the server"


# -- openclaw.json that is not a config --------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _huge(path: Path) -> None:
    pad = "x" * 1000
    with path.open("w") as fh:
        fh.write('{"agents": {"list": [')
        fh.write(",".join(f'{{"id": "a{i}", "pad": "{pad}"}}' for i in range(20_000)))
        fh.write("]}}\n")


def _deep(path: Path) -> None:
    path.write_text('{"agents": {"list": [{"agentDir": "/x", "deep": '
                    + "[" * 60 + "]" * 60 + "}]}}\n")


CONFIG_ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (_fifo, "fifo"),
    "huge": (_huge, "bytes"),
    "deep": (_deep, "deep"),
}


@case("files-openclaw-json-fifo", "files",
      "openclaw.json is a FIFO with no writer",
      "opened O_NONBLOCK and fstat-checked: one error naming the file and its type, "
      "start-up goes on")
@case("files-openclaw-json-huge", "files",
      "openclaw.json is 20 MB",
      "size capped before parsing: one error naming the file and its size, no minutes of parsing")
@case("files-openclaw-json-deep", "files",
      "openclaw.json nests 60 levels (the JSON5 parser recurses)",
      "depth counted before parsing: one error naming the file, no RecursionError crash")
@pytest.mark.parametrize("attack", sorted(CONFIG_ATTACKS))
def test_a_hostile_openclaw_json_gives_one_error_at_start_up(
        attack: str, oc: OpenClawHome, fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    config = oc.state / "openclaw.json"
    build, expect = CONFIG_ATTACKS[attack]
    build(config)
    before = config.read_bytes() if attack != "fifo" else b""
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        keeps_refreshing(daemon, fast, good)
        errors = events(daemon, "openclaw_config_unusable")
        assert len(errors) == 1, daemon.output[-3000:]
        assert "openclaw.json" in str(errors[0]["file"])
        assert expect in str(errors[0]["error"])
        stop_within(daemon)
    if attack != "fifo":
        assert config.read_bytes() == before
    else:
        assert stat.S_ISFIFO(config.lstat().st_mode)
    assert_no_secrets([daemon.output], all_tokens(fast))


@case("files-openclaw-json-fifo-on-reload", "files",
      "openclaw.json is swapped for a FIFO, then the daemon gets SIGHUP",
      "reload reads it with the same non-blocking reader: one error, the daemon keeps serving")
def test_a_fifo_openclaw_json_on_reload(oc: OpenClawHome, fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    config = oc.state / "openclaw.json"
    config.write_text('{"agents": {"list": []}}\n')
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        config.unlink()
        _fifo(config)
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded", timeout=10)
        wait_for(lambda: len(events(daemon, "openclaw_config_unusable")) >= 1, 10,
                 "the config error", daemon)
        keeps_refreshing(daemon, fast, good, times=2)
        assert len(events(daemon, "openclaw_config_unusable")) == 1
        stop_within(daemon)


@case("files-openclaw-json-symlink-to-fifo", "files",
      "openclaw.json is a symlink (as dotfile managers make it) to a FIFO with no writer",
      "the symlink is followed as OpenClaw follows it, and its target gets the same "
      "non-blocking, type- and size-checked read: one error naming openclaw.json")
def test_a_symlinked_openclaw_json_to_a_fifo_gives_one_error(
        oc: OpenClawHome, fast: FakeQwen, tmp_path: Path) -> None:
    good = healthy(oc, fast)
    fifo = tmp_path / "dotfiles" / "openclaw.json"
    fifo.parent.mkdir()
    _fifo(fifo)
    config = oc.state / "openclaw.json"
    config.symlink_to(fifo)
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        keeps_refreshing(daemon, fast, good)
        errors = events(daemon, "openclaw_config_unusable")
        assert len(errors) == 1, daemon.output[-3000:]
        assert str(errors[0]["file"]).endswith("openclaw.json")
        assert "fifo" in str(errors[0]["error"])
        stop_within(daemon)
    assert config.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert_no_secrets([daemon.output], all_tokens(fast))


# -- symlinked and foreign-owned directories ---------------------------------------------------


@case("files-agent-dir-symlink", "files",
      "an agent directory is a symlink to a directory elsewhere holding someone's store",
      "every directory between OpenClaw's state dir and the store is checked like the store "
      "itself: refused, never read, locked or written")
def test_a_symlinked_agent_dir_is_refused(oc: OpenClawHome, fast: FakeQwen,
                                          tmp_path: Path) -> None:
    good = healthy(oc, fast)
    outside = tmp_path / "victim" / "agent"
    victim = oc.write_store(qwen_store_doc(fast, 5), path=outside / "auth-profiles.json")
    victim_refresh = json.loads(victim.read_bytes())["profiles"]["qwen-portal:default"]["refresh"]
    before = victim.read_bytes()
    (oc.state / "agents" / "evil").mkdir(parents=True)
    (oc.state / "agents" / "evil" / "agent").symlink_to(outside)
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        keeps_refreshing(daemon, fast, good, times=3)
        bad = [e for e in events(daemon, "store_invalid") if "evil" in str(e.get("store"))]
        assert len(bad) == 1, daemon.output[-3000:]
        assert "symlink" in str(bad[0]["error"])
        assert "agents/evil/agent" in str(bad[0]["error"]), "the error names the directory"
        stop_within(daemon)
    never_sent(fast, victim_refresh)
    assert victim.read_bytes() == before
    assert sorted(p.name for p in outside.iterdir()) == ["auth-profiles.json"]


@needs_root
@case("files-agent-dir-foreign-owner", "files",
      "an agent directory is owned by another user, who can swap the store for a symlink",
      "directories between the state dir and the store must be ours (or root's): refused, "
      "named with its owner")
def test_an_agent_dir_owned_by_another_user_is_refused(oc: OpenClawHome,
                                                       fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    attacked = oc.write_store(qwen_store_doc(fast, 5), agent="other")
    attacked_refresh = json.loads(attacked.read_bytes())["profiles"]["qwen-portal:default"][
        "refresh"]
    before = attacked.read_bytes()
    os.chown(attacked.parent, NOBODY, NOBODY)
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        keeps_refreshing(daemon, fast, good, times=3)
        bad = [e for e in events(daemon, "store_invalid") if "other" in str(e.get("store"))]
        assert len(bad) == 1, daemon.output[-3000:]
        assert f"uid {NOBODY}" in str(bad[0]["error"])
        stop_within(daemon)
    never_sent(fast, attacked_refresh)
    assert attacked.read_bytes() == before


# -- our own state dir ---------------------------------------------------------------------------


def run_to_exit(oc: OpenClawHome, fake: FakeQwen) -> tuple[int, str]:
    with DaemonProcess(oc, fake) as daemon:
        try:
            rc = daemon.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon did not refuse its state dir within 10 s\n"
                                 + daemon.output[-3000:]) from None
        daemon._reader.join(5)
        return rc, daemon.output


@needs_root
@case("files-state-dir-foreign-owner", "files",
      "our state dir is owned by another user (who could plant symlinks in it)",
      "refused at start-up with exit 78 and one error naming the dir and its owner")
def test_a_state_dir_owned_by_another_user_is_refused(oc: OpenClawHome,
                                                      fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    before = good.read_bytes()
    oc.our_state.mkdir(mode=0o700)
    os.chown(oc.our_state, NOBODY, NOBODY)
    rc, output = run_to_exit(oc, fast)
    assert rc == 78, output[-3000:]
    assert str(oc.our_state) in output and f"uid {NOBODY}" in output
    assert good.read_bytes() == before
    assert list(oc.our_state.iterdir()) == []


@case("files-state-dir-too-wide", "files",
      "our state dir is group- and world-writable (0777)",
      "refused at start-up with exit 78 and one error naming the dir, its mode and the exact "
      "chmod that fixes it")
def test_a_state_dir_wider_than_0700_is_refused(oc: OpenClawHome, fast: FakeQwen) -> None:
    healthy(oc, fast)
    oc.our_state.mkdir()
    os.chmod(oc.our_state, 0o777)
    rc, output = run_to_exit(oc, fast)
    assert rc == 78, output[-3000:]
    assert str(oc.our_state) in output and "0777" in output
    assert f"`chmod 700 {oc.our_state}`" in output
    assert list(oc.our_state.iterdir()) == []


@case("files-state-dir-readable-by-others", "files",
      "our own state dir is 2755 (mkdir -p under umask 022 on a setgid volume): readable, "
      "but writable by nobody else",
      "nobody else could have planted anything: tightened to 0700 with one warning naming "
      "the dir and its old mode, and the daemon serves")
def test_our_state_dir_readable_by_others_is_tightened(oc: OpenClawHome,
                                                       fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    oc.our_state.mkdir()
    os.chmod(oc.our_state, 0o2755)
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        keeps_refreshing(daemon, fast, good, times=1)
        warned = events(daemon, "state_dir_mode_tightened")
        assert len(warned) == 1, daemon.output[-3000:]
        assert warned[0]["old_mode"] == "2755" and warned[0]["state_dir"] == str(oc.our_state)
        assert stat.S_IMODE(oc.our_state.stat().st_mode) == 0o700
        stop_within(daemon)
    assert_no_secrets([daemon.output], all_tokens(fast))


STATE_NAMES = ("state.json", "journal.json", "lineage.log", "salt", "daemon.lock")


@case("files-state-symlinks-at-start", "files",
      "state.json, journal.json, lineage.log, salt and daemon.lock are planted symlinks to a "
      "victim file",
      "every state file is opened O_NOFOLLOW: start-up refused with exit 78 naming the file, "
      "the victim untouched")
@pytest.mark.parametrize("name", STATE_NAMES)
def test_planted_symlinks_in_the_state_dir_refuse_start_up(
        name: str, oc: OpenClawHome, fast: FakeQwen, tmp_path: Path) -> None:
    healthy(oc, fast)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    oc.our_state.mkdir(mode=0o700)
    (oc.our_state / name).symlink_to(victim)
    rc, output = run_to_exit(oc, fast)
    assert rc == 78, output[-3000:]
    assert name in output and "symlink" in output
    assert victim.read_bytes() == b"precious\n"


@case("files-state-fifo-at-start", "files",
      "journal.json, lineage.log or salt in our state dir is a FIFO",
      "read non-blocking and type-checked: start-up refused with exit 78 within seconds, no hang")
@pytest.mark.parametrize("name", ("journal.json", "lineage.log", "salt", "state.json"))
def test_fifos_in_the_state_dir_refuse_start_up(name: str, oc: OpenClawHome,
                                                fast: FakeQwen) -> None:
    healthy(oc, fast)
    oc.our_state.mkdir(mode=0o700)
    os.mkfifo(oc.our_state / name, 0o600)
    rc, output = run_to_exit(oc, fast)
    assert rc == 78, output[-3000:]
    assert name in output and "fifo" in output


@case("files-state-symlinks-while-running", "files",
      "while the daemon runs, state.json, journal.json and lineage.log are replaced by symlinks "
      "to a victim file",
      "temp file with O_EXCL then rename, appends with O_NOFOLLOW: the victim is never "
      "truncated or appended to")
def test_symlinks_planted_while_running_never_reach_the_victim(
        oc: OpenClawHome, fast: FakeQwen, tmp_path: Path) -> None:
    good = healthy(oc, fast)
    victims = {}
    with DaemonProcess(oc, fast) as daemon:
        daemon.wait_event("started", timeout=30)
        keeps_refreshing(daemon, fast, good, times=1)
        for name in ("state.json", "journal.json", "lineage.log"):
            victim = tmp_path / f"victim-{name}"
            victim.write_bytes(b"precious " + name.encode() + b"\n")
            victims[victim] = victim.read_bytes()
            planted = oc.our_state / name
            if os.path.lexists(planted):
                planted.unlink()
            planted.symlink_to(victim)
        keeps_refreshing(daemon, fast, good, times=3)
        stop_within(daemon)
    for victim, data in victims.items():
        assert victim.read_bytes() == data, f"{victim.name} was written through a symlink"
    assert_no_secrets([daemon.output], all_tokens(fast))


# -- credentials never wider than 0600 ---------------------------------------------------------


@case("files-store-found-0644", "files",
      "a store holding tokens is found world-readable (0644), twice",
      "every write makes it 0600 as OpenClaw does, and the daemon warns once naming the file "
      "and the old mode")
def test_a_store_found_0644_is_written_0600_with_one_warning(oc: OpenClawHome,
                                                             fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    os.chmod(good, 0o644)
    count = refreshes_of(fast, good)
    with DaemonProcess(oc, fast) as daemon:
        wait_for(lambda: count() >= 1, 20, "the first rotation", daemon)
        wait_for(lambda: stat.S_IMODE(good.stat().st_mode) == 0o600, 5, "mode 0600", daemon)
        os.chmod(good, 0o644)
        wait_for(lambda: count() >= 3, 25, "two more rotations", daemon)
        wait_for(lambda: stat.S_IMODE(good.stat().st_mode) == 0o600, 5, "mode 0600 again",
                 daemon)
        warnings = events(daemon, "store_mode_tightened")
        assert len(warnings) == 1, daemon.output[-3000:]
        assert warnings[0]["old_mode"] == "0644"
        assert "auth-profiles.json" in str(warnings[0]["store"])
        stop_within(daemon)
    assert_no_secrets([daemon.output], all_tokens(fast))


@needs_root
@case("files-store-foreign-owner-kept", "files",
      "a store belongs to another user and the daemon runs as root",
      "the owner is kept on the replacement file (fchown before the rename), never changed")
def test_a_store_owned_by_another_user_keeps_its_owner(oc: OpenClawHome,
                                                       fast: FakeQwen) -> None:
    good = healthy(oc, fast)
    os.chown(good, NOBODY, NOBODY)
    count = refreshes_of(fast, good)
    with DaemonProcess(oc, fast) as daemon:
        wait_for(lambda: count() >= 2, 25, "two rotations", daemon)
        stop_within(daemon)
    st = good.stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(st.st_mode) == 0o600


@case("files-store-owner-cannot-be-kept", "files",
      "a store owned by root sits in the user's directory and the daemon runs as that user",
      "refused before any refresh with an error naming the owner: its owner is never silently "
      "changed")
def test_an_owner_that_cannot_be_kept_is_an_error() -> None:
    from qwen_refresher.errors import OwnershipError
    from qwen_refresher.fileio import owner_to_keep

    path = Path("/home/u/.openclaw/agents/main/agent/auth-profiles.json")
    user = {"euid": 1000, "egid": 1000, "groups": {1000, 27}}
    assert owner_to_keep(path, 1000, 1000, **user) is None  # type: ignore[arg-type]
    assert owner_to_keep(path, 0, 0, euid=0, egid=0, groups={0}) is None
    assert owner_to_keep(path, 1000, 1000, euid=0, egid=0, groups={0}) == (1000, 1000)
    assert owner_to_keep(path, 1000, 27, **user) == (1000, 27)  # type: ignore[arg-type]
    with pytest.raises(OwnershipError) as info:
        owner_to_keep(path, 0, 0, **user)  # type: ignore[arg-type]
    assert "uid 0" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(OwnershipError):
        owner_to_keep(path, 1000, 0, **user)  # type: ignore[arg-type]


@needs_root
@case("files-store-root-owned-run-as-user", "files",
      "the daemon runs as an ordinary user and a store in that user's dir is owned by root",
      "the store is refused with one error naming its owner; the user's other store keeps "
      "being refreshed")
def test_a_root_owned_store_is_refused_by_a_daemon_running_as_a_user(fast: FakeQwen) -> None:
    base = Path(tempfile.mkdtemp(prefix="qr-as-user-", dir="/tmp"))
    try:
        run_as_nobody_beside_a_root_owned_store(base, fast)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_as_nobody_beside_a_root_owned_store(base: Path, fast: FakeQwen) -> None:
    os.chmod(base, 0o755)
    oc = OpenClawHome(base)
    good = healthy(oc, fast)
    attacked = oc.write_store(qwen_store_doc(fast, 5), agent="rooted")
    os.chmod(attacked, 0o644)  # readable by the user: the danger is the write
    before = attacked.read_bytes()
    for dirpath, _dirs, files in os.walk(oc.home):
        os.chown(dirpath, NOBODY, NOBODY)
        for name in files:
            if Path(dirpath, name) != attacked:
                os.chown(Path(dirpath, name), NOBODY, NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import qwen_refresher"],
                           cwd=ROOT, capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the venv is not usable by nobody here")
    env = oc.env(QWEN_REFRESHER_STATE_DIR=str(oc.home / "state"),
                 XDG_CONFIG_HOME=str(oc.home / "xdg-config"),
                 XDG_STATE_HOME=str(oc.home / "xdg-state"))
    with DaemonProcess(oc, fast, env=env, prefix=as_nobody) as daemon:
        daemon.wait_event("started", timeout=20)
        keeps_refreshing(daemon, fast, good, times=2)
        bad = [e for e in events(daemon, "store_invalid") if "rooted" in str(e.get("store"))]
        assert len(bad) == 1, daemon.output[-3000:]
        assert "uid 0" in str(bad[0]["error"])
        stop_within(daemon)
    assert attacked.read_bytes() == before
    assert attacked.stat().st_uid == 0
