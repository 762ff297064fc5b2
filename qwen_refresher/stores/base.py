"""What every store adapter offers, and the JSON helpers they share.

An adapter knows one file format and one lock protocol. The engine only ever does
``lock() -> read() -> render()/write()``; it never looks inside a document.
"""

from __future__ import annotations

import json
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import FileRefused, StoreMalformed, StoreUnreadable
from ..fileio import (
    FileRead,
    atomic_write,
    check_parents,
    owner_to_keep,
    read_store_file,
    resolve_confined,
    tighten_mode,
)
from ..lockfile import FileLock, LockStyle
from ..models import Credentials, ProfileKey
from ..paths import store_anchor
from ..protocols import StopSignal
from ..report import shorten_home

#: ``expires`` below this many milliseconds (1973-03-03) is almost surely in seconds.
MIN_PLAUSIBLE_EXPIRES_MS = 100_000_000_000
#: ...and above this (year 2286) is nonsense too.
MAX_PLAUSIBLE_EXPIRES_MS = 10_000_000_000_000
#: Deeper nesting than any real store has; refusing it keeps the parser from recursing away.
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class ProfileRecord:
    """One qwen-portal profile as read: usable credentials, or the reason it is not usable."""

    key: ProfileKey
    creds: Credentials | None
    problem: str | None = None


@dataclass(frozen=True)
class StoreSnapshot:
    """A store as read at one moment: the bytes, the parsed document, and its qwen profiles."""

    store: Store
    file: FileRead | None  # None: the file does not exist yet (login creates it)
    document: dict[str, Any]
    records: dict[str, ProfileRecord] = field(default_factory=dict)

    @property
    def raw(self) -> bytes:
        return self.file.data if self.file is not None else b""


class Store(ABC):
    """One credential file of one format."""

    kind: ClassVar[str]
    lock_style: ClassVar[LockStyle]

    def __init__(self, path: Path, *, anchor: Path | None = None,
                 anchors: Iterable[Path] | None = None) -> None:
        """``anchor``: the directory this store is trusted from, if the caller knows it;
        else found among ``anchors`` (``paths.anchor_dirs()``, which a discovery looks up
        once for all its stores) or, without them, from the environment."""
        self.path = (path if isinstance(path, Path) else Path(path)).absolute()
        #: Directories from here down to the store are checked like the store itself.
        self.anchor = anchor if anchor is not None else store_anchor(self.path, bases=anchors)

    def check_path(self) -> None:
        """Refuse the store when a directory above it is a symlink leading elsewhere or belongs
        to another user (``fileio.check_parents``); the store's owner is trusted, since it
        controls the file anyway."""
        try:
            check_parents(self.path, self.anchor)
        except FileRefused:
            # Trusting one more owner can only turn a refusal into a pass, so the file is
            # looked at (a ``stat``) only when it could change the answer.
            try:
                owner = os.stat(self.path).st_uid
            except OSError:
                owner = None
            if owner is None:
                raise  # the refusal: without its owner, the file adds no one to trust
            check_parents(self.path, self.anchor, trusted_uids=[owner])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # -- identity ---------------------------------------------------------------------------
    def lock_path(self) -> Path:
        """Where this format's lock file lives: OpenClaw's rule, ``realpath(dir)/<name>.lock``.

        OpenClaw resolves the directory, not the file: a store that is a symlink is locked
        under its own name, and so must we, or the two programs would not exclude each other.
        """
        return Path(os.path.realpath(self.path.parent)) / f"{self.path.name}.lock"

    def real_path(self) -> Path:
        """The file behind any in-directory symlink; locks and renames act on it."""
        return resolve_confined(self.path)

    def describe(self) -> str:
        """Short human name for logs and status (the path, home as ``~``)."""
        return shorten_home(self.path)

    @property
    def agent(self) -> str | None:
        """The OpenClaw agent id when the path has OpenClaw's layout, for display."""
        return None

    @abstractmethod
    def login_command(self, profile: str) -> str:
        """The command a person runs to log this profile in again."""

    # -- locking ----------------------------------------------------------------------------
    def lock(self, *, timeout: float = 40.0, stop: StopSignal | None = None) -> FileLock:
        return FileLock(self.lock_path(), self.lock_style, timeout=timeout, stop=stop)

    # -- reading ----------------------------------------------------------------------------
    def read(self, *, allow_missing: bool = False) -> StoreSnapshot:
        """Read and parse the file; raise ``StoreError`` naming the file when it is unusable.

        Problems confined to one profile do not raise: they come back in its record, so every
        other profile in the same file is still served.
        """
        self.check_path()
        try:
            file = read_store_file(self.path)
        except StoreUnreadable as exc:
            if allow_missing and exc.problem == "does not exist":
                return StoreSnapshot(self, None, self.empty_document())
            raise
        # A store whose owner we could not keep on write is refused now, before any refresh
        # spends its token; never rotated and then silently handed to us.
        owner_to_keep(self.path, file.uid, file.gid)
        document = parse_json_document(self.path, file.data)
        return StoreSnapshot(self, file, document, self.extract(document))

    def read_settled(self, *, attempts: int = 4, pause: float = 0.05) -> StoreSnapshot:
        """Read, tolerating a writer caught mid-write.

        OpenClaw truncates and rewrites in place, so an unlocked read can see half a file. A
        parse failure is reported only when the bytes stop changing across a short pause.
        """
        last_error: StoreMalformed | None = None
        last_bytes: bytes | None = None
        for _ in range(attempts):
            try:
                return self.read()
            except StoreMalformed as exc:
                try:
                    current = read_store_file(self.path).data
                except StoreUnreadable:
                    current = None
                if last_error is not None and current == last_bytes:
                    raise
                last_error, last_bytes = exc, current
                time.sleep(pause)
        assert last_error is not None
        raise last_error

    @abstractmethod
    def empty_document(self) -> dict[str, Any]:
        """The document a brand-new file starts from."""

    @abstractmethod
    def extract(self, document: dict[str, Any]) -> dict[str, ProfileRecord]:
        """Find the qwen-portal profiles in a parsed document."""

    # -- writing ----------------------------------------------------------------------------
    @abstractmethod
    def render(self, snapshot: StoreSnapshot, updates: Mapping[str, Credentials]) -> bytes:
        """The new file contents: ``snapshot`` with ``updates`` applied and nothing else changed."""

    def write(self, snapshot: StoreSnapshot, updates: Mapping[str, Credentials]) -> bytes:
        """Apply ``updates`` and replace the file atomically; returns the bytes written.

        The owner of an existing file is kept (or ``OwnershipError``, never a silent change);
        the mode is always 0600, as OpenClaw chmods its store on every save: a file found wider
        is tightened and named once in a ``store_mode_tightened`` warning. A new file is 0600
        in a 0700 directory.
        """
        from ..fileio import ensure_private_dir

        data = self.render(snapshot, updates)
        self.check_path()
        if snapshot.file is None:
            ensure_private_dir(self.path.parent)
            atomic_write(self.real_path(), data, mode=0o600, user_path=self.path)
        else:
            file = snapshot.file
            atomic_write(
                file.real_path,
                data,
                mode=tighten_mode(file.real_path, self.describe(), file.mode),
                owner=owner_to_keep(self.path, file.uid, file.gid),
                user_path=self.path,
            )
        return data


# -- JSON helpers shared by the adapters --------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NonStandard(ValueError):
    pass


def _no_constant(name: str) -> Any:
    """``NaN``/``Infinity`` are Python's extensions to JSON, not JSON."""
    raise _NonStandard(name)


#: ``json.loads`` with hooks builds a decoder (and its scanner) per call: half the parse of a
#: small store. One, shared: decoding keeps no state between calls (the scanner's key memo
#: is only an interning cache, cleared after each document).
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _depth(text: str) -> int:
    """How deep ``text``'s JSON nests (brackets inside strings do not count), or, when that
    cannot exceed ``MAX_JSON_DEPTH``, an upper bound of it (all the caller compares).

    The character loop is Python-slow (~0.1 ms per KiB, on every store read), so it runs only
    when it could matter: nesting can never exceed the number of opening brackets in the text,
    which ``str.count`` finds at C speed, and a real store has a handful."""
    openers = text.count("[") + text.count("{")
    if openers <= MAX_JSON_DEPTH:
        return openers
    depth = best = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def parse_json_document(path: Path, data: bytes) -> dict[str, Any]:
    """Strict JSON the way a careful reader wants it: one clear problem or a dict.

    Duplicate keys are refused rather than silently resolved, since whichever copy we kept
    could be the wrong token; a BOM is refused because OpenClaw's ``JSON.parse`` refuses it.
    """
    if not data or data.isspace():  # ``not data.strip()``, without copying the file
        raise StoreMalformed(path, "is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        raise StoreMalformed(path, "starts with a UTF-8 byte-order mark, which OpenClaw cannot "
                                   "parse; save it without the BOM")
    if b"\x00" in data:
        raise StoreMalformed(path, "contains NUL bytes; it is not a JSON text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreMalformed(path, f"is not valid UTF-8 (byte {exc.start})") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise StoreMalformed(path, f"nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        document = _STRICT_DECODER.decode(text)
    except _DuplicateKey as exc:
        raise StoreMalformed(path, f"has the key {exc.key!r} twice in one object") from None
    except _NonStandard as exc:
        raise StoreMalformed(path, f"contains {exc.args[0]}, which is not JSON (OpenClaw's "
                                   "JSON.parse refuses it)") from None
    except json.JSONDecodeError as exc:
        raise StoreMalformed(
            path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise StoreMalformed(path, "nests too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise StoreMalformed(path, f"cannot be parsed: {str(exc)[:120]}") from None
    if not isinstance(document, dict):
        raise StoreMalformed(path, f"holds a JSON {type(document).__name__}, not an object")
    return document


def check_expires_ms(value: object, field_name: str) -> tuple[int | None, str | None]:
    """Validate an expiry in epoch milliseconds; returns (value, problem)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        return None, f"{field_name} is {kind}, expected milliseconds since the epoch"
    if value != value or value in (float("inf"), float("-inf")):
        return None, f"{field_name} is not a finite number"
    if value < 0:
        return None, f"{field_name} is negative"
    if value < MIN_PLAUSIBLE_EXPIRES_MS:
        return None, (f"{field_name} looks like seconds, not milliseconds "
                      f"({int(value)} is in {time.gmtime(value).tm_year} as seconds)")
    if value > MAX_PLAUSIBLE_EXPIRES_MS:
        return None, f"{field_name} is too far in the future to be milliseconds since the epoch"
    return int(value), None


#: A server's ``expires_in`` we take as given lies in this range (seconds). Below it the
#: token would be refreshed in a tight loop; above it, the expiry is a guess we do not trust
#: (and far enough out, ``now + expires_in`` fails ``check_expires_ms`` on our next read).
MIN_EXPIRES_IN = 1.0
MAX_EXPIRES_IN = 30 * 86400.0
#: What an unusable ``expires_in`` next to valid tokens is taken to be: short, so that a wrong
#: guess costs one early refresh rather than an expired token nobody refreshes.
FALLBACK_EXPIRES_IN = 3600.0


def check_expires_in(value: object, field_name: str = "expires_in") -> tuple[float, str | None]:
    """A token lifetime in seconds from a server answer: (usable seconds, problem or None).

    Never raises and always returns a usable number: when the server sent new tokens, the old
    refresh token is already spent, so a broken lifetime must not cost the tokens. Numeric
    strings are accepted (a typed field is not worth a login). A value in (0, MIN) is raised
    to ``MIN_EXPIRES_IN``; anything else outside the range, or not a finite number, becomes
    ``FALLBACK_EXPIRES_IN``; the problem says which, without echoing a long value.
    """
    number: float | None = None
    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            number = float(value)
        except (ValueError, OverflowError):  # "soon"; an int too large for a float
            number = None
    if number is None:
        kind = "missing" if value is None else f"not a number ({type(value).__name__})"
        return FALLBACK_EXPIRES_IN, f"{field_name} is {kind}"
    if number != number or number in (float("inf"), float("-inf")):
        return FALLBACK_EXPIRES_IN, f"{field_name} is not a finite number"
    if number <= 0:
        return FALLBACK_EXPIRES_IN, f"{field_name} is not positive ({number:.3g})"
    if number < MIN_EXPIRES_IN:
        return MIN_EXPIRES_IN, f"{field_name} is shorter than {MIN_EXPIRES_IN:g}s ({number:.3g})"
    if number > MAX_EXPIRES_IN:
        return FALLBACK_EXPIRES_IN, (f"{field_name} is longer than {MAX_EXPIRES_IN:.0f}s "
                                     f"({number:.3g})")
    return number, None


#: Real tokens are a few hundred bytes; anything near this is not a token.
MAX_TOKEN_LENGTH = 16 * 1024


def check_token(value: object, field_name: str) -> str | None:
    """The problem with a token field's value, or None when it is a plausible token."""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        return f"{field_name} is {kind}, expected a string"
    stripped = value.strip()
    if not stripped:
        return f"{field_name} is empty"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"{field_name} is {len(value)} characters long, longer than any real token"
    if value.isascii():
        # Every real token (four per store read): ASCII holds no lone surrogate, and what the
        # pattern below lets through in ASCII is exactly U+0021..U+007E, which these two C
        # scans tell without the regex; anything else is left to it.
        if stripped.isprintable() and " " not in stripped:
            return None
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{field_name} contains invalid Unicode (a lone surrogate)"
    if _SPACE_OR_CONTROL.search(stripped) is not None:
        return f"{field_name} contains whitespace or control characters"
    return None


#: ``str.isspace()`` or below U+0020: ``\s`` on a str pattern is exactly ``str.isspace``
#: (both are ``Py_UNICODE_ISSPACE``), and a regex scans at C speed where a generator over
#: the characters cost ~10 % of a storm's CPU.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def render_json(document: dict[str, Any]) -> bytes:
    """Serialize as ``JSON.stringify(doc, null, 2) + "\\n"``, the layout OpenClaw writes.

    Like ``JSON.stringify``, a lone surrogate (possible in a user's own strings) is written as
    a ``\\uXXXX`` escape, so the file stays valid UTF-8 and its content unchanged.
    """
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8")
