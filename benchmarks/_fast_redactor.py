"""The daemon with a cheap log redactor: a what-if for benchmarks, NOT the shipped code.

``qwen_refresher.logsetup.Redactor.add`` recompiles one regular expression alternating over
every secret it has ever been told about (up to 10,000) each time a new token is seen. Compiling
that alternation costs about 0.5 s at 4,000 secrets and 2.4 s at 10,000 on the benchmark machine,
so start-up with many profiles and every refresh pay for it. This shim swaps in the fix the
benchmarks suggest, to show what the rest of the daemon costs once that is gone:

- ``add`` only adds to a set (copy-on-write, newest 10,000 kept);
- ``scrub`` finds token-shaped runs with one fixed regular expression and masks those that are
  known secrets (a set lookup), so its cost does not grow with the number of secrets.

Usage (as ``python -m qwen_refresher``): ``python benchmarks/_fast_redactor.py run ...``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_refresher import logsetup

_TOKEN_SHAPED = re.compile(r"[A-Za-z0-9._~+/=-]{6,}")
_KEEP = 10_000


def _add(self: Any, *secrets: str | None) -> None:
    fresh = [s for s in secrets if s and len(s) >= 6 and s not in self._secrets]
    if not fresh:
        return
    with self._lock:
        known = dict.fromkeys(self._fast_order if hasattr(self, "_fast_order") else ())
        known.update(dict.fromkeys(fresh))
        order = list(known)[-_KEEP:]
        self._fast_order = order
        self._secrets = frozenset(order)


def _scrub(self: Any, text: str) -> str:
    known = self._secrets
    if not known:
        return text
    return _TOKEN_SHAPED.sub(
        lambda m: logsetup.MASK if m.group(0) in known else m.group(0), text)


logsetup.Redactor.add = _add  # type: ignore[method-assign]
logsetup.Redactor.scrub = _scrub  # type: ignore[method-assign]

if __name__ == "__main__":
    from qwen_refresher.cli import main

    sys.exit(main())
