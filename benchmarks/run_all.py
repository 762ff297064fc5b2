"""Runs every benchmark in one go, one after the other, so their figures share a machine state.

Order: idle, reaction, memory (as shipped, then with the fast-redactor what-if), scale
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

#: (name, script, arguments for a full run, arguments for --quick)
STEPS: list[tuple[str, str, list[str], list[str]]] = [
    ("idle", "idle.py", [], ["--quick"]),
    ("reaction", "reaction.py", [], ["--quick"]),
    ("memory", "memory.py", ["--budget", "300"], ["--quick"]),
    ("memory-fast", "memory.py", ["--fast-redactor"], ["--quick", "--fast-redactor"]),
    ("scale", "scale.py", ["--startup-sizes", "100,300,1000"],
     ["--quick", "--startup-sizes", "50,200"]),
    ("status", "status_speed.py", [], ["-n", "10"]),
    ("reads", "reads.py", [], ["--quick"]),
    ("sweep", "sweep.py", [], ["--quick"]),
    ("storm", "storm.py", [], ["--quick"]),
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
    parser.add_argument("--quick", action="store_true", help="every script's --quick")
    parser.add_argument("--out", type=Path, help="also write everything to this file")
    parser.add_argument("--only", help="comma-separated step names: "
                        + ",".join(name for name, *_ in STEPS))
    opts = parser.parse_args(argv)
    only = set(opts.only.split(",")) if opts.only else None
    out = opts.out.open("w") if opts.out else None
    env = dict(os.environ)
    openclaw = _openclaw_bin()
    if openclaw:
        env["OPENCLAW_BIN"] = openclaw
    try:
        _emit(f"# qwen-refresher benchmarks ({'quick' if opts.quick else 'full'})\n"
              f"{machine_line()}\ncode: {code_version()}\nload at start: {loadavg()}  "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n", out)
        began = time.monotonic()
        for name, script, full, quick in STEPS:
            if only is not None and name not in only:
                continue
            path = BENCH_DIR / script
            if not path.exists():
                _emit(f"== {name}: {script} is not there yet, skipped\n\n", out)
                continue
            cmd = [sys.executable, str(path), *(quick if opts.quick else full)]
            _emit(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n", out)
            t = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                _emit(line, out)
            rc = proc.wait()
            _emit(f"({name}: exit {rc}, {time.monotonic() - t:.0f} s; load {loadavg()})\n\n",
                  out)
        _emit(f"all done in {time.monotonic() - began:.0f} s; code: {code_version()}; "
              f"load at end: {loadavg()}\n", out)
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
