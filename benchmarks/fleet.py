"""Fleet figures: N real daemons ("hosts") x one token family through a real 3-member etcd cluster.

Each host is a real ``qwen-refresher run`` process (``benchmarks/_common.Daemon``, i.e.
``qwen_refresher/testing/daemon_proc.py``, the one daemon runner) with its own HOME, OpenClaw
state dir, store and state dir, against the fake Qwen server on 127.0.0.1, and its own
``testing.etcd_tap.Tap`` in front of the etcd cluster: a counting TCP proxy that sees every
HTTP request the host sends to etcd, on the wire.

The run:

1. every store is seeded with one long-lived token; the N daemons start (default settings but
   a short margin) and join the fleet;
2. a login on host 0 (a new short-lived token written into its store) reaches every host;
3. ``--rotations`` rotations of ``--lifetime``-second tokens follow, each refreshed by
   whichever host is due first; the last one is issued long-lived;
4. idle: every host's etcd requests are counted over ``--idle`` seconds (default probe every
   15 s, watch re-opened after 60 s of silence).

Printed: server refreshes per rotation (must be 1, and no rejected or reused request), the time
from the server's answer to the last host's store written (each store's mtime once it holds the
new token; p50/p99 over rotations), and etcd requests per host per hour when idle (counted by
the taps). ``--quick``: 3 hosts, 2 rotations, 3 s idle: only checks that it all still works.

    .venv/bin/python benchmarks/fleet.py [--hosts 20] [--rotations 10] [--idle 65] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from _common import Daemon, Home, fmt_ms, footer, header, loadavg, median, pct, table

from qwen_refresher.fleet.crypto import write_secret_file
from qwen_refresher.testing.etcd_cluster import EtcdCluster, EtcdNotInstalled, ensure_etcd
from qwen_refresher.testing.etcd_tap import Tap, Taps
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig

PROFILE = "qwen-portal:default"
AGENT = "main"


class Host:
    def __init__(self, index: int, root: Path, fake: FakeQwen, tap: Tap, secret: Path,
                 margin: float, jitter: float) -> None:
        self.name = f"host-{index:02d}"
        self.home = Home(root / self.name)
        self.tap = tap
        self.fake, self.secret, self.margin, self.jitter = fake, secret, margin, jitter
        self.daemon: Daemon | None = None

    def seed(self, creds: tuple[str, str, int]) -> None:
        self.home.write_store(AGENT, {PROFILE: creds})

    def start(self) -> None:
        self.daemon = Daemon(self.home, self.fake, margin=f"{self.margin:g}",
                             jitter=f"{self.jitter:g}", env={
                                 "QWEN_REFRESHER_FLEET": self.tap.url,
                                 "QWEN_REFRESHER_FLEET_SECRET_FILE": str(self.secret),
                                 "QWEN_REFRESHER_FLEET_NAMESPACE": "bench",
                                 "QWEN_REFRESHER_FLEET_HOST_ID": self.name})

    def held(self) -> str | None:
        return self.home.read_refresh(AGENT, PROFILE)

    def written_at(self) -> float:
        return os.stat(self.home.store_path(AGENT)).st_mtime_ns / 1e9


def wait_until(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def start_all(hosts: list[Host], seed: tuple[str, str, int]) -> float:
    """Seed every store, start every daemon, wait until each has joined: seconds taken."""
    t0 = time.monotonic()
    for h in hosts:
        h.seed(seed)
        h.start()
    started = all(h.daemon is not None and h.daemon.wait_event("started", 120) for h in hosts)
    joined = all(h.daemon is not None and h.daemon.wait_event("fleet_joined", 30)
                 for h in hosts)
    took = time.monotonic() - t0
    print(f"{len(hosts)} daemons ready in {took:.1f} s (started={started}, joined={joined}); "
          f"load {loadavg()}", flush=True)
    time.sleep(1.0)  # each host's start-up reconcile has run
    return took


def issued_more(fake: FakeQwen, before: int) -> bool:
    return len(fake.issued) > before


def all_hold(hosts: list[Host], token: str) -> bool:
    return all(h.held() == token for h in hosts)


def login_everywhere(fake: FakeQwen, hosts: list[Host], lifetime: float) -> float | None:
    """A login on host 0 (a new token in its store): seconds until the last host has it."""
    login = fake.issue_tokens(lifetime=lifetime)
    at = time.time()
    hosts[0].seed(login)
    if not wait_until(partial(all_hold, hosts, login[1]), 30):
        return None
    last = max(h.written_at() for h in hosts) - at
    print(f"login on host-00 -> every host: {fmt_ms(last)}", flush=True)
    return last


def answer_at(fake: FakeQwen, spent: str | None) -> float | None:
    """When the fake answered ``spent`` with new tokens (its request log), or None yet."""
    return next((r.at for r in fake.refresh_requests()
                 if r.refresh_token == spent and r.outcome == "ok"), None)


def answered_yet(fake: FakeQwen, spent: str | None) -> bool:
    return answer_at(fake, spent) is not None


def rotations(fake: FakeQwen, hosts: list[Host], count: int, lifetime: float,
              ) -> tuple[list[float], list[int], int]:
    """Wait for ``count`` rotations: (answer -> last host written, in seconds; server
    refreshes of each rotation's token; rotations that did not complete)."""
    lags: list[float] = []
    spends: list[int] = []
    incomplete = 0
    for rotation in range(count):
        if rotation == count - 1:
            fake.configure(lifetime=3600.0)  # the last token lets the fleet idle
        before = len(fake.issued)
        if not wait_until(partial(issued_more, fake, before), lifetime * 3, every=0.02):
            print(f"rotation {rotation + 1}: no refresh within {lifetime * 3:g} s", flush=True)
            return lags, spends, incomplete + count - rotation
        issued = fake.issued[before]
        # The fake files a token as issued a moment before it logs the request that got it.
        if not wait_until(partial(answered_yet, fake, issued.replaced), 5, every=0.01):
            print(f"rotation {rotation + 1}: the fake logged no answer", flush=True)
            return lags, spends, incomplete + count - rotation
        answered = answer_at(fake, issued.replaced)
        assert answered is not None
        everywhere = wait_until(partial(all_hold, hosts, issued.refresh_token), 30)
        incomplete += not everywhere
        last = max(h.written_at() for h in hosts) - answered
        lags.append(last)
        spends.append(sum(1 for r in fake.refresh_requests()
                          if r.refresh_token == issued.replaced))
        print(f"rotation {rotation + 1:2d}: {spends[-1]} server refresh(es); last of "
              f"{len(hosts)} hosts written {last * 1000:.0f} ms after the answer"
              f"{'' if everywhere else ' (not every host)'}; load {loadavg()}", flush=True)
    return lags, spends, incomplete


def idle_requests(hosts: list[Host], seconds: float) -> tuple[float, Counter[str]]:
    """etcd requests per host per hour over ``seconds`` of idle, counted by the taps."""
    time.sleep(2.0)
    before = [h.tap.counts() for h in hosts]
    time.sleep(seconds)
    paths: Counter[str] = Counter()
    for h, b in zip(hosts, before, strict=True):
        paths.update(h.tap.counts() - b)
    print(f"idle etcd requests by path (all hosts, {seconds:g} s): {dict(paths)}")
    return sum(paths.values()) / len(hosts) * 3600 / seconds, paths


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--rotations", type=int, default=10)
    ap.add_argument("--lifetime", type=float, default=10.0,
                    help="seconds a refreshed token lives (the margin is half of it)")
    ap.add_argument("--idle", type=float, default=65.0,
                    help="seconds of idle to count etcd requests over (0: skip)")
    ap.add_argument("--quick", action="store_true",
                    help="3 hosts, 2 rotations, 3 s idle: a smoke run, figures mean little")
    args = ap.parse_args()
    if args.quick:
        args.hosts, args.rotations, args.idle, args.lifetime = 3, 2, 3.0, 6.0
    return args


def main() -> int:
    args = parse_args()
    margin, jitter = args.lifetime / 2, min(1.0, args.lifetime / 10)
    header(f"fleet: {args.hosts} daemons x one family, real 3-member etcd",
           f"hosts={args.hosts} rotations={args.rotations} lifetime={args.lifetime:g}s "
           f"margin={margin:g}s jitter={jitter:g}s idle={args.idle:g}s")
    try:
        ensure_etcd()
    except EtcdNotInstalled as exc:
        table([("etcd", "unavailable", str(exc)[:60])])
        footer()
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="qr-fleet-bench-"))
    secret = tmp / "fleet.key"
    write_secret_file(secret)
    hosts: list[Host] = []
    rows: list[tuple[str, str, str]] = []
    ok = False
    try:
        with EtcdCluster(3) as cluster, Taps(cluster.urls) as taps, \
                FakeQwen(FakeQwenConfig(lifetime=args.lifetime)) as fake:
            hosts = [Host(i, tmp, fake, taps.add(f"h{i}"), secret, margin, jitter)
                     for i in range(args.hosts)]
            ready_s = start_all(hosts, fake.issue_tokens(lifetime=3600))
            login_last = login_everywhere(fake, hosts, args.lifetime)
            lags, spends, incomplete = rotations(fake, hosts, args.rotations, args.lifetime)
            bad = Counter(r.outcome for r in fake.refresh_requests() if r.outcome != "ok")
            idle = idle_requests(hosts, args.idle)[0] if args.idle > 0 else None
            needs_login = sum(h.daemon.count("needs_login") for h in hosts if h.daemon)
            ok = (not incomplete and set(spends) == {1} and not bad and needs_login == 0
                  and login_last is not None)
            rows = [
                ("hosts (daemons) / etcd members", f"{args.hosts} / 3", "20 / 3"),
                ("daemons started and joined", f"{ready_s:.1f} s", "-"),
                ("server refreshes per rotation", ",".join(map(str, sorted(set(spends))))
                 + f" ({len(spends)} rotations)", "1"),
                ("rejected or reused requests", str(sum(bad.values())), "0"),
                ("needs_login events", str(needs_login), "0"),
                ("rotation -> last host written, p50", fmt_ms(median(lags)), "-"),
                ("rotation -> last host written, p99", fmt_ms(pct(lags, 0.99)), "-"),
                ("login -> last host written", fmt_ms(login_last), "-"),
            ]
            if idle is not None:
                rows.append(("etcd requests per host per hour, idle", f"{idle:.0f}", "-"))
    finally:
        running = [h.daemon for h in hosts if h.daemon is not None]
        for d in running:  # SIGTERM all at once, then reap each
            d.signal()
        for d in running:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    table(rows)
    footer()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
