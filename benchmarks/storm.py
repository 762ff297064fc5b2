"""Storm: every family due at once, and the rate at which that hits the token server.

After an outage (or a fleet started late) every token is already inside its margin: jitter
cannot spread them, so only the daemon's concurrency and its rate limit
(``max_refresh_rate``) stand between the fleet and Qwen's endpoint. Each phase seeds a fresh
OpenClaw home with ``stores`` agents x 2 qwen profiles (each its own family) whose tokens
expire in 120 s (inside the 900 s margin), starts the real daemon, and lets the fake (this
process, answering each refresh after ``--latency`` s) record when every request started.

Phases, one after the other in the same run (so the same machine and load):

1. ``baseline``: rate limit out of the way (1,000/s), 16 in flight: what the server would see
   without a limiter;
2. ``limited``: ``--rate`` (80/s) and 16 in flight: the storm's duration (goal < 30 s for
   2,000 families) with the limiter holding the server's peak;
3. ``defaults``: the shipped defaults (10/s, 4 in flight) on fewer families, showing the
   default limit holding;
4. ``written``: a slow drain (25 stores at 1/s; 10 at 2/s with ``--quick``) while another
   program rewrites every store all along, under the store's lock as OpenClaw does (its usage
   stats), each write a re-plan of families waiting for a worker: dozens per family. One
   queued run per family (``runtime/jobs.py``): APScheduler's "skipped: maximum number of
   running instances" warnings must stay at 0 (before that, a run was queued per re-plan,
   up to 64 per family).

Figures per phase: time from spawn to the last refresh answered, requests/s mean and peak in
any 1 s and 100 ms window (``FakeQwen.max_rate``), max in flight, daemon CPU per refresh.

    .venv/bin/python benchmarks/storm.py [--quick] [--stores 1000] [--rate 80] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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
)

from qwen_refresher.stores.openclaw import OpenClawStore
from qwen_refresher.testing.fake_qwen.records import most_within

GOAL_STORM_S = 30.0


@dataclass
class Phase:
    label: str
    stores: int
    rate: float | None  # None: the daemon's default
    concurrency: int | None
    written: bool = False  # another program rewrites every store during the storm


@dataclass
class Result:
    phase: Phase
    families: int
    done: int
    spawn_to_last: float
    spawn_to_started: float
    first_to_last: float
    peak_1s: int
    peak_100ms: int
    in_flight: int
    cpu_per_refresh: float
    failed: int
    skipped: int  # APScheduler "skipped: maximum number of running instances" warnings
    writes: int  # store rewrites by the other program


class StoreToucher:
    """Another program rewriting each store under its lock (``usageStats`` changes), one
    store after another, until stopped: OpenClaw's gateway noting each call."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.paths:
                try:
                    with OpenClawStore(path).lock(timeout=5.0).held():
                        document = json.loads(path.read_bytes())
                        document["usageStats"] = {"calls": self.writes}
                        temp = path.with_name(f".{path.name}.toucher")
                        # 0600, as OpenClaw writes a file of tokens
                        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        with os.fdopen(fd, "w") as out:
                            out.write(json.dumps(document))
                        os.replace(temp, path)
                    self.writes += 1
                except Exception:  # a lock not had in time: the next round
                    continue
            self._stop.wait(0.05)

    def __enter__(self) -> StoreToucher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_phase(phase: Phase, latency: float, timeout: float, tmp: Path) -> Result:
    env: dict[str, str] = {}
    if phase.rate is not None:
        env["QWEN_REFRESHER_MAX_REFRESH_RATE"] = f"{phase.rate:g}"
    if phase.concurrency is not None:
        env["QWEN_REFRESHER_MAX_CONCURRENT_REFRESHES"] = str(phase.concurrency)
    with TimedFake(latency=latency, lifetime=SIX_HOURS) as fake:
        home = Home(tmp / phase.label)
        seeded = seed_stores(home, fake, stores=phase.stores, per_store=2, expires_in=120.0)
        families = len(seeded)
        toucher = StoreToucher(sorted({home.store_path(agent) for agent, _ in seeded})
                               if phase.written else [])
        fake.reset_spans()
        with Daemon(home, fake, env=env) as daemon, toucher:
            spawned = time.time()
            deadline = time.monotonic() + timeout
            started = daemon.wait_event("started", timeout)
            cpu0 = sample(daemon.pid) if started is not None else None
            while fake.ok < families and time.monotonic() < deadline and \
                    daemon.proc.poll() is None:
                time.sleep(0.2)
            cpu1 = sample(daemon.pid) if daemon.proc.poll() is None else None
        spans = fake.ok_spans()
        starts = [s for s, _ in spans]
        done = len(spans)
        peak_1s = fake.max_rate(1.0) if fake.refresh_requests() else 0
        peak_100ms = most_within(starts, 0.1)
        return Result(
            phase=phase, families=families, done=done,
            spawn_to_last=(max(e for _, e in spans) - spawned) if spans else float("nan"),
            spawn_to_started=(started["_arrived"] - spawned) if started else float("nan"),
            first_to_last=(max(starts) - min(starts)) if starts else float("nan"),
            peak_1s=peak_1s, peak_100ms=peak_100ms, in_flight=fake.max_in_flight,
            cpu_per_refresh=((cpu1.cpu_ns - cpu0.cpu_ns) / 1e9 / done
                             if cpu0 and cpu1 and done else float("nan")),
            failed=fake.failed_spans(), skipped=daemon.skipped_runs, writes=toucher.writes,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 stores (50 at defaults): checks it works")
    parser.add_argument("--stores", type=int, help="agents x 2 profiles (default 1000)")
    parser.add_argument("--rate", type=float, default=80.0,
                        help="max_refresh_rate of the `limited` phase, requests/s")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="max_concurrent_refreshes of the baseline and limited phases")
    parser.add_argument("--default-stores", type=int,
                        help="agents in the `defaults` phase (default 150; quick 25)")
    parser.add_argument("--written-stores", type=int,
                        help="agents in the `written` phase (default 25 at 1/s; quick 10 at 2/s)")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=420.0, help="per phase, seconds")
    parser.add_argument("--only",
                        help="comma-separated phases: baseline,limited,defaults,written")
    opts = parser.parse_args(argv)
    stores = opts.stores or (100 if opts.quick else 1000)
    default_stores = opts.default_stores or (25 if opts.quick else 150)
    phases = [
        Phase("baseline", stores, 1000.0, opts.concurrency),
        Phase("limited", stores, opts.rate, opts.concurrency),
        Phase("defaults", default_stores, None, None),
        Phase("written", opts.written_stores or (10 if opts.quick else 25),
              2.0 if opts.quick else 1.0, None, written=True),
    ]
    if opts.only:
        wanted = set(opts.only.split(","))
        phases = [p for p in phases if p.label in wanted]
    header("storm: every family due at once; rate at the token server",
           f"latency {opts.latency:g} s; tokens expiring in 120 s (margin 900 s); phases: "
           + "; ".join(f"{p.label}: {p.stores * 2} families, rate "
                       f"{'default' if p.rate is None else f'{p.rate:g}/s'}, in flight "
                       f"{'default' if p.concurrency is None else p.concurrency}"
                       + (", stores rewritten all along" if p.written else "")
                       for p in phases))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-storm-") as tmp:
        for phase in phases:
            results.append(run_phase(phase, opts.latency, opts.timeout, Path(tmp)))
    rows: list[tuple[str, str, str]] = []
    unlimited = next((r for r in results if r.phase.label == "baseline"), None)
    for r in results:
        p = r.phase
        limit = "default 10" if p.rate is None else f"{p.rate:g}"
        rate_goal = f"<= {10 if p.rate is None else p.rate:g} (+1)" if p.label != "baseline" \
            else ""
        mean = r.done / r.first_to_last if r.first_to_last and r.first_to_last > 0 else 0.0
        rows += [
            (f"**{p.label}** (limit {limit}/s, in flight "
             f"{'default 4' if p.concurrency is None else p.concurrency}): refreshed",
             f"{r.done} / {r.families}", "all"),
            (f"{p.label}: spawn -> last refresh answered", f"{r.spawn_to_last:.1f} s",
             f"< {GOAL_STORM_S:g} s" if p.label == "limited" and r.families >= 2000 else ""),
            (f"{p.label}: of which spawn -> `started`; first request -> last sent",
             f"{r.spawn_to_started:.1f} s; {r.first_to_last:.1f} s", ""),
            (f"{p.label}: x the limiter's floor (families / rate = "
             f"{r.families / (p.rate or 10.0):.1f} s)"
             + ("; x the unlimited `baseline` phase" if unlimited and unlimited is not r
                else ""),
             f"{r.spawn_to_last / (r.families / (p.rate or 10.0)):.2f}x"
             + (f"; {r.spawn_to_last / unlimited.spawn_to_last:.2f}x"
                if unlimited and unlimited is not r and unlimited.spawn_to_last > 0 else ""),
             ""),
            (f"{p.label}: requests/s mean; **peak in any 1 s**; in any 100 ms",
             f"{mean:.1f}; **{r.peak_1s}**; {r.peak_100ms}", rate_goal),
            (f"{p.label}: max in flight at the server", str(r.in_flight), ""),
            (f"{p.label}: daemon CPU per refresh", f"{r.cpu_per_refresh * 1000:.1f} ms", ""),
            (f"{p.label}: non-ok answers", str(r.failed), "0"),
            (f"{p.label}: APScheduler skipped-run warnings"
             + ("; store rewrites by another program" if p.written else ""),
             f"{r.skipped}" + (f"; {r.writes:,}" if p.written else ""), "0"),
        ]
    table(rows)
    footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
