"""Two helper processes for the concurrent-writer suite.

``writer`` behaves like an OpenClaw gateway <= 2026.3.22 after each model call: it takes
OpenClaw's lock, reads the store, "works" a little, updates its bookkeeping (``usageStats``,
``lastGood``) and rewrites the whole file **in place** (truncate, then two writes with a pause
between them, so a reader that takes no lock can see a torn file), then releases the lock.
Sometimes it writes from the snapshot it read when it "started" instead of from the fresh read:
that puts a consumed refresh token back (a revert). Its bookkeeping counter always increases, so
a lost update by anyone else shows up as the counter going backwards.

``reader`` reads the file without any lock, as fast as it reasonably can, and records every
read that does not parse (with its time) and every change of (refresh token, counter) it sees.

Both write a JSON report to ``--out`` when done. Tokens never appear in a report: only a short
sha256 prefix (``token_id``) does.

    python -m tests.reliability.openclaw_mimic writer --store PATH --duration 60 --out W.json
    python -m tests.reliability.openclaw_mimic reader --store PATH --duration 60 --out R.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_refresher.lockfile import OPENCLAW, FileLock

PROFILE = "qwen-portal:default"


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _refresh_of(doc: dict[str, Any]) -> str:
    return str(doc["profiles"][PROFILE]["refresh"])


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.requested = True


def writer(store: Path, duration: float, seed: int, stale_p: float, resnapshot_s: float,
           tear_pause: float) -> dict[str, Any]:
    rng = random.Random(seed)
    stop = _Stop()
    lock_path = Path(str(store.resolve()) + ".lock")
    deadline = time.monotonic() + duration
    snapshot: dict[str, Any] | None = None
    snapshot_at = 0.0
    counter = 0
    writes: list[dict[str, Any]] = []
    lock_waits: list[float] = []
    violations = 0
    while time.monotonic() < deadline and not stop.requested:
        time.sleep(rng.uniform(0.05, 0.3))
        lock = FileLock(lock_path, OPENCLAW, timeout=30.0)
        lock_waits.append(lock.acquire())
        try:
            data = store.read_bytes()
            inode = os.stat(store).st_ino
            doc = json.loads(data)
            if snapshot is None or time.monotonic() - snapshot_at > resnapshot_s:
                # A gateway (re)start or a config hot reload: a new in-memory snapshot.
                snapshot, snapshot_at = copy.deepcopy(doc), time.monotonic()
            stale = rng.random() < stale_p
            out = copy.deepcopy(snapshot if stale else doc)
            counter += 1
            out.setdefault("usageStats", {})[PROFILE] = {
                "errorCount": 0, "lastUsed": int(time.time() * 1000), "mimicCount": counter}
            out["lastGood"] = {"qwen-portal": PROFILE}
            time.sleep(rng.uniform(0.0, 0.05))  # the model call
            body = (json.dumps(out, indent=2, ensure_ascii=False) + "\n").encode()
            if store.read_bytes() != data or os.stat(store).st_ino != inode:
                violations += 1  # someone wrote while we held OpenClaw's lock
            started = time.time()
            with open(store, "r+b") as fh:  # OpenClaw's writeFile: truncate and write in place
                fh.truncate(0)
                half = len(body) // 2
                fh.write(body[:half])
                fh.flush()
                time.sleep(rng.uniform(tear_pause / 5, tear_pause))
                fh.write(body[half:])
                fh.flush()
            os.chmod(store, 0o600)
            writes.append({"start": started, "end": time.time(), "stale": stale,
                           "counter": counter,
                           "reverted": _refresh_of(out) != _refresh_of(doc),
                           "read_token": token_id(_refresh_of(doc)),
                           "wrote_token": token_id(_refresh_of(out))})
        finally:
            lock.release()
    return {"writes": writes, "lock_violations": violations, "last_counter": counter,
            "lock_wait_max_s": max(lock_waits, default=0.0)}


def reader(store: Path, duration: float) -> dict[str, Any]:
    stop = _Stop()
    deadline = time.monotonic() + duration
    reads = 0
    torn: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    last: tuple[str, int] | None = None
    while time.monotonic() < deadline and not stop.requested:
        started = time.time()
        try:
            data = store.read_bytes()
        except FileNotFoundError:
            torn.append({"start": started, "end": time.time(), "why": "missing"})
            continue
        ended = time.time()
        reads += 1
        try:
            doc = json.loads(data)
            token = _refresh_of(doc)
            count = int(doc.get("usageStats", {}).get(PROFILE, {}).get("mimicCount", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            torn.append({"start": started, "end": ended, "why": type(exc).__name__,
                         "size": len(data)})
        else:
            seen = (token_id(token), count)
            if seen != last:
                changes.append({"at": started, "token": seen[0], "counter": count})
                last = seen
        time.sleep(0.002)  # fast enough to catch a tear, and leaves the CPU to the rest
    return {"reads": reads, "torn": torn, "changes": changes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.openclaw_mimic")
    parser.add_argument("role", choices=["writer", "reader"])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stale-p", type=float, default=0.25)
    parser.add_argument("--resnapshot-s", type=float, default=3.0)
    parser.add_argument("--tear-pause", type=float, default=0.03)
    args = parser.parse_args(argv)
    if args.role == "writer":
        report = writer(args.store, args.duration, args.seed, args.stale_p, args.resnapshot_s,
                        args.tear_pause)
    else:
        report = reader(args.store, args.duration)
    args.out.write_text(json.dumps(report))
    print("done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
