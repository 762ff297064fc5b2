"""Footprint at scale: start to ready, idle RSS, and idle wake-ups per minute per thread.

One daemon over ``--stores`` agents x 2 qwen profiles (tokens live 6 h: nothing is due),
each figure printed beside a baseline measured in the same run (``_baseline.py``):

* **start to ready**: spawn -> ``READY=1`` received on a notify socket of our own (systemd's
  protocol: the daemon sends it once the first scan is done and every family is planned),
  spawn -> the ``started`` log record, and spawn -> a ``state.json`` listing every profile
  with its planned refresh; ratio to the import floor (``python -c "import <the six card
  packages>"``), which no daemon built on them can beat. ``READY=1`` is also taken over
  ``--ready-runs`` starts (the first on an empty state dir, the others restarts over the
  state the one before left, as systemd's restarts find it) and given as their median with
  min and max, so one start on a busy shared machine does not make the figure: the
  baseline beside it is a median of ``--runs`` too;
* **idle RSS** (``VmRSS`` after a settle): ratio to the import floor's peak RSS. Run it with
  the interpreter of a clean ``pip install .`` venv (``--python`` is not needed: run this
  script with that interpreter; the daemon inherits it) so test-only packages do not count;
* **wake-ups per minute per thread** over an idle ``--window`` (context switches from
  ``/proc/<pid>/task/*/status``; a thread that blocks without a time-out shows 0). The
  daemon's only periodic wake-ups are meant to be its main-loop tick and the sweep.

    .venv/bin/python benchmarks/footprint.py [--quick] [--stores 1000] [--window 60]
    /tmp/clean-venv/bin/python benchmarks/footprint.py     # RSS without test packages
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from _baseline import Baseline, by_name, measure, ratio
from _common import (
    SIX_HOURS,
    Daemon,
    Home,
    TimedFake,
    fmt_s,
    footer,
    header,
    median,
    sample,
    seed_stores,
    table,
    thread_switches,
)

GOAL_READY_S = 1.0
GOAL_RSS_MB = 60.0


def _all_planned(home: Home, expected: int) -> bool:
    profiles = home.state_profiles()
    return profiles is not None and len(profiles) >= expected and all(
        p.get("next_refresh_at") is not None for p in profiles)


class ReadyListener:
    """A ``$NOTIFY_SOCKET`` (abstract namespace) that notes when ``READY=1`` arrives."""

    def __init__(self) -> None:
        name = f"qr-bench-notify-{uuid.uuid4().hex}"
        self.env_value = "@" + name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())
        self.sock.settimeout(0.5)
        self.ready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set() and self.ready_at is None:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if "READY=1" in data.decode(errors="replace").split("\n"):
                self.ready_at = time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _time_ready(home: Home, fake: TimedFake, extra: dict[str, str],
                timeout: float) -> list[float]:
    """One more start of the daemon over ``home``, timed from spawn to READY=1 received; []
    if it never came."""
    notify = ReadyListener()
    try:
        with Daemon(home, fake, env={**extra, "NOTIFY_SOCKET": notify.env_value}) as daemon:
            deadline = time.monotonic() + timeout
            while notify.ready_at is None and time.monotonic() < deadline and \
                    daemon.proc.poll() is None:
                time.sleep(0.01)
            return [] if notify.ready_at is None else [notify.ready_at - daemon.spawned_at]
    finally:
        notify.close()


def _ready_row(readies: list[float], wanted: int, profiles: int,
               floor: Baseline | None) -> tuple[str, str, str]:
    """Spawn -> READY=1: the median of the starts, with their spread."""
    name = f"**spawn -> READY=1** (sd_notify, received; {profiles} profiles)"
    if not readies:
        return name, "not received", f"< {GOAL_READY_S:g} s"
    mid = median(readies)
    spread = (f"; median of {len(readies)} starts, {fmt_s(min(readies))}-"
              f"{fmt_s(max(readies))}; first start {fmt_s(readies[0])}"
              if len(readies) > 1 else "")
    missing = f"; {wanted - len(readies)} never sent it" if len(readies) < wanted else ""
    return (name, f"{fmt_s(mid)} ({ratio(mid, floor)} the import floor{spread}{missing})",
            f"< {GOAL_READY_S:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="20 stores, 3 s window, 3 baseline runs: checks it works")
    parser.add_argument("--stores", type=int, help="agents x 2 profiles (default 1000)")
    parser.add_argument("--window", type=float, help="idle window, seconds (default 60)")
    parser.add_argument("--settle", type=float, help="after ready, seconds (default 5)")
    parser.add_argument("--runs", type=int, help="baseline runs (default 10)")
    parser.add_argument("--ready-runs", type=int,
                        help="starts timed to READY=1 (default 5; 1 with --quick)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the daemon (a what-if, e.g. "
                             "MALLOC_ARENA_MAX=2); the table says which")
    opts = parser.parse_args(argv)
    stores = opts.stores or (20 if opts.quick else 1000)
    window = opts.window or (3.0 if opts.quick else 60.0)
    settle = opts.settle if opts.settle is not None else (1.0 if opts.quick else 5.0)
    runs = opts.runs or (3 if opts.quick else 10)
    ready_runs = max(1, opts.ready_runs or (1 if opts.quick else 5))
    profiles = stores * 2
    extra = dict(item.split("=", 1) for item in opts.daemon_env)
    header("footprint: start to ready, idle RSS, idle wake-ups per thread",
           f"{stores} stores x 2 = {profiles} profiles, tokens live 6 h; idle window "
           f"{window:g} s after a {settle:g} s settle; interpreter {sys.executable}"
           + (f"; daemon env {extra}" if extra else ""))
    baselines = measure(runs)
    floor = by_name(baselines, "import floor")
    rows: list[tuple[str, str, str]] = [b.row() for b in baselines]
    per_thread: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-footprint-") as tmp, \
            TimedFake(lifetime=SIX_HOURS) as fake:
        home = Home(Path(tmp))
        seed_stores(home, fake, stores=stores, per_store=2, expires_in=SIX_HOURS)
        notify = ReadyListener()
        with Daemon(home, fake, env={**extra, "NOTIFY_SOCKET": notify.env_value}) as daemon:
            state_at: float | None = None
            cpu_ready: float | None = None
            deadline = time.monotonic() + opts.timeout
            while time.monotonic() < deadline and daemon.proc.poll() is None:
                if cpu_ready is None and daemon.count("started"):
                    cpu_ready = sample(daemon.pid).cpu  # within 20 ms of READY, not at state
                if state_at is None and _all_planned(home, profiles):
                    state_at = time.time()
                if cpu_ready is not None and state_at is not None:
                    break
                time.sleep(0.02)
            started = daemon.wait_event("started", 0.1)
            if started is None:
                notify.close()
                rows.append(("spawn -> ready (`started`)", f"> {opts.timeout:g} s (gave up)",
                              f"< {GOAL_READY_S:g} s"))
                table(rows)
                footer()
                return 0
            logged = float(started["_ts"]) - daemon.spawned_at
            if cpu_ready is None:
                cpu_ready = sample(daemon.pid).cpu
            notify.close()
            ready_row = len(rows)
            rows.append(("spawn -> the `started` log record (its own timestamp)",
                         f"{fmt_s(logged)} ({ratio(logged, floor)} the import floor)", ""))
            full = (state_at - daemon.spawned_at) if state_at else float("nan")
            rows.append(("spawn -> state.json lists every profile, each planned",
                         f"{fmt_s(full)} ({ratio(full, floor)} the import floor)", ""))
            rows.append(("daemon CPU by `started` (all threads, read when it arrived)",
                         f"{cpu_ready:.2f} s", ""))
            time.sleep(settle)
            before = sample(daemon.pid)
            threads0 = thread_switches(daemon.pid)
            time.sleep(window)
            after = sample(daemon.pid)
            threads1 = thread_switches(daemon.pid)
            span = after.at - before.at
            rss = after.rss_kb
            rows.append((f"**idle RSS** ({profiles} profiles)",
                         f"{rss / 1024:.1f} MB ({ratio(rss, floor, rss=True)} the import "
                         "floor's peak)", f"< {GOAL_RSS_MB:g} MB"))
            rows.append(("threads / open fds", f"{after.threads} / {after.fds}", ""))
            rows.append((f"idle CPU ({span:.0f} s window), per hour",
                         f"{(after.cpu_ns - before.cpu_ns) / 1e9 / span * 3600:.3f} s/h", ""))
            total = (after.switches - before.switches) / span * 60
            rows.append(("idle wake-ups per minute, all threads", f"{total:.1f} /min", ""))
            for tid in sorted(threads1):
                if tid not in threads0:
                    continue
                _, v1, i1 = threads1[tid]
                _, v0, i0 = threads0[tid]
                name = "main thread" if tid == daemon.pid else f"thread {tid}"
                per_thread.append((f"  {name}: wake-ups per minute",
                                   f"{((v1 - v0) + (i1 - i0)) / span * 60:.1f} /min", ""))
            rows.append(("refresh requests (nothing is due)", str(fake.ok), "0"))
        # The first start's READY=1, then restarts timed to READY=1 alone (each stopped then).
        readies = [notify.ready_at - daemon.spawned_at] if notify.ready_at is not None else []
        for _ in range(ready_runs - 1):
            readies += _time_ready(home, fake, extra, opts.timeout)
    rows.insert(ready_row, _ready_row(readies, ready_runs, profiles, floor))
    table(rows + per_thread)
    footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
