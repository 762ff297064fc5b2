"""The protocol against a real cluster, two "hosts" (two Fleet objects, one secret)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from qwen_refresher.fleet import Fleet, FleetBusy, FleetConfig, FleetMoved, FleetUnavailable
from qwen_refresher.models import Credentials, ProfileKey
from qwen_refresher.testing.etcd_cluster import EtcdCluster


def creds(n: int) -> Credentials:
    return Credentials(access=f"ACCESS-{n}-xyzzy", refresh=f"REFRESH-{n}-plugh",
                       expires_ms=1_900_000_000_000 + n)


def host(cluster: EtcdCluster, secret: Path, ns: str, name: str, **kw: object) -> Fleet:
    config = FleetConfig(urls=cluster.urls, secret_file=secret, namespace=ns, host_id=name,
                         timeout=1, lease_ttl=2, inflight_grace=3, adopt_wait=2,
                         **kw)  # type: ignore[arg-type]
    return Fleet(config)


KEYS = [ProfileKey(Path("/s/a.json"), "qwen-portal:default")]


def test_one_spender_then_followers_adopt(cluster: EtcdCluster, secret_file: Path,
                                          namespace: str) -> None:
    a = host(cluster, secret_file, namespace, "host-a")
    b = host(cluster, secret_file, namespace, "host-b")
    first = a.reconcile(KEYS, creds(1))
    assert first.kind == "created"
    assert b.reconcile(KEYS, creds(1)).kind == "in_sync"
    assert b.reconcile(KEYS, creds(1)).fid == first.fid

    ticket = a.begin_spend(first.fid)
    with pytest.raises(FleetBusy, match="host-a"):
        b.begin_spend(first.fid)
    assert a.commit(ticket, KEYS, creds(2)) == "published"
    # b's stores still hold generation 1: b must not spend it, it adopts generation 2.
    with pytest.raises(FleetMoved):
        b.begin_spend(first.fid)
    seen = b.reconcile(KEYS, creds(1))
    assert seen.kind == "adopt" and seen.adopt == creds(2)
    assert b.reconcile(KEYS, creds(2)).kind == "in_sync"
    assert b.family_status()[first.fid]["role"] == "follower of host-a"
    assert b.begin_spend(first.fid) is not None  # lock and in-flight marker were released


def test_late_answer_lands_after_lease_loss(cluster: EtcdCluster, secret_file: Path,
                                            namespace: str) -> None:
    """A holder paused past its lease still lands its CAS (compare on revision): nobody else
    could move the record without spending the same token, which the server refuses."""
    a = host(cluster, secret_file, namespace, "host-a")
    b = host(cluster, secret_file, namespace, "host-b")
    fid = a.reconcile(KEYS, creds(1)).fid
    b.reconcile(KEYS, creds(1))
    ticket = a.begin_spend(fid)
    ticket.stop.set()  # no keep-alive: as if paused
    a.client.revoke(ticket.lock_lease)
    # The in-flight marker still blocks b for inflight_grace.
    with pytest.raises(FleetBusy):
        b.begin_spend(fid)
    assert a.commit(ticket, KEYS, creds(2)) == "published"
    assert b.reconcile(KEYS, creds(1)).adopt == creds(2)


def test_rejected_spender_adopts_the_fleets_newer_token(cluster: EtcdCluster,
                                                        secret_file: Path,
                                                        namespace: str) -> None:
    a = host(cluster, secret_file, namespace, "host-a")
    b = host(cluster, secret_file, namespace, "host-b")
    fid = a.reconcile(KEYS, creds(1)).fid
    b.reconcile(KEYS, creds(1))
    ticket_b = b.begin_spend(fid)
    # b is "paused"; its markers vanish (expired); a spends and publishes meanwhile.
    b.release(ticket_b)
    ticket_a = a.begin_spend(fid)
    assert a.commit(ticket_a, KEYS, creds(2)) == "published"
    # b's (late) request is rejected by the server: it adopts, it does not need a login.
    assert b.after_rejection(ticket_b) == creds(2)


def test_rejection_marks_needs_login_and_a_login_anywhere_wins(
        cluster: EtcdCluster, secret_file: Path, namespace: str) -> None:
    a = host(cluster, secret_file, namespace, "host-a")
    b = host(cluster, secret_file, namespace, "host-b")
    fid = a.reconcile(KEYS, creds(1)).fid
    b.reconcile(KEYS, creds(1))
    assert a.after_rejection(a.begin_spend(fid)) is None  # nothing newer within adopt_wait
    assert a.read(fid)[0].needs_login  # type: ignore[union-attr]
    # A login on b (a token the fleet never saw, same profiles) becomes the family's token.
    assert b.reconcile(KEYS, creds(50)).kind == "published"
    seen = a.reconcile(KEYS, creds(1))
    assert seen.kind == "adopt" and seen.adopt == creds(50) and seen.fid == fid


def test_unpublished_rotation_is_published_later(cluster: EtcdCluster, secret_file: Path,
                                                 namespace: str, tmp_path: Path) -> None:
    """etcd loses its quorum between the spend and the CAS; the host is even restarted before
    it comes back: what it agreed with the fleet is kept in fleet.json (no token in it), so
    its rotation is still published as the family's next generation."""
    known = tmp_path / "fleet.json"
    a = host(cluster, secret_file, namespace, "host-a", state_file=known)
    fid = a.reconcile(KEYS, creds(1)).fid
    ticket = a.begin_spend(fid)
    cluster.stop_member(1)
    cluster.stop_member(2)
    assert a.commit(ticket, KEYS, creds(2)) == "pending"
    with pytest.raises(FleetUnavailable):
        a.reconcile(KEYS, creds(2))
    assert a.unavailable_since is not None
    a.stop()
    assert b"REFRESH" not in known.read_bytes() and b"ACCESS" not in known.read_bytes()
    a = host(cluster, secret_file, namespace, "host-a", state_file=known)  # restarted
    cluster.start_member(1)
    cluster.start_member(2)
    cluster.wait_healthy()
    # A txn that timed out without a quorum may still commit once the quorum is back (the
    # old leader had it in its log): either way the fleet ends up holding ours.
    assert a.reconcile(KEYS, creds(2)).kind in ("published", "in_sync")
    assert a.read(fid)[0].creds == creds(2)  # type: ignore[union-attr]
    assert a.available
    b = host(cluster, secret_file, namespace, "host-b")
    assert b.reconcile(KEYS, creds(1)).adopt == creds(2)  # a joining host is brought up


def test_no_quorum_means_no_spend(cluster: EtcdCluster, secret_file: Path,
                                  namespace: str) -> None:
    a = host(cluster, secret_file, namespace, "host-a")
    fid = a.reconcile(KEYS, creds(1)).fid
    cluster.stop_member(0)
    a.reconcile(KEYS, creds(1))  # one member down: unaffected
    a.release(a.begin_spend(fid))
    cluster.stop_member(1)
    with pytest.raises(FleetUnavailable):
        a.begin_spend(fid)


def test_raw_etcd_values_hold_no_token(cluster: EtcdCluster, secret_file: Path,
                                       namespace: str) -> None:
    a = host(cluster, secret_file, namespace, "host-a")
    fid = a.reconcile(KEYS, creds(1)).fid
    a.commit(a.begin_spend(fid), KEYS, creds(2))
    dump = subprocess.run([cluster.etcdctl, "get", "--prefix", namespace, "-w", "json"],
                          env=cluster.etcdctl_env(), capture_output=True, check=True,
                          timeout=20).stdout
    raw = subprocess.run([cluster.etcdctl, "get", "--prefix", namespace],
                         env=cluster.etcdctl_env(), capture_output=True, check=True,
                         timeout=20).stdout
    assert raw.count(b"QRF1") == 1
    for n in (1, 2):
        c = creds(n)
        for token in (c.access, c.refresh):
            for form in encodings(token):
                assert form not in dump and form not in raw, "a token is readable in etcd"


def encodings(token: str) -> list[bytes]:
    t = token.encode()
    return [t, base64.b64encode(t), base64.urlsafe_b64encode(t), t.hex().encode(),
            base64.b64encode(t).rstrip(b"="), t[:12]]


def test_index_keys_are_bounded_and_recent_generations_still_find_the_family(
        cluster: EtcdCluster, secret_file: Path, namespace: str) -> None:
    """One index key per generation, but only the last INDEX_KEEP stay: the one a new
    generation pushes out is deleted in the commit's own transaction. A host whose store
    holds a recent old token (and no fleet.json) still finds the family by it."""
    from qwen_refresher.fleet.etcd import prefix_end
    from qwen_refresher.fleet.records import INDEX_KEEP

    a = host(cluster, secret_file, namespace, "host-a")
    fid = a.reconcile(KEYS, creds(0)).fid
    rotations = INDEX_KEEP + 5
    for n in range(1, rotations + 1):
        assert a.commit(a.begin_spend(fid), KEYS, creds(n)) == "published"
    prefix = f"{namespace}/t/".encode()
    kvs, _ = a.client.range(prefix, prefix_end(prefix))
    ids = {kv.key[len(prefix):].decode() for kv in kvs}
    assert len(ids) == INDEX_KEEP
    assert ids == {a.keys.token_id(creds(n).refresh)
                   for n in range(rotations - INDEX_KEEP + 1, rotations + 1)}
    lagging = host(cluster, secret_file, namespace, "host-lagging")  # no fleet.json
    seen = lagging.reconcile(KEYS, creds(rotations - INDEX_KEEP + 1))
    assert (seen.fid, seen.kind, seen.adopt) == (fid, "adopt", creds(rotations))
    a.stop()
    lagging.stop()


def test_a_refused_token_is_spent_once_fleet_wide(cluster: EtcdCluster, secret_file: Path,
                                                  namespace: str) -> None:
    """After the server refused a's spend: while a waits for the fleet to move it keeps the
    lock (b may not spend the same dead token), and once a marked the record needs_login
    nobody spends it again; a login (a new token published) clears it."""
    import threading

    from qwen_refresher.fleet import FleetNeedsLogin

    a = host(cluster, secret_file, namespace, "host-a")
    b = host(cluster, secret_file, namespace, "host-b")
    fid = a.reconcile(KEYS, creds(1)).fid
    assert b.reconcile(KEYS, creds(1)).kind == "in_sync"
    ticket = a.begin_spend(fid)
    result: list[Credentials | None] = []
    waiting = threading.Thread(target=lambda: result.append(a.after_rejection(ticket)))
    waiting.start()
    try:
        with pytest.raises(FleetBusy):
            b.begin_spend(fid)  # a is still waiting, lock held
    finally:
        waiting.join(timeout=10)
    assert result == [None]
    assert b.reconcile(KEYS, creds(1)).kind == "in_sync"
    with pytest.raises(FleetNeedsLogin):
        b.begin_spend(fid)
    assert b.family_status()[fid]["needs_login"]
    assert b.reconcile(KEYS, creds(9)).kind == "published"  # a login on b
    assert a.reconcile(KEYS, creds(1)).adopt == creds(9)
    a.commit(a.begin_spend(fid), KEYS, creds(10))
    a.stop()
    b.stop()


def test_a_host_that_lost_fleet_json_finds_its_family_by_its_profiles(
        cluster: EtcdCluster, secret_file: Path, namespace: str) -> None:
    """The host's state dir is gone (no fleet.json) and its store holds a token no index
    knows (a login made while its daemon was down): it finds its family through its own
    member keys and adopts the fleet's live token, instead of starting a family of its own."""
    a = host(cluster, secret_file, namespace, "host-a")
    fid = a.reconcile(KEYS, creds(1)).fid
    assert a.commit(a.begin_spend(fid), KEYS, creds(2)) == "published"
    a.stop()
    again = host(cluster, secret_file, namespace, "host-a")  # same host, memory lost
    seen = again.reconcile(KEYS, creds(50))
    assert (seen.fid, seen.kind, seen.adopt) == (fid, "adopt", creds(2))
    other = host(cluster, secret_file, namespace, "host-b")  # another host: not its keys
    assert other.reconcile(KEYS, creds(51)).kind == "created"
    again.stop()
    other.stop()
