"""Reads are not events: what an idle daemon pays when something *reads* a store many times.

One real daemon, 5 OpenClaw agents x 2 qwen profiles, tokens living 6 h (nothing is due).
After start-up and a settle, two windows of the same length are measured, one after the other:

- ``reads``: ``cat`` runs on one store ``--reads`` times (1,000; ``--quick`` 100), then the
  benchmark waits ``--drain`` seconds (debounce and any scan it triggered);
- ``baseline``: the same daemon, idle, for exactly as long as the ``reads`` window took.

CPU (per-thread schedstat, ns) and context switches (voluntary + involuntary, summed over
``/proc/<pid>/task/*/status``) are read around each window; reads minus baseline is what the
reads cost. A read opens and closes the file (IN_OPEN, IN_CLOSE_NOWRITE); a watch that asks the
kernel only for writes, moves, creations and deletions is never woken by it.

    .venv/bin/python benchmarks/reads.py [--quick] [--reads 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SIX_HOURS, Daemon, Home, TimedFake, footer, header, sample, seed_stores, table

GOAL_SWITCHES = 200
GOAL_CPU_S = 0.05


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 reads (checks it works)")
    parser.add_argument("--reads", type=int, help="cat runs on one store (default 1000)")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--drain", type=float, default=1.0,
                        help="seconds after the last read still counted in the window")
    opts = parser.parse_args(argv)
    reads = opts.reads or (100 if opts.quick else 1000)
    header("reads: an idle daemon while a store is read (cat) many times",
           f"{reads} x `cat store`; 5 stores x 2 profiles; tokens live 6 h; "
           f"drain {opts.drain:g} s; baseline: same daemon idle for as long")
    with tempfile.TemporaryDirectory(prefix="qr-bench-reads-") as tmp, \
            TimedFake(lifetime=SIX_HOURS) as fake:
        home = Home(Path(tmp))
        seed_stores(home, fake, stores=5, per_store=2, expires_in=SIX_HOURS)
        target = home.store_path("main")
        with Daemon(home, fake) as daemon:
            if daemon.wait_event("started", 60) is None:
                print(f"daemon did not start:\n{daemon.tail()}")
                return 0
            time.sleep(opts.settle)
            r0 = sample(daemon.pid)
            for _ in range(reads):
                subprocess.run(["cat", str(target)], stdout=subprocess.DEVNULL, check=True,
                               timeout=10)
            read_span = time.monotonic() - r0.at
            time.sleep(opts.drain)
            r1 = sample(daemon.pid)
            b0 = sample(daemon.pid)
            time.sleep(max(r1.at - r0.at, 0.1))
            b1 = sample(daemon.pid)
            scans = daemon.count("store_found")
        refreshes = len(fake.refresh_requests())

    read_cpu = (r1.cpu_ns - r0.cpu_ns) / 1e9
    base_cpu = (b1.cpu_ns - b0.cpu_ns) / 1e9
    read_sw = r1.switches - r0.switches
    base_sw = b1.switches - b0.switches
    extra_sw = read_sw - base_sw
    extra_cpu = read_cpu - base_cpu
    per_1000 = 1000 / reads
    rows = [
        ("window length (reads + drain; baseline the same)",
         f"{r1.at - r0.at:.2f} s (reads took {read_span:.2f} s)", ""),
        ("daemon switches: reads window / baseline",
         f"{read_sw} ({r1.voluntary - r0.voluntary} vol) / {base_sw}", ""),
        ("daemon CPU: reads window / baseline",
         f"{read_cpu * 1000:.1f} ms / {base_cpu * 1000:.1f} ms", ""),
        (f"**cost of {reads} reads** (reads - baseline): switches",
         f"{extra_sw}", f"< {GOAL_SWITCHES * reads // 1000}"),
        (f"**cost of {reads} reads**: CPU", f"{extra_cpu:.3f} s",
         f"< {GOAL_CPU_S * reads / 1000:g} s"),
        ("scaled to 1,000 reads: switches; CPU",
         f"{extra_sw * per_1000:.0f}; {extra_cpu * per_1000:.3f} s", ""),
        ("stores found / refresh requests", f"{scans} / {refreshes}",
         "5 / 0"),
    ]
    table(rows)
    met = extra_sw * per_1000 < GOAL_SWITCHES and extra_cpu * per_1000 < GOAL_CPU_S
    print(f"goal < {GOAL_SWITCHES} switches and < {GOAL_CPU_S} s CPU per 1,000 reads: "
          f"{'MET' if met else 'MISSED'}")
    footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
