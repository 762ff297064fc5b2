"""structlog set-up: JSON lines for machines, console output for people, and redaction.

Redaction is a processor at the end of the chain, so it guards every log line whatever the
call site passed: values under secret-sounding keys are dropped, and any string containing a
token the daemon currently knows (stores, memory, journal) has it replaced. The tokens are
registered with ``REDACTOR.add`` as soon as they are read or received.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset({
    "access", "refresh", "access_token", "refresh_token", "token", "device_code",
    "code_verifier", "authorization", "password", "secret", "key",
})
MASK = "[redacted]"


class Redactor:
    """Knows the secrets in play and scrubs them from anything about to be printed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, *secrets: str | None) -> None:
        fresh = {s for s in secrets if s and len(s) >= 6} - self._secrets
        if not fresh:
            return
        with self._lock:
            self._secrets |= fresh
            if len(self._secrets) > 10_000:  # bounded: keep the newest we were told about
                self._secrets = set(fresh)
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(MASK, text) if pattern is not None else text

    def scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        if isinstance(value, dict):
            return {k: (MASK if str(k).lower() in SECRET_KEYS else self.scrub_value(v))
                    for k, v in value.items()}
        if isinstance(value, list | tuple | set):
            return [self.scrub_value(v) for v in value]
        return value

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            if key.lower() in SECRET_KEYS:
                event_dict[key] = MASK
            else:
                event_dict[key] = self.scrub_value(event_dict[key])
        return event_dict


REDACTOR = Redactor()


def configure(*, fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """JSON when the stream is not a terminal (systemd, Docker, files), console when it is."""
    out = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if use_json
                     else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    for noisy in ("httpx", "httpcore", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Library warnings (apscheduler's, say) still reach us, through the same redaction.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("qwen_refresher").bind(**context)
