"""Resident memory after start and across 20,000 refreshes (goal: < 60 MB, flat).

The real daemon manages 20 OpenClaw agents x 2 qwen profiles (40 families). The fake Qwen
server hands out tokens that live ``--lifetime`` seconds (default 2) and the daemon runs with
``--margin 1 --jitter 0``, so every family is refreshed about once a second, without a pause,
until the fake has answered ``--refreshes`` refresh requests (default 20,000, ~9 minutes) or
the time budget runs out. VmRSS, CPU and the fake's answered-refresh count are sampled along
the way. "Flat" is judged on the second half of the run (``FLAT_KB_PER_1000``): the first
~4,000 refreshes fill the daemon's bounded tables, and glibc's heap takes ~10,000 to settle.

``--fast-redactor`` runs the same daemon with the cheap log redactor of
``benchmarks/_fast_redactor.py`` (a what-if for the redactor fix, not the shipped code).

    .venv/bin/python benchmarks/memory.py [--quick] [--fast-redactor] [--refreshes 10000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _baseline import by_name, measure, ratio
from _common import (
    Daemon,
    Home,
    ProcSample,
    TimedFake,
    footer,
    header,
    sample,
    seed_stores,
    table,
)

GOAL_RSS_MB = 60.0
#: "Flat": the trend over the second half of the run, once the daemon's bounded tables are
#: full (history's 64 links a lineage and last 4,096 links, the redactor's 62 s of tokens:
#: ~4,000 refreshes here) and the allocator has settled, under 1 MB per 10,000 refreshes.
FLAT_KB_PER_1000 = 100.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 refreshes, 90 s budget")
    parser.add_argument("--refreshes", type=int, help="target refreshes (default 20,000)")
    parser.add_argument("--budget", type=float, help="time budget, seconds (default 900)")
    parser.add_argument("--families", type=int, default=40, help="profiles (2 per store)")
    parser.add_argument("--lifetime", type=float, default=2.0, help="token lifetime, seconds")
    parser.add_argument("--margin", type=float, default=1.0, help="daemon --margin, seconds")
    parser.add_argument("--fast-redactor", action="store_true",
                        help="run the daemon with benchmarks/_fast_redactor.py")
    parser.add_argument("--every", type=float, default=2.0, help="sampling interval, seconds")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="the daemon's max_refresh_rate (default 1000/s: out of the way)")
    opts = parser.parse_args(argv)
    # The named baseline, in the same run: the import floor of the six card packages.
    floor = by_name(measure(3, openclaw=False), "import floor")
    target = opts.refreshes or (1000 if opts.quick else 20_000)
    budget = opts.budget or (90.0 if opts.quick else 900.0)
    variant = "fast redactor (what-if)" if opts.fast_redactor else "as shipped"
    header(f"memory: RSS after start and across {target:,} refreshes [{variant}]",
           f"{opts.families} profiles ({opts.families // 2} stores x 2), token lifetime "
           f"{opts.lifetime:g} s, --margin {opts.margin:g} --jitter 0, max_refresh_rate "
           f"{opts.rate:g}/s, budget {budget:.0f} s")
    samples: list[tuple[int, ProcSample]] = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-mem-") as tmp, \
            TimedFake(lifetime=opts.lifetime) as fake:
        home = Home(Path(tmp))
        # First refreshes come ~8 s after seeding: start-up is measured while nothing is due.
        seed_stores(home, fake, stores=opts.families // 2, per_store=2,
                    expires_in=opts.margin + 8)
        # Churn is the point here, not the limiter: the default max_refresh_rate (10/s)
        # would cap 40 families of 2-second tokens at a quarter of their refreshes.
        daemon = Daemon(home, fake, margin=f"{opts.margin:g}", jitter="0",
                        fast_redactor=opts.fast_redactor,
                        env={"QWEN_REFRESHER_MAX_REFRESH_RATE": f"{opts.rate:g}"})
        try:
            if daemon.wait_event("started", 60) is None:
                print(f"daemon did not start:\n{daemon.tail()}")
                return 0
            at_started = sample(daemon.pid)
            time.sleep(3)
            after_start = sample(daemon.pid)
            ok_before = fake.ok
            t0 = time.monotonic()
            samples.append((fake.ok, after_start))
            while True:
                time.sleep(opts.every)
                if daemon.proc.poll() is not None:
                    print(f"daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}")
                    break
                samples.append((fake.ok, sample(daemon.pid)))
                if fake.ok >= target or time.monotonic() - t0 > budget:
                    break
            elapsed = time.monotonic() - t0
            failures = {name: daemon.count(name) for name in
                        ("refresh_failed", "write_failed", "needs_login", "revert_undone")}
        finally:
            daemon.stop()
        skipped = daemon.skipped_runs
        reused = fake.reuse_count
        failed_at_fake = fake.failed_spans()

    done = samples[-1][0]
    first, last = samples[0][1], samples[-1][1]
    rows = [
        ("RSS at `started`", f"{at_started.rss_kb / 1024:.1f} MB", f"< {GOAL_RSS_MB:g} MB"),
        ("RSS 3 s after start (idle)", f"{after_start.rss_kb / 1024:.1f} MB",
         f"< {GOAL_RSS_MB:g} MB"),
    ]
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        want = int(target * frac)
        hit = next(((n, s) for n, s in samples if n >= want), None)
        if hit is not None:
            rows.append((f"RSS after {hit[0]:,} refreshes", f"{hit[1].rss_kb / 1024:.1f} MB",
                         f"< {GOAL_RSS_MB:g} MB"))
    peak = max(s.rss_kb for _, s in samples)
    rows.append(("peak RSS during the run",
                 f"{peak / 1024:.1f} MB ({ratio(peak, floor, rss=True)} the import floor)",
                 f"< {GOAL_RSS_MB:g} MB"))
    if floor is not None:
        rows.insert(0, (f"baseline: {floor.name}, peak RSS", f"{floor.rss_kb / 1024:.1f} MB", ""))
    warm = next(((n, s) for n, s in samples if n >= max(done // 10, 1)), samples[0])
    rows.append((f"RSS growth from {warm[0]:,} to {done:,} refreshes",
                 f"{(last.rss_kb - warm[1].rss_kb) / 1024:+.1f} MB", "~0 (no growth)"))
    slope = _slope([(n, s.rss_kb) for n, s in samples if n >= warm[0]])
    rows.append(("RSS trend (least squares, after warm-up)",
                 f"{slope * 1000:+.0f} KB per 1,000 refreshes", "~0"))
    half = [(n, s.rss_kb) for n, s in samples if n >= done // 2]
    settled = _slope(half) * 1000
    rows.append((f"RSS trend over the second half ({half[0][0]:,} to {done:,} refreshes)",
                 f"{settled:+.0f} KB per 1,000 refreshes",
                 f"< {FLAT_KB_PER_1000:g} KB (flat)"))
    rows.append(("refreshes answered / wanted", f"{done - ok_before + ok_before:,} / {target:,}"
                 + ("" if done >= target else f" (budget {budget:.0f} s ran out)"), ""))
    rows.append(("refresh throughput", f"{(done - ok_before) / elapsed:.1f} /s over "
                 f"{elapsed:.0f} s", ""))
    cpu_rows = _cpu_per_refresh(samples)
    rows += cpu_rows
    rows.append(("APScheduler 'skipped: max running instances' warnings",
                 f"{skipped:,}", "0"))
    rows.append(("threads / fds at the end", f"{last.threads} / {last.fds}", ""))
    rows.append(("failures (daemon events; fake non-ok answers; reused tokens)",
                 f"{sum(failures.values())} {failures}; {failed_at_fake}; {reused}", "0; 0; 0"))
    table(rows)
    print()
    print("timeline (refreshes answered, RSS, daemon CPU so far):")
    step = max(1, len(samples) // 12)
    for n, s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"  t={s.at - first.at:6.0f} s  refreshes {n:>6,}  RSS {s.rss_kb / 1024:6.1f} MB"
              f"  CPU {s.cpu - first.cpu:7.1f} s")
    verdict_rss = peak / 1024 < GOAL_RSS_MB
    print(f"goal RSS < {GOAL_RSS_MB:g} MB: {'MET' if verdict_rss else 'MISSED'}"
          f" (peak {peak / 1024:.1f} MB); {target:,} refreshes reached: "
          f"{'yes' if done >= target else 'no'}; flat (second half < "
          f"{FLAT_KB_PER_1000:g} KB per 1,000): {'MET' if settled < FLAT_KB_PER_1000 else 'MISSED'}"
          f" ({settled:+.0f} KB)")
    footer()
    return 0


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of y over x (KB per refresh); 0 for fewer than 2 points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _cpu_per_refresh(samples: list[tuple[int, ProcSample]]) -> list[tuple[str, str, str]]:
    """Daemon CPU per refresh over the first and the last fifth of the run, and overall."""
    if len(samples) < 3 or samples[-1][0] == samples[0][0]:
        return [("CPU per refresh", "n/a (no refreshes)", "")]
    total_n = samples[-1][0] - samples[0][0]
    total_cpu = samples[-1][1].cpu - samples[0][1].cpu
    fifth = max(1, len(samples) // 5)

    def per(a: tuple[int, ProcSample], b: tuple[int, ProcSample]) -> str:
        n = b[0] - a[0]
        return f"{(b[1].cpu - a[1].cpu) / n * 1000:.1f} ms" if n > 0 else "n/a"

    return [
        ("daemon CPU per refresh, whole run", f"{total_cpu / total_n * 1000:.1f} ms", ""),
        ("  first fifth of the run", per(samples[0], samples[fifth]), ""),
        ("  last fifth of the run", per(samples[-1 - fifth], samples[-1]), "same as first"),
    ]


if __name__ == "__main__":
    sys.exit(main())
