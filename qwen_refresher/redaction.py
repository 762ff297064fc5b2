"""The redactor: the index that finds any form of thousands of tokens (``secret_forms``) in
any text about to leave the process (``Redactor``).

``logsetup`` puts the one instance (``logsetup.REDACTOR``) at the end of the log chain and
at every other way out; this module has no logging and no typing import at run time, so
``status`` can load it cheaply.
"""

from __future__ import annotations

import operator
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterator, MutableMapping
from itertools import compress, repeat

from .secret_forms import _WINDOW, KEY_CHARS, MIN_SECRET, _forms, _index_entry, secret_forms

TYPE_CHECKING = False
if TYPE_CHECKING:  # ``status`` imports this module to redact its output: no typing at run time
    from typing import Any

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
#: Texts longer than this are windowed in chunks (bounded transient memory).
_CHUNK = 64 * 1024
#: An index entry is one signed 64-bit integer: the key's hash with its low ``_ID_BITS``
#: bits replaced by the owner's id (``Redactor._secrets``). Entries sort by hash, so the
#: entries of one key are neighbours and ``bisect`` finds them.
_ID_BITS = 20
_ID = (1 << _ID_BITS) - 1
_HASH = ~_ID
#: Entries are spread over 2 ** _BUCKET_BITS arrays by their top bits (a sort after
#: additions sorts a 1/256th of the index, not all of it); ``entry >> _BUCKET_SHIFT`` is
#: the array's index, negative for half of them (a list takes those too).
_BUCKET_BITS = 8
_BUCKET_SHIFT = 64 - _BUCKET_BITS
#: The filter has a byte per slot (1: some key's hash has these top bits) and at least this
#: many slots per key (rebuilt with twice that when keys outgrow it, smaller when they fall
#: below 1/64th): a scan drops in C the windows whose slot is empty, and looks up the 1 in 8
#: or fewer left in the sorted arrays.
_FILTER_SLOTS = 8
_MIN_FILTER_BITS = 10
assert MAX_SECRETS < _ID, "secret ids must fit in an index entry"


def _windows(text: str) -> Iterator[list[int]]:
    """The hashes of every window of ``text`` that could be a key (the ``KEY_CHARS - 1``
    characters after each anchor character), one list per chunk of ``_CHUNK`` characters.
    Found by the regex engine and hashed in C (``map``). Chunks, and the caller looking each
    up before the next is made, keep the transient small: the windows of a whole
    2,000-row state.json at once were ~150,000 ints (several MB, whose freed pools then held
    the idle daemon's RSS up)."""
    if len(text) <= _CHUNK:
        yield list(map(hash, _WINDOW.findall(text)))
        return
    for at in range(0, len(text), _CHUNK):
        yield list(map(hash, _WINDOW.findall(text[at:at + _CHUNK + KEY_CHARS - 1])))


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

    So each form is filed under one short window of itself, its *key* (``_keys``: 8 key
    characters, ``_KEY_CLASS``, that start with an anchor character; one key serves every
    form that holds it, so a token needs five to eight). A scan hashes every anchored window
    of the text (``_windows``, in C) and confirms each candidate secret by searching its
    forms, derived again (``_forms``, cached) rather than kept. A form occurring in the text
    puts its own key among the text's windows, so nothing is missed; a form without such a
    window (a token of lower-case letters and punctuation only) is kept whole and searched
    with ``str.find``.

    The index holds no Python object per key (a dict of int keys cost ~100 bytes each):
    each key is one 64-bit entry (hash | owner id) in ``array`` buckets, appended to and
    sorted by the first look-up after (``_bucket``), found with ``bisect``. In front of them a
    byte filter (``_filter``, 8 to 32 bytes per key) indexed by the hash's top bits lets a
    scan drop almost every window in C (``itemgetter`` and ``compress``), so only the few
    that pass cost a Python-level look-up. ``retain`` and the expiry pass drop secrets that
    are neither live nor recent, the filter is rebuilt to the size of what is left and the
    containers are compacted (``_compact``), so memory follows the number of profiles, not
    the number of refreshes. ``add`` only notes a secret; the next scrub files every secret
    noted before it (``_drain``), so a start-up pays its thousands of keys once it is ready.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # raw secret -> scrub at least until
        self._buckets = [array("q") for _ in range(1 << _BUCKET_BITS)]  # entries
        self._sorted = array("i", bytes(4 << _BUCKET_BITS))  # a bucket's sorted length
        self._entries = 0  # entries in the buckets
        self._secrets: list[str | None] = []  # id -> secret (None: a free id)
        self._free = array("i")  # ids to reuse
        self._filter = bytearray(1 << _MIN_FILTER_BITS)
        self._shift = 64 - _MIN_FILTER_BITS  # filter slot of a hash: hash >> shift
        self._stale = 0  # entries removed since the filter was last built
        self._plain: dict[str, tuple[str, ...]] = {}  # secret -> its forms without a key
        self._long: dict[str, None] = {}  # forms of absurdly long secrets, oldest first
        self._added = 0  # additions since the last expiry pass
        self._pending: dict[str, None] = {}  # added, not filed yet (``_drain``), in order

    def add(self, *secrets: str | None, until: float | None = None) -> None:
        """Scrub these, in every encoding (``secret_forms``), from now on, at least until
        ``until`` (default: a day from now).

        A token is worth hiding while it could still be used: an access token until it
        expires, a refresh token while a store holds it (``retain`` keeps those).

        A secret is filed in the index by the next scrub (``_drain``), not here: a start-up
        over 1,000 stores adds 4,000 before it prints anything, and then pays their keys
        (~18 µs each) once, when its first line goes out, instead of on its way to ready.
        Every scrub drains first, so no text is ever checked against an index missing a
        secret already added.
        """
        now = time.time()
        keep = until if until is not None else now + DEFAULT_KEEP
        with self._lock:
            known = self._until
            for secret in secrets:
                if not secret or len(secret) < MIN_SECRET:
                    continue
                if len(secret) > MAX_INDEXED_SECRET:
                    # Such a "token" is absurd, but must still be scrubbed: a plain replace
                    # of its forms, without caching megabytes of them.
                    for form in sorted(secret_forms(secret), key=len, reverse=True):
                        self._long[form] = None
                    while len(self._long) > 16 * 16:
                        del self._long[next(iter(self._long))]
                    continue
                old = known.get(secret)
                if old is not None:
                    known[secret] = max(old, keep)
                    continue
                known[secret] = keep
                self._pending[secret] = None
                self._added += 1
            while len(self._until) > MAX_SECRETS:  # bounded (and ids fit in an entry)
                self._forget(next(iter(self._until)))
            if self._added >= EXPIRY_PASS:
                self._added = 0
                self._expire(now)

    def _drain(self) -> None:
        """File every secret added since the last scrub (caller holds the lock). One
        forgotten meanwhile left ``_pending`` then (``_forget``)."""
        if self._pending:
            pending, self._pending = self._pending, {}
            for secret in pending:
                keys, plain = _index_entry(secret)
                self._file(secret, keys, plain)

    def _file(self, secret: str, keys: set[int], plain: tuple[str, ...]) -> None:
        """Index ``secret`` under ``keys`` (appended: ``_bucket`` sorts on the next look-up)
        before ``add`` returns, so no line logged after it can miss the token."""
        if plain:
            self._plain[secret] = plain
        if not keys:
            return
        if self._free:
            owner = self._free.pop()
            self._secrets[owner] = secret
        else:
            owner = len(self._secrets)
            self._secrets.append(secret)
        buckets, sieve, shift = self._buckets, self._filter, self._shift
        for key in keys:
            buckets[key >> _BUCKET_SHIFT].append(key & _HASH | owner)
            sieve[key >> shift] = 1
        self._entries += len(keys)
        if self._entries * _FILTER_SLOTS > len(sieve):
            self._build_filter()

    def _bucket(self, at: int) -> array[int]:
        """Bucket ``at``, sorted: an addition appends (an insertion costs 3x as much, and a
        start-up adds thousands), the first look-up after it sorts."""
        bucket = self._buckets[at]
        if len(bucket) != self._sorted[at]:
            bucket = self._buckets[at] = array("q", sorted(bucket))
            self._sorted[at] = len(bucket)
        return bucket

    def _build_filter(self) -> None:
        """The filter again, sized to the entries there are (twice ``_FILTER_SLOTS`` slots
        each, or up to twice that again), without the slots of forgotten entries."""
        bits = _MIN_FILTER_BITS
        while (1 << bits) < self._entries * _FILTER_SLOTS * 2:  # room to grow 2x
            bits += 1
        sieve = bytearray(1 << bits)
        shift = 64 - bits
        for bucket in self._buckets:
            for entry in bucket:
                sieve[entry >> shift] = 1
        self._filter, self._shift, self._stale = sieve, shift, 0

    def _forget(self, secret: str) -> None:
        """Drop ``secret`` and its entries (keys derived again: cheaper than keeping them)."""
        del self._until[secret]
        if self._pending.pop(secret, 0) is None:
            return  # never filed: nothing in the index
        self._plain.pop(secret, None)
        keys, _ = _index_entry(secret)
        found = self._owned(secret, keys)
        if found is None:
            return
        owner = found
        for key in keys:
            bucket = self._bucket(key >> _BUCKET_SHIFT)
            at = bisect_left(bucket, (key & _HASH) | owner)
            if at < len(bucket) and bucket[at] == (key & _HASH) | owner:
                del bucket[at]
                self._sorted[key >> _BUCKET_SHIFT] -= 1
                self._entries -= 1
                self._stale += 1
        self._secrets[owner] = None
        self._free.append(owner)
        if self._stale > self._entries // 2 + 64 or (
                len(self._filter) > (1 << _MIN_FILTER_BITS)
                and self._entries * _FILTER_SLOTS * 8 < len(self._filter)):
            self._build_filter()

    def _owned(self, secret: str, keys: set[int]) -> int | None:
        """The id ``secret`` is filed under (found through any of its keys), or None."""
        owners = self._secrets
        for key in keys:
            bucket = self._bucket(key >> _BUCKET_SHIFT)
            at = bisect_left(bucket, key & _HASH)
            while at < len(bucket) and bucket[at] & _HASH == key & _HASH:
                if owners[bucket[at] & _ID] == secret:
                    return bucket[at] & _ID
                at += 1
        return None

    def _expire(self, now: float) -> None:
        """Forget expired secrets once they are a quarter of those known (a start-up that
        reads thousands of stores does not pay a pass per store), and the oldest beyond
        ``MAX_SECRETS``."""
        expired = [s for s, until in self._until.items() if until < now]
        if expired and len(expired) * 4 > len(self._until):
            for secret in expired:
                self._forget(secret)
            self._compact()
        while len(self._until) > MAX_SECRETS:  # bounded: forget the oldest
            self._forget(next(iter(self._until)))

    def _compact(self) -> None:
        """After many secrets were forgotten: containers that keep their size when items are
        deleted (a dict's table, an array deleted from one item at a time, the list of ids)
        copied to fit those left, ids renumbered when most are free."""
        self._until = dict(self._until)
        owners = self._secrets
        live = [owner for owner, secret in enumerate(owners) if secret is not None]
        if len(live) * 2 >= len(owners):
            self._buckets = [array("q", bucket) for bucket in self._buckets]
            return
        renumber = {old: new for new, old in enumerate(live)}
        self._secrets = [owners[owner] for owner in live]
        self._free = array("i")
        self._buckets = [array("q", sorted(entry & _HASH | renumber[entry & _ID]
                                           for entry in bucket)) for bucket in self._buckets]
        self._sorted = array("i", map(len, self._buckets))

    def retain(self, live: set[str]) -> None:
        """Forget secrets that are not ``live`` and whose keep-until time has passed."""
        now = time.time()
        with self._lock:
            gone = [s for s, until in self._until.items() if until < now and s not in live]
            for secret in gone:
                self._forget(secret)
            if len(gone) > len(self._until):
                self._compact()
            self._added = 0

    def __len__(self) -> int:
        """Secrets known (each stands for all its forms)."""
        return len(self._until)

    def _candidates(self, windows: list[int], found: set[str]) -> None:
        """Add to ``found`` the secrets filed under one of ``windows`` (hashes). Caller
        holds the lock."""
        sieve, shift = self._filter, self._shift
        if len(windows) > 1:
            passed = compress(windows, operator.itemgetter(
                *map(operator.rshift, windows, repeat(shift)))(sieve))
        else:
            passed = compress(windows, [sieve[windows[0] >> shift]])
        owners = self._secrets
        for window in set(passed):  # a text repeats itself (2,000 rows of state.json)
            bucket = self._bucket(window >> _BUCKET_SHIFT)
            wanted = window & _HASH
            at = bisect_left(bucket, wanted)
            while at < len(bucket) and bucket[at] & _HASH == wanted:
                owner = owners[bucket[at] & _ID]
                if owner is not None:
                    found.add(owner)
                at += 1

    def scrub(self, text: str) -> str:
        """``text`` with every known secret, in any of its forms, replaced by MASK."""
        with self._lock:
            long_forms = tuple(self._long)
        for form in long_forms:
            text = text.replace(form, MASK)
        if len(text) < MIN_SECRET:
            return text
        candidates: set[str] = set()
        with self._lock:
            self._drain()
        for windows in _windows(text):
            if windows:
                with self._lock:
                    self._candidates(windows, candidates)
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
