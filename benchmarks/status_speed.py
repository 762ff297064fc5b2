"""How long ``qwen-refresher status`` takes next to a bare ``python -c pass`` (issue 16).

Health checks run ``status`` every few seconds, so its goals are ratios against starting the
same interpreter and doing nothing: <= 2.5x with 3 profiles, <= 4x for ``status`` and
``status --json`` with 1,000 profiles. A second baseline is measured in the same run: the
import floor of the six packages the daemon is built on (apscheduler, httpx, pydantic-settings,
structlog, watchdog, tenacity), which is what ``status`` would cost if it imported the daemon.

For each size (``--profiles``, default 3 and 1,000) this builds a populated home (OpenClaw
agents with two qwen profiles each, plus Qwen Code's file), publishes a daemon state the way the
daemon does (``state.write_state``), holds the daemon lock itself so status sees a running
daemon, and times each command N times, interleaved so that background load hits all alike.
Wall time is the figure; CPU time (user + system of the child, ``os.wait4``) is printed beside
it because it barely moves when other processes share the cores.

Measure in a clean ``pip install .`` venv: the test extras (click, pygments ...) add ``.pth``
and import work to every interpreter start, the baseline's included:

    python -m venv /tmp/v && /tmp/v/bin/pip install . && \
        /tmp/v/bin/python benchmarks/status_speed.py [-n 40] [--profiles 3,1000]

Children run in the temporary directory (not the checkout), so ``python -m qwen_refresher``
imports the installed package. Byte-code: by default the children get a private
``PYTHONPYCACHEPREFIX`` (and one warm-up run) to match an installation; ``--as-is`` keeps the
environment untouched. If ``OPENCLAW_BIN`` names OpenClaw's CLI, ``openclaw models status
--json`` is timed too (a few runs: it takes seconds).
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
    # Each profile its own expiry, a second apart, as in a real install (families refreshed
    # at different times): no renderer gets to reuse one formatted time for every row.
    by_agent: dict[str, dict[str, int]] = {}
    for n, (agent, profile) in enumerate(wanted):
        by_agent.setdefault(agent, {})[profile] = expires + n * 1000
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
             "family": f"fam{n}", "state": "ok", "expires_at": expires / 1000 + n,
             "next_refresh_at": expires / 1000 + n - 900, "last_refresh_at": now - 60 - n,
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


FLOOR = ("apscheduler", "httpx", "pydantic_settings", "structlog", "watchdog", "tenacity")


def _run(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``cmd``, output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = 0  # reaped by wait4; keep Popen from waiting again
    return wall, usage.ru_utime + usage.ru_stime


def time_runs(commands: dict[str, list[str]], env: dict[str, str], n: int, cwd: str,
              expect: dict[str, int] | None = None,
              ) -> dict[str, tuple[list[float], list[float]]]:
    """Run every command once (warm-up, exit code checked against ``expect``), then n rounds
    interleaved; name -> (wall times, CPU times)."""
    usable: dict[str, list[str]] = {}
    for name, cmd in commands.items():
        try:
            proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"  {name}: skipped ({exc})")
            continue
        want = (expect or {}).get(name, 0)
        if want >= 0 and proc.returncode != want:
            print(f"  {name}: skipped (exit {proc.returncode}: "
                  f"{(proc.stderr or proc.stdout).strip()[-200:]})")
            continue
        usable[name] = cmd
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in usable}
    for _ in range(n):
        for name, cmd in usable.items():
            wall, cpu = _run(cmd, env, cwd)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return times


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else values[0]


def report(times: dict[str, tuple[list[float], list[float]]], baseline: str,
           floor: str | None) -> None:
    base = statistics.median(times[baseline][0])
    base_cpu = statistics.median(times[baseline][1]) or 1e-9
    floor_wall = statistics.median(times[floor][0]) if floor in times else None
    print(f"{'command':52} {'median':>8} {'p90':>8} {'x pass':>7} {'cpu':>7} {'cpu x':>6}"
          f" {'x floor':>8}")
    for name, (walls, cpus) in times.items():
        med, cpu = statistics.median(walls), statistics.median(cpus)
        vs_floor = f"{med / floor_wall:7.2f}x" if floor_wall else "       -"
        print(f"{name:52} {med * 1000:6.1f}ms {p90(walls) * 1000:6.1f}ms {med / base:6.2f}x "
              f"{cpu * 1000:5.1f}ms {cpu / base_cpu:5.2f}x {vs_floor}")


def profiles_for(count: int) -> tuple[tuple[str, str], ...]:
    """``count`` qwen profiles: the 3 of a small install, else two per agent."""
    if count == len(PROFILES):
        return PROFILES
    names = ("qwen-portal:default", "qwen-portal:qwen-cli")
    return tuple((f"agent{i // 2:04d}", names[i % 2]) for i in range(count))


def measure(count: int, opts: argparse.Namespace, tmp: Path) -> None:
    python = sys.executable
    script = str(Path(python).with_name("qwen-refresher"))
    root = tmp / f"p{count}"
    env, state_dir = build_home(root, profiles_for(count))
    if not opts.as_is:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    cwd = str(root)
    lock = DaemonLock(state_dir)
    lock.acquire()  # status now sees a running daemon: this process
    try:
        commands = {
            "python -c pass": [python, "-c", "pass"],
            "import floor (6 card packages)": [python, "-c", "import " + ", ".join(FLOOR)],
            "qwen-refresher status --quiet": [script, "status", "--quiet"],
            "qwen-refresher status": [script, "status", "--no-color"],
            "qwen-refresher status --json": [script, "status", "--json"],
            "python -m qwen_refresher status --json": [python, "-m", "qwen_refresher",
                                                       "status", "--json"],
        }
        if opts.compare:  # another installation (e.g. the previous release), same run
            other = str(Path(opts.compare).with_name("qwen-refresher"))
            commands |= {f"compare: status {' '.join(a)}".rstrip(): [other, "status", *a]
                         for a in (("--quiet",), ("--no-color",), ("--json",))}
        print(f"\n{count} profiles ({len({a for a, _ in profiles_for(count)})} agents + "
              f"Qwen Code's file), n={opts.n}")
        times = time_runs(commands, env, opts.n, cwd)
        openclaw = os.environ.get("OPENCLAW_BIN")  # a path, or a command line ("node x.mjs")
        if openclaw and count == len(PROFILES):
            oc_env = {**env, "PATH": os.environ.get("PATH", "")}
            cmd = [*shlex.split(openclaw), "models", "status", "--json"]
            times.update(time_runs({"openclaw models status --json": cmd}, oc_env,
                                   max(1, min(opts.n, 3)), cwd,
                                   expect={"openclaw models status --json": -1}))
    finally:
        lock.release()
    report(times, "python -c pass", "import floor (6 card packages)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=40, help="runs per command (default 40)")
    parser.add_argument("--profiles", default="3,1000",
                        help="comma-separated profile counts to measure (default 3,1000)")
    parser.add_argument("--agents", type=int,
                        help="N agents x 2 qwen profiles (the old option: --profiles 2N)")
    parser.add_argument("--compare", metavar="PYTHON",
                        help="also time the qwen-refresher next to this interpreter (another "
                             "venv, e.g. the previous version) in the same run")
    parser.add_argument("--as-is", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE etc. as they are")
    opts = parser.parse_args()
    counts = [int(c) for c in opts.profiles.split(",") if c.strip()]
    if opts.agents:
        counts = [2 * opts.agents]
    print(f"python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} cpus, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}, bytecode "
          f"{'as-is' if opts.as_is else 'cached (private prefix)'}")
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        for count in counts:
            measure(count, opts, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
