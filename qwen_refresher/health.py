"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP, for Docker, Kubernetes and Prometheus.

The two probes answer different questions. ``/healthz`` (liveness): is the daemon's main loop
still turning? If not, restarting the container helps. ``/readyz`` (readiness): can the agents
use their tokens right now? If not, a person may have to act (a new login), and restarting the
daemon would not help, so it must never be the liveness probe.

Readiness rules (``readiness``): not ready when no qwen-portal profile is managed at all
(nothing to serve is a misconfiguration, not success), when any profile needs a login, holds an
expired token or sits in an unusable store, or while the gateway was not told of its newest
tokens (``on_rotate`` failing and being retried). ``retrying`` is still ready while its current
token is valid: the agents are fine until expiry and the daemon is working on it.

The port may face a network (in Kubernetes it listens on the pod network), so the server is
bounded whatever clients do (``_EventLoop``): one thread runs a ``selectors`` loop, at most
``MAX_CONNECTIONS`` sockets are open (a new one evicts the oldest unfinished request), a request
head must arrive whole within ``REQUEST_TIMEOUT`` and ``MAX_HEAD_BYTES``, and answers that read
the daemon's state are built by ``WORKERS`` threads, so ``/healthz`` never waits behind them.
Nothing is logged per request, so probes do not flood the daemon's stderr.
"""

from __future__ import annotations

import contextlib
import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

from .metrics import Metrics
from .paths import shorten_home
from .state import ProfileStatus

#: States in which the profile's token is served and the daemon has things in hand.
READY_STATES = frozenset({"ok", "due", "refreshing", "retrying"})
JSON_TYPE = "application/json"
NO_PROFILE = "no qwen-portal profile found"


def readiness(profiles: list[ProfileStatus], now: float) -> tuple[bool, list[str]]:
    """Whether every managed profile holds a token valid now; else the short reasons why not."""
    if not profiles:
        return False, [NO_PROFILE]
    reasons: list[str] = []
    for p in profiles:
        where = f"{p['profile'] or '(whole file)'} in {shorten_home(p['store'])}"
        if p["state"] not in READY_STATES:
            reasons.append(f"{where}: {p['state']}")
        elif p["expires_at"] is None or p["expires_at"] <= now:
            reasons.append(f"{where}: token expired")
        hook = p.get("hook")
        if hook is not None and not hook["ok"] and hook["failing_since"] is not None:
            # The gateway still holds the consumed token: it locks itself out at expiry.
            reasons.append(f"{where}: gateway reload failed (on_rotate) since "
                           f"{max(0, round(now - hook['failing_since']))} s ago, retrying")
    return not reasons, reasons


#: At most this many connections open at once; a new one beyond it evicts the oldest one that
#: has not finished sending its request (probes finish in milliseconds; idlers do not).
MAX_CONNECTIONS = 64
#: From accept to the end of the request head: a deadline for the whole head, not per read, so
#: a client dripping a byte a second (slowloris) is cut off like an idle one.
REQUEST_TIMEOUT = 5.0
#: From accept to the last byte of the answer (a client that does not read is dropped).
RESPONSE_TIMEOUT = 15.0
#: The request line and headers together; a probe sends about a hundred bytes.
MAX_HEAD_BYTES = 8192
#: Threads that build /readyz and /metrics answers (they take the daemon's lock and may wait on
#: it); /healthz is answered by the event loop itself and never waits behind them.
WORKERS = 2
#: Connections the kernel may hold completed before we accept them (kernel memory, not our
#: descriptors): a flood is accepted and evicted at once instead of retrying its SYNs for
#: seconds, which would also keep a probe waiting.
BACKLOG = 1024
#: Answers being built or queued at once; beyond it a request is answered 503 at once.
MAX_PENDING = 8
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 414: "URI Too Long",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
_INLINE = frozenset({"/healthz"})


class _Conn:
    """One client connection, from accept to close (one request each: ``Connection: close``)."""

    __slots__ = ("accepted", "head", "out", "sock", "stage")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.accepted = now
        self.head = b""
        self.out = b""
        self.stage = "read"  # "read" the request head, "work" in the pool, "write" the answer

    def deadline(self) -> float:
        return self.accepted + (REQUEST_TIMEOUT if self.stage == "read" else RESPONSE_TIMEOUT)


def _response(status: int, body: bytes, content_type: str, *, send_body: bool = True) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\nServer: qwen-refresher\r\n\r\n")
    return head.encode("ascii") + (body if send_body else b"")


def _error(status: int, message: str) -> bytes:
    return _response(status, (json.dumps({"error": message}) + "\n").encode(), JSON_TYPE)


def _parse_head(head: bytes) -> tuple[str, str] | bytes:
    """(method, path) of a complete request head, or the error answer to send instead."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        return _error(400, "bad request")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return _error(400, "bad request")
    if method not in ("GET", "HEAD"):
        return _error(405, "only GET and HEAD")
    return method, target.split("?", 1)[0]


class _EventLoop:
    """A single-threaded, non-blocking HTTP/1.1 server for a few tiny endpoints.

    Why not ``ThreadingHTTPServer`` (one thread per connection, no timeout, no cap: a thousand
    idle sockets cost a thousand threads and descriptors) nor waitress (a fixed pool, but at its
    ``connection_limit`` it stops accepting, so a probe waits in the kernel's backlog behind the
    idlers until their ``channel_timeout``, and a dripping client resets that timeout with every
    byte): here every connection costs one descriptor in a ``selectors`` set, the number of them
    is capped with the oldest unfinished request evicted first, the request head has one
    deadline and a size cap, and answers are built by a fixed pool of ``WORKERS`` threads.
    """

    def __init__(self, host: str, port: int, app: HealthServer) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.listener.listen(BACKLOG)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self.app = app
        self.port = int(self.listener.getsockname()[1])
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.conns: dict[int, _Conn] = {}
        # Daemon threads, not a ThreadPoolExecutor: its workers are joined at interpreter exit,
        # and one stuck in a callback would keep a stopping daemon from exiting.
        self.jobs: queue.SimpleQueue[tuple[_Conn, str, bool] | None] = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._work, name=f"qwen-refresher-http-{n}",
                                         daemon=True) for n in range(WORKERS)]
        for worker in self.workers:
            worker.start()
        self.pending = 0
        self.done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self.stopping = False

    # -- the loop ---------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            wait = min([0.5, *(c.deadline() - now for c in self.conns.values())])
            for key, events in self.selector.select(max(0.0, wait)):
                try:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self.wake_r:
                        self._drain_wakeups()
                    else:
                        self._ready(key.data, events)
                except Exception:  # one client must never take the loop down
                    if isinstance(key.data, _Conn):
                        self._close(key.data)
            self._finish_answers()
            now = time.monotonic()
            for conn in [c for c in self.conns.values() if c.deadline() <= now]:
                self._close(conn)
        self._shutdown()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self.wake_r.recv(4096):
                pass

    def _accept(self) -> None:
        for _ in range(256):  # then let the others have a turn
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: drop this round, keep serving
                return
            if len(self.conns) >= MAX_CONNECTIONS and not self._evict():
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic())
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request; False if there is none."""
        reading = [c for c in self.conns.values() if c.stage == "read"]
        if not reading:
            return False
        self._close(min(reading, key=lambda c: c.accepted))
        return True

    def _ready(self, conn: _Conn, events: int) -> None:
        if conn.stage == "read" and events & selectors.EVENT_READ:
            self._read(conn)
        elif conn.stage == "write" and events & selectors.EVENT_WRITE:
            self._write(conn)
        elif conn.stage == "work" and events & selectors.EVENT_READ:
            pass  # unregistered while working; nothing to do

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_HEAD_BYTES + 1 - len(conn.head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        conn.head += chunk
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            end = conn.head.find(b"\n\n")
        if end < 0:
            if len(conn.head) > MAX_HEAD_BYTES:
                too_long = b"\n" not in conn.head
                self._answer(conn, _error(414, "request line too long") if too_long else
                             _error(431, "request head too large"))
            return
        parsed = _parse_head(conn.head[:end])
        if isinstance(parsed, bytes):
            self._answer(conn, parsed)
            return
        method, path = parsed
        send_body = method == "GET"
        if path in _INLINE or path not in self.app.ROUTES:
            self._answer(conn, self._build(path, send_body))
            return
        if self.pending >= MAX_PENDING:
            self._answer(conn, _error(503, "busy"))
            return
        conn.stage = "work"
        self.selector.unregister(conn.sock)
        self.pending += 1
        self.jobs.put((conn, path, send_body))

    def _build(self, path: str, send_body: bool) -> bytes:
        try:
            status, body, content_type = self.app.route(path)
        except Exception:  # a broken callback answers 500 and stays quiet
            status, body, content_type = 500, b'{"error": "internal error"}\n', JSON_TYPE
        return _response(status, body, content_type, send_body=send_body)

    def _work(self) -> None:
        """A worker thread: build answers, hand them to the loop (which owns every socket)."""
        while (job := self.jobs.get()) is not None:
            conn, path, send_body = job
            self.done.put((conn, self._build(path, send_body)))
            self.wake()

    def _finish_answers(self) -> None:
        while True:
            try:
                conn, answer = self.done.get_nowait()
            except queue.Empty:
                return
            self.pending -= 1
            if self.conns.get(conn.sock.fileno()) is conn:  # not closed by its deadline
                conn.stage = "read"  # registered again below
                try:
                    self.selector.register(conn.sock, selectors.EVENT_READ, conn)
                    self._answer(conn, answer)
                except (OSError, ValueError, KeyError):
                    self._close(conn)

    def _answer(self, conn: _Conn, answer: bytes) -> None:
        conn.stage, conn.out, conn.head = "write", answer, b""
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self.conns.get(fd) is conn:
            del self.conns[fd]
            if conn.stage != "work":
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(conn.sock)
        conn.sock.close()

    def _shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        for _ in self.workers:
            self.jobs.put(None)
        self.selector.close()
        for sock in (self.listener, self.wake_r, self.wake_w):
            sock.close()

def _json(status: int, doc: object) -> tuple[int, bytes, str]:
    return status, (json.dumps(doc) + "\n").encode(), JSON_TYPE


class HealthServer:
    """The daemon's HTTP endpoints. ``port`` 0 picks a free port (see ``.port``)."""

    ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, host: str, port: int, *, live_fn: Callable[[], bool],
                 profiles_fn: Callable[[], list[ProfileStatus]], metrics: Metrics,
                 not_ready_fn: Callable[[], list[str]] | None = None) -> None:
        self.host = host
        self._port = port
        self.live_fn = live_fn
        self.profiles_fn = profiles_fn
        #: Reasons beyond the profiles' (the fleet's etcd unreachable: nothing is refreshed).
        self.not_ready_fn = not_ready_fn
        self.metrics = metrics
        self._loop: _EventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one after ``start()`` with port 0)."""
        return self._loop.port if self._loop is not None else self._port

    def start(self) -> None:
        """Bind (raises OSError if the address is taken) and serve on a daemon thread."""
        self._loop = _EventLoop(self.host, self._port, self)
        self._thread = threading.Thread(target=self._loop.serve, name="qwen-refresher-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stopping = True
        loop.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def route(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for one request path."""
        if path == "/healthz":
            return self._healthz()
        if path == "/readyz":
            ready, reasons = readiness(self.profiles_fn(), time.time())
            if self.not_ready_fn is not None:
                reasons = [*reasons, *self.not_ready_fn()]
                ready = not reasons
            return _json(200, {"ready": True}) if ready else \
                _json(503, {"ready": False, "reasons": reasons})
        if path == "/metrics":
            body, content_type = self.metrics.render()
            return 200, body, content_type
        return _json(404, {"error": "not found", "endpoints": sorted(self.ROUTES)})

    def _healthz(self) -> tuple[int, bytes, str]:
        try:
            alive = bool(self.live_fn())
        except Exception:
            alive = False
        return _json(200, {"status": "alive"}) if alive else _json(503, {"status": "stalled"})
