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
import time
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
#: How long a secret added without an explicit lifetime is scrubbed.
DEFAULT_KEEP = 24 * 3600.0
#: Secrets added since the last merge into the large tier.
RECENT_TIER = 256
#: Longest secret put in the automaton; longer ones are scrubbed with a plain replace.
MAX_AUTOMATON_WORD = 16 * 1024
#: Shorter strings are not treated as secrets (they would mask ordinary words).
MIN_SECRET = 8


class _Tier:
    """A set of secrets and the automaton that finds them (built lazily when it changed)."""

    def __init__(self) -> None:
        self.secrets: dict[str, float] = {}  # secret -> scrub at least until this time
        self._automaton: Any = None
        self._dirty = False

    def add(self, secret: str, until: float) -> None:
        if secret not in self.secrets:
            self._dirty = True
        self.secrets[secret] = max(until, self.secrets.get(secret, 0.0))

    def replace(self, secrets: dict[str, float]) -> None:
        self.secrets, self._dirty = secrets, True

    def automaton(self) -> Any:
        if self._dirty:
            automaton = None
            if self.secrets:
                automaton = ahocorasick.Automaton()
                for secret in self.secrets:
                    automaton.add_word(secret, len(secret))
                automaton.make_automaton()
            self._automaton, self._dirty = automaton, False
        return self._automaton


def _apply(automaton: Any, text: str) -> str:
    out: list[str] = []
    start = 0
    for end, length in automaton.iter_long(text):
        out.append(text[start:end - length + 1])
        out.append(MASK)
        start = end + 1
    if not out:
        return text
    out.append(text[start:])
    return "".join(out)


class Redactor:
    """Knows the secrets in play and scrubs them from anything about to be printed.

    A daemon with a thousand stores knows thousands of tokens, and every log line must be
    checked against all of them, tokens that may share long prefixes (a JWT's header). An
    Aho-Corasick automaton (pyahocorasick) finds every one of them in one pass over the line,
    whatever their number. Secrets live in two tiers, like an LSM tree: new ones go to a small
    tier that is cheap to rebuild after every rotation, and are merged into the large tier
    only every ``RECENT_TIER`` additions. ``retain`` drops secrets that are neither live nor
    recent, so memory follows the number of profiles, not the number of refreshes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stable = _Tier()
        self._recent = _Tier()
        self._long: list[str] = []

    def add(self, *secrets: str | None, until: float | None = None) -> None:
        """Scrub these from now on, at least until ``until`` (default: a day from now).

        A token is worth hiding while it could still be used: an access token until it
        expires, a refresh token while a store holds it (``retain`` keeps those).
        """
        now = time.time()
        keep = until if until is not None else now + DEFAULT_KEEP
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
                elif secret in self._stable.secrets:
                    self._stable.secrets[secret] = max(keep, self._stable.secrets[secret])
                else:
                    self._recent.add(secret, keep)
            if len(self._recent.secrets) > RECENT_TIER:
                merged = {s: t for s, t in {**self._stable.secrets, **self._recent.secrets}
                          .items() if t >= now}
                while len(merged) > MAX_SECRETS:  # bounded: forget the oldest
                    del merged[next(iter(merged))]
                self._stable.replace(merged)
                self._recent.replace({})

    def retain(self, live: set[str]) -> None:
        """Forget secrets that are not ``live`` and whose keep-until time has passed."""
        now = time.time()
        with self._lock:
            merged = {**self._stable.secrets, **self._recent.secrets}
            self._stable.replace({s: t for s, t in merged.items() if s in live or t >= now})
            self._recent.replace({})

    def __len__(self) -> int:
        return len(self._stable.secrets) + len(self._recent.secrets)

    def scrub(self, text: str) -> str:
        for secret in self._long:
            text = text.replace(secret, MASK)
        if len(text) < MIN_SECRET:
            return text
        with self._lock:
            automata = [a for a in (self._stable.automaton(), self._recent.automaton()) if a]
        for automaton in automata:
            text = _apply(automaton, text)
        return text

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
