"""A token server that misbehaves on purpose, on 127.0.0.1, in front of the real fake server.

Every request is recorded. A request whose ``refresh_token`` has a *behaviour* registered gets
that behaviour (a drip, an endless body, a gzip bomb, a redirect, an absurd answer...); every
other request is forwarded to the upstream ``FakeQwen`` and its answer relayed, so one daemon
can be attacked on one profile while its other profiles are served normally.

Behaviours write raw bytes to the socket: the point is to send what a well-behaved HTTP server
library would refuse to send.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx

from qwen_refresher.testing.fake_qwen import FakeQwen

Behaviour = Callable[["_Handler", dict[str, str]], None]


@dataclass(frozen=True)
class Seen:
    at: float
    path: str
    form: dict[str, str]


class HostileServer:
    """``token_url``/``device_code_url`` look like a FakeQwen's, so ``DaemonProcess`` takes it."""

    def __init__(self, upstream: FakeQwen | None = None) -> None:
        self.upstream = upstream
        self.behaviours: dict[str, Behaviour] = {}
        self.seen: list[Seen] = []
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hostile = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._relay = httpx.Client(trust_env=False, timeout=10)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._relay.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_url(self) -> str:
        return self.base_url + "/api/v1/oauth2/token"

    @property
    def device_code_url(self) -> str:
        return self.base_url + "/api/v1/oauth2/device/code"

    def attack(self, refresh_token: str, behaviour: Behaviour) -> None:
        self.behaviours[refresh_token] = behaviour

    def hits(self, refresh_token: str) -> list[Seen]:
        return [s for s in list(self.seen) if s.form.get("refresh_token") == refresh_token]

    def relay(self, form: dict[str, str]) -> httpx.Response:
        assert self.upstream is not None, "no upstream to forward to"
        return self._relay.post(self.upstream.token_url, data=form)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hostile(self) -> HostileServer:
        return self.server.hostile  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.hostile.seen.append(Seen(time.time(), self.path, {}))
        self.raw(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20)).decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(body).items()}
        self.hostile.seen.append(Seen(time.time(), self.path, form))
        behaviour = self.hostile.behaviours.get(form.get("refresh_token", ""))
        try:
            if behaviour is not None:
                behaviour(self, form)
                self.close_connection = True
            elif self.hostile.upstream is not None:
                answer = self.hostile.relay(form)
                self.send_bytes(answer.status_code, answer.content)
            else:
                self.send_bytes(404, b"{}")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    # -- primitives for behaviours ------------------------------------------------------------
    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def send_bytes(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                   ) -> None:
        head = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.raw(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def alive(self) -> bool:
        return not self.hostile.stopping.is_set()


# -- behaviours ---------------------------------------------------------------------------------


def answer(status: int, body: bytes | str | object, headers: dict[str, str] | None = None,
           ) -> Behaviour:
    """A fixed answer, never forwarded: the token is *not* consumed upstream."""
    data = body if isinstance(body, bytes) else (
        body.encode() if isinstance(body, str) else json.dumps(body).encode())

    def run(h: _Handler, form: dict[str, str]) -> None:
        h.send_bytes(status, data, headers)
    return run


def rotate_then(edit: Callable[[dict[str, Any]], str]) -> Behaviour:
    """Let the real server rotate, then relay its answer with ``edit`` applied: the new tokens
    exist and the old one is spent, exactly as when a real server sends a broken field."""

    def run(h: _Handler, form: dict[str, str]) -> None:
        upstream = h.hostile.relay(form)
        text = edit(upstream.json()) if upstream.status_code == 200 else upstream.text
        h.send_bytes(upstream.status_code, text.encode())
    return run


def drip(interval: float = 2.0) -> Behaviour:
    """Headers at once, then one body byte every ``interval`` seconds, for ever."""

    def run(h: _Handler, form: dict[str, str]) -> None:
        h.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n")
        while h.alive():
            h.raw(b" ")
            h.hostile.stopping.wait(interval)
    return run


def endless() -> Behaviour:
    """A 200 whose body never ends (no length, no chunking, connection never closed)."""

    def run(h: _Handler, form: dict[str, str]) -> None:
        h.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
              b'{"access_token": "')
        chunk = b"A" * 65536
        while h.alive():
            h.raw(chunk)
    return run


def gzip_bomb(inflated: int = 1 << 30) -> Behaviour:
    """A small gzip stream that inflates to ``inflated`` bytes (1 GiB: about 1 MB on the wire)."""

    def run(h: _Handler, form: dict[str, str]) -> None:
        h.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip"
              b"\r\nConnection: close\r\n\r\n")
        packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        h.raw(packer.compress(b'{"access_token": "'))
        block = b"A" * (1 << 20)
        for _ in range(inflated >> 20):
            if not h.alive():
                return
            out = packer.compress(block)
            if out:
                h.raw(out)
        h.raw(packer.flush())
    return run


def redirect(status: int, location: str) -> Behaviour:
    def run(h: _Handler, form: dict[str, str]) -> None:
        h.send_bytes(status, b"", {"Location": location})
    return run


def huge_headers(count: int = 400, size: int = 8000) -> Behaviour:
    """Megabytes of response headers before a body that would otherwise be a valid answer."""

    def run(h: _Handler, form: dict[str, str]) -> None:
        h.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        line = b"X-Pad-%d: " + b"p" * size + b"\r\n"
        for i in range(count):
            if not h.alive():
                return
            h.raw(line % i)
        h.raw(b"Content-Length: 2\r\n\r\n{}")
    return run


class Recorder:
    """A plain HTTP server that only records who came: the 'elsewhere' of a redirect, or a
    proxy that must never be used."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                recorder.requests.append(f"{self.command} {self.path}")
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_CONNECT = do_PUT = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
