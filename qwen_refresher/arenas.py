"""glibc's malloc arenas, capped: a long-running daemon's memory stays flat under churn.

glibc gives threads their own malloc arenas, up to eight per core, and memory freed in an
arena stays there for that arena's reuse. The daemon's threads are many (refresh workers,
the state.json publisher, hook and scan pools), and each may land in an arena of its own:
under 2-second token churn the resident size kept climbing ~0.7 MB per 1,000 refreshes
with no Python object growing (pymalloc's arenas and allocated blocks flat; glibc's "free"
bytes and mmap'd chunks growing). Two arenas, what ``MALLOC_ARENA_MAX=2`` does for many
long-running services, made it level off (issue 16; BENCHMARKS.md). The daemon's threads
hold the GIL for nearly all they do, so they seldom contend for an arena anyway.

Stdlib only (``ctypes``); a no-op where the C library has no ``mallopt`` (musl) or the user
set ``MALLOC_ARENA_MAX`` themselves (theirs wins).
"""

from __future__ import annotations

import ctypes
import os

#: ``M_ARENA_MAX`` of glibc's ``<malloc.h>``.
M_ARENA_MAX = -8
#: Arenas the daemon lets glibc use.
DAEMON_ARENAS = 2


def cap_malloc_arenas(arenas: int = DAEMON_ARENAS) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` for the rest of this process's life; True if set.

    Called before the daemon starts its threads (arenas already made stay, none are added
    past the cap). False, and nothing changed, where ``MALLOC_ARENA_MAX`` is set or the C
    library has no ``mallopt``.
    """
    if os.environ.get("MALLOC_ARENA_MAX", "").strip():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas))
