"""Fleet figures: N hosts x one token family through a real 3-member etcd cluster.

Each "host" is a real ``Engine`` with its own store file, state dir (lineage, journal) and
``Fleet`` (its own etcd client, watch and probe threads), all in this one process against the
fake Qwen server on 127.0.0.1; a follower's watch nudge runs its engine as the daemon's job
would. (20 full daemons would measure the 2-core machine's scheduler more than the protocol.)

Rotations alternate between two shapes:

- ``jittered``: one host reaches its due time first (the daemon's jitter spreads them) and
  rotates; the others learn it from the watch;
- ``stampede``: every host runs at the same instant (no jitter): all but one must lose.

Printed: server refreshes per rotation (must be 1, and no rejected or reused request), the
time from the server's answer to the last host's store written (p50/p99 over all hosts and
rotations), and etcd requests per host per hour when idle (default probe and watch settings),
measured over ``--idle`` seconds.

    .venv/bin/python benchmarks/fleet.py [--hosts 20] [--rotations 10] [--idle 65]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwen_refresher.engine import Engine, Member  # noqa: E402
from qwen_refresher.fleet import Fleet, FleetConfig  # noqa: E402
from qwen_refresher.fleet.cluster import EtcdCluster  # noqa: E402
from qwen_refresher.fleet.crypto import write_secret_file  # noqa: E402
from qwen_refresher.history import TokenHistory  # noqa: E402
from qwen_refresher.journal import Journal  # noqa: E402
from qwen_refresher.models import Credentials, ProfileKey, fingerprint  # noqa: E402
from qwen_refresher.qwen import QwenOAuthClient  # noqa: E402
from qwen_refresher.stores.openclaw import OpenClawStore  # noqa: E402
from qwen_refresher.testing.fake_qwen import (  # noqa: E402
    QWEN_CLIENT_ID,
    FakeQwen,
    FakeQwenConfig,
)

PROFILE = "qwen-portal:default"
SALT = b"fleet-bench-salt"


class Host:
    def __init__(self, name: str, root: Path, fake: FakeQwen, urls: list[str], secret: Path,
                 pool: ThreadPoolExecutor, writes: list[tuple[str, str, float]]) -> None:
        self.name = name
        self.store_path = root / "auth-profiles.json"
        state = root / "state"
        state.mkdir(parents=True, mode=0o700)
        self.fleet = Fleet(FleetConfig(urls=urls, secret_file=secret, namespace="bench",
                                       host_id=name, timeout=2, lease_ttl=3, inflight_grace=10))
        self.client = QwenOAuthClient(fake.token_url, fake.device_code_url, QWEN_CLIENT_ID,
                                      timeout=10)
        self.engine = Engine(client=self.client, salt=SALT,
                             history=TokenHistory(state / "lineage.log"),
                             journal=Journal(state), lock_timeout=5.0, fleet=self.fleet)
        self.pool = pool
        self.writes = writes
        self.lock = threading.Lock()
        self.fleet.on_change = self._nudged

    def _nudged(self, fid: str, members: frozenset[ProfileKey]) -> None:
        self.pool.submit(self.run, False)

    def held(self) -> str:
        return str(json.loads(self.store_path.read_bytes())["profiles"][PROFILE]["refresh"])

    def run(self, due: bool) -> str:
        with self.lock:  # one job per family, as the daemon's scheduler guarantees
            held = self.held()
            outcome = self.engine.run([Member(OpenClawStore(self.store_path), PROFILE)],
                                      due_at=0 if due else 2**40,
                                      planned_fp=fingerprint(held, SALT))
            if outcome.written and outcome.creds is not None:
                self.writes.append((self.name, outcome.creds.refresh, time.monotonic()))
            return outcome.result


def write_store(path: Path, creds: Credentials) -> None:
    doc = {"version": 1, "profiles": {PROFILE: {
        "type": "oauth", "provider": "qwen-portal", "access": creds.access,
        "refresh": creds.refresh, "expires": creds.expires_ms}}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    os.chmod(path, 0o600)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--rotations", type=int, default=10)
    ap.add_argument("--idle", type=float, default=65.0,
                    help="seconds of idle to count etcd requests over (0: skip)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qr-fleet-bench-"))
    secret = tmp / "fleet.key"
    write_secret_file(secret)
    writes: list[tuple[str, str, float]] = []
    with EtcdCluster(3) as cluster, FakeQwen(FakeQwenConfig(lifetime=3600)) as fake, \
            ThreadPoolExecutor(max_workers=args.hosts) as pool:
        access, refresh, expires = fake.issue_tokens(lifetime=3600)
        first = Credentials(access=access, refresh=refresh, expires_ms=expires)
        hosts = []
        for i in range(args.hosts):
            root = tmp / f"h{i:02d}"
            root.mkdir(mode=0o700)
            host = Host(f"host-{i:02d}", root, fake, cluster.urls, secret, pool, writes)
            write_store(host.store_path, first)
            hosts.append(host)
        for h in hosts:  # every host joins: reconciles once and starts watching
            h.run(False)
            h.fleet.start()
        time.sleep(0.5)

        per_rotation: list[int] = []
        lags: list[float] = []
        last_host: list[float] = []
        for rotation in range(args.rotations):
            shape = "stampede" if rotation % 2 else "jittered"
            before = len(fake.refresh_requests())
            if shape == "jittered":
                random.choice(hosts).run(True)
            else:
                list(pool.map(lambda h: h.run(True), hosts))
            target = fake.issued[-1].refresh_token
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and \
                    any(h.held() != target for h in hosts):
                time.sleep(0.005)
            # A store is written a moment before its run returns and logs the time.
            while time.monotonic() < deadline and \
                    len({name for name, tok, _ in writes if tok == target}) < len(hosts):
                time.sleep(0.005)
            requests = fake.refresh_requests()[before:]
            per_rotation.append(len(requests))
            answered = max(r.monotonic for r in requests)
            times = {name: t for name, tok, t in writes if tok == target}
            host_lags = [times[h.name] - answered for h in hosts if h.name in times]
            lags.extend(host_lags)
            last_host.append(max(host_lags))
            print(f"rotation {rotation + 1:2d} ({shape:8s}): {len(requests)} server "
                  f"refresh(es), last of {len(host_lags)} hosts written "
                  f"{max(host_lags) * 1000:.0f} ms after the answer")
        bad = [r for r in fake.refresh_requests() if r.outcome != "ok"]

        idle_rate = None
        if args.idle > 0:
            for h in hosts:  # the default idle settings: probe every 15 s, watch re-opened
                h.fleet.config = FleetConfig(**{**h.fleet.config.__dict__,
                                                "probe_interval": 15.0, "watch_idle": 60.0})
            time.sleep(1)
            start = sum(h.fleet.client.requests for h in hosts)
            time.sleep(args.idle)
            spent = sum(h.fleet.client.requests for h in hosts) - start
            idle_rate = spent / len(hosts) * 3600 / args.idle

        for h in hosts:
            h.fleet.stop()
            h.client.close()

    print()
    print(f"hosts: {args.hosts}, one family, rotations: {args.rotations} "
          f"(half jittered, half stampede), etcd: 3 members on 127.0.0.1")
    print(f"server refreshes per rotation: {sorted(set(per_rotation))} "
          f"(rejected or reused requests: {len(bad)})")
    print(f"rotation -> each host written: p50 {statistics.median(lags) * 1000:.0f} ms, "
          f"p99 {pct(lags, 0.99) * 1000:.0f} ms")
    print(f"rotation -> last host written: p50 {statistics.median(last_host) * 1000:.0f} ms, "
          f"p99 {pct(last_host, 0.99) * 1000:.0f} ms")
    if idle_rate is not None:
        print(f"etcd requests per host per hour, idle: {idle_rate:.0f} "
              f"(measured over {args.idle:.0f} s; probe 15 s, watch re-opened after 60 s)")
    return 0 if set(per_rotation) == {1} and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
