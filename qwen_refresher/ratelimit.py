"""A limit on how fast refresh requests leave for the token server.

Qwen rate-limits its token endpoint. After an outage (or a fleet started late) thousands of
families can be due at the same moment; jitter cannot spread tokens already inside their
margin, and concurrency alone bounds the rate only by the server's latency (``in flight /
latency``: 400 requests/s against a 10 ms endpoint). This spaces request *starts* at least
``1 / rate`` apart, whatever the concurrency.

A tiny reservation-style token bucket of capacity one, not a library: the wait must end the
moment the daemon stops (SIGTERM during a storm), which ``stop.wait`` gives and the blocking
modes of the libraries considered (pyrate-limiter, limits) do not; it costs no import in a
daemon with a memory budget; and it is a dozen lines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Hands out request slots at most ``rate()`` per second, first come first served.

    Each caller reserves the next free slot under a lock and waits for it outside the lock,
    so a burst of callers is spread evenly and none starves. ``rate`` is read on every call,
    so a reload that changes it takes effect for the next reservation.
    """

    def __init__(self, rate: Callable[[], float], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._next_send = 0.0

    def acquire(self, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Wait for a slot. False if ``stop`` was set or the slot is later than ``timeout``
        (nothing is reserved then)."""
        rate = self._rate()
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            if timeout is not None and slot - now > timeout:
                return False
            self._next = slot + 1.0 / rate
        delay = slot - now
        return _wait(delay, stop)

    def pace(self, stop: threading.Event | None = None) -> bool:
        """Just before a request leaves: at least ``1 / rate`` after the one before it left.

        ``acquire`` spaces the slots, but between a slot and its send lie the store locks and
        a re-read, milliseconds that vary with load: a late send and an on-time one then reach
        the server closer than ``1 / rate`` (measured: 103 requests in one second at a limit
        of 100 once the daemon kept up with it). This spaces the sends themselves: it waits
        only when sends bunched up (not at all while they keep to their slots), about one
        interval at most, so the store locks held meanwhile stall no one for long. It also
        paces a request no slot was taken for (the second refresh after an unusable answer).
        False if ``stop`` was set while waiting.
        """
        rate = self._rate()
        with self._lock:
            now = self._clock()
            send = max(now, self._next_send)
            self._next_send = send + 1.0 / rate
        delay = send - now
        return _wait(delay, stop)


def _wait(delay: float, stop: threading.Event | None) -> bool:
    """Sleep ``delay`` (none if <= 0); False if ``stop`` is (or gets) set meanwhile."""
    if delay <= 0:
        return not (stop is not None and stop.is_set())
    if stop is None:
        time.sleep(delay)
        return True
    return not stop.wait(delay)
