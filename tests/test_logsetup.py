from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from qwen_refresher import logsetup
from qwen_refresher.logsetup import MASK, Redactor, secret_forms

#: Characters that change under every encoding: URL (+ / = ~ %), JSON (" \\ é), base64 (é).
HOSTILE = 'fakeref-a+b/c=d~e%f"g\\h\u00e9ij0123456789'


def encodings(secret: str) -> dict[str, str]:
    """The ways a token shows up in the wild, computed here independently of secret_forms."""
    data = secret.encode()
    b64 = base64.b64encode(data).decode()
    return {
        "raw": secret,
        "quote": quote(secret, safe=""),
        "quote-lower": quote(secret, safe="").replace("%2B", "%2b").replace("%2F", "%2f")
        .replace("%3D", "%3d").replace("%C3%A9", "%c3%a9").replace("%5C", "%5c"),
        "quote_plus": quote_plus(secret),
        "json-ascii": json.dumps(secret)[1:-1],
        "json-utf8": json.dumps(secret, ensure_ascii=False)[1:-1],
        "base64": b64,
        "base64-unpadded": b64.rstrip("="),
        "base64-urlsafe": base64.urlsafe_b64encode(data).decode(),
        "base64-urlsafe-unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "hex": data.hex(),
        "base64-of-request-form": base64.b64encode(quote_plus(secret).encode()).decode(),
    }


def test_known_tokens_are_scrubbed_anywhere_in_a_string() -> None:
    r = Redactor()
    r.add("fakeref-abcdefghijkl", "fakeacc-0123456789", None, "")
    text = "body refresh_token=fakeref-abcdefghijkl&x=1 Bearer fakeacc-0123456789."
    assert r.scrub(text) == f"body refresh_token={MASK}&x=1 Bearer {MASK}."


def test_overlapping_prefixes_take_the_longest_secret() -> None:
    r = Redactor()
    r.add("samepref-short", "samepref-short-and-longer")
    assert r.scrub("x samepref-short-and-longer y") == f"x {MASK} y"


def test_secret_keys_are_masked_and_nested_values_scrubbed() -> None:
    r = Redactor()
    r.add("tok-123456789")
    event = r(None, "info", {"event": "e", "refresh": "anything", "detail": {
        "access_token": "z", "note": ["see tok-123456789"]}, "err": ValueError("tok-123456789")})
    assert event["refresh"] == MASK
    assert event["detail"] == {"access_token": MASK, "note": [f"see {MASK}"]}
    assert event["err"] == f"ValueError: {MASK}"


def test_scrubbing_stays_fast_with_thousands_of_secrets() -> None:
    """Every form of 20,000 secrets: building the automaton stays well under a second or
    two (it happens on a merge, not per line), scanning a line stays in microseconds."""
    r = Redactor()
    start = time.process_time()
    r.add(*[f"fakeref-{i:032d}" for i in range(20_000)])
    r.scrub("first line builds the automaton")
    built = time.process_time() - start
    assert built < 5.0, f"{built:.2f} s to register and index 20,000 secrets"
    line = "x" * 300 + " fakeref-" + f"{12345:032d}"
    start = time.perf_counter()
    for _ in range(200):
        out = r.scrub(line)
    per_line = (time.perf_counter() - start) / 200
    assert out.endswith(MASK)
    assert per_line < 0.005, f"{per_line * 1000:.2f} ms per line"


def test_configured_json_logs_are_redacted() -> None:
    stream = io.StringIO()
    logsetup.configure(fmt="json", level="info", stream=stream)
    logsetup.REDACTOR.add("leaky-token-value-1234")
    logsetup.get_logger().info("something", detail="got leaky-token-value-1234 back")
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["detail"] == f"got {MASK} back"


def test_an_absurdly_long_secret_is_scrubbed_without_crashing() -> None:
    """A megabyte-long secret is scrubbed without crashing or stalling (in a subprocess, so a
    crash, as pyahocorasick's recursive free once gave, cannot take pytest down)."""
    import subprocess
    import sys

    code = ("from qwen_refresher.logsetup import Redactor\n"
            "r = Redactor(); big = 'k' * (1 << 20); r.add(big, 'normal-token-1234')\n"
            "out = r.scrub('a ' + big + ' b normal-token-1234')\n"
            "assert out == 'a [redacted] b [redacted]', out[:50]\n"
            "del r\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-500:]


def test_secrets_survive_the_merge_into_the_large_tier() -> None:
    r = Redactor()
    tokens = [f"tok-{i:020d}" for i in range(1000)]  # several merges of the recent tier
    for t in tokens:
        r.add(t)
    assert len(r) == 1000
    assert all(r.scrub(f"x {t} y") == f"x {MASK} y" for t in tokens[::97])


def test_retain_forgets_expired_dead_secrets_but_keeps_live_and_valid_ones() -> None:
    r = Redactor()
    r.add("old-dead-token-0001", until=time.time() - 1)  # expired, no store holds it
    r.add("live-token-000002", until=time.time() - 1)  # expired, but a store holds it
    r.add("rotated-access-03", until=time.time() + 3600)  # rotated away, still valid
    r.retain({"live-token-000002"})
    assert len(r) == 2
    assert r.scrub("old-dead-token-0001") == "old-dead-token-0001"
    assert r.scrub("live-token-000002 rotated-access-03") == f"{MASK} {MASK}"


def test_secret_forms_cover_every_encoding_and_the_raw_token() -> None:
    forms = secret_forms(HOSTILE)
    for kind, text in encodings(HOSTILE).items():
        assert text in forms, kind
    assert secret_forms("") == set()
    assert all(len(f) >= logsetup.MIN_SECRET for f in secret_forms("abcdefgh"))


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_base64_of_a_longer_payload_hides_the_token_at_any_alignment(offset: int) -> None:
    """``refresh_token=<t>&...`` base64-encoded as a whole: the token's bytes sit at any
    offset in a 3-byte group; the stable inner run is a form, and the redactor masks it."""
    payload = ("x" * offset + "grant_type=refresh_token&refresh_token=" + HOSTILE
               + "&client_id=abc").encode()
    echoed = base64.b64encode(payload).decode()
    assert any(form in echoed for form in secret_forms(HOSTILE))
    r = Redactor()
    r.add(HOSTILE)
    scrubbed = r.scrub(f"server said: {echoed}")
    assert MASK in scrubbed
    # what is left decodes to at most two bytes of the token on either side of the mask
    left, _, right = scrubbed.removeprefix("server said: ").partition(MASK)
    for piece in (left, right):
        for cut in range(4):
            chunk = piece[cut:] if piece is right else piece[:len(piece) - cut]
            chunk = chunk[:len(chunk) // 4 * 4]
            try:
                decoded = base64.b64decode(chunk)
            except ValueError:
                continue
            assert HOSTILE[2:12].encode() not in decoded


@pytest.mark.parametrize("kind", list(encodings(HOSTILE)))
def test_redactor_masks_every_encoding(kind: str) -> None:
    r = Redactor()
    r.add(HOSTILE, "fakeacc-plain-token-000111")
    text = encodings(HOSTILE)[kind]
    scrubbed = r.scrub(f"error=invalid_grant&echo={text}&more")
    assert text not in scrubbed and MASK in scrubbed, scrubbed
    assert scrubbed.startswith("error=invalid_grant&echo=")


def test_retained_secrets_keep_all_their_forms_after_merges() -> None:
    r = Redactor()
    r.add(HOSTILE, until=time.time() + 60)
    r.add(*[f"tok-{i:020d}" for i in range(600)])  # forces merges of the recent tier
    r.add("gone-token-000000000", until=time.time() - 1)
    r.retain(set())
    assert len(r) == 601
    assert r.scrub("gone-token-000000000") == "gone-token-000000000"
    for text in encodings(HOSTILE).values():
        assert text not in r.scrub(f"[{text}]")


def test_many_secrets_sharing_keys_are_all_found() -> None:
    """Secrets whose forms share their last characters (percent forms of tokens that differ
    only early) map one key to several secrets; each is still found."""
    r = Redactor()
    secrets_ = [f"{c}+shared-tail-0123456789" for c in "abcdefgh"]
    r.add(*secrets_)
    text = " ".join(quote(s, safe="") for s in secrets_)
    assert r.scrub(text) == " ".join([MASK] * len(secrets_))


def test_documents_and_environments_are_scrubbed_in_place() -> None:
    logsetup.REDACTOR.add(HOSTILE)
    doc = {"profiles": [{"last_error": "echo " + quote_plus(HOSTILE), "attempts": 3,
                         "expires_at": 1.5, "ok": None}], quote(HOSTILE, safe=""): True}
    out = logsetup.redact_document(doc)
    assert out == {"profiles": [{"last_error": f"echo {MASK}", "attempts": 3,
                                 "expires_at": 1.5, "ok": None}], MASK: True}
    env = logsetup.redact_environ({"QWEN_REFRESHER_REASON": json.dumps(HOSTILE)})
    assert env == {"QWEN_REFRESHER_REASON": f'"{MASK}"'}
    assert logsetup.redact_text(base64.b64encode(HOSTILE.encode()).decode()) == MASK


def _stdlib_output(emit: Any) -> str:
    stream = io.StringIO()
    logsetup.configure(fmt="json", level="info", stream=stream)
    logsetup.REDACTOR.add(HOSTILE)
    try:
        emit()
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
    return stream.getvalue()


@pytest.mark.parametrize("kind", list(encodings(HOSTILE)))
def test_stdlib_records_go_through_the_redactor(kind: str) -> None:
    """httpx, apscheduler, urllib3 log through ``logging``: same chain, same redaction."""
    text = encodings(HOSTILE)[kind]
    out = _stdlib_output(lambda: logging.getLogger("urllib3.connectionpool").warning(
        "POST body %s failed", text))
    line = json.loads(out.strip().splitlines()[-1])
    assert line["event"] == f"POST body {MASK} failed"
    assert line["level"] == "warning" and line["logger"] == "urllib3.connectionpool"
    for form in encodings(HOSTILE).values():
        assert form not in out


def test_stdlib_exceptions_warnings_and_thread_crashes_are_redacted() -> None:
    """In a fresh interpreter (pytest hooks warnings and thread crashes itself): a logged
    exception, a ``warnings.warn`` and a thread dying of an exception all carry the token
    URL-encoded; all come out as JSON lines with it masked."""
    import subprocess
    import sys

    code = f"""
import logging, sys, threading, warnings
from urllib.parse import quote_plus
from qwen_refresher import logsetup
logsetup.configure(fmt="json", level="info", stream=sys.stdout)
secret = {HOSTILE!r}
logsetup.REDACTOR.add(secret)
leak = quote_plus(secret)
try:
    raise RuntimeError("server echoed refresh_token=" + leak)
except RuntimeError:
    logging.getLogger("apscheduler.executors").exception("job failed")
warnings.warn("deprecated call with " + leak, UserWarning, stacklevel=1)
def die():
    raise ValueError(leak)
worker = threading.Thread(target=die)
worker.start()
worker.join()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["level"] for line in lines] == ["error", "warning", "critical"], out
    assert "job failed" in out and "deprecated call" in out and "ValueError" in out
    assert out.count(MASK) >= 3, out
    for form in encodings(HOSTILE).values():
        assert form not in out


def test_dumps_redacted_keeps_json_valid_whatever_the_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile token spelled like JSON syntax (``", "state": "``) matches our own document's
    structure once serialized: the masking is done string by string, so the file stays valid
    JSON and every field but the leaked text is kept."""
    token = '", "state": "'
    monkeypatch.setattr(logsetup, "REDACTOR", Redactor())  # such a token must not linger
    logsetup.REDACTOR.add(token, "plain-token-00000001")
    doc = {"profiles": [{"last_error": "echo plain-token-00000001", "state": "ok",
                         "store": "/x"}]}
    text = logsetup.dumps_redacted(doc)
    assert json.loads(text) == {"profiles": [{"last_error": f"echo {MASK}", "state": "ok",
                                              "store": "/x"}]}
    clean = {"profiles": [{"state": "ok", "n": 1}]}
    assert logsetup.dumps_redacted(clean, indent=2) == json.dumps(clean, indent=2)
