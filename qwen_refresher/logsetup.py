"""structlog set-up: JSON lines for machines, console output for people, and redaction.

Redaction is a processor at the end of the chain, so it guards every log line whatever the
call site passed: values under secret-sounding keys are dropped, and any string containing a
token the daemon currently knows (stores, memory, journal) has it replaced, in any of the
forms the token can take on the way out (``secret_forms``: raw, URL-encoded, JSON-escaped,
base64, hex). The tokens are registered with ``REDACTOR.add`` as soon as they are read or
received. Records of the standard ``logging`` module go through the same chain.

Every other way out has one function here, called at its boundary: ``redact_text`` (notices,
printed text), ``redact_document`` / ``dumps_redacted`` (``state.json``, ``status --json``),
``redact_environ`` (a hook's environment and a runner's argv).
"""

from __future__ import annotations

import binascii
import functools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from urllib.parse import quote, quote_plus

TYPE_CHECKING = False
if TYPE_CHECKING:  # ``status`` imports this module to redact its output: no typing, no logging
    from typing import Any, TextIO

    from .protocols import Logger

SECRET_KEYS = frozenset({
    "access", "refresh", "access_token", "refresh_token", "token", "device_code",
    "code_verifier", "authorization", "password", "secret", "key",
})
MASK = "[redacted]"
#: Secrets remembered at most (live ones are re-added on every read).
MAX_SECRETS = 100_000
#: How long a secret added without an explicit lifetime is scrubbed.
DEFAULT_KEEP = 24 * 3600.0
#: Additions between two passes that forget expired secrets.
EXPIRY_PASS = 256
#: Longest secret indexed; longer ones are scrubbed with a plain replace of their forms.
MAX_INDEXED_SECRET = 16 * 1024
#: Shorter strings are not treated as secrets (they would mask ordinary words).
MIN_SECRET = 8
#: Index keys are windows of ``KEY_CHARS`` characters of a form that start with an anchor
#: character (a hit is then checked against the whole form). Every form is at least
#: ``MIN_SECRET`` long, so can hold a whole key.
KEY_CHARS = MIN_SECRET
#: Anchor characters: digits and upper-case letters. Every hex, base64, percent- or
#: ``\u``-escaped form has them, and so has a random token; ordinary text has few (fewer
#: windows to look up per scan). A form without one is searched whole (``Redactor._plain``).
_ANCHOR_CHARS = "0-9A-Z"
#: An anchor and the ``KEY_CHARS - 1`` characters after it; the match consumes the anchor
#: only, so windows overlap, and a leading character class lets the regex engine skip
#: ahead to the next anchor in C (a leading lookahead tried every position: 1.6x slower).
_WINDOW = re.compile(f"[{_ANCHOR_CHARS}](?=([\\s\\S]{{{KEY_CHARS - 1}}}))")
_LAST_ANCHOR = re.compile(f"[\\s\\S]*([{_ANCHOR_CHARS}])")
_ANCHORS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Texts longer than this are windowed in chunks (bounded transient memory).
_CHUNK = 64 * 1024
#: Secrets whose forms stay cached (a hit re-derives the forms of the secret it names).
FORMS_CACHE = 256
_PERCENT_HEX = re.compile(r"%[0-9A-F]{2}")
_JSON_U = re.compile(r"\\u[0-9a-f]{4}")
#: Characters that URL-encoding (RFC 3986 "unreserved") and JSON leave as they are.
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]*")


def _hex_lower(quoted: str) -> str:
    """``%2F`` -> ``%2f``: some encoders (and hand-written code) emit lower-case hex."""
    return _PERCENT_HEX.sub(lambda m: m.group(0).lower(), quoted)


def _base64_forms(data: bytes) -> set[str]:
    """The base64 texts that give ``data`` away, wherever it sits in a longer payload.

    Encoded alone, ``data`` is one text (padded or not). Inside a longer payload its bytes
    start at offset 0, 1 or 2 of a 3-byte group, and the characters that straddle the edges
    depend on the bytes around it; but the groups made only of ``data``'s bytes encode the
    same whatever surrounds them. For each alignment that inner run is what we mask (at most
    two bytes of the secret stay visible at each edge, mixed with foreign bits).
    """
    encoded = {binascii.b2a_base64(data, newline=False)}
    for skip in (0, 1, 2):
        usable = (len(data) - skip) // 3 * 3
        if usable > 0:
            encoded.add(binascii.b2a_base64(data[skip:skip + usable], newline=False))
    encoded |= {text.rstrip(b"=") for text in encoded}
    encoded |= {text.translate(_URLSAFE) for text in encoded}
    return {text.decode("ascii") for text in encoded}


def secret_forms(secret: str) -> set[str]:
    """Every text under which ``secret`` can leave this process, the raw one included.

    A token reaches an output in other clothes than its own: a token server's error body
    echoes our request form URL-encoded (``quote_plus``, upper- or lower-case hex), a JSON
    document or a JSON log line escapes it (``ensure_ascii`` or not), an Authorization
    header or a data: URL carries it base64 (standard or URL-safe, padded or not, and at any
    alignment inside a longer payload), a dump of our request body carries it base64 *of its
    URL-encoded form*, a debug dump shows it as hex. Masking by value must know all
    of them; forms shorter than ``MIN_SECRET`` are left out (they would mask ordinary words).
    """
    if not secret:
        return set()
    forms = {secret}
    if _UNRESERVED.fullmatch(secret):  # the usual token: URL and JSON leave it as it is
        forms.add(secret.replace("~", "%7E"))
    else:
        strict = quote(secret, safe="")
        for quoted in (strict, strict.replace("~", "%7E"), quote(secret),
                       quote(secret, safe="!'()*"),  # JavaScript's encodeURIComponent
                       quote_plus(secret), quote_plus(secret, safe="/")):
            forms |= {quoted, _hex_lower(quoted)}
        for ascii_only in (True, False):
            escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
            forms |= {escaped, escaped.replace("/", "\\/"),  # some encoders escape "/"
                      _JSON_U.sub(lambda m: m.group(0).upper().replace("\\U", "\\u"),
                                  escaped)}
    try:
        data = secret.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no byte form to look for
        data = secret.encode("utf-8", "surrogatepass")
    forms |= _base64_forms(data)
    # A server that dumps our request body in base64 encodes the token as the form carried
    # it: URL-encoded first (``quote_plus``, and ``quote`` for a query string).
    if not _UNRESERVED.fullmatch(secret):
        for quoted in {quote_plus(secret), quote(secret, safe="")}:
            forms |= _base64_forms(quoted.encode("ascii"))
    hexed = data.hex()
    forms |= {hexed, hexed.upper()}
    return {f for f in forms if len(f) >= MIN_SECRET}


@functools.lru_cache(maxsize=FORMS_CACHE)
def _forms(secret: str) -> tuple[str, ...]:
    """``secret_forms`` as a tuple, cached: a hit re-derives the forms of the secret it
    names instead of the redactor keeping every form of every secret in memory."""
    return tuple(sorted(secret_forms(secret), key=len, reverse=True))


def _anchor_key(form: str) -> str | None:
    """The window of ``form`` the index files it under: the last ``KEY_CHARS`` characters
    starting with an anchor character (``_ANCHOR_CHARS``), or None if it has none. The index
    keeps the hash of the window without its anchor (``_WINDOW`` yields that part).

    The *last* window, not the first: tokens often share their start (a JWT's header, a
    vendor prefix) but not their end, so keys of different secrets rarely collide.
    """
    if form[-KEY_CHARS] in _ANCHORS:  # the usual case (a random token's forms): no regex
        return form[-KEY_CHARS:]
    found = _LAST_ANCHOR.match(form, 0, len(form) - KEY_CHARS + 1)
    return None if found is None else form[found.start(1):found.start(1) + KEY_CHARS]


def _index_entry(secret: str) -> tuple[set[int], tuple[str, ...]]:
    """(the hashes of ``secret``'s keys, its forms that have no key and are searched whole).

    Forms are taken shortest first, and one that already contains a picked key needs none of
    its own (the key is among the windows of any text holding that form): a token's padded
    and unpadded, standard and URL-safe base64 runs mostly share one, so a typical token
    needs four or five keys for its dozen forms.
    """
    keys: list[str] = []
    plain: list[str] = []
    for form in reversed(_forms(secret)):  # shortest first
        if any(key in form for key in keys):
            continue
        key = _anchor_key(form)
        if key is None:
            plain.append(form)
        else:
            keys.append(key)
    return {hash(key[1:]) for key in keys}, tuple(plain)


def _windows(text: str) -> Iterator[set[int]]:
    """The hashes of every window of ``text`` that could be a key (the ``KEY_CHARS - 1``
    characters after each anchor character), one set per chunk of ``_CHUNK`` characters.
    Found by the regex engine, hashed and collected in C (``map``/``set``). Chunks, and the
    caller intersecting each with the index before the next is made, keep the transient
    small: the windows of a whole 2,000-row state.json at once were ~150,000 ints in one set
    (several MB, whose freed pools then held the idle daemon's RSS up)."""
    if len(text) <= _CHUNK:
        yield set(map(hash, _WINDOW.findall(text)))
        return
    for at in range(0, len(text), _CHUNK):
        yield set(map(hash, _WINDOW.findall(text[at:at + _CHUNK + KEY_CHARS - 1])))


def _find_forms(forms: tuple[str, ...], text: str, spans: list[tuple[int, int]]) -> None:
    """Append the spans of ``text`` that hold one of ``forms`` whole: ``str.find`` per form,
    so a hostile low-entropy token (``aaaa…``) echoed in a long body stays linear."""
    for form in forms:
        at = text.find(form)
        while at >= 0:
            spans.append((at, at + len(form)))
            at = text.find(form, at + len(form))


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each span replaced by MASK; overlapping spans merge into one mask, so
    of two secrets sharing a prefix the longer one is hidden whole."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out: list[str] = []
    pos = 0
    for start, end in merged:
        out += (text[pos:start], MASK)
        pos = end
    out.append(text[pos:])
    return "".join(out)


class Redactor:
    """Knows the secrets in play and scrubs them from anything about to be printed.

    A daemon with a thousand stores knows thousands of tokens, and every log line must be
    checked against all of them, in all their forms (``secret_forms``: a dozen for a token
    with ``+/=``), wherever they sit in the text (a base64 form inside a longer payload).
    Memory must follow the number of secrets at a few hundred bytes each, and adding one
    (every rotation) must cost the same whatever their number.

    So each form is filed under one short window of itself, its *key* (``_anchor_key``: the
    last ``KEY_CHARS`` characters that start with an anchor character), and the index keeps
    only the key's hash -> the secret(s). A scan takes every anchored window of the text
    (``_windows``, in C), intersects their hashes with the index, and confirms each
    candidate secret by searching its forms, derived again (``_forms``, cached) rather than
    kept. A form occurring in the text puts its own key among the text's windows, so
    nothing is missed; a form without an anchored window (a token of lower-case letters and
    punctuation only) is kept whole and searched with ``str.find``. ``retain`` and the
    expiry pass drop secrets that are neither live nor recent, so memory follows the number
    of profiles, not the number of refreshes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # raw secret -> scrub at least until
        self._index: dict[int, str | set[str]] = {}  # key hash -> its secret(s)
        self._plain: dict[str, tuple[str, ...]] = {}  # secret -> its forms without a key
        self._long: dict[str, None] = {}  # forms of absurdly long secrets, oldest first
        self._added = 0  # additions since the last expiry pass

    def add(self, *secrets: str | None, until: float | None = None) -> None:
        """Scrub these, in every encoding (``secret_forms``), from now on, at least until
        ``until`` (default: a day from now).

        A token is worth hiding while it could still be used: an access token until it
        expires, a refresh token while a store holds it (``retain`` keeps those).
        """
        now = time.time()
        keep = until if until is not None else now + DEFAULT_KEEP
        fresh = [s for s in secrets if s and MIN_SECRET <= len(s) <= MAX_INDEXED_SECRET]
        entries = {s: _index_entry(s) for s in fresh if s not in self._until}
        with self._lock:
            for secret in secrets:
                if secret and len(secret) > MAX_INDEXED_SECRET:
                    # Such a "token" is absurd, but must still be scrubbed: a plain replace
                    # of its forms, without caching megabytes of them.
                    for form in sorted(secret_forms(secret), key=len, reverse=True):
                        self._long[form] = None
                    while len(self._long) > 16 * 16:
                        del self._long[next(iter(self._long))]
            for secret in fresh:
                known = self._until.get(secret)
                if known is not None:
                    self._until[secret] = max(known, keep)
                    continue
                self._until[secret] = keep
                keys, plain = entries.get(secret) or _index_entry(secret)
                self._file(secret, keys, plain)
                self._added += 1
            if self._added >= EXPIRY_PASS:
                self._added = 0
                self._expire(now)

    def _file(self, secret: str, keys: set[int], plain: tuple[str, ...]) -> None:
        index = self._index
        for key in keys:
            owner = index.get(key)
            if owner is None:
                index[key] = secret
            elif isinstance(owner, set):
                owner.add(secret)
            elif owner != secret:  # two secrets, one key
                index[key] = {owner, secret}
        if plain:
            self._plain[secret] = plain

    def _forget(self, secret: str) -> None:
        """Drop ``secret`` and its keys (derived again: cheaper than keeping them)."""
        del self._until[secret]
        self._plain.pop(secret, None)
        keys, _ = _index_entry(secret)
        index = self._index
        for key in keys:
            owner = index.get(key)
            if owner == secret:
                del index[key]
            elif isinstance(owner, set):
                owner.discard(secret)
                if len(owner) == 1:
                    index[key] = next(iter(owner))

    def _expire(self, now: float) -> None:
        """Forget expired secrets once they are a quarter of those known (a start-up that
        reads thousands of stores does not pay a pass per store), and the oldest beyond
        ``MAX_SECRETS``."""
        expired = [s for s, until in self._until.items() if until < now]
        if expired and len(expired) * 4 > len(self._until):
            for secret in expired:
                self._forget(secret)
        while len(self._until) > MAX_SECRETS:  # bounded: forget the oldest
            self._forget(next(iter(self._until)))

    def retain(self, live: set[str]) -> None:
        """Forget secrets that are not ``live`` and whose keep-until time has passed."""
        now = time.time()
        with self._lock:
            for secret in [s for s, until in self._until.items()
                           if until < now and s not in live]:
                self._forget(secret)
            self._added = 0

    def __len__(self) -> int:
        """Secrets known (each stands for all its forms)."""
        return len(self._until)

    def scrub(self, text: str) -> str:
        """``text`` with every known secret, in any of its forms, replaced by MASK."""
        with self._lock:
            long_forms = tuple(self._long)
        for form in long_forms:
            text = text.replace(form, MASK)
        if len(text) < MIN_SECRET:
            return text
        candidates: set[str] = set()
        for windows in _windows(text):
            with self._lock:
                index = self._index
                for key in windows & index.keys():
                    owner = index[key]
                    if isinstance(owner, set):
                        candidates |= owner
                    else:
                        candidates.add(owner)
        with self._lock:
            plain = list(self._plain.values())
        spans: list[tuple[int, int]] = []
        for secret in candidates:
            _find_forms(_forms(secret), text, spans)
        for forms in plain:
            _find_forms(forms, text, spans)
        return _mask(text, spans) if spans else text

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
