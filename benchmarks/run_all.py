"""Runs every benchmark in one go, one after the other, so their figures share a machine state.

Order: footprint (start to ready, idle RSS and wake-ups per thread at 1,000 x 2, with the
named baselines), idle, reaction, memory (as shipped, then with the fast-redactor what-if), scale
(start-up at three sizes, then both storms at 1,000 stores), and
``status_speed.py`` if it is there (with ``OPENCLAW_BIN`` set from
``scripts/install-openclaw.sh --check`` when OpenClaw is installed). Each script prints its own
table; this prints the machine and the load between them, and can tee everything to a file.

    .venv/bin/python benchmarks/run_all.py [--quick] [--out results.txt] [--only idle,memory]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from _common import BENCH_DIR, ROOT, code_version, loadavg, machine_line

#: (name, script, arguments for a full run, arguments for --quick or None: not in --quick).
#: ``--quick`` only checks that every script still runs and prints its table (CI,
#: ``tests/test_benchmarks.py``): tiny sizes and windows, the whole run well under a minute;
#: its figures mean nothing. A script's own ``--quick`` is a shorter real measurement.
STEPS: list[tuple[str, str, list[str], list[str] | None]] = [
    ("footprint", "footprint.py", [], ["--quick"]),
    ("idle", "idle.py", [], ["--duration", "2", "--settle", "0.5", "--fast-sweep", "1"]),
    ("reaction", "reaction.py", [], ["--repeats", "2", "--pause", "0.2"]),
    ("memory", "memory.py", [],
     ["--refreshes", "20", "--budget", "6", "--families", "4", "--every", "1"]),
    ("memory-fast", "memory.py", ["--fast-redactor"], None),
    ("scale", "scale.py", ["--startup-sizes", "100,300,1000"],
     ["--stores", "10", "--startup-sizes", "10", "--startup-only", "--idle", "1"]),
    ("status", "status_speed.py", [], ["-n", "2"]),
    ("reads", "reads.py", [], ["--reads", "20", "--settle", "0.5", "--drain", "0.3"]),
    ("sweep", "sweep.py", [], ["--stores", "10", "--duration", "2", "--interval", "1",
                               "--settle", "0.5"]),
    ("storm", "storm.py", [], ["--stores", "10", "--default-stores", "5", "--written-stores", "2",
                               "--timeout", "30"]),
    ("fleet", "fleet.py", [], ["--quick"]),
]


def _openclaw_bin() -> str | None:
    if os.environ.get("OPENCLAW_BIN"):
        return os.environ["OPENCLAW_BIN"]
    script = ROOT / "scripts" / "install-openclaw.sh"
    if not script.exists():
        return None
    try:
        done = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if done.returncode != 0 or not {"NODE", "OPENCLAW"} <= paths.keys():
        return None
    return f"{shlex.quote(paths['NODE'])} {shlex.quote(paths['OPENCLAW'])}"


def _emit(text: str, out: TextIO | None) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
    if out is not None:
        out.write(text)
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, checks every script works (< 1 min)")
    parser.add_argument("--out", type=Path, help="also write everything to this file")
    parser.add_argument("--only", help="comma-separated step names: "
                        + ",".join(name for name, *_ in STEPS))
    opts = parser.parse_args(argv)
    only = set(opts.only.split(",")) if opts.only else None
    out = opts.out.open("w") if opts.out else None
    env = dict(os.environ)
    # OpenClaw's CLI takes seconds per call: a baseline for full runs, not for a smoke run.
    openclaw = None if opts.quick else _openclaw_bin()
    if openclaw:
        env["OPENCLAW_BIN"] = openclaw
    elif opts.quick:
        env.pop("OPENCLAW_BIN", None)
    try:
        _emit(f"# qwen-refresher benchmarks ({'quick' if opts.quick else 'full'})\n"
              f"{machine_line()}\ncode: {code_version()}\nload at start: {loadavg()}  "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n", out)
        began = time.monotonic()
        failed: list[str] = []
        for name, script, full, quick in STEPS:
            if only is not None and name not in only:
                continue
            args = quick if opts.quick else full
            if args is None:
                continue
            path = BENCH_DIR / script
            if not path.exists():
                _emit(f"== {name}: {script} is not there yet, skipped\n\n", out)
                continue
            cmd = [sys.executable, str(path), *args]
            _emit(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n", out)
            t = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                _emit(line, out)
            rc = proc.wait()
            if rc != 0:
                failed.append(f"{name} (exit {rc})")
            _emit(f"({name}: exit {rc}, {time.monotonic() - t:.0f} s; load {loadavg()})\n\n",
                  out)
        _emit(f"all done in {time.monotonic() - began:.0f} s; code: {code_version()}; "
              f"load at end: {loadavg()}\n", out)
        if failed:
            _emit(f"FAILED: {', '.join(failed)}\n", out)
    finally:
        if out is not None:
            out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
