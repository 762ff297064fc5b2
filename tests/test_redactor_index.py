"""The redactor's index (issue 16, memory): each form filed under one anchored window of
itself, a scan intersecting the text's windows with the index. These cases attack what that
design could miss: forms with no anchor character, a form cut by the chunking of a long text,
keys shared by several secrets, and memory growing by kilobytes per secret. The encodings are
computed independently of ``logsetup.secret_forms`` (``tests.test_logsetup.encodings``).
"""

from __future__ import annotations

import secrets
import time
import tracemalloc

import pytest

from qwen_refresher import logsetup
from qwen_refresher.logsetup import MASK, Redactor
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
    chunk = logsetup._CHUNK
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
    logsetup._forms.cache_clear()
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
    assert per_secret < 700, f"{per_secret} B per secret"
    assert r.scrub(f"Bearer {tokens[1234]}.").endswith(f"Bearer {MASK}.")


def test_churn_forgets_expired_secrets_as_it_goes() -> None:
    """Under rotation churn each secret is added once and expires: the redactor holds what
    is still valid, not everything ever seen."""
    r = Redactor()
    valid = _realistic(2)
    r.add(*valid, until=time.time() + 3600)
    for _ in range(20):
        r.add(*_realistic(256), until=time.time() - 1)
    assert len(r) <= logsetup.EXPIRY_PASS + 2
    assert r.scrub(" ".join(valid)) == f"{MASK} {MASK}"


def test_the_anchor_fast_path_and_the_window_regex_agree_on_every_character() -> None:
    """``_anchor_key`` skips its regex when a form's last window starts with a character of
    ``_ANCHORS``; the scan finds windows with ``_WINDOW``. If the two disagreed on a single
    character, a form keyed by the fast path could be missed by the scan."""
    import re

    anchor = re.compile(f"[{logsetup._ANCHOR_CHARS}]")
    agree = {chr(c) for c in range(0x110000) if anchor.fullmatch(chr(c))}
    assert agree == set(logsetup._ANCHORS)
    assert logsetup._WINDOW.findall("ab" + "Q" + "xyz!@#$" + "cd") == ["xyz!@#$"]
    assert logsetup._WINDOW.findall("0123456789") == ["1234567", "2345678", "3456789"]
