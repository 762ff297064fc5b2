"""Times single OpenClaw runs, one after another, for BENCHMARKS.md and docs/interop.md.

    .venv/bin/python -m tests.interop.bench_openclaw [-n 5]

Each of ``models status --json`` and ``models status --json --probe --probe-provider
qwen-portal`` runs ``n`` times against a fresh store and the in-process fake; prints min, median
and max wall time. Needs ``scripts/install-openclaw.sh`` to have run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import OpenClawHome, qwen_profile
from tests.interop.openclaw import DEFAULT_PROFILE, PROBE, STATUS, OpenClaw, install


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.interop.bench_openclaw")
    parser.add_argument("-n", type=int, default=5, help="runs per command (default 5)")
    args = parser.parse_args(argv)
    found = install()
    if isinstance(found, str):
        print(found, file=sys.stderr)
        return 1
    with FakeQwen(lifetime=3600) as fake, tempfile.TemporaryDirectory() as tmp:
        home = OpenClawHome(Path(tmp))
        home.write_store({"version": 1,
                          "profiles": {DEFAULT_PROFILE: qwen_profile(*fake.issue_tokens())}})
        claw = OpenClaw(found, home, fake.base_url)
        claw.run(*STATUS)  # warms the compile cache
        for command in (STATUS, PROBE):
            times = []
            for _ in range(args.n):
                run = claw.run(*command)
                if run.returncode != 0:
                    print(run.describe(), file=sys.stderr)
                    return 1
                times.append(run.seconds)
            print(f"openclaw {' '.join(command)}: n={args.n} min={min(times):.2f}s "
                  f"median={statistics.median(times):.2f}s max={max(times):.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
