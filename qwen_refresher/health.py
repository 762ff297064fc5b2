"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP, for Docker, Kubernetes and Prometheus.

The two probes answer different questions. ``/healthz`` (liveness): is the daemon's main loop
still turning? If not, restarting the container helps. ``/readyz`` (readiness): can the agents
use their tokens right now? If not, a person may have to act (a new login), and restarting the
daemon would not help, so it must never be the liveness probe.

Readiness rules (``readiness``): not ready when no qwen-portal profile is managed at all
(nothing to serve is a misconfiguration, not success), when any profile needs a login, holds an
expired token or sits in an unusable store. ``retrying`` is still ready while its current token
is valid: the agents are fine until expiry and the daemon is working on it.

A stdlib ``ThreadingHTTPServer`` on a daemon thread is plenty for a probe every few seconds
and a scrape a minute; access logs are dropped so probes do not flood the daemon's stderr.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    return not reasons, reasons


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: HealthServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.app = app


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "qwen-refresher"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        route = self.path.split("?", 1)[0]
        try:
            status, body, content_type = self.server.app.route(route)
        except Exception:  # a broken callback must answer 500, not kill the thread silently
            status, body, content_type = 500, b'{"error": "internal error"}\n', JSON_TYPE
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would drown the daemon's log; say nothing."""


def _json(status: int, doc: object) -> tuple[int, bytes, str]:
    return status, (json.dumps(doc) + "\n").encode(), JSON_TYPE


class HealthServer:
    """The daemon's HTTP endpoints. ``port`` 0 picks a free port (see ``.port``)."""

    def __init__(self, host: str, port: int, *, live_fn: Callable[[], bool],
                 profiles_fn: Callable[[], list[ProfileStatus]], metrics: Metrics) -> None:
        self.host = host
        self._port = port
        self.live_fn = live_fn
        self.profiles_fn = profiles_fn
        self.metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one after ``start()`` with port 0)."""
        return int(self._server.server_address[1]) if self._server is not None else self._port

    def start(self) -> None:
        """Bind (raises OSError if the address is taken) and serve on a daemon thread."""
        self._server = _Server((self.host, self._port), self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="qwen-refresher-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def route(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for one request path."""
        if path == "/healthz":
            return self._healthz()
        if path == "/readyz":
            ready, reasons = readiness(self.profiles_fn(), time.time())
            return _json(200, {"ready": True}) if ready else \
                _json(503, {"ready": False, "reasons": reasons})
        if path == "/metrics":
            body, content_type = self.metrics.render()
            return 200, body, content_type
        return _json(404, {"error": "not found",
                           "endpoints": ["/healthz", "/readyz", "/metrics"]})

    def _healthz(self) -> tuple[int, bytes, str]:
        try:
            alive = bool(self.live_fn())
        except Exception:
            alive = False
        return _json(200, {"status": "alive"}) if alive else _json(503, {"status": "stalled"})
