"""Behaviours a test turns on: one-shot faults (a FIFO) and a seeded failure rate, and the
answer each fault kind sends instead of the real one (``_Faults``, mixed into ``FakeQwen``).
"""

from __future__ import annotations

import json
import random
import threading
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from .config import (
    _HTML_200,
    DEFAULT_RANDOM_KINDS,
    FAULT_KINDS,
    FAULT_TARGETS,
    FakeQwenConfig,
    _as_int,
    _as_number,
)
from .records import (
    Fault,
    _json_number,
    _json_reply,
    _oauth_error,
    _reject_reply,
    _Reply,
    _status_kind,
)


class _Faults:
    """The fault queue and the seeded failure rate of a ``FakeQwen`` (a mixin: the state lives
    on the fake, behind its one lock, and is reset by ``_reset_faults``)."""

    _lock: threading.RLock
    _config: FakeQwenConfig
    _stopping: threading.Event

    def _reset_faults(self) -> None:
        self._faults: deque[Fault] = deque()
        self._failure_p = 0.0
        self._failure_kinds: tuple[str, ...] = DEFAULT_RANDOM_KINDS
        self._rng = random.Random()

    def inject(self, kind: str, count: int = 1, retry_after: float | str | None = None,
               delay: float | None = None, *, target: str | None = None,
               body: Any = None) -> None:
        """Queues ``count`` one-shot faults; each is used by the next matching request."""
        if kind not in FAULT_KINDS and _status_kind(kind) is None:
            raise ValueError(f"unknown fault kind {kind!r}")
        count = _as_int("count", count, minimum=1)
        if retry_after is not None and not isinstance(retry_after, str):
            retry_after = _as_number("retry_after", retry_after, minimum=0)
        if delay is not None:
            delay = _as_number("delay", delay, minimum=0)
        if target is None:
            target = "device_token" if kind == "slow_down" else "refresh"
        if target not in FAULT_TARGETS:
            raise ValueError(f"target must be one of {', '.join(sorted(FAULT_TARGETS))}")
        fault = Fault(kind, retry_after, delay, target, body)
        with self._lock:
            self._faults.extend([fault] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._failure_p = 0.0

    def set_failure_rate(self, p: float, kinds: Sequence[str] | None = None,
                         seed: int | None = None) -> None:
        """Fails each refresh with probability ``p`` (when no queued fault applies)."""
        p = _as_number("p", p, minimum=0)
        if p > 1:
            raise ValueError("p must be <= 1")
        chosen = tuple(kinds) if kinds else DEFAULT_RANDOM_KINDS
        for kind in chosen:
            if kind not in FAULT_KINDS and _status_kind(kind) is None:
                raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._failure_p = p
            self._failure_kinds = chosen
            self._rng = random.Random(seed)

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def _next_fault(self, target: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.target in (target, "any"):
                    del self._faults[index]
                    return fault
            if target == "refresh" and self._failure_p > 0 and (
                    self._rng.random() < self._failure_p):
                return Fault(self._rng.choice(self._failure_kinds))
            return None

    def _fault_reply(self, fault: Fault) -> _Reply | None:
        """The answer a fault sends instead of the real one; None means hang up."""
        kind, outcome = fault.kind, f"fault:{fault.kind}"
        if kind in ("drop", "timeout"):
            return None
        if kind == "empty200":
            return _Reply(200, b"", outcome)
        if kind == "html200":
            return _Reply(200, _HTML_200, outcome, content_type="text/html; charset=utf-8")
        if kind == "reject":
            reply = _reject_reply(self._config, outcome)
        elif kind == "slow_down":
            reply = _oauth_error(429, "slow_down", "Polling too fast", outcome)
        else:
            status = _status_kind(kind)
            assert status is not None
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = ""
            if status == 200:
                reply = _json_reply(200, {}, outcome)
            else:
                reply = _oauth_error(status, "server_error" if status >= 500 else
                                     phrase.lower().replace(" ", "_") or "error", phrase, outcome)
        if fault.body is not None:
            if isinstance(fault.body, str):
                reply.body, reply.content_type = fault.body.encode(), "text/plain; charset=utf-8"
            else:
                reply.body = json.dumps(fault.body).encode()
        retry_after = fault.retry_after
        if retry_after is None and kind == "429":
            retry_after = 1
        if retry_after is not None:
            reply.headers["Retry-After"] = (
                retry_after if isinstance(retry_after, str) else str(_json_number(retry_after)))
        return reply

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

