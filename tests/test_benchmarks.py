"""The benchmarks still run: ``benchmarks/run_all.py --quick``, every script on tiny sizes.

Benchmarks are not timed tests: nothing here judges a figure (a loaded CI machine would make
that a coin toss). What this catches is a benchmark that no longer works (an import or an
option renamed under it, a daemon that no longer starts the way it starts it, a table that
is no longer printed), so that the figures in BENCHMARKS.md can always be reproduced with
the command written next to them. The run takes ~30-50 s on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_ALL = ROOT / "benchmarks" / "run_all.py"

#: What a script prints when its daemon never got going, or a wait gave up: the script
#: still exits 0 (a benchmark reports what it saw), so the smoke test looks for these.
_BROKEN = re.compile(r"Traceback \(most recent call last\)|did not start|gave up|"
                     r"is not there yet")


@pytest.mark.timeout(240)
def test_every_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "quick.txt"
    env = {k: v for k, v in os.environ.items() if k != "OPENCLAW_BIN"}
    done = subprocess.run([sys.executable, str(RUN_ALL), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=230)
    text = out.read_text() if out.exists() else done.stdout
    tail = "\n".join(text.splitlines()[-60:])
    assert done.returncode == 0, f"run_all.py --quick exited {done.returncode}:\n{tail}\n" \
                                 f"{done.stderr[-2000:]}"
    broken = _BROKEN.search(text)
    assert broken is None, f"a benchmark did not get its figures ({broken.group(0)!r}):\n" \
        + text[max(0, broken.start() - 1500):broken.end() + 1500]
    steps = re.findall(r"^\((\S+): exit (\d+),", text, re.MULTILINE)
    names = [name for name, _ in steps]
    for wanted in ("footprint", "idle", "reaction", "memory", "scale", "reads", "sweep",
                   "storm"):
        assert wanted in names, f"step {wanted} did not run: {names}"
    assert all(rc == "0" for _, rc in steps), steps
    # Every step that prints a figure table printed one (status_speed has its own layout).
    assert text.count("| figure") >= len([n for n in names if n != "status"]), text[-3000:]
