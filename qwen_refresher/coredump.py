"""No core dumps: a dump of the daemon would hold every token it has in memory.

A crash (a bug in a C extension, SIGABRT, SIGSEGV) or ``gcore`` would otherwise write the
process image, with every access and refresh token the daemon holds, to wherever
``kernel.core_pattern`` points: a ``core`` file in the working directory, or
systemd-coredump's store, where it lives for days and may be readable by admins or sent to a
crash reporter. So the daemon sets ``RLIMIT_CORE`` to 0 as the first thing it does, soft *and*
hard limit, so that nothing it runs later can raise it again (hooks inherit it). The systemd
unit says ``LimitCORE=0`` as well: there ``SystemCallFilter=~@resources`` refuses
``setrlimit``, and the limit is already 0 when we start. Stdlib only.
"""

from __future__ import annotations

import resource


def disable_core_dumps() -> str | None:
    """Set ``RLIMIT_CORE`` to (0, 0). None when core dumps are off (now or already), else why
    they could not be turned off (for one warning; the daemon runs on regardless)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        problem = str(exc) or type(exc).__name__
    else:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if soft == 0:
        return None  # e.g. LimitCORE=0 under a seccomp filter that refuses setrlimit
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (OSError, ValueError):
        return problem
    return None
