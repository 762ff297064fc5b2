from __future__ import annotations

import io
import json
import time

from qwen_refresher import logsetup
from qwen_refresher.logsetup import MASK, Redactor


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
    r = Redactor()
    r.add(*[f"fakeref-{i:032d}" for i in range(20_000)])
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
    """pyahocorasick's recursive free crashes on a megabyte-long word: such words stay out of
    the automaton (checked in a subprocess, since the crash would take pytest down)."""
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
