"""The fake service itself: ``FakeQwen`` ties the rooms together (token book-keeping, fault
behaviours, the HTTP server) behind one lock, and is what a test holds.

The rooms are mixins (``book._TokenBook``, ``modes._Faults``) rather than objects of their
own because every answer reads and changes tokens, faults and the request log under ONE lock
(a refresh that is both faulted and rotating must be atomic): the split is by concern, the
state stays in one place. Each mixin declares the attributes it uses and resets its own.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import asdict, replace
from types import TracebackType
from typing import Any, Self

from .book import _TokenBook
from .config import (
    DEVICE_GRANT_TYPE,
    Endpoints,
    FakeQwenConfig,
    _as_number,
    _as_str,
    _validated_changes,
)
from .control import FakeQwenControl
from .modes import _Faults
from .records import RequestRecord, most_within
from .server import _Server

log = logging.getLogger("qwen_refresher.testing.fake_qwen")


class FakeQwen(_TokenBook, _Faults, Endpoints):
    """The fake service: protocol state, fault queue and request log behind one lock.

    All public methods are thread-safe; request handler threads and the test share this object.
    """

    def __init__(self, config: FakeQwenConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, **overrides: Any) -> None:
        self._lock = threading.RLock()
        self._config = replace(config or FakeQwenConfig(), **_validated_changes(overrides))
        self._host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._generation = 0  # bumped by reset(): answers to older requests are not logged
        self._reset_state()

    def _reset_state(self) -> None:
        self._log: list[RequestRecord] = []
        self._reset_tokens()
        self._reset_faults()

    # ---- lifecycle

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("FakeQwen is already running")
        self._stopping.clear()
        server = _Server((self._host, self._requested_port), self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-qwen:{server.server_address[1]}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and cuts open connections, as a crashed server would."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in "timeout"/"delay" faults
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- addresses

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeQwen is not running")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def resource_url(self) -> str:
        return self._config.resource_url or f"{self.host}:{self.port}"

    @property
    def control(self) -> FakeQwenControl:
        """The HTTP control client, so one test body can drive either mode."""
        return FakeQwenControl(self.base_url)

    # ---- control

    @property
    def config(self) -> FakeQwenConfig:
        return self._config

    def configure(self, **changes: Any) -> FakeQwenConfig:
        with self._lock:
            self._config = replace(self._config, **_validated_changes(changes))
            return self._config

    def reset(self) -> None:
        """Forgets tokens, faults, device codes and the log; the configuration stays.

        Requests still in flight (a sleeping "timeout" fault) are left out of the new log, so a
        shared server can be reset between tests without one test's leftovers in the next.
        """
        with self._lock:
            self._reset_state()
            self._generation += 1

    # ---- observation

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def refresh_requests(self) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._log if r.grant_type == "refresh_token"]

    def max_rate(self, window_s: float) -> int:
        """The most refresh requests seen within any ``window_s`` seconds (a count, not a rate).

        Benchmarks use it to prove the daemon never hammers the endpoint, even while failing.
        """
        window_s = _as_number("window_s", window_s, minimum=0, exclusive=True)
        return most_within((r.monotonic for r in self.refresh_requests()), window_s)

    def state(self) -> dict[str, Any]:
        """Everything observable, JSON-ready: what ``GET /_fake/state`` answers."""
        with self._lock:
            log_ = list(self._log)
            outcomes = Counter(r.outcome for r in log_)
            refreshes = [r for r in log_ if r.grant_type == "refresh_token"]
            return {
                "base_url": self.base_url if self._server is not None else None,
                "config": asdict(self._config),
                "counts": {
                    "requests": len(log_),
                    "refresh": len(refreshes),
                    "refresh_ok": sum(1 for r in refreshes if r.outcome == "ok"),
                    "device_codes": sum(1 for r in log_ if r.endpoint == "device_code"),
                    "device_polls": sum(1 for r in log_ if r.grant_type == DEVICE_GRANT_TYPE),
                    "chat": sum(1 for r in log_ if r.endpoint == "chat"),
                    "faults": sum(1 for r in log_ if r.fault is not None),
                    "issued": len(self._issued),
                    "outcomes": dict(outcomes),
                },
                "reuse_count": self._reuse_count,
                "requests": [asdict(r) for r in log_],
                "issued": [asdict(i) for i in self._issued],
                "pending_device_codes": self.pending_device_codes(),
                "pending_faults": [asdict(f) for f in self._faults],
                "failure_rate": {"p": self._failure_p, "kinds": list(self._failure_kinds)},
            }

    # ---- called from handler threads

    def _record(self, record: RequestRecord, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._log.append(record)
        log.debug("fake qwen: %s %s -> %s (%s)", record.endpoint, record.grant_type,
                  record.status, record.outcome)

    def _control_call(self, name: str, args: dict[str, Any]) -> Any:
        """One ``POST /_fake/<name>``; KeyError becomes 404, ValueError/TypeError 400."""
        if name == "inject":
            self.inject(**args)
            return {"pending_faults": len(self.pending_faults)}
        if name == "failure_rate":
            self.set_failure_rate(**args)
            return {"ok": True}
        if name == "clear_faults":
            self.clear_faults()
            return {"ok": True}
        if name == "reject":
            self.reject_token(_as_str("refresh_token", args.get("refresh_token")))
            return {"ok": True}
        if name == "issue":
            access, refresh, expires_ms = self.issue_tokens(**args)
            return {"access_token": access, "refresh_token": refresh, "expires_ms": expires_ms}
        if name in ("approve", "deny"):
            code = _as_str("user_code", args.get("user_code"))
            (self.approve if name == "approve" else self.deny)(code)
            return {"ok": True}
        if name == "config":
            return asdict(self.configure(**args))
        if name == "reset":
            self.reset()
            return {"ok": True}
        raise KeyError(f"no control endpoint {name!r}")


