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
        if delay <= 0:
            return not (stop is not None and stop.is_set())
        if stop is None:
            time.sleep(delay)
            return True
        return not stop.wait(delay)
