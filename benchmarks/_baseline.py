"""The named baselines every issue-16 row is divided by, measured in the same run.

* ``interpreter``: ``python -c pass`` with the interpreter running the benchmark (and the
  daemon): the floor no Python program can go under;
* ``import floor``: the same interpreter importing the six packages of the project card
  (apscheduler, httpx, pydantic-settings, structlog, watchdog, tenacity) and nothing else:
  the floor no daemon built on them can go under (start-up time, RSS);
* ``openclaw``: ``openclaw models status --json`` (``OPENCLAW_BIN``, set by ``run_all.py``
  from ``scripts/install-openclaw.sh --check``) where OpenClaw is installed: what the user
  already runs to ask the same question.

Each is the median of ``runs`` interleaved runs: wall time from spawn to exit, and the
child's peak RSS (``VmHWM``, read by the child itself just before it exits). Stdlib only.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

CARD_PACKAGES = ("apscheduler", "httpx", "pydantic_settings", "structlog", "watchdog",
                 "tenacity")

_REPORT = ("import sys\n"
           "for _l in open('/proc/self/status'):\n"
           "    if _l.startswith(('VmHWM:', 'VmRSS:')): sys.stdout.write(_l)\n")


@dataclass(frozen=True)
class Baseline:
    name: str
    wall_s: float  # median spawn -> exit
    rss_kb: int  # median peak RSS (0: not known, e.g. OpenClaw's node)
    runs: int

    def row(self) -> tuple[str, str, str]:
        rss = f"; peak RSS {self.rss_kb / 1024:.1f} MB" if self.rss_kb else ""
        return (f"baseline: {self.name}", f"{self.wall_s * 1000:.1f} ms{rss} "
                f"(median of {self.runs})", "")


def _python(code: str, python: str) -> tuple[float, int]:
    t = time.perf_counter()
    done = subprocess.run([python, "-c", code + "\n" + _REPORT], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{python} -c {code!r} failed: {done.stderr[-300:]}")
    hwm = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("VmHWM")]
    return wall, (hwm[0] if hwm else 0)


def measure(runs: int = 10, *, python: str = sys.executable,
            openclaw: bool = True) -> list[Baseline]:
    """Interpreter and import floor (``runs`` each, interleaved), and OpenClaw (3 runs)
    when ``OPENCLAW_BIN`` is set and ``openclaw`` is true."""
    bare: list[tuple[float, int]] = []
    floor: list[tuple[float, int]] = []
    _python("pass", python)  # warm the page cache and the byte-code cache
    _python("import " + ", ".join(CARD_PACKAGES), python)
    for _ in range(runs):
        bare.append(_python("pass", python))
        floor.append(_python("import " + ", ".join(CARD_PACKAGES), python))
    out = [
        Baseline("`python -c pass`", statistics.median(w for w, _ in bare),
                 int(statistics.median(r for _, r in bare)), runs),
        Baseline("import floor (" + ", ".join(CARD_PACKAGES) + ")",
                 statistics.median(w for w, _ in floor),
                 int(statistics.median(r for _, r in floor)), runs),
    ]
    command = os.environ.get("OPENCLAW_BIN")
    if openclaw and command:
        walls = []
        for _ in range(3):
            t = time.perf_counter()
            try:
                subprocess.run([*shlex.split(command), "models", "status", "--json"],
                               capture_output=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                break
            walls.append(time.perf_counter() - t)
        if walls:
            out.append(Baseline("`openclaw models status --json`", statistics.median(walls),
                                0, len(walls)))
    return out


def by_name(baselines: list[Baseline], prefix: str) -> Baseline | None:
    return next((b for b in baselines if b.name.startswith(prefix)), None)


def ratio(value: float, base: Baseline | None, *, rss: bool = False) -> str:
    """``value`` as a multiple of ``base`` (its RSS in KiB when ``rss``, else its wall s)."""
    if base is None:
        return "n/a"
    denominator = base.rss_kb if rss else base.wall_s
    if not denominator or value != value:
        return "n/a"
    return f"{value / denominator:.2f}x"
