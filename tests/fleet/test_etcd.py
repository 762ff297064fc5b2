"""The JSON-gateway client against a real 3-member cluster, and against hostile answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen_refresher.fleet.cluster import EtcdCluster
from qwen_refresher.fleet.errors import FleetAnswerInvalid, FleetUnavailable
from qwen_refresher.fleet.etcd import Compare, EtcdClient, Get, Put, prefix_end


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

    seen: list[bytes] = []
    stop = threading.Event()
    start = client.get(key)[1] + 1

    def watch() -> None:
        for _, events in client.watch(f"{namespace}/".encode(),
                                      prefix_end(f"{namespace}/".encode()), start,
                                      idle=5, stop=stop):
            seen.extend(e.kv.value for e in events)
            if seen:
                return

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.3)
    client.txn([], [Put(key, b"v3")])
    thread.join(timeout=10)
    stop.set()
    assert seen == [b"v3"]


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
