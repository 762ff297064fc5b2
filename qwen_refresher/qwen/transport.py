"""Bounded requests: every request ends by its deadline, every body is read within its cap.

httpx's timeouts are per operation, and httpx inflates a whole chunk of a compressed body at
once; a refresh runs under the store lock, which OpenClaw breaks when it is older than 30 s. So
the sockets here are bounded by the request's *overall* deadline (shortened when the daemon is
stopping), bodies are decompressed by us with the output counted as it grows, and a loopback
URL never goes through a proxy (which would receive the refresh token).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from .. import errors
from ..config import is_loopback_host
from ..protocols import StopSignal

#: Largest answer body we read, counted after decompression. A real answer is under 2 KiB.
MAX_BODY = 64 * 1024
#: Once shutdown is asked for, a request whose bytes have started to leave gets this long
#: (never more than its own deadline) to bring its answer back: the server may have rotated
#: already, and the answer then carries the only live refresh token. Under the 10 s a service
#: manager gives a stopping daemon. A request not started yet is never sent once stop is set.
STOP_GRACE = 8.0
#: How often a blocked read looks at the stop event.
_STOP_POLL = 0.25

# httpx logs every request line at INFO; our own log says what matters, once.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


def transport_failure(exc: httpx.TransportError, what: str,
                       ) -> tuple[type[errors.TransientOAuthError], str]:
    """The kind and the reason of a request that broke before a whole answer came back."""
    if isinstance(exc, httpx.TimeoutException):
        return errors.RequestTimeout, f"{what} timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return errors.NetworkError, f"cannot connect to {what}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return errors.NetworkError, f"{what} closed the connection without a valid answer"
    return errors.NetworkError, f"network error talking to {what} ({type(exc).__name__})"


class Budget:
    """The deadline of the request running on this thread, shortened when ``stop`` is set.

    Before a byte of the request is written, stop ends it at once (nothing was spent).
    After, the server may already have consumed the refresh token and its answer is the only
    copy of the new one: the request keeps up to ``STOP_GRACE`` from the moment stop was
    first seen, within its own deadline.
    """

    def __init__(self, seconds: float, stop: StopSignal | None) -> None:
        self.deadline = time.monotonic() + seconds
        self.stop = stop
        #: Set by the first write of the request: from then on the server may act on it.
        self.sent = False
        self._stop_seen: float | None = None

    def remaining(self) -> float:
        now = time.monotonic()
        if self.stop is not None and self.stop.is_set():
            if self._stop_seen is None:
                self._stop_seen = now
            grace = STOP_GRACE if self.sent else 0.0
            self.deadline = min(self.deadline, self._stop_seen + grace)
        return self.deadline - now


#: The budget of the request the current thread is making (the client is shared by threads,
#: and httpcore does a request's I/O on the thread that made it).
BUDGET = threading.local()


def _budget() -> Budget | None:
    budget: Budget | None = getattr(BUDGET, "current", None)
    return budget


def _bounded(timeout: float | None, exc: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the request's budget; raises when nothing is."""
    budget = _budget()
    if budget is None:
        return timeout
    left = budget.remaining()
    if left <= 0:
        raise exc("the request's overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every operation is bounded by the request's overall deadline.

    httpx's timeouts are per operation: a server that drips one byte every 2 s never trips
    a 15 s read timeout and can hold the request (and the store lock) open for ever. Each
    read here may wait only for what is left of the budget, and looks at the stop event
    every ``_STOP_POLL`` so that shutdown is not held up by a server that never answers.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        started = time.monotonic()
        while True:
            per_read = None if timeout is None else timeout - (time.monotonic() - started)
            if per_read is not None and per_read <= 0:
                raise httpcore.ReadTimeout("timed out")
            left = _bounded(per_read, httpcore.ReadTimeout)
            budget = _budget()
            if budget is None or budget.stop is None or (left is not None
                                                         and left <= _STOP_POLL):
                return self._inner.read(max_bytes, left)
            try:
                # A timed-out recv consumes nothing, so polling in slices is safe.
                return self._inner.read(max_bytes, _STOP_POLL)
            except httpcore.ReadTimeout:
                continue

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        bounded = _bounded(timeout, httpcore.WriteTimeout)  # raises if stopped before sending
        budget = _budget()
        if budget is not None:
            budget.sent = True
        self._inner.write(buffer, bounded)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(
            ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, _bounded(timeout, httpcore.ConnectTimeout), local_address,
            socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, _bounded(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def proxy_for(*urls: str) -> str | None:
    """The proxy the environment asks for, or None. Never one for a loopback URL: a proxy
    would receive the refresh token of a request meant never to leave this machine (and in
    clear text, since loopback is where http:// is allowed)."""
    hosts = [urlsplit(u).hostname or "" for u in urls]
    if any(is_loopback_host(h) for h in hosts):
        return None
    proxies = urllib.request.getproxies()
    scheme = urlsplit(urls[0]).scheme
    if any(urllib.request.proxy_bypass(h) for h in hosts):
        return None
    return proxies.get(scheme) or proxies.get("all") or None


def deadline_transport(proxy: str | None) -> httpx.HTTPTransport:
    """httpx's transport with every socket bounded by the request's overall deadline."""
    transport = httpx.HTTPTransport(proxy=proxy)  # trust_env: SSL_CERT_FILE still counts
    pool = transport._pool
    # httpcore takes a network backend only in the pool's constructor, which httpx does not
    # expose; the attribute is httpcore's documented extension point behind it.
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport


def _decoder(encoding: str) -> Any:
    """A zlib stream for the body's Content-Encoding, or None for identity."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if name == "deflate":
        return zlib.decompressobj()
    raise ValueError("an unsupported Content-Encoding")


def read_body(response: httpx.Response, cap: int = MAX_BODY) -> bytes:
    """The decoded body, refused (ValueError naming why) beyond ``cap`` bytes.

    Decompression is ours, not httpx's, so that output is bounded *while inflating*: httpx
    inflates a whole network chunk at once, and 64 KiB of gzip is 64 MiB of zeros. Raw bytes
    are capped as well (a compressed stream that inflates to nothing can still be endless).
    """
    decoder = _decoder(response.headers.get("Content-Encoding", ""))
    out = bytearray()
    raw = 0
    for chunk in response.iter_raw():
        raw += len(chunk)
        if raw > cap:
            raise ValueError(f"a body larger than {cap // 1024} KiB")
        if decoder is None:
            out += chunk
        else:
            pending = chunk
            while pending and len(out) <= cap:
                try:
                    out += decoder.decompress(pending, cap + 1 - len(out))
                except zlib.error:
                    raise ValueError("a body that does not decompress") from None
                pending = decoder.unconsumed_tail
        if len(out) > cap:
            raise ValueError(f"a body larger than {cap // 1024} KiB once decompressed")
    return bytes(out)
