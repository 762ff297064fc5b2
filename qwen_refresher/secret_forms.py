"""Which texts give a token away (``secret_forms``: raw, URL-encoded, JSON-escaped, base64
at any alignment, hex), and the keys the redactor files a token under so that a scan finds
any of them (``_index_entry``). Functions of the token alone (``_forms`` caches a few):
``redaction.Redactor`` holds the index.
"""

from __future__ import annotations

import binascii
import functools
import json
import re

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
#: The characters of a key: those of tokens and of their encodings (base64, hex, percent and
#: JSON escapes). A log line's spaces, colons, quotes and brackets end a window, so a scan
#: looks up a third of the windows it would otherwise (and the regex finds them 2.5x faster).
_KEY_CLASS = "A-Za-z0-9%._~+/=\\\\-"
#: An anchor and the ``KEY_CHARS - 1`` key characters after it; the match consumes the
#: anchor only, so windows overlap, and a leading character class lets the regex engine
#: skip ahead to the next anchor in C (a leading lookahead tried every position: 1.6x slower).
_WINDOW = re.compile(f"[{_ANCHOR_CHARS}](?=([{_KEY_CLASS}]{{{KEY_CHARS - 1}}}))")
_LAST_KEY = re.compile(f"[\\s\\S]*([{_ANCHOR_CHARS}][{_KEY_CLASS}]{{{KEY_CHARS - 1}}})")
#: The last key of a form made of characters that URL-encoding, JSON and the two base64
#: alphabets all leave as they are.
_SHARED_KEY = re.compile(f"[\\s\\S]*([{_ANCHOR_CHARS}][A-Za-z0-9.~]{{{KEY_CHARS - 1}}})")
_SHARED_WINDOW = re.compile(f"[{_ANCHOR_CHARS}][A-Za-z0-9.~]{{{KEY_CHARS - 1}}}")
#: ``_ANCHOR_CHARS`` as a set, for checks without a regex.
_ANCHORS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: A run of ``KEY_CHARS`` digits: in a hex dump it reads the same in lower and upper case,
#: so one key serves both; ``_LAST_DIGITS``: the last one.
_LAST_DIGITS = re.compile(f"[\\s\\S]*([0-9]{{{KEY_CHARS}}})")
_DIGITS = re.compile(f"[0-9]{{{KEY_CHARS}}}")
#: Secrets whose forms stay cached (a hit re-derives the forms of the secret it names).
FORMS_CACHE = 256
#: What ``urllib.parse.quote`` escapes whatever its ``safe`` (its safe sets add to these).
_UNSAFE = re.compile(r"[^A-Za-z0-9_.~-]")
_PERCENT = {chr(byte): f"%{byte:02X}" for byte in range(256)}
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_JSON_U = re.compile(r"\\u[0-9a-f]{4}")
#: Standard base64 to its URL-safe alphabet.
_URLSAFE = bytes.maketrans(b"+/", b"-_")
#: Characters that URL-encoding (RFC 3986 "unreserved") and JSON leave as they are.
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]*")
#: The usual token (``_usual_keys``): at least ``MIN_SECRET`` characters, no ``~``, no
#: ``%``; ``_PLAIN``: one without the characters URL-encoding escapes (``+/=``).
_USUAL = re.compile(f"[A-Za-z0-9._+/=-]{{{MIN_SECRET},}}")
_PLAIN = re.compile(f"[A-Za-z0-9._-]{{{MIN_SECRET},}}")


def _percent_forms(data: bytes) -> tuple[str, str, set[str]]:
    """(``quote(t, safe="")``, ``quote_plus(t)``, every URL-encoded form of the token ``t``
    whose UTF-8 bytes are ``data``): ``quote`` with the safe sets of a form body, a path or
    query (``/``), JavaScript's ``encodeURIComponent`` (``!'()*``), ``quote_plus`` (with and
    without ``/``), ``~`` escaped or not, upper- or lower-case hex (some encoders, and
    hand-written code, emit lower-case hex).

    One substitution of the few unsafe characters, then ``str.replace`` of escapes: in a
    percent-encoded text every ``%`` starts an escape, so replacing one is exact
    (``urllib.parse.quote`` costs a Python call per character, eleven times).
    """
    strict = _UNSAFE.sub(lambda m: _PERCENT[m.group()], data.decode("latin-1"))
    plus = strict.replace("%20", "+")
    script = strict
    for char in "!'()*":
        script = script.replace(_PERCENT[char], char)
    upper = {strict, strict.replace("~", "%7E"), plus, strict.replace("%2F", "/"),
             plus.replace("%2F", "/"), script}
    escapes = set(_ESCAPE.findall(strict)) | {"%7E"}
    forms = set(upper)
    for text in upper:
        for escape in escapes:
            text = text.replace(escape, escape.lower())
        forms.add(text)
    return strict, plus, forms


def _base64_forms(data: bytes) -> set[str]:
    """The base64 texts that give ``data`` away, wherever it sits in a longer payload.

    Encoded alone, ``data`` is one text (padded or not). Inside a longer payload its bytes
    start at offset 0, 1 or 2 of a 3-byte group, and the characters that straddle the edges
    depend on the bytes around it; but the groups made only of ``data``'s bytes encode the
    same whatever surrounds them. For each alignment that inner run is what we mask (at most
    two bytes of the secret stay visible at each edge, mixed with foreign bits).
    """
    whole = binascii.b2a_base64(data, newline=False)
    encoded = {whole, whole.rstrip(b"=")}
    for skip in (0, 1, 2):
        usable = (len(data) - skip) // 3 * 3
        if usable > 0:  # an inner run has no padding
            encoded.add(binascii.b2a_base64(data[skip:skip + usable], newline=False))
    standard = b" ".join(encoded)  # one translate and one decode for all (no space in base64)
    return set((standard + b" " + standard.translate(_URLSAFE)).decode().split())


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
    try:
        data = secret.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no valid UTF-8, its bytes all the same
        data = secret.encode("utf-8", "surrogatepass")
    if _UNRESERVED.fullmatch(secret):  # the usual token: URL and JSON leave it as it is
        if "~" in secret:
            forms |= {secret.replace("~", "%7E"), secret.replace("~", "%7e")}
    else:
        strict, plus, quoted = _percent_forms(data)
        forms |= quoted
        for ascii_only in (True, False):
            escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
            forms |= {escaped, escaped.replace("/", "\\/"),  # some encoders escape "/"
                      _JSON_U.sub(lambda m: m.group(0).upper().replace("\\U", "\\u"),
                                  escaped)}
        # A server that dumps our request body in base64 encodes the token as the form
        # carried it: URL-encoded first (``quote_plus``, and ``quote`` for a query string).
        for carried in {strict, plus}:
            forms |= _base64_forms(carried.encode("ascii"))
    forms |= _base64_forms(data)
    hexed = data.hex()
    forms |= {hexed, hexed.upper()}
    return {f for f in forms if len(f) >= MIN_SECRET}


@functools.lru_cache(maxsize=FORMS_CACHE)
def _forms(secret: str) -> tuple[str, ...]:
    """``secret_forms`` as a tuple, cached: a hit re-derives the forms of the secret it
    names instead of the redactor keeping every form of every secret in memory."""
    return tuple(sorted(secret_forms(secret), key=len, reverse=True))


def _keys(secret: str) -> tuple[list[str], tuple[str, ...]]:
    """(the keys ``secret`` is filed under, its forms that have no key and are searched
    whole).

    A form that holds a picked key needs none of its own (the key is among the windows of
    any text holding that form): a token's padded and unpadded, standard and URL-safe base64
    runs share one, its URL- and JSON-encoded forms share one of its windows without ``+/=``,
    its lower- and upper-case hex dumps share a run of digits. The usual token
    (``_usual_keys``) is keyed without deriving its forms at all.
    """
    usual = _usual_keys(secret)
    return (usual, ()) if usual is not None else _general_keys(secret)


def _general_keys(secret: str) -> tuple[list[str], tuple[str, ...]]:
    """``_keys`` of any secret, from its forms, taken shortest first."""
    forms = _forms(secret)
    keys: list[str] = []
    digits = _LAST_DIGITS.match(secret.encode("utf-8", "surrogatepass").hex())
    if digits is not None:  # one key for the hex dumps, lower- and upper-case
        keys.append(digits.group(1))
    plain: list[str] = []
    for form in reversed(forms):  # shortest first
        for key in keys:
            if key in form:
                break
        else:
            # Rather a window no encoding changes (its URL, JSON and other base64 forms
            # then hold it too, and need no key of their own), else any.
            found = (_SHARED_KEY.fullmatch(form, len(form) - KEY_CHARS)  # no regex walk
                     or _SHARED_KEY.match(form) or _LAST_KEY.match(form))
            if found is None:
                plain.append(form)
            else:
                keys.append(found.group(1))
    return keys, tuple(plain)


def _usual_keys(secret: str, skip_anchor: int = 0) -> list[str] | None:
    """The keys of a token of ASCII letters, digits, ``-``, ``_``, ``.`` (what servers
    issue) and base64's ``+/=``, from its encodings alone; None for any other token, or
    one with a form whose key is not where this expects it.

    Such a token's forms (``secret_forms``) are: itself, which URL-encoding and JSON leave
    as it is but for its ``+/=``, so a key without those serves them all; the three base64
    inner runs of its bytes, and of its URL-encoded bytes if it has ``+/=``, each keyed by a
    window without ``+`` or ``/`` (its URL-safe twin then holds it too), the one at offset 0
    also serving the whole text, padded or not (which starts with it); and its hex dumps
    (one run of digits reads the same in both cases). Deriving and sorting the forms cost
    three times what this does. With ``skip_anchor=1``, the keys without their anchor (what
    the index hashes).
    """
    escaped = _PLAIN.fullmatch(secret) is None
    if escaped and not _USUAL.fullmatch(secret):
        return None
    data = secret.encode("ascii")
    hexed = data.hex()
    # A run of digits in the second half (tokens share their start, "fakeacc-", not their
    # end), else a key for each case.
    digits = _DIGITS.search(hexed, len(hexed) // 2)
    keys = [] if digits is None else [digits.group()[skip_anchor:]]
    sources = [data]
    if escaped:
        sources.append(_UNSAFE.sub(lambda m: _PERCENT[m.group()], secret).encode("ascii"))
    forms = [secret] if digits is not None else [secret, hexed, hexed.upper()]
    b64 = binascii.b2a_base64
    for data in sources:  # the runs at offsets 0, 1 and 2: whole 3-byte groups
        size = len(data)
        forms += (b64(data[:size // 3 * 3], newline=False).decode(),
                  b64(data[1:1 + (size - 1) // 3 * 3], newline=False).decode(),
                  b64(data[2:2 + (size - 2) // 3 * 3], newline=False).decode())
    for form in forms:
        if escaped:  # a key without "+/=", from the middle on: the ends of these forms are
            # alike ("JTNEJTNE", base64 of "%3D%3D", ends that of every token ending "==")
            found = (_SHARED_WINDOW.search(form, len(form) // 2 - KEY_CHARS // 2)
                     or _SHARED_WINDOW.search(form))
            if found is None:
                return None
            keys.append(found.group()[skip_anchor:])
            continue
        at = len(form) - KEY_CHARS  # made of key characters: the last one after an anchor
        while form[at] not in _ANCHORS:
            at -= 1
            if at < 0:  # no anchor: the general way keeps the form whole
                return None
        keys.append(form[at + skip_anchor:at + KEY_CHARS])
    return keys


def _index_entry(secret: str) -> tuple[set[int], tuple[str, ...]]:
    """(the hashes of ``secret``'s keys without their anchor, as ``_windows`` yields them;
    its forms that have no key)."""
    windows = _usual_keys(secret, 1)
    if windows is not None:
        return set(map(hash, windows)), ()
    keys, plain = _general_keys(secret)
    return {hash(key[1:]) for key in keys}, plain
