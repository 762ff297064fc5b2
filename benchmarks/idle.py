"""Idle cost: CPU seconds per hour and wake-ups per second with 10 profiles.

Two real daemons run side by side over the same window, so machine noise hits both alike:

- ``default``: 5 OpenClaw agents x 2 qwen profiles (10 families), tokens living 6 h, default
  settings (margin 15 min, sweep every 300 s, main loop tick 15 s): nothing is due, so this is
  the daemon's floor;
- ``fast sweep``: the same, with ``--sweep-interval 5``: the extra CPU it burns, divided by the
  sweeps it ran, is the cost of one sweep, which the per-hour figure of ``default`` then
  includes (12 sweeps an hour), because a short window may hold no sweep at all.

CPU is read from /proc/<pid>/stat (utime+stime, 10 ms ticks) and from the per-thread schedstat
run times (ns); wake-ups are voluntary + involuntary context switches summed over
/proc/<pid>/task/*/status, also broken down per thread.

    .venv/bin/python benchmarks/idle.py [--quick] [--duration 120]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    SIX_HOURS,
    Daemon,
    Home,
    TimedFake,
    footer,
    header,
    sample,
    seed_stores,
    table,
    thread_switches,
)

GOAL_CPU_PER_HOUR = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 s window instead of 120 s")
    parser.add_argument("--duration", type=float, help="measuring window, seconds")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the started event before measuring")
    parser.add_argument("--fast-sweep", type=float, default=5.0,
                        help="sweep interval of the second daemon, seconds")
    opts = parser.parse_args(argv)
    duration = opts.duration or (30.0 if opts.quick else 120.0)
    header("idle: CPU and wake-ups with 10 profiles (tokens live 6 h)",
           f"window {duration:.0f} s after {opts.settle:.0f} s settle; 5 stores x 2 profiles; "
           f"margin 900 s, jitter 60 s; daemon B --sweep-interval {opts.fast_sweep:g}")
    with tempfile.TemporaryDirectory(prefix="qr-bench-idle-") as tmp, \
            TimedFake(lifetime=SIX_HOURS) as fake:
        homes = {"default": Home(Path(tmp) / "a"), "fast sweep": Home(Path(tmp) / "b")}
        for home in homes.values():
            seed_stores(home, fake, stores=5, per_store=2, expires_in=SIX_HOURS)
        daemons = {
            "default": Daemon(homes["default"], fake),
            "fast sweep": Daemon(homes["fast sweep"], fake,
                                 args=["--sweep-interval", f"{opts.fast_sweep:g}"]),
        }
        try:
            started = {name: d.wait_event("started", 60) for name, d in daemons.items()}
            for name, ev in started.items():
                if ev is None:
                    print(f"daemon {name!r} did not start:\n{daemons[name].tail()}")
                    return 0
            start_cost = {name: sample(d.pid) for name, d in daemons.items()}
            time.sleep(opts.settle)
            phase = {name: _next_sweep(h) for name, h in homes.items()}
            w0 = time.time()
            before = {name: sample(d.pid) for name, d in daemons.items()}
            threads_before = {name: thread_switches(d.pid) for name, d in daemons.items()}
            time.sleep(duration)
            after = {name: sample(d.pid) for name, d in daemons.items()}
            threads_after = {name: thread_switches(d.pid) for name, d in daemons.items()}
            intervals = {"default": 300.0, "fast sweep": opts.fast_sweep}
            w1 = time.time()
            sweeps = {name: sweeps_in(phase[name], intervals[name], w0, w1)
                      for name, h in homes.items()}
        finally:
            for d in daemons.values():
                d.stop()
        refreshes = len(fake.refresh_requests())

    a0, a1 = before["default"], after["default"]
    b0, b1 = before["fast sweep"], after["fast sweep"]
    span = a1.at - a0.at
    base_cpu = (a1.cpu_ns - a0.cpu_ns) / 1e9
    fast_cpu = (b1.cpu_ns - b0.cpu_ns) / 1e9
    n_sweeps = max(sweeps["fast sweep"] - sweeps["default"], 0)
    per_sweep = (fast_cpu - base_cpu) / n_sweeps if n_sweeps else float("nan")
    base_per_hour = base_cpu / span * 3600
    # default's own window may or may not contain one of its 300 s sweeps
    base_minus_sweeps = base_cpu - sweeps["default"] * max(per_sweep, 0.0)
    per_hour = base_minus_sweeps / span * 3600 + 12 * max(per_sweep, 0.0)
    wake_a = (a1.switches - a0.switches) / span
    wake_b = (b1.switches - b0.switches) / span

    rows = [
        ("daemon CPU to start (default, at `started`)",
         f"{start_cost['default'].cpu:.2f} s", ""),
        ("RSS when idle (default)", f"{a1.rss_kb / 1024:.1f} MB", "< 60 MB"),
        ("threads / open fds (default)", f"{a1.threads} / {a1.fds}", ""),
        (f"CPU in the {span:.0f} s window (schedstat; stat ticks)",
         f"{base_cpu * 1000:.0f} ms; {(a1.cpu - a0.cpu) * 1000:.0f} ms", ""),
        ("idle CPU per hour, window extrapolated", f"{base_per_hour:.2f} s/h", "< 1 s/h"),
        ("CPU of one sweep of 10 profiles (B - A)",
         f"{per_sweep * 1000:.1f} ms ({n_sweeps} sweeps)", ""),
        ("idle CPU per hour incl. 12 sweeps/h", f"{per_hour:.2f} s/h", "< 1 s/h"),
        ("wake-ups/s (ctx switches, all threads)",
         f"{wake_a:.2f} /s ({a1.voluntary - a0.voluntary} vol + "
         f"{a1.involuntary - a0.involuntary} invol)", ""),
        (f"wake-ups/s with sweep every {opts.fast_sweep:g} s", f"{wake_b:.2f} /s", ""),
        ("refresh requests during the run", str(refreshes), "0"),
    ]
    table(rows)
    print()
    print("wake-ups per thread of the default daemon (switches/s in the window):")
    _per_thread(threads_before["default"], threads_after["default"], span)
    print(f"goal < {GOAL_CPU_PER_HOUR:g} s CPU per idle hour: "
          f"{'MET' if per_hour < GOAL_CPU_PER_HOUR else 'MISSED'}")
    footer()
    return 0


def _next_sweep(home: Home) -> float | None:
    """Sweeps are not logged, but ``state.json`` publishes ``daemon.next_sweep_at``."""
    try:
        doc = json.loads((home.our_state / "state.json").read_bytes())
        return float(doc["daemon"]["next_sweep_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweeps_in(phase: float | None, interval: float, w0: float, w1: float) -> int:
    """Sweeps in the wall-clock window [w0, w1]: the interval job fires at ``phase + k *
    interval``, and any published ``next_sweep_at`` is on that lattice (a sweep that changed
    nothing does not republish state.json, so the phase is read once)."""
    if phase is None:
        return 0
    return max(0, math.floor((w1 - phase) / interval) - math.ceil((w0 - phase) / interval) + 1)


def _per_thread(before: dict[int, tuple[str, int, int]],
                after: dict[int, tuple[str, int, int]], span: float) -> None:
    rows = []
    for tid, (name, vol, invol) in after.items():
        _, v0, i0 = before.get(tid, (name, 0, 0))
        rows.append(((vol - v0 + invol - i0) / span, tid, name))
    rows.sort(reverse=True)
    for rate, tid, name in rows:
        if rate > 0:
            print(f"  tid {tid:>7} {name:<16} {rate:6.2f} /s")
    quiet = sum(1 for rate, _, _ in rows if rate <= 0)
    print(f"  {quiet} other thread(s): no wake-up at all")


if __name__ == "__main__":
    sys.exit(main())
