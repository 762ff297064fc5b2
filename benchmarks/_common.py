"""Shared plumbing for the benchmarks: a throw-away OpenClaw home, the real daemon as a
subprocess, an instrumented fake Qwen server, and /proc readings of the daemon process.

Stdlib only (plus this project). Nothing here is a pass/fail test: the scripts print figures.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwen_refresher.testing.daemon_proc import (  # noqa: E402
    DaemonProc,
    daemon_env,
    ensure_bytecode,
    redact,
    run_argv,
)
from qwen_refresher.testing.fake_qwen import FakeQwen  # noqa: E402

# The daemon measured is the one a user runs: an installed package has its bytecode, a
# checkout under PYTHONDONTWRITEBYTECODE=1 would compile every module at every start.
ensure_bytecode()

PROVIDER = "qwen-portal"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIX_HOURS = 6 * 3600.0


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_line() -> str:
    return (f"machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
            f"Python {platform.python_version()}, Linux {platform.release()}")


def code_version() -> str:
    """The commit measured, and whether qwen_refresher/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qwen_refresher"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in qwen_refresher/' if dirty else ''}"


def header(title: str, settings: str) -> None:
    print(f"== {title}")
    print(machine_line())
    print(f"code: {code_version()}")
    print(f"load (1/5/15 min) at start: {loadavg()}   {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"settings: {settings}")
    sys.stdout.flush()


def footer() -> None:
    print(f"load (1/5/15 min) at end: {loadavg()}")
    print()
    sys.stdout.flush()


def table(rows: Sequence[tuple[str, str, str]]) -> None:
    """Prints ``figure | value | goal`` rows as an aligned Markdown table."""
    head = ("figure", "value", "goal")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(3)]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcSample:
    at: float  # time.monotonic()
    cpu: float  # utime + stime of the whole process (all threads, dead ones too), seconds
    cpu_ns: int  # sum over live threads of /proc/<pid>/task/*/schedstat run time (ns precision)
    voluntary: int  # context switches summed over live threads
    involuntary: int
    rss_kb: int
    threads: int
    fds: int

    @property
    def switches(self) -> int:
        return self.voluntary + self.involuntary


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def proc_cpu(pid: int) -> float:
    stat = _read(f"/proc/{pid}/stat")
    rest = stat[stat.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def thread_switches(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (comm, voluntary, involuntary) for every live thread."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            status = _read(f"/proc/{pid}/task/{tid}/status")
        except OSError:
            continue
        vol = invol = 0
        name = "?"
        for line in status.splitlines():
            if line.startswith("Name:"):
                name = line.split(None, 1)[1] if len(line.split()) > 1 else "?"
            elif line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
        out[int(tid)] = (name, vol, invol)
    return out


def sample(pid: int) -> ProcSample:
    cpu_ns = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            cpu_ns += int(_read(f"/proc/{pid}/task/{tid}/schedstat").split()[0])
        except (OSError, ValueError, IndexError):
            continue
    switches = thread_switches(pid)
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return ProcSample(
        at=time.monotonic(), cpu=proc_cpu(pid), cpu_ns=cpu_ns,
        voluntary=sum(v for _, v, _ in switches.values()),
        involuntary=sum(i for _, _, i in switches.values()),
        rss_kb=proc_rss_kb(pid), threads=len(switches), fds=fds,
    )


# --------------------------------------------------------------------------- OpenClaw home


def qwen_profile(access: str, refresh: str, expires_ms: int) -> dict[str, Any]:
    return {"type": "oauth", "provider": PROVIDER, "access": access, "refresh": refresh,
            "expires": expires_ms}


class Home:
    """A throw-away HOME with an OpenClaw state dir and our own state dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.state = self.home / ".openclaw"
        self.our_state = root / "refresher-state"
        self.home.mkdir(parents=True, exist_ok=True)

    def store_path(self, agent: str) -> Path:
        return self.state / "agents" / agent / "agent" / "auth-profiles.json"

    def write_store(self, agent: str, profiles: dict[str, tuple[str, str, int]]) -> Path:
        """Writes in place, as OpenClaw does (``JSON.stringify(doc, null, 2) + "\\n"``)."""
        path = self.store_path(agent)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"version": 1,
               "profiles": {pid: qwen_profile(*creds) for pid, creds in profiles.items()},
               "order": {PROVIDER: list(profiles)}}
        path.write_bytes((json.dumps(doc, indent=2) + "\n").encode())
        os.chmod(path, 0o600)
        return path

    def read_refresh(self, agent: str, profile: str) -> str | None:
        try:
            doc = json.loads(self.store_path(agent).read_bytes())
            return str(doc["profiles"][profile]["refresh"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def env(self, **extra: str) -> dict[str, str]:
        """The daemon's environment (``daemon_proc.daemon_env``) for this home."""
        return daemon_env(root=self.root, home=self.home, openclaw_state=self.state,
                          our_state=self.our_state, **extra)

    def state_profiles(self) -> list[dict[str, Any]] | None:
        """The daemon's published ``state.json`` profiles, or None if absent/unreadable."""
        try:
            doc = json.loads((self.our_state / "state.json").read_bytes())
        except (OSError, ValueError):
            return None
        profiles = doc.get("profiles") if isinstance(doc, dict) else None
        return profiles if isinstance(profiles, list) else None


def seed_stores(home: Home, fake: FakeQwen, *, stores: int, per_store: int,
                expires_in: float, prefix: str = "agent") -> list[tuple[str, str]]:
    """``stores`` agents with ``per_store`` qwen profiles each, every profile its own family.

    Tokens come from the fake (``issue_tokens``) so refreshes are accepted; ``expires_in``
    sets their expiry relative to now. Returns [(agent, profile id)].
    """
    out: list[tuple[str, str]] = []
    for s in range(stores):
        agent = "main" if (s == 0 and prefix == "agent") else f"{prefix}{s:04d}"
        profiles: dict[str, tuple[str, str, int]] = {}
        for p in range(per_store):
            pid = f"{PROVIDER}:p{p}"
            profiles[pid] = fake.issue_tokens(lifetime=expires_in)
            out.append((agent, pid))
        home.write_store(agent, profiles)
    return out


# --------------------------------------------------------------------------- the fake


class TimedFake(FakeQwen):
    """FakeQwen that also counts refreshes in flight and can answer with a fixed latency.

    The fake's own request log records a request when it is answered; this adds the moment
    each refresh grant started being served, how many overlapped, and when each refresh
    token was first presented (for reaction times).
    """

    def __init__(self, *, latency: float = 0.0, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.latency = latency
        self._span_lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.spans: list[tuple[float, float, str]] = []  # (start, end) time.time(), outcome
        self.first_seen: dict[str, float] = {}  # refresh token -> time.time() first presented
        self.ok = 0

    def _refresh_grant(self, form: dict[str, str]) -> Any:
        start = time.time()
        token = form.get("refresh_token", "")
        with self._span_lock:
            self.first_seen.setdefault(token, start)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        outcome = "?"
        try:
            if self.latency > 0:
                time.sleep(self.latency)
            reply = super()._refresh_grant(form)
            outcome = str(reply.outcome)
            return reply
        finally:
            with self._span_lock:
                self.in_flight -= 1
                self.spans.append((start, time.time(), outcome))
                if outcome == "ok":
                    self.ok += 1

    def reset_spans(self) -> None:
        with self._span_lock:
            self.max_in_flight = self.in_flight
            self.spans = []
            self.first_seen = {}
            self.ok = 0

    def ok_spans(self) -> list[tuple[float, float]]:
        with self._span_lock:
            return [(s, e) for s, e, o in self.spans if o == "ok"]

    def failed_spans(self) -> int:
        with self._span_lock:
            return sum(1 for _, _, o in self.spans if o != "ok")


def rate_histogram(starts: Iterable[float], t0: float, bucket: float = 1.0) -> list[int]:
    """Counts per ``bucket`` seconds from ``t0``."""
    counts: Counter[int] = Counter(int((t - t0) // bucket) for t in starts)
    if not counts:
        return []
    return [counts.get(i, 0) for i in range(max(counts) + 1)]


# --------------------------------------------------------------------------- the daemon


_SKIPPED_JOB = re.compile(r'Execution of job "([^ "(]+)')


def _parse_ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Daemon(DaemonProc):
    """``python -m qwen_refresher run`` (``qwen_refresher.testing.daemon_proc``, the one way
    tests and benchmarks start it) with JSON logs, each record stamped on arrival: ``_arrived``
    (when the line was read) and ``_ts`` (the daemon's own timestamp, or the arrival).

    ``fast_redactor`` runs it through ``benchmarks/_fast_redactor.py`` instead: the same
    daemon with the log redactor swapped for a cheap one (a what-if, not the shipped code).
    Lines are not kept (a long run prints hundreds of thousands): ``records``, ``other`` and
    the counters are.
    """

    def __init__(self, home: Home, fake: FakeQwen, *, margin: str = "900", jitter: str = "60",
                 args: Sequence[str] = (), env: dict[str, str] | None = None,
                 fast_redactor: bool = False, entry: Sequence[str] | None = None) -> None:
        self.home = home
        if entry is None:
            entry = ([str(BENCH_DIR / "_fast_redactor.py")] if fast_redactor
                     else ["-m", "qwen_refresher"])
        #: APScheduler's "skipped: maximum number of running instances reached" warnings: a
        #: family's job re-added while an instance of it is queued or running.
        self.skipped_runs = 0
        self.skipped_by_job: Counter[str] = Counter()
        argv = run_argv(fake, *args, margin=margin, jitter=jitter, entry=entry)
        super().__init__(argv, env=home.env(**(env or {})), keep_lines=False,
                         secrets=lambda: [t for i in fake.issued
                                          for t in (i.access_token, i.refresh_token)])

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every JSON log record so far: the live list (append-only while the daemon runs)."""
        return self.records

    def on_line(self, line: str, event: dict[str, Any] | None, arrived: float) -> None:
        if event is None and "maximum number of running instances" in line:
            self.skipped_runs += 1
            job = _SKIPPED_JOB.search(line)
            self.skipped_by_job[job.group(1) if job else "?"] += 1
            return
        if event is not None:
            event["_arrived"] = arrived
            event["_ts"] = _parse_ts(event.get("timestamp")) or arrived
        super().on_line(line, event, arrived)

    def wait_event(self, name: str, timeout: float = 20.0,  # type: ignore[override]
                   at_least: int = 1) -> dict[str, Any] | None:
        """The first ``name`` record, or None if none came within ``timeout`` s (a benchmark
        reports what it saw instead of failing)."""
        if not self.wait(lambda: self.counts[name] >= at_least, timeout):
            return None
        return self.named(name)[at_least - 1]

    def tail(self, n: int = 15) -> str:
        with self._cond:
            lines = [json.dumps({k: v for k, v in e.items() if not k.startswith("_")})
                     for e in self.records[-n:]] + self.other[-n:]
        return redact("\n".join(lines), self.secrets())

    def stop(self, timeout: float = 30.0) -> int:
        return super().stop(timeout)


def fmt_s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f} s"


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value * 1000:.1f} ms"


_SPARK = " .:-=+*#%@"


def spark(counts: Sequence[int]) -> str:
    """A one-line picture of a histogram (each character one bucket, darker = more)."""
    if not counts:
        return ""
    top = max(counts) or 1
    return "".join(_SPARK[min(len(_SPARK) - 1, round(c / top * (len(_SPARK) - 1)))]
                   if c else "_" for c in counts)


def sanitize(text: str) -> str:
    """Drops anything token-shaped from a diagnostic dump."""
    return re.sub(r"fake(acc|ref)-[A-Za-z0-9_-]+", "fake\\1-…", text)
