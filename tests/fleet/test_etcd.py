"""The JSON-gateway client against a real 3-member cluster, and against hostile answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen_refresher.fleet.errors import FleetAnswerInvalid, FleetUnavailable
from qwen_refresher.fleet.etcd import Compare, EtcdClient, Get, Put, prefix_end
from qwen_refresher.testing.etcd_cluster import EtcdCluster


def watched(client: EtcdClient, prefix: bytes, change: Callable[[], object]) -> list[bytes]:
    """The values a watch on ``prefix`` (from now) sees when ``change`` runs."""
    seen: list[bytes] = []
    stop = threading.Event()
    start = client.get(prefix)[1] + 1

    def watch() -> None:
        for _, events in client.watch(prefix, prefix_end(prefix), start, idle=5, stop=stop):
            seen.extend(e.kv.value for e in events)
            if seen:
                return

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.3)
    change()
    thread.join(timeout=10)
    stop.set()
    return seen


def test_kv_txn_lease_and_watch(cluster: EtcdCluster, namespace: str) -> None:
    client = EtcdClient(cluster.urls, timeout=2)
    key = f"{namespace}/k".encode()
    assert client.get(key)[0] is None
    done = client.txn([Compare(key, "CREATE", 0)], [Put(key, b"v1")], [Get(key)])
    assert done.succeeded
    again = client.txn([Compare(key, "CREATE", 0)], [Put(key, b"v2")], [Get(key)])
    assert not again.succeeded and again.ranges[0][0].value == b"v1"
    kv, _ = client.get(key)
    assert kv is not None and kv.value == b"v1" and kv.mod_revision == done.revision

    lease = client.grant(1)
    lkey = f"{namespace}/leased".encode()
    client.txn([], [Put(lkey, b"x", lease)])
    assert client.keepalive(lease) >= 1
    deadline = time.monotonic() + 10
    while client.get(lkey)[0] is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get(lkey)[0] is None, "a lease not kept alive must expire"
    assert client.keepalive(lease) == 0

    prefix = f"{namespace}/".encode()
    assert watched(client, prefix, lambda: client.txn([], [Put(key, b"v3")])) == [b"v3"]


def test_failover_and_no_quorum(cluster: EtcdCluster, namespace: str) -> None:
    client = EtcdClient(cluster.urls, timeout=1)
    key = f"{namespace}/k".encode()
    client.txn([], [Put(key, b"v")])
    cluster.stop_member(0)
    assert client.get(key)[0] is not None  # the next URL answers
    cluster.stop_member(1)
    started = time.monotonic()
    with pytest.raises(FleetUnavailable, match="no etcd member answered"):
        client.get(key)
    assert time.monotonic() - started < 3 * 1 + 1.5, "every call has a deadline"
    problems = dict(client.status())
    assert problems[cluster.urls[2]] is not None  # no leader


class _Hostile(BaseHTTPRequestHandler):
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[type[_Hostile]]:
    handler = type("H", (_Hostile,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("body, problem", [
    (b"x" * 5000, "larger than"),
    (b"not json", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"header": {"revision": "12x"}}', "not an integer"),
    (b'{"header": {"revision": "1"}, "kvs": [{"key": "***"}]}', "not base64"),
    (b'{"header": {"revision": "1"}, "kvs": "nope"}', "not a list"),
    (b'{"error": "etcdserver: no leader", "code": 14}', "no leader"),
])
def test_hostile_answers_are_unavailability(hostile: type[_Hostile], body: bytes,
                                            problem: str) -> None:
    hostile.body = body
    client = EtcdClient([hostile.url], timeout=1, max_answer=4096)  # type: ignore[attr-defined]
    with pytest.raises(FleetUnavailable, match=problem):
        client.get(b"k")


def test_hostile_answer_is_invalid_kind(hostile: type[_Hostile]) -> None:
    hostile.body = b"not json"
    client = EtcdClient([hostile.url], timeout=1)  # type: ignore[attr-defined]
    with pytest.raises(FleetUnavailable) as caught:
        client.get(b"k")
    # Summarised across members as unavailability: never acted on.
    assert not isinstance(caught.value, FleetAnswerInvalid) or "not JSON" in str(caught.value)


def test_a_tap_counts_each_request_on_the_wire_and_can_hold_one(cluster: EtcdCluster,
                                                                 namespace: str) -> None:
    """The benchmark counts a host's etcd requests with a tap, and the kill test holds a
    host's commit in one: both only mean something if the tap sees exactly what the client
    sends (watch streams pass through) and a held request never reaches etcd."""
    from qwen_refresher.testing.etcd_tap import Taps

    with Taps(cluster.urls) as taps:
        tap = taps.add("h")
        client = EtcdClient([tap.url], timeout=2)
        key = f"{namespace}/tapped".encode()
        seen = watched(client, key, lambda: client.txn([], [Put(key, b"one")]))
        assert seen == [b"one"], "a watch stream passes through the tap"
        assert tap.counts() == {"/v3/kv/range": 1, "/v3/watch": 1, "/v3/kv/txn": 1}
        assert tap.total() == client.requests

        tap.hold("/v3/kv/txn")
        with pytest.raises(FleetUnavailable):
            client.txn([], [Put(key, b"two")])
        assert tap.held.is_set()
        direct = EtcdClient(cluster.urls, timeout=2)
        kv, _ = direct.get(key)
        assert kv is not None and kv.value == b"one", "a held request reached etcd"
        client.txn([], [Put(key, b"three")])  # one shot: the next passes
        assert direct.get(key)[0].value == b"three"  # type: ignore[union-attr]
        client.close()
        direct.close()


def test_a_step_deadline_bounds_a_call_over_silent_members(cluster: EtcdCluster,
                                                           namespace: str) -> None:
    """A member that accepts connections and never answers (a partition, a hung process)
    costs at most what is left of the step's deadline, not ``timeout`` x members; and the
    next call starts at the member after it."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepted: connects, then no answer
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = EtcdClient([url, url, cluster.urls[0]], timeout=1)
        started = time.monotonic()
        with client.deadline(0.6), pytest.raises(FleetUnavailable, match="deadline"):
            client.get(f"{namespace}/x".encode())
        assert time.monotonic() - started < 1.5, "the deadline did not bound the call"
        with client.deadline(2.5):  # one silent member left before the good one
            assert client.get(f"{namespace}/x".encode())[0] is None
        client.close()
