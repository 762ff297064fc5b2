"""How long ``qwen-refresher status`` takes next to a bare ``python -c pass``.

Health checks run ``status`` every few seconds, so the goal is a wall time within 5x of starting
the interpreter and doing nothing. This script builds a populated home (two OpenClaw agents and
Qwen Code's file), publishes a daemon state the way the daemon does (``state.write_state``),
holds the daemon lock itself so status sees a running daemon, and times each command N times,
interleaved so that background load hits all of them alike.

Byte-code: this tree is often run with ``PYTHONDONTWRITEBYTECODE=1``, which makes every run
recompile our modules; an installed package has its ``.pyc`` files. By default the children get
a private ``PYTHONPYCACHEPREFIX`` (and one warm-up run) to match an installation; ``--as-is``
keeps the environment untouched.

If ``OPENCLAW_BIN`` names OpenClaw's CLI, ``openclaw models status --json`` is timed too
(a few runs: it takes seconds).

    .venv/bin/python benchmarks/status_speed.py [-n 40] [--as-is] [--agents 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_refresher.state import DaemonLock, PublishedState, StoreStatus, write_state

PROFILES = (("main", "qwen-portal:default"), ("main", "qwen-portal:qwen-cli"),
            ("work", "qwen-portal:default"))


def _store(path: Path, profiles: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"version": 1, "profiles": {
        pid: {"type": "oauth", "provider": "qwen-portal", "access": f"access-{n}",
              "refresh": f"refresh-{n}", "expires": exp}
        for n, (pid, exp) in enumerate(profiles.items())}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.chmod(0o600)


def build_home(root: Path, wanted: tuple[tuple[str, str], ...] = PROFILES,
               ) -> tuple[dict[str, str], Path]:
    """A home with stores and a published state; returns the children's env and state dir."""
    home = root / "home"
    now = time.time()
    expires = int((now + 6 * 3600) * 1000)
    by_agent: dict[str, dict[str, int]] = {}
    for agent, profile in wanted:
        by_agent.setdefault(agent, {})[profile] = expires
    stores = {}
    for agent, profiles in by_agent.items():
        path = home / ".openclaw" / "agents" / agent / "agent" / "auth-profiles.json"
        _store(path, profiles)
        stores[agent] = path
    qwen = home / ".qwen" / "oauth_creds.json"
    qwen.parent.mkdir(mode=0o700)
    qwen.write_text(json.dumps({"access_token": "a", "refresh_token": "r", "token_type": "Bearer",
                                "expiry_date": expires, "resource_url": "portal.qwen.ai"}))
    state_dir = home / ".local" / "state" / "qwen-refresher"
    rows = [{"store": str(stores[a]), "store_kind": "openclaw", "agent": a, "profile": p,
             "family": f"fam{n}", "state": "ok", "expires_at": expires / 1000,
             "next_refresh_at": expires / 1000 - 900, "last_refresh_at": now - 60,
             "attempts": 0, "last_error": None,
             "login_command": "openclaw models auth login --provider qwen-portal"}
            for n, (a, p) in enumerate(wanted)]
    rows.append({**rows[0], "store": str(qwen), "store_kind": "qwen-code", "agent": None,
                 "profile": "qwen-code", "family": "fam0"})
    state: PublishedState = {
        "schema_version": 1,
        "daemon": {"pid": os.getpid(), "version": "bench", "started_at": now - 3600,
                   "updated_at": now, "next_sweep_at": now + 300},
        "profiles": rows,  # type: ignore[typeddict-item]
        "stores": [StoreStatus(path=str(p), kind="openclaw", error=None)
                   for p in stores.values()]
        + [StoreStatus(path=str(qwen), kind="qwen-code", error=None)],
        "consumed": [],
    }
    time.sleep(0.01)  # the state is published after the stores were last written
    write_state(state_dir, state)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QWEN_REFRESHER_", "OPENCLAW_", "XDG_"))}
    env["HOME"] = str(home)
    return env, state_dir


def time_runs(commands: dict[str, list[str]], env: dict[str, str], n: int,
              expect: int | None = 0) -> dict[str, list[float]]:
    """Run every command once (warm-up, exit code checked unless None), then n rounds
    interleaved."""
    usable: dict[str, list[str]] = {}
    for name, cmd in commands.items():
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"  {name}: skipped ({exc})")
            continue
        if expect is not None and proc.returncode != expect:
            print(f"  {name}: skipped (exit {proc.returncode}: "
                  f"{(proc.stderr or proc.stdout).strip()[-200:]})")
            continue
        usable[name] = cmd
    times: dict[str, list[float]] = {name: [] for name in usable}
    for _ in range(n):
        for name, cmd in usable.items():
            start = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return times


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else values[0]


def report(times: dict[str, list[float]], baseline: str) -> None:
    base = statistics.median(times[baseline])
    print(f"{'command':58} {'median':>9} {'p90':>9} {'x pass':>7}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:58} {med * 1000:7.1f}ms {p90(values) * 1000:7.1f}ms {med / base:6.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=40, help="runs per command (default 40)")
    parser.add_argument("--agents", type=int,
                        help="N agents x 2 qwen profiles instead of the 3 default profiles "
                             "(e.g. 1000: status at 2,000 profiles)")
    parser.add_argument("--as-is", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE etc. as they are")
    opts = parser.parse_args()
    python = sys.executable
    script = str(Path(python).with_name("qwen-refresher"))
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        profiles = PROFILES if not opts.agents else tuple(
            (f"agent{i:04d}", p) for i in range(opts.agents)
            for p in ("qwen-portal:default", "qwen-portal:qwen-cli"))
        env, state_dir = build_home(Path(tmp), profiles)
        if not opts.as_is:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        lock = DaemonLock(state_dir)
        lock.acquire()  # status now sees a running daemon: this process
        try:
            commands = {
                "python -c pass": [python, "-c", "pass"],
                "qwen-refresher status --quiet": [script, "status", "--quiet"],
                "python -m qwen_refresher status --quiet": [python, "-m", "qwen_refresher",
                                                            "status", "--quiet"],
                "python -m qwen_refresher status --json": [python, "-m", "qwen_refresher",
                                                           "status", "--json"],
            }
            print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, n={opts.n}, "
                  f"bytecode {'as-is' if opts.as_is else 'cached (private prefix)'}")
            times = time_runs(commands, env, opts.n)
            openclaw = os.environ.get("OPENCLAW_BIN")  # a path, or a command line ("node x.mjs")
            if openclaw:
                oc_env = {**env, "PATH": os.environ.get("PATH", "")}
                cmd = [*shlex.split(openclaw), "models", "status", "--json"]
                times.update(time_runs({"openclaw models status --json": cmd}, oc_env,
                                       max(1, min(opts.n, 3)), expect=None))
        finally:
            lock.release()
    report(times, "python -c pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
