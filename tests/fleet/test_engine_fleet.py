"""The engine's fleet seam: three "hosts" in one process (each its own store file, state dir,
history, journal, engine and Fleet) sharing one family through a real 3-member etcd, against
the fake Qwen server. They race on real threads at every due time."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwen_refresher.engine import Engine, Member, Outcome
from qwen_refresher.fleet import Fleet, FleetConfig, Ticket
from qwen_refresher.fleet.etcd import b64, prefix_end
from qwen_refresher.history import TokenHistory
from qwen_refresher.journal import Journal
from qwen_refresher.models import Credentials, fingerprint
from qwen_refresher.qwen import QwenOAuthClient
from qwen_refresher.stores.openclaw import OpenClawStore
from qwen_refresher.testing.etcd_cluster import EtcdCluster
from qwen_refresher.testing.fake_qwen import QWEN_CLIENT_ID, FakeQwen, FakeQwenConfig

PROFILE = "qwen-portal:default"
SALT = b"fleet-engine-salt"


@pytest.fixture
def fake() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as server:
        yield server


@dataclass
class Host:
    name: str
    store_path: Path
    engine: Engine
    fleet: Fleet
    client: QwenOAuthClient

    @property
    def member(self) -> Member:
        return Member(OpenClawStore(self.store_path), PROFILE)

    def held(self) -> str:
        return str(json.loads(self.store_path.read_bytes())["profiles"][PROFILE]["refresh"])

    def run(self) -> Outcome:
        held = self.held()
        return self.engine.run([self.member], due_at=0, planned_fp=fingerprint(held, SALT))


def write_store(path: Path, creds: Credentials) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"version": 1, "profiles": {PROFILE: {
        "type": "oauth", "provider": "qwen-portal", "access": creds.access,
        "refresh": creds.refresh, "expires": creds.expires_ms}}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    os.chmod(path, 0o600)


@pytest.fixture
def hosts(tmp_path: Path, fake: FakeQwen, cluster: EtcdCluster, secret_file: Path,
          namespace: str) -> Iterator[list[Host]]:
    access, refresh, expires = fake.issue_tokens(lifetime=3600)
    first = Credentials(access=access, refresh=refresh, expires_ms=expires)
    made = []
    for name in ("a", "b", "c"):
        root = tmp_path / name
        state = root / "state"
        state.mkdir(parents=True, mode=0o700)
        store = root / "auth-profiles.json"
        write_store(store, first)
        fleet = Fleet(FleetConfig(urls=cluster.urls, secret_file=secret_file,
                                  namespace=namespace, host_id=f"host-{name}", timeout=1,
                                  lease_ttl=2, inflight_grace=3, adopt_wait=3))
        client = QwenOAuthClient(fake.token_url, fake.device_code_url, QWEN_CLIENT_ID,
                                 timeout=5)
        engine = Engine(client=client, salt=SALT, history=TokenHistory(state / "lineage.log"),
                        journal=Journal(state), lock_timeout=2.0, fleet=fleet)
        made.append(Host(name, store, engine, fleet, client))
    yield made
    for h in made:
        h.client.close()
        h.fleet.client.close()


def race(hosts: list[Host]) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(hosts)
    barrier = threading.Barrier(len(hosts))

    def go(i: int) -> None:
        barrier.wait()
        outcomes[i] = hosts[i].run()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]


def test_one_refresh_per_rotation_fleet_wide(hosts: list[Host], fake: FakeQwen) -> None:
    for rotation in range(1, 4):
        outcomes = race(hosts)
        results = sorted(o.result for o in outcomes)
        assert results.count("rotated") == 1, [(o.result, o.reason) for o in outcomes]
        assert len(fake.refresh_requests()) == rotation
        # Followers: the next run (the watch's nudge in the daemon) writes the new tokens.
        for h in hosts:
            h.run() if h.held() != fake.issued[-1].refresh_token else None
        assert {h.held() for h in hosts} == {fake.issued[-1].refresh_token}
    assert fake.reuse_count == 0
    assert not [r for r in fake.refresh_requests() if r.outcome != "ok"]


def test_follower_with_an_old_generation_adopts_instead_of_spending(
        hosts: list[Host], fake: FakeQwen) -> None:
    a, b, _ = hosts
    assert a.run().result == "rotated"
    outcome = b.run()  # due, but its token is the fleet's previous generation
    assert outcome.result == "synced", outcome.reason
    assert b.held() == a.held() == fake.issued[-1].refresh_token
    assert len(fake.refresh_requests()) == 1


def test_no_quorum_no_spend_but_reads_go_on(hosts: list[Host], fake: FakeQwen,
                                            cluster: EtcdCluster) -> None:
    a = hosts[0]
    a.run()  # the family exists in the fleet
    before = len(fake.refresh_requests())
    cluster.stop_member(1)
    cluster.stop_member(2)
    outcome = a.run()
    assert outcome.result == "unavailable" and "etcd" in (outcome.reason or "")
    assert len(fake.refresh_requests()) == before
    assert a.fleet.unavailable_since is not None
    not_due = a.engine.run([a.member], due_at=2**40)  # not due: nothing asked of the fleet
    assert not_due.result == "not_due"


def test_a_record_holding_a_dead_token_is_replaced_not_adopted(
        hosts: list[Host], fake: FakeQwen, namespace: str) -> None:
    """etcd emptied (or restored from an old backup), then a lagging host re-creates the
    family with a token the others saw rotated away: they publish theirs instead of adopting
    a dead token, and the lagging host comes up to date."""
    a, b, _ = hosts
    old = b.held()
    assert a.run().result == "rotated"
    new = a.held()
    prefix = f"{namespace}/".encode()
    a.fleet.client.call("/v3/kv/deleterange", {"key": b64(prefix),
                                               "range_end": b64(prefix_end(prefix))})
    assert b.held() == old
    b.engine.run([b.member], due_at=2**40)  # re-creates the family from its (old) token
    outcome = a.engine.run([a.member], due_at=2**40)
    assert a.held() == new, outcome.reason
    assert b.run().result == "synced" and b.held() == new
    assert len(fake.refresh_requests()) == 1


class Crash(BaseException):
    """Stands for kill -9 at one instant: nothing after it runs in that process."""


def test_killed_between_journal_and_cas_is_recovered_at_restart(
        hosts: list[Host], fake: FakeQwen, tmp_path: Path) -> None:
    """Host a gets the server's answer, journals it, and "dies" before the CAS. Host b spends
    the old token, is rejected, waits, marks the record needs_login. When a starts again, its
    journal replay puts the new token in its store and publishes it: b adopts it."""
    a, b, _ = hosts

    tickets: list[Ticket] = []

    def die(ticket: Ticket, *args: object) -> str:
        tickets.append(ticket)
        raise Crash

    a.fleet.commit = die  # type: ignore[method-assign,assignment]
    with pytest.raises(Crash):
        a.run()
    assert [r.outcome for r in fake.refresh_requests()] == ["ok"]
    new = fake.issued[-1].refresh_token
    a.fleet.release(tickets[0])  # the dead process's leases lapse on their own

    rejected = b.run()
    assert rejected.result == "rejected"  # the old token was spent by a; nothing newer yet

    # a restarts: a new Fleet (its fleet.json is not used here: the same process memory is
    # gone, so rebuild from the state dir) and a journal replay, as Daemon._restore does.
    state = a.store_path.parent / "state"
    journal, history = Journal(state), TokenHistory(state / "lineage.log")
    history.load()
    for replaces, fp, creds, _members in journal.pending():
        history.link(replaces, fp)
        history.remember(fp, creds)
    fleet = Fleet(a.fleet.config)
    fleet.known.restore(a.fleet.known.snapshot())  # what fleet.json would hold
    a.engine = Engine(client=a.client, salt=SALT, history=history, journal=journal,
                      lock_timeout=2.0, fleet=fleet)
    a.fleet = fleet
    a.engine.run([a.member], due_at=2**40)
    assert a.held() == new
    assert b.engine.run([b.member], due_at=2**40).result == "synced"
    assert b.held() == new
    assert [r.outcome for r in fake.refresh_requests()] == ["ok", "reused"]  # refused
