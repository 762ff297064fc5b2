"""Signals against the real daemon: storms of SIGHUP, SIGTERM at the worst moments, core dumps.

What a signal may do to the daemon is bounded by how its handler is written: the handler only
sets a flag and the main loop is woken through ``signal.set_wakeup_fd``, so a signal landing
anywhere (inside a lock, inside another handler, inside a reload) can neither deadlock the main
thread nor recurse. Every case here ends with SIGTERM and an exit status of 0 within 10 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qwen_refresher import service
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.adversarial.registry import case
from tests.harness import (
    ROOT,
    DaemonProcess,
    OpenClawHome,
    seed_qwen_store,
    stop_within,
    wait_for,
)

STOP_WITHIN = 10.0




def no_crash(daemon: DaemonProcess) -> None:
    text = daemon.output
    assert "Traceback" not in text and "RecursionError" not in text, text[-3000:]


def count(daemon: DaemonProcess, event: str) -> int:
    return sum(e.get("event") == event for e in daemon.events())


class ConfigDaemon(DaemonProcess):
    """The daemon with its margin from ``config`` alone (the harness's ``--margin`` flag would
    win over the file, and the file is what a reload reads)."""

    def __init__(self, home: OpenClawHome, fake: FakeQwen, config: Path) -> None:
        super().__init__(home, fake, "--config", str(config), margin=None)


@pytest.fixture
def quick() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=5)) as server:
        yield server


# --- reloads ---------------------------------------------------------------------------------

@case("signals-sighup-storm", "signals",
      "SIGHUPs sent without pause for two seconds (~10^5), landing inside handlers, locks "
      "and reloads.",
      "The handler only sets a flag (woken through set_wakeup_fd): reloads coalesce to one "
      "pending, the last one still runs, no deadlock or RecursionError.")
def test_a_sighup_storm_coalesces_and_the_last_reload_still_runs(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    seed_qwen_store(oc, fake, lifetime=40)
    config = tmp_path / "config.toml"
    config.write_text("margin = 1\n")
    with ConfigDaemon(oc, fake, config) as daemon:
        daemon.wait_event("started")
        pid = daemon.proc.pid
        sent, until = 0, time.monotonic() + 2
        while time.monotonic() < until:  # as fast as one process can: ~10^5 signals
            os.kill(pid, signal.SIGHUP)
            sent += 1
        config.write_text("margin = 39\n")
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: len(fake.refresh_requests()) == 1, 15,
                 "a refresh under the margin of the last reload", daemon)
        wait_for(lambda: count(daemon, "rotated") == 1, 5, "the rotation's log line", daemon)
        reloads = count(daemon, "reloaded")
        assert 1 <= reloads <= max(20, sent // 100), f"{reloads} reloads for {sent} SIGHUPs"
        assert daemon.proc.poll() is None
        stop_within(daemon)
    no_crash(daemon)


@case("signals-sigterm-during-reload", "signals",
      "SIGTERM while a reload is stuck reading config.toml (replaced by a FIFO no one writes).",
      "Reloads run off the main loop, which stays free to act on SIGTERM: the daemon exits 0 "
      "within 10 s.")
def test_sigterm_during_a_stuck_reload(oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    seed_qwen_store(oc, fake, lifetime=3600)
    config = tmp_path / "config.toml"
    config.write_text("margin = 60\n")
    with DaemonProcess(oc, fake, "--config", str(config)) as daemon:
        daemon.wait_event("started")
        config.unlink()
        os.mkfifo(config)
        daemon.signal(signal.SIGHUP)
        time.sleep(0.5)
        stop_within(daemon)


@case("signals-sigterm-during-refresh", "signals",
      "SIGTERM while a refresh request is in flight and the server takes 2.5 s to answer "
      "(it rotates the token when it answers).",
      "Shutdown waits, boundedly, for the answer: the daemon exits 0 within 10 s and the "
      "rotated tokens are kept (written, or journaled and written at the next start).")
def test_sigterm_during_a_refresh_keeps_the_rotated_tokens(oc: OpenClawHome,
                                                          fake: FakeQwen) -> None:
    quick = fake  # answers with hour-long tokens: the restart below has nothing due
    path = seed_qwen_store(oc, quick, lifetime=5)
    # Within the grace an in-flight request gets after stop (qwen.STOP_GRACE, 8 s).
    quick.inject("delay", delay=2.5)
    with DaemonProcess(oc, quick, margin="3") as daemon:
        wait_for(lambda: not quick.pending_faults, 15, "the refresh to reach the server",
                 daemon, interval=0.01)
        stop_within(daemon)
    (issued,) = quick.issued[1:]  # [0] is the seed: one refresh, and its answer arrived

    def stored() -> str:
        return str(json.loads(path.read_bytes())["profiles"]["qwen-portal:default"]["refresh"])

    with DaemonProcess(oc, quick, margin="3") as again:
        wait_for(lambda: stored() == issued.refresh_token, 10, "the rotated tokens", again)
        again.wait_event("started")
    assert quick.reuse_count == 0 and len(quick.refresh_requests()) == 1


@case("signals-sigterm-during-hook", "signals",
      "SIGTERM while on_rotate runs a command that would take five minutes (hook_timeout 120).",
      "Shutdown ends running hooks (their process group: SIGTERM, then SIGKILL) instead of "
      "waiting for their deadline: exit 0 within 10 s, no hook process left.")
def test_sigterm_during_a_hook(oc: OpenClawHome, quick: FakeQwen) -> None:
    marker = f"298.{random.randrange(10**8):08d}"
    seed_qwen_store(oc, quick, lifetime=5)
    env = oc.env(QWEN_REFRESHER_ON_ROTATE=f"echo in-hook; sleep {marker}",
                 QWEN_REFRESHER_HOOK_TIMEOUT="120")
    try:
        with DaemonProcess(oc, quick, margin="3", env=env) as daemon:
            wait_for(lambda: bool(_marked(marker)), 15, "the hook to start", daemon)
            stop_within(daemon)
            wait_for(lambda: not _marked(marker), 3, "the hook to be killed", daemon)
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def _marked(marker: str) -> list[int]:
    from tests.adversarial.test_hooks import marked_pids

    return marked_pids(marker)


# --- core dumps ------------------------------------------------------------------------------

@pytest.fixture
def core_dumps_allowed() -> Iterator[None]:
    """Start the daemon the way a shell with ``ulimit -c unlimited`` would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("the hard RLIMIT_CORE is 0 here: the daemon could not lower it visibly")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


@case("signals-core-dump", "signals",
      "The daemon crashes (SIGSEGV, SIGABRT, a debugger's gcore) started from a shell that "
      "allows core dumps: the dump would hold every token in memory.",
      "RLIMIT_CORE is set to 0 (soft and hard) at start-up and the unit says LimitCORE=0.")
def test_the_running_daemon_cannot_dump_core(oc: OpenClawHome, fake: FakeQwen,
                                            core_dumps_allowed: None) -> None:
    seed_qwen_store(oc, fake, lifetime=3600)
    with DaemonProcess(oc, fake) as daemon:
        daemon.wait_event("started")
        limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
        stop_within(daemon)
    line = next(x for x in limits.splitlines() if x.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"], line


def test_the_units_set_limit_core_to_zero() -> None:
    shipped = (ROOT / "systemd" / "qwen-refresher.service").read_text()
    rendered = service.render_unit(service.UnitParams(
        exec_start=("/usr/bin/qwen-refresher", "run"), environment=(),
        read_write_paths=(), installed=True, specifiers=False))
    for text in (shipped, rendered):
        assert re.search(r"^LimitCORE=0$", text, re.M), text


# --- the stress test -------------------------------------------------------------------------

class ForkServer:
    """Client of ``tests/adversarial/forkserver.py``: real daemons, forked from one warm
    interpreter (see there why). Each daemon is signalled by pid; its exit status and time
    come back from the server, which is its parent."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_REFRESHER_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.adversarial.forkserver"],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "READY"
        self.pids: dict[str, int] = {}
        self.exits: dict[int, tuple[int, float]] = {}
        self.cv = threading.Condition()
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, *rest = line.split()
            with self.cv:
                if kind == "pid":
                    self.pids[rest[0]] = int(rest[1])
                elif kind == "exit":
                    self.exits[int(rest[0])] = (int(rest[1]), float(rest[2]))
                self.cv.notify_all()

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        assert self.proc.stdin is not None
        with self.cv:
            self._next += 1
            ident = str(self._next)
            self.proc.stdin.write(json.dumps({"id": ident, "argv": argv, "env": env,
                                              "cwd": str(ROOT), "log": str(log)}) + "\n")
            self.proc.stdin.flush()
            assert self.cv.wait_for(lambda: ident in self.pids, 30), "fork server silent"
            return self.pids[ident]

    def wait_exit(self, pid: int, timeout: float) -> tuple[int, float] | None:
        with self.cv:
            self.cv.wait_for(lambda: pid in self.exits, timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        with self.cv:
            running = [pid for pid in self.pids.values() if pid not in self.exits]
        for pid in running:  # only a hung daemon of ours is left here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def _cycle(server: ForkServer, oc: OpenClawHome, fake: FakeQwen, log: Path,
           rng: random.Random) -> tuple[float, str]:
    """Start, wait for READY, a burst of ~20 SIGHUPs, SIGTERM; how long the stop took, and
    what went wrong (empty when nothing did)."""
    argv = ["run", "--token-url", fake.token_url, "--device-code-url", fake.device_code_url,
            "--margin", "60", "--jitter", "0", "--no-qwen-code"]
    pid = server.spawn(argv, oc.env(), log)

    def output() -> str:
        try:
            return log.read_text(errors="replace")
        except FileNotFoundError:  # the child has not opened it yet
            return ""

    deadline = time.monotonic() + 60
    while '"event": "started"' not in output():
        if pid in server.exits or time.monotonic() > deadline:
            return float("inf"), f"no start\n{output()[-3000:]}"
        time.sleep(0.01)
    for _ in range(rng.randrange(15, 26)):
        os.kill(pid, signal.SIGHUP)
        if rng.random() < 0.3:
            time.sleep(rng.random() / 500)
    time.sleep(rng.choice((0, 0, 0.001, 0.005, 0.02, 0.05)))
    sent = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    ended = server.wait_exit(pid, STOP_WITHIN + 5)
    if ended is None:
        return float("inf"), f"SIGTERM ignored\n{output()[-3000:]}"
    rc, at = ended
    took = at - sent
    text = output()
    if rc != 0 or took >= STOP_WITHIN or "Traceback" in text or '"critical"' in text:
        return took, f"exit {rc} after {took:.1f}s\n{text[-3000:]}"
    return took, ""


@case("signals-hup-term-stress", "signals",
      "100 cycles (500 with `--long`) of start / a burst of ~20 SIGHUPs / SIGTERM, four "
      "daemons at a time.",
      "No handler takes a lock or logs, reloads coalesce: every cycle exits 0 within 10 s.")
@pytest.mark.timeout(600)  # --long: ~0.3 s a cycle on two cores
def test_start_sighup_burst_sigterm_cycles(tmp_path: Path, fake: FakeQwen,
                                           request: pytest.FixtureRequest) -> None:
    default = "500" if request.config.getoption("--long") else "100"
    cycles = int(os.environ.get("SIGNAL_STRESS_CYCLES", default))
    parallel = 4
    homes = []
    for n in range(parallel):
        oc = OpenClawHome(tmp_path / f"d{n}")
        seed_qwen_store(oc, fake, lifetime=3600)
        homes.append(oc)
    failures: list[str] = []
    times: list[float] = []
    lock = threading.Lock()
    seed_value = random.randrange(2**32)
    server = ForkServer()

    def worker(n: int) -> None:
        rng = random.Random(seed_value + n)
        for i in range(n, cycles, parallel):
            took, problem = _cycle(server, homes[n], fake, tmp_path / f"cycle{i}.log", rng)
            with lock:
                times.append(took)
                if problem:
                    failures.append(f"cycle {i} (seed {seed_value}): {problem}")
            if problem:
                return

    began = time.monotonic()
    try:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(worker, range(parallel)))
    finally:
        server.close()
    elapsed = time.monotonic() - began
    print(f"\n{len(times)} cycles in {elapsed:.1f}s, slowest stop {max(times):.2f}s")
    assert not failures, failures[0]
    assert len(times) == cycles
