"""The redactor's index (issue 16, memory): each form filed under one anchored window of
itself, a scan intersecting the text's windows with the index. These cases attack what that
design could miss: forms with no anchor character, a form cut by the chunking of a long text,
keys shared by several secrets, and memory growing by kilobytes per secret. The encodings are
computed independently of ``secret_forms.secret_forms`` (``tests.test_logsetup.encodings``).
"""

from __future__ import annotations

import random
import secrets
import time
import tracemalloc

import pytest

from qwen_refresher import redaction
from qwen_refresher import secret_forms as forms
from qwen_refresher.redaction import MASK, Redactor
from tests.test_logsetup import HOSTILE, encodings

#: No digit and no upper-case letter: its raw (and percent-free) forms have no anchor.
UNANCHORED = "fakeref-lower~case+only/letters=here"


def _realistic(n: int) -> list[str]:
    return [f"fakeacc-{secrets.token_urlsafe(32)}" for _ in range(n)]


@pytest.mark.parametrize("kind", list(encodings(UNANCHORED)))
def test_a_token_without_anchor_characters_is_masked_in_every_encoding(kind: str) -> None:
    r = Redactor()
    r.add(UNANCHORED, "fakeacc-Plain0Token0000111")
    text = encodings(UNANCHORED)[kind]
    scrubbed = r.scrub(f"echo={text}&glued{text}tail")
    assert text not in scrubbed and scrubbed.count(MASK) == 2, kind


@pytest.mark.parametrize("kind", ["raw", "quote", "base64", "hex", "json-ascii"])
def test_a_form_cut_by_the_chunking_of_a_long_text_is_masked(kind: str) -> None:
    """A state.json of 2,000 rows is windowed in chunks: a form straddling a chunk edge, at
    every cut point, is still found."""
    r = Redactor()
    r.add(HOSTILE)
    form = encodings(HOSTILE)[kind]
    chunk = redaction._CHUNK
    for cut in range(len(form) + 1):
        text = "x" * (chunk - cut) + form + "y" * 50
        assert form not in r.scrub(text), (kind, cut)


def test_forms_glued_to_anchor_characters_are_masked() -> None:
    """Text around a form made of anchor characters (upper-case, digits) adds windows that
    overlap the form's own; the form's key is among them all the same."""
    r = Redactor()
    token = _realistic(1)[0]
    r.add(token)
    for kind, text in encodings(token).items():
        for left, right in (("ABC123", "XYZ789"), ("0" * 40, "F" * 40), ("", "")):
            assert text not in r.scrub(left + text + right), kind


def test_forgetting_one_of_two_secrets_that_share_a_key_keeps_the_other() -> None:
    r = Redactor()
    gone, kept = "aaaa+shared-TAIL-0123456789", "bbbb+shared-TAIL-0123456789"
    r.add(gone, until=time.time() - 1)
    r.add(kept, until=time.time() + 3600)
    r.retain(set())
    assert len(r) == 1
    assert r.scrub(f"x {gone} y") == f"x {gone} y"
    for text in encodings(kept).values():
        assert text not in r.scrub(f"[{text}]")


def test_memory_per_secret_is_a_few_hundred_bytes() -> None:
    """4,000 secrets (a 1,000-store x 2 daemon: access + refresh each) cost well under a
    kilobyte apiece, forms cache included (the trie this replaced took ~1.9 KB each)."""
    tokens = _realistic(4000)
    forms._forms.cache_clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        r = Redactor()
        for i in range(0, len(tokens), 2):
            r.add(tokens[i], tokens[i + 1], until=time.time() + 3600)
        r.scrub("a first log line")
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_secret = used // 4000  # a number only: no token in a failure message
    assert per_secret < 300, f"{per_secret} B per secret"  # a dict of int keys took ~620
    assert r.scrub(f"Bearer {tokens[1234]}.").endswith(f"Bearer {MASK}.")


def test_memory_follows_the_live_secrets_once_the_others_are_forgotten(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's arrays and filter shrink back when ``retain`` forgets most secrets: a
    daemon that once knew thousands keeps no trace of them."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=time.time())
    monkeypatch.setattr(redaction, "time", SimpleNamespace(time=lambda: clock.now))
    tokens = _realistic(4000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        r = Redactor()
        for i in range(0, len(tokens), 2):
            r.add(tokens[i], tokens[i + 1], until=clock.now + 60)
        r.add(tokens[7], until=clock.now + 3600)
        r.scrub("a first log line")  # files them (``add`` only notes them)
        full = tracemalloc.get_traced_memory()[0] - before
        clock.now += 120  # all but one expired; a store still holds another
        r.retain({tokens[0]})
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(r) == 2
    assert left < full // 4, f"{left} B left of {full} B"
    assert r.scrub(f"{tokens[0]} {tokens[7]} {tokens[1]}") == f"{MASK} {MASK} {tokens[1]}"


def test_adding_forgetting_and_scrubbing_from_several_threads_at_once() -> None:
    """The daemon adds tokens from its pools while log lines are scrubbed and ``retain``
    runs; a scan sorts the arrays it looks in. Every token still live is masked throughout,
    in every encoding."""
    import threading

    r = Redactor()
    batches = [_realistic(600) for _ in range(3)]
    kept = batches[0][:50]
    stop = threading.Event()
    missed: list[int] = []

    def add(batch: list[str]) -> None:
        for i in range(0, len(batch), 2):
            r.add(batch[i], batch[i + 1], until=time.time() + (3600 if batch is batches[0]
                                                                  else -1))

    def scrub() -> None:
        while not stop.is_set():
            for token in kept[:5]:
                if token in r.scrub(f"line with {token} in it"):
                    missed.append(1)

    def retain() -> None:
        while not stop.is_set():
            r.retain(set(kept))

    r.add(*kept[:5], until=time.time() + 3600)
    workers = [threading.Thread(target=add, args=(b,)) for b in batches]
    watchers = [threading.Thread(target=scrub), threading.Thread(target=retain)]
    for t in watchers + workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    stop.set()
    for t in watchers:
        t.join(timeout=60)
    assert not missed, f"{len(missed)} lines kept a live token"
    for token in batches[0][::37]:
        for kind, text in encodings(token).items():
            assert text not in r.scrub(f"[{text}]"), kind
    assert len(r) <= len(batches[0]) + redaction.EXPIRY_PASS


def test_churn_forgets_expired_secrets_as_it_goes() -> None:
    """Under rotation churn each secret is added once and expires: the redactor holds what
    is still valid, not everything ever seen."""
    r = Redactor()
    valid = _realistic(2)
    r.add(*valid, until=time.time() + 3600)
    for _ in range(20):
        r.add(*_realistic(256), until=time.time() - 1)
    assert len(r) <= redaction.EXPIRY_PASS + 2
    assert r.scrub(" ".join(valid)) == f"{MASK} {MASK}"


def test_the_anchor_fast_path_and_the_window_regex_agree_on_every_character() -> None:
    """``_usual_keys`` skips its regex when a form's last window starts with a character of
    ``_ANCHORS``; the scan finds windows with ``_WINDOW``. If the two disagreed on a single
    character, a form keyed by the fast path could be missed by the scan."""
    import re

    anchor = re.compile(f"[{forms._ANCHOR_CHARS}]")
    agree = {chr(c) for c in range(0x110000) if anchor.fullmatch(chr(c))}
    assert agree == set(forms._ANCHORS)
    assert forms._WINDOW.findall("ab" + "Q" + "xyz%._~" + "cd") == ["xyz%._~"]
    assert forms._WINDOW.findall("0123456789") == ["1234567", "2345678", "3456789"]
    # a window ends at a character no token encoding has: a log line's space, colon, quote
    assert forms._WINDOW.findall('Q1234 67 Q12:4567 Q"234567') == []


@pytest.mark.parametrize("alphabet", [
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.",  # what servers issue
    "abcdefghijklmnopqrstuvwxyz-_.0",  # few anchors: the fast path's regex fallback
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",  # base64 tokens
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=~",
    "ab+/=-_.9",  # dense "+/=": no window without them, the general way
    'ab"\\ \u00e9\u20ac%:!9Z',  # JSON escapes, non-ASCII, characters that end a window
])
def test_every_form_holds_a_key_the_scan_sees_or_is_searched_whole(alphabet: str) -> None:
    """The index finds a form only through a key inside it that the scan's windows include:
    the usual token's keys are picked without deriving its forms (``_usual_keys``), so check
    them against every form ``secret_forms`` derives, for tokens of every length."""
    rng = random.Random(16)
    for length in [8, 9, 10, 11, 12, 13, 40, 41, 42, 43] * 8:
        secret = "".join(rng.choice(alphabet) for _ in range(length))
        keys, plain = forms._keys(secret)
        for key in keys:
            assert forms._WINDOW.findall(key) == [key[1:]], "a key the scan cannot see"
        assert forms._index_entry(secret) == ({hash(key[1:]) for key in keys}, plain)
        uncovered = [form for form in forms.secret_forms(secret)
                     if form not in plain and not any(key in form for key in keys)]
        assert not uncovered, f"{len(uncovered)} forms without a key (length {length})"


def test_secrets_are_filed_at_the_next_scrub_and_never_missed_by_one() -> None:
    """``add`` only notes a secret (a start-up adds thousands before its first line); the
    next scrub files them all first, so a text scrubbed after ``add`` returned is never
    checked against an index without it. One forgotten before that is never filed, and one
    forgotten and added again is filed once."""
    r = Redactor()
    tokens = _realistic(600)  # more than one expiry pass's worth
    for i in range(0, 600, 2):
        r.add(tokens[i], tokens[i + 1], until=time.time() + 3600)
    assert r._entries == 0 and len(r) == 600  # noted, not filed
    assert r.scrub(f"a {tokens[599]} b {tokens[0]}") == f"a {MASK} b {MASK}"
    assert r._entries > 0 and not r._pending
    late = _realistic(2)
    r.add(late[0], until=time.time() - 1)
    r.retain(set())  # forgotten while pending: nothing of it to find or remove
    assert late[0] not in r._pending and len(r) == 600
    entries = r._entries
    r.add(late[1], until=time.time() - 1)
    r.retain(set())
    r.add(late[1], until=time.time() + 3600)  # forgotten, then added again
    assert r.scrub(f"x {late[1]} {late[0]}") == f"x {MASK} {late[0]}"
    assert r._entries - entries == len(forms._index_entry(late[1])[0])  # filed once
