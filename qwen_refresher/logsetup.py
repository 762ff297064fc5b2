"""structlog set-up: JSON lines for machines, console output for people, and redaction.

Redaction is a processor at the end of the chain, so it guards every log line whatever the
call site passed: values under secret-sounding keys are dropped, and any string containing a
token the daemon currently knows (stores, memory, journal) has it replaced, in any of the
forms the token can take on the way out (``secret_forms``: raw, URL-encoded, JSON-escaped,
base64, hex). The tokens are registered with ``REDACTOR.add`` as soon as they are read or
received. Records of the standard ``logging`` module go through the same chain. The
redactor itself lives in ``redaction`` (the index) and ``secret_forms`` (the forms); the
names others use are re-exported here.

Every other way out has one function here, called at its boundary: ``redact_text`` (notices,
printed text), ``redact_document`` / ``dumps_redacted`` (``state.json``, ``status --json``),
``redact_environ`` (a hook's environment and a runner's argv).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, MutableMapping

from .redaction import (
    DEFAULT_KEEP,
    EXPIRY_PASS,
    MASK,
    MAX_INDEXED_SECRET,
    MAX_SECRETS,
    SECRET_KEYS,
    Redactor,
)
from .secret_forms import MIN_SECRET, secret_forms

TYPE_CHECKING = False
if TYPE_CHECKING:  # ``status`` imports this module to redact its output: no typing, no logging
    from typing import Any, TextIO

    from .protocols import Logger

__all__ = ["DEFAULT_KEEP", "EXPIRY_PASS", "MASK", "MAX_INDEXED_SECRET", "MAX_SECRETS",
           "MIN_SECRET", "REDACTOR", "SECRET_KEYS", "Redactor", "configure", "dumps_redacted",
           "get_logger", "redact_document", "redact_environ", "redact_text", "secret_forms"]

REDACTOR = Redactor()


# -- the boundaries: one function per kind of way out -------------------------------------------


def redact_text(text: str) -> str:
    """Text about to leave the process (a notice's title and body, a printed status, a log
    line built by hand): every known secret, in every form, masked."""
    return REDACTOR.scrub(text)


def redact_document(document: Any) -> Any:
    """A JSON document about to be written or sent (``state.json``, ``status --json``, a
    webhook payload): the same structure and types, every string (keys included) scrubbed.

    Unlike a log event, keys with secret-sounding names keep their values' shape: published
    documents have a schema, and no token is ever put in one on purpose; what this catches is a
    token *inside* text, such as a server's error echoed into ``last_error``.
    """
    if isinstance(document, str):
        return REDACTOR.scrub(document)
    if isinstance(document, dict):
        return {redact_document(k) if isinstance(k, str) else k: redact_document(v)
                for k, v in document.items()}
    if isinstance(document, list | tuple):
        return [redact_document(v) for v in document]
    return document


def dumps_redacted(document: Any, **options: Any) -> str:
    """``json.dumps(redact_document(document), **options)``, at the cost of one scan of the
    serialized text when no secret is in it (the usual case: a ``state.json`` of two thousand
    profiles is scanned once instead of string by string). The serialized text is only
    checked, never edited: a mask there could cut through the JSON syntax."""
    text = json.dumps(document, **options)
    if REDACTOR.scrub(text) == text:
        return text
    return json.dumps(redact_document(document), **options)


def redact_environ(variables: Mapping[str, str]) -> dict[str, str]:
    """Variables (or argv words) we hand a child process: values scrubbed, names kept."""
    return {name: REDACTOR.scrub(value) for name, value in variables.items()}


#: Marks the root handler ``configure`` installs, so a second call replaces it.
_HANDLER_MARK = "_qwen_refresher_handler"


def configure(*, fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """JSON when the stream is not a terminal (systemd, Docker, files), console when it is.

    Records of the standard ``logging`` module (httpx, apscheduler, watchdog, urllib3, warnings,
    uncaught exceptions in threads) go through structlog's ``ProcessorFormatter`` to the same
    stream, and so through the same redactor and renderer as our own lines: a library that logs
    a request body or an exception text cannot print a token past it.
    """
    import logging

    import structlog

    out = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamp,
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    colors = out.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org
    renderer: Any = (structlog.processors.JSONRenderer() if use_json
                     else structlog.dev.ConsoleRenderer(colors=colors))
    if _writes_to_journal(out):
        renderer = _JournalPriority(renderer)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    for noisy in ("httpx", "httpcore", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars,
                           structlog.processors.add_log_level,
                           structlog.stdlib.add_logger_name, stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, REDACTOR, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_crash


#: syslog priorities by structlog level, for journald's ``<N>`` line prefix (sd-daemon(3)).
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2, "fatal": 2}


def _writes_to_journal(out: TextIO) -> bool:
    """True when ``out`` is the stream systemd connected to the journal.

    systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` for a service's stdout/stderr; a child that
    redirected its output elsewhere inherits the variable, so the pair must match our stream.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _JournalPriority:
    """Prefix each rendered line with ``<N>`` so journald records its priority and
    ``journalctl -p warning`` shows warnings and errors only (the prefix is stripped there)."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        level = str(event_dict.get("level", method)).lower()
        return f"<{_PRIORITY.get(level, 6)}>{self.renderer(logger, method, event_dict)}"


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception, logged (redacted) instead of printed raw to stderr."""
    import logging

    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("qwen_refresher").critical(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def get_logger(**context: Any) -> Logger:
    """Our structlog logger, bound to ``context``: typed as the ``protocols.Logger`` seam
    (structlog itself types it ``Any``)."""
    import structlog

    logger: Logger = structlog.get_logger("qwen_refresher").bind(**context)
    return logger
