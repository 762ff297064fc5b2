"""The daemon with a cheap log redactor: a what-if for benchmarks, NOT the shipped code.

The shipped ``qwen_refresher.logsetup.Redactor`` keeps a structure over every secret it knows
(a regular expression until 064adfe, Aho-Corasick automata until issue 16's second round, an
index of hashed windows of each form since) and updates it as secrets arrive. This shim swaps
in a redactor whose cost does not depend on the number of secrets, to
show what the rest of the daemon costs without that:

- ``add`` only records the secret (copy-on-write dict, newest 10,000 kept);
- ``scrub`` finds token-shaped runs with one fixed regular expression and masks the runs that
  are known secrets (a set lookup): O(length of the text), whatever the number of secrets;
- ``retain`` (when the shipped class has it) forgets secrets neither live nor recent.

Its state lives in attributes of its own, so it works whatever the shipped class keeps.

Usage (as ``python -m qwen_refresher``): ``python benchmarks/_fast_redactor.py run ...``
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_refresher import logsetup

_TOKEN_SHAPED = re.compile(r"[A-Za-z0-9._~+/=-]{6,}")
_KEEP = 10_000
_MIN = 6
_LOCK = threading.Lock()


def _known(self: Any) -> dict[str, float]:
    known: dict[str, float] = self.__dict__.get("_fast_known", {})
    return known


def _publish(self: Any, known: dict[str, float]) -> None:
    self.__dict__["_fast_known"] = known
    self.__dict__["_fast_set"] = frozenset(known)


def _add(self: Any, *secrets: str | None) -> None:
    now = time.time()
    with _LOCK:
        current = _known(self)
        fresh = [s for s in secrets if s and len(s) >= _MIN and s not in current]
        if not fresh:
            return
        known = dict(current)
        for secret in fresh:
            known[secret] = now
        while len(known) > _KEEP:
            del known[next(iter(known))]
        _publish(self, known)


def _retain(self: Any, live: Iterable[str], *, newer_than: float) -> None:
    keep = set(live)
    with _LOCK:
        _publish(self, {s: t for s, t in _known(self).items() if s in keep or t >= newer_than})


def _len(self: Any) -> int:
    return len(_known(self))


def _scrub(self: Any, text: str) -> str:
    known: frozenset[str] = self.__dict__.get("_fast_set", frozenset())
    if not known:
        return text
    return _TOKEN_SHAPED.sub(
        lambda m: logsetup.MASK if m.group(0) in known else m.group(0), text)


logsetup.Redactor.add = _add  # type: ignore[method-assign]
logsetup.Redactor.scrub = _scrub  # type: ignore[method-assign]
if hasattr(logsetup.Redactor, "retain"):
    logsetup.Redactor.retain = _retain  # type: ignore[method-assign,unused-ignore]
if hasattr(logsetup.Redactor, "__len__"):
    logsetup.Redactor.__len__ = _len  # type: ignore[method-assign,unused-ignore]

if __name__ == "__main__":
    from qwen_refresher.cli import main

    sys.exit(main())
