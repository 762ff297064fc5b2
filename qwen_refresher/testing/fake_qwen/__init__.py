"""A fake Qwen OAuth server speaking real HTTP on 127.0.0.1.

Why a real server and not mocks: the refresher's worst bugs live in the seams that mocks paper
over: a keep-alive connection that dies, a 200 whose body is not JSON, a rotated refresh token
whose answer never arrived. This server follows ``shared/reference/qwen-oauth.md`` (rotation,
reuse rejection, device flow with PKCE) and lets a test break it on purpose, deterministically
(a FIFO of one-shot faults) or statistically (a seeded failure rate).

Stdlib only, so that the demo, the benchmarks and a bare subprocess can run it without httpx.

In-process::

    with FakeQwen(lifetime=2) as fake:
        access, refresh, expires_ms = fake.issue_tokens()
        fake.inject("503", count=2)
        ...  # point the client at fake.token_url / fake.device_code_url

As a subprocess (prints exactly one line, ``READY http://127.0.0.1:PORT``, then serves until
SIGTERM/SIGINT)::

    python -m qwen_refresher.testing.fake_qwen --port 0 --lifetime 1.5 --no-rotate

    with FakeQwenProcess(lifetime=1.5) as proc:
        proc.control.inject("drop")
        proc.control.state()["reuse_count"]

Fault kinds for ``inject`` (they hit the refresh grant unless ``target`` says otherwise):

- ``"500"``, ``"502"``, ``"503"``, any status 400-599 as a string; ``"200"`` with a ``body``
  serves a malformed success. ``"429"`` sends ``Retry-After`` (1 s unless given).
- ``"timeout"``: sleeps ``delay`` (default 30 s), then hangs up; the token is untouched.
- ``"delay"``: sleeps ``delay`` (default 1 s), then answers normally.
- ``"drop"``: hangs up without answering; the token is untouched.
- ``"lost"``: processes the request (a refresh token IS rotated), then hangs up: the
  answer-lost-in-flight case that kills rotating token families.
- ``"empty200"``, ``"html200"``: a 200 with an empty or an HTML body.
- ``"reject"``: the rejection answer, without touching the token.
- ``"slow_down"``: 429 ``{"error":"slow_down"}``; aims at device polling by default.
"""


from __future__ import annotations

from .cli import main
from .config import (
    DEVICE_CODE_PATH,
    DEVICE_GRANT_TYPE,
    FAULT_KINDS,
    FAULT_TARGETS,
    QWEN_CLIENT_ID,
    TOKEN_PATH,
    FakeQwenConfig,
)
from .control import FakeQwenControl, FakeQwenProcess
from .fake import FakeQwen
from .records import Fault, IssuedTokens, RequestRecord, pkce_challenge

__all__ = [
    "DEVICE_CODE_PATH",
    "DEVICE_GRANT_TYPE",
    "FAULT_KINDS",
    "FAULT_TARGETS",
    "QWEN_CLIENT_ID",
    "TOKEN_PATH",
    "FakeQwen",
    "FakeQwenConfig",
    "FakeQwenControl",
    "FakeQwenProcess",
    "Fault",
    "IssuedTokens",
    "RequestRecord",
    "main",
    "pkce_challenge",
]
