"""Hostile hooks: a hook is the user's shell command, so anything a shell can do, it may do.

A hook that leaves a child behind holding our pipe, that ignores SIGTERM, that prints hundreds of
megabytes or terminal escape codes, and names (profile ids, agent directories) that are not
clean text. Each case runs real processes: the real daemon as a subprocess where the daemon is
the point, ``run_hook`` directly where the hook runner is.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_refresher import hooks
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.adversarial.registry import case
from tests.harness import (
    DaemonProcess,
    OpenClawHome,
    seed_qwen_store,
    stop_within,
    wait_for,
)

# --- helpers ---------------------------------------------------------------------------------

def marked_pids(marker: str) -> list[int]:
    """Live processes whose argv contains ``marker`` (a unique ``sleep`` duration); zombies,
    whose cmdline is empty, are dead already and not listed."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    """A ``sleep`` argument no other process uses; whatever still runs with it at the end of the
    test (a detached child the test planted on purpose) is killed by pid."""
    value = f"299.{secrets.randbelow(10**8):08d}"
    yield value
    for pid in marked_pids(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")




@pytest.fixture
def quick() -> Iterator[FakeQwen]:
    """Tokens due two seconds after they are issued (margin 3, lifetime 5)."""
    with FakeQwen(FakeQwenConfig(lifetime=5)) as server:
        yield server


# --- a hook's children -------------------------------------------------------------------------

@pytest.mark.parametrize("spawn", [
    pytest.param("setsid sleep {m} &", id="setsid"),
    pytest.param("sleep {m} &", id="same-group"),
])
@case("hooks-child-holds-stdout", "hooks",
      "on_rotate leaves a child (detached with setsid, or in its own group) that keeps the "
      "hook's stdout open for five minutes.",
      "The hook is over when its shell exits; the pipe is drained briefly, then closed, "
      "never waited on, so rotations and SIGTERM go on.")
def test_a_child_holding_the_hook_pipe_blocks_nothing(oc: OpenClawHome, quick: FakeQwen,
                                                      marker: str, spawn: str) -> None:
    seed_qwen_store(oc, quick, lifetime=5)
    env = oc.env(QWEN_REFRESHER_ON_ROTATE=f"echo reloaded; {spawn.format(m=marker)}")
    with DaemonProcess(oc, quick, margin="3", env=env) as daemon:
        first = daemon.wait_event("on_rotate_ok", timeout=15)
        assert marked_pids(marker), "the hook's child should still be running"
        # The family is not held: the next rotation (due ~2 s later) runs its hook too.
        wait_for(lambda: sum(e.get("event") == "on_rotate_ok" for e in daemon.events()) >= 2,
                 15, "a second rotation and hook", daemon)
        assert first["command"].startswith("echo reloaded")
        stop_within(daemon)


@case("hooks-ignores-sigterm", "hooks",
      "A hook that traps SIGTERM and has a background child ignoring it runs past hook_timeout.",
      "At the deadline the whole process group gets SIGTERM (output still read), then SIGKILL; "
      "nothing of it survives.")
def test_a_hook_past_its_deadline_gets_sigterm_then_its_group_sigkill(marker: str) -> None:
    command = (f"trap 'echo got-term' TERM; (trap '' TERM; exec sleep {marker}) & "
               f"echo started; while :; do sleep 0.05; done")
    started = time.monotonic()
    result = hooks.run_hook(command, {}, timeout=1.0)
    took = time.monotonic() - started
    assert result.timed_out and result.returncode is None
    assert "started" in result.output and "got-term" in result.output, result.output
    assert took < 1.0 + hooks.TERM_GRACE + 1.5, f"took {took:.1f}s"
    wait_for(lambda: not marked_pids(marker), 2, "the background child to be killed")


@case("hooks-output-flood", "hooks",
      "on_rotate prints 400 MB to stdout.",
      "Output is read in chunks and only the last 64 KiB kept: the daemon's peak RSS grows by "
      "less than 50 MB and the logged tail stays short.")
def test_a_hook_printing_400_mb_does_not_grow_the_daemon(oc: OpenClawHome,
                                                         quick: FakeQwen) -> None:
    seed_qwen_store(oc, quick, lifetime=5)
    flood = "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 400000000; echo; echo flood-end"
    env = oc.env(QWEN_REFRESHER_ON_ROTATE=flood, QWEN_REFRESHER_HOOK_TIMEOUT="60")
    with DaemonProcess(oc, quick, margin="3", env=env) as daemon:
        daemon.wait_event("started")
        before = vm_kib(daemon.proc.pid, "VmHWM")
        event = daemon.wait_event("on_rotate_ok", timeout=60)
        grown = vm_kib(daemon.proc.pid, "VmHWM") - before
        assert grown < 50 * 1024, f"peak RSS grew by {grown // 1024} MiB"
        assert len(json.dumps(event)) < 4096
        stop_within(daemon)


def test_the_output_tail_keeps_the_end_of_a_big_output() -> None:
    result = hooks.run_hook("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo the-end",
                            {}, timeout=30)
    assert result.ok and result.output.endswith("the-end"), result.output[-100:]
    assert len(result.output) <= 500


@case("hooks-output-terminal-escapes", "hooks",
      "A hook prints terminal escape codes (clear screen, retitle, OSC 8 links) that the log "
      "would pass to the operator's terminal.",
      "Control characters in the logged output are shown as visible escapes (\\x1b, \\t); "
      "lines stay lines.")
def test_hook_output_cannot_reach_the_terminal_raw() -> None:
    result = hooks.run_hook(r"printf 'a\033[2J\033]0;owned\007\tb\nc\233d\n'", {}, timeout=10)
    assert result.ok
    assert result.output == "a\\x1b[2J\\x1b]0;owned\\x07\\tb\nc\\x9bd", repr(result.output)
    assert not any(ord(c) < 32 and c != "\n" for c in result.output)


# --- names that are not clean text ------------------------------------------------------------

NAMES = {
    "PROFILE": "qwen-portal:\ud800lone",                          # a JSON "\ud800" in the store
    "STORE": os.fsdecode(b"/home/u/.openclaw/agents/ag\xffent/agent/auth-profiles.json"),
    "EVENT": "rotated\x1b]0;pwned\x07\x1b[31m",                   # terminal escapes
    "PROFILES": "/a#x\n/b#\x9b1m",                                  # the list keeps its \n
}
ESCAPED = {
    "PROFILE": "qwen-portal:\\ud800lone",
    "STORE": "/home/u/.openclaw/agents/ag\\xffent/agent/auth-profiles.json",
    "EVENT": "rotated\\x1b]0;pwned\\x07\\x1b[31m",
    "PROFILES": "/a#x\n/b#\\x9b1m",
}


@case("hooks-names-not-text", "hooks",
      "A profile id with a lone surrogate, an agent directory that is not UTF-8 and an id with "
      "terminal escapes reach the hook's environment.",
      "Every variable is escaped to printable UTF-8 (\\ud800, \\xff, \\x1b) before the hook "
      "starts; the hook runs and sees the escaped names.")
def test_hook_names_that_are_not_text_are_escaped(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    command = ('printf "%s\\0" "$QWEN_REFRESHER_PROFILE" "$QWEN_REFRESHER_STORE" '
               f'"$QWEN_REFRESHER_EVENT" "$QWEN_REFRESHER_PROFILES" > {out}')
    result = hooks.run_hook(command, NAMES, timeout=10)
    assert result.ok, result.output
    seen = out.read_bytes().split(b"\0")[:-1]
    assert seen == [ESCAPED[k].encode() for k in ("PROFILE", "STORE", "EVENT", "PROFILES")]


@case("hooks-runner-names-not-text", "hooks",
      "The same names go to systemd-run, which refuses a --setenv value that is not UTF-8 or "
      "holds control characters.",
      "runner_argv passes the escaped values: every argument is valid UTF-8 without control "
      "characters (but the PROFILES newline).")
def test_runner_argv_with_names_that_are_not_text() -> None:
    argv = hooks.runner_argv(("systemd-run", "--user"), "true", NAMES, timeout=5, unit="u",
                             environ={"PATH": "/usr/bin", "BAD": os.fsdecode(b"\xff")})
    for arg in argv:
        arg.encode("utf-8")  # raises on a surrogate
        assert not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) < 0xa0 for c in arg), arg
    assert "--setenv=QWEN_REFRESHER_PROFILE=qwen-portal:\\ud800lone" in argv
    assert "--setenv=BAD" not in argv  # ours, by name: not passable, left out as before
