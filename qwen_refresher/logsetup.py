"""structlog set-up: JSON lines for machines, console output for people, and redaction.

Redaction is a processor at the end of the chain, so it guards every log line whatever the
call site passed: values under secret-sounding keys are dropped, and any string containing a
token the daemon currently knows (stores, memory, journal) has it replaced. The tokens are
registered with ``REDACTOR.add`` as soon as they are read or received.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import ahocorasick
import structlog

SECRET_KEYS = frozenset({
    "access", "refresh", "access_token", "refresh_token", "token", "device_code",
    "code_verifier", "authorization", "password", "secret", "key",
})
MASK = "[redacted]"
#: Secrets remembered at most (live ones are re-added on every read).
MAX_SECRETS = 100_000
#: Longest secret put in the automaton; longer ones are scrubbed with a plain replace.
MAX_AUTOMATON_WORD = 16 * 1024
#: Shorter strings are not treated as secrets (they would mask ordinary words).
MIN_SECRET = 8


class Redactor:
    """Knows the secrets in play and scrubs them from anything about to be printed.

    A daemon with a thousand stores knows thousands of tokens, and every log line must be
    checked against all of them, tokens that may share long prefixes (a JWT's header). An
    Aho-Corasick automaton (pyahocorasick) finds every one of them in a single pass over the
    line, whatever their number; it is rebuilt lazily, once per batch of new secrets.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, None] = {}
        self._automaton: Any = None
        self._dirty = False
        self._long: list[str] = []

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            for secret in secrets:
                if not secret or len(secret) < MIN_SECRET:
                    continue
                if len(secret) > MAX_AUTOMATON_WORD:
                    # pyahocorasick frees its trie recursively: a megabyte-long word crashes
                    # the interpreter. Such a "token" is absurd, but must still be scrubbed.
                    if secret not in self._long:
                        self._long.append(secret)
                        del self._long[:-16]
                elif secret not in self._secrets:
                    self._secrets[secret] = None
                    self._dirty = True
            while len(self._secrets) > MAX_SECRETS:  # bounded: forget the oldest
                del self._secrets[next(iter(self._secrets))]

    def _current(self) -> Any:
        with self._lock:
            if self._dirty:
                automaton = ahocorasick.Automaton()
                for secret in self._secrets:
                    automaton.add_word(secret, len(secret))
                automaton.make_automaton()
                self._automaton, self._dirty = automaton, False
            return self._automaton

    def scrub(self, text: str) -> str:
        for secret in self._long:
            text = text.replace(secret, MASK)
        automaton = self._current()
        if automaton is None or len(text) < MIN_SECRET:
            return text
        out: list[str] = []
        start = 0
        for end, length in automaton.iter_long(text):
            begin = end - length + 1
            out.append(text[start:begin])
            out.append(MASK)
            start = end + 1
        if not out:
            return text
        out.append(text[start:])
        return "".join(out)

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
