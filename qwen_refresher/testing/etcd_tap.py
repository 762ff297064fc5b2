"""A counting door in front of etcd, one per host: for the fleet's tests and benchmark.

Not used by the daemon. Each ``Tap`` listens on its own 127.0.0.1 port and forwards every TCP
connection to the first etcd member that accepts it, byte for byte (watch streams included).
On the way in it reads the HTTP/1.1 request heads (the JSON gateway's requests carry a
``Content-Length`` body), so it can

- count what a host asks of etcd, per path, as it crosses the wire (not as the client thinks
  it asked): the benchmark's "etcd requests per host per hour when idle";
- hold one request of a given path (``hold("/v3/kv/txn")``): its bytes never reach etcd and
  ``held`` is set, so a test can SIGKILL the host exactly between the server's answer and the
  etcd write that would publish it (the host journals, then sends that txn).

All taps share one asyncio loop on one thread. Every wait has a deadline; a head larger than
``MAX_HEAD`` or a chunked body stops the parsing for that connection (it is forwarded raw and
counted under ``"?"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Coroutine
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

#: Largest request head parsed.
MAX_HEAD = 64 * 1024
#: How long a connection to an etcd member may take.
CONNECT_TIMEOUT = 2.0


class Tap:
    """One host's door: ``url`` goes into its ``fleet`` setting."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop,
                 upstreams: list[tuple[str, int]]) -> None:
        self.name = name
        self._loop = loop
        self._upstreams = upstreams
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._hold: str | None = None
        #: Set when a request was held (its bytes kept from etcd).
        self.held = threading.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> Counter[str]:
        """Requests seen so far, per path."""
        with self._lock:
            return Counter(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def hold(self, path: str) -> None:
        """Keep the next request for ``path`` from etcd (one shot), and set ``held``."""
        with self._lock:
            self.held.clear()
            self._hold = path

    def _seen(self, path: str) -> bool:
        """Count one request; True when it is to be held."""
        with self._lock:
            self._counts[path] += 1
            if self._hold is not None and path == self._hold:
                self._hold = None
                return True
            return False

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: Exception = ConnectionError("no etcd member")
        for host, port in self._upstreams:
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port),
                                              CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                last = exc
        raise last

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        down: asyncio.Future[None] | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await self._open_upstream()
            down = asyncio.ensure_future(_pump(up_reader, writer))
            await self._requests(reader, up_writer)
            up_writer.close()  # the client is done: so is etcd's side, then the pump
            await asyncio.wait_for(down, 5)
        except (asyncio.CancelledError, OSError, TimeoutError):
            pass  # closing, or a side went away: this connection ends quietly
        finally:
            for w in (up_writer, writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()
            if down is not None and not down.done():
                down.cancel()

    async def _requests(self, reader: asyncio.StreamReader,
                        up: asyncio.StreamWriter) -> None:
        """Client -> etcd, request by request: count each, forward it or hold it."""
        buf = b""
        body_left = 0
        raw = False
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            while buf:
                if raw or body_left:
                    n = len(buf) if raw else min(body_left, len(buf))
                    up.write(buf[:n])
                    buf, body_left = buf[n:], (0 if raw else body_left - n)
                    continue
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raw = True
                        self._seen("?")
                    break
                head = buf[:end + 4]
                path, length, chunked = _parse_head(head)
                if chunked:
                    raw = True
                if self._seen(path if not chunked else "?"):
                    self.held.set()
                    # The rest of this connection never reaches etcd: wait for the
                    # client to go (it is killed) and drop what it sends.
                    while await reader.read(65536):
                        pass
                    return
                up.write(head)
                buf, body_left = buf[end + 4:], length
            await up.drain()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


async def _cancel_the_rest() -> None:
    """End every connection still open (a watch stream, a held request)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=2) if tasks else None


def _parse_head(head: bytes) -> tuple[str, int, bool]:
    """(path, Content-Length, chunked) of one request head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    path = parts[1].decode("ascii", "replace")[:200] if len(parts) >= 2 else "?"
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                length = max(0, int(value.strip()))
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return path, length, chunked


class Taps:
    """Many taps on one loop thread, in front of the same etcd members; a context manager."""

    def __init__(self, member_urls: list[str]) -> None:
        self._upstreams: list[tuple[str, int]] = []
        for url in member_urls:
            parts = urlsplit(url)
            self._upstreams.append((parts.hostname or "127.0.0.1", int(parts.port or 2379)))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="etcd-taps",
                                        daemon=True)
        self.taps: list[Tap] = []

    def _run(self, coro: Coroutine[Any, Any, None], timeout: float = 10.0) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> Taps:
        self._thread.start()
        return self

    def add(self, name: str) -> Tap:
        tap = Tap(name, self._loop, self._upstreams)
        self._run(tap._serve())
        self.taps.append(tap)
        return tap

    def close(self) -> None:
        if self._thread.is_alive():
            for tap in self.taps:
                with contextlib.suppress(Exception):
                    self._run(tap._close())
            with contextlib.suppress(Exception):
                self._run(_cancel_the_rest())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Taps:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
