"""What the previous run left: its ``state.json`` (rejected tokens, last refresh times,
failing ``on_rotate`` episodes) and its journal (tokens received but not yet written).

Taken back once, at start, before the first scan. The ``state.json`` is ours, but an older or
newer version, a hand edit or a bad disk can give it any shape: an entry that is not what we
write is skipped (with one warning naming the file), the rest is used; a file that cannot be
used at all is never a reason not to start.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..history import TokenHistory
from ..journal import Journal
from ..logsetup import REDACTOR
from ..models import ProfileKey
from ..protocols import Logger
from ..state import STATE_FILE, HookStatus, read_state
from .inventory import REDACT_GRACE
from .memory import Memory


def previous_run(state_dir: Path, memory: Memory, history: TokenHistory, journal: Journal,
                 log: Logger) -> dict[ProfileKey, HookStatus]:
    """Reload lineage, rejections, refresh times and pending rotations; returns the profiles
    whose ``on_rotate`` was failing (``OnRotate.resume`` tells the gateway after the scan)."""
    history.load()
    pending: dict[ProfileKey, HookStatus] = {}
    previous = read_state(state_dir)
    file = str(state_dir / STATE_FILE)
    if previous is not None:
        try:
            pending, bad = restore_state(previous, memory, history)
        except Exception as exc:  # never a reason not to start: it is only a memory
            log.warning("state_ignored", file=file, error=f"{type(exc).__name__}: {exc}",
                        message="the previous run's state could not be used; "
                                "starting from the stores alone")
        else:
            if bad:
                log.warning("state_entries_ignored", file=file, count=len(bad),
                            entries=bad[:5],
                            message="entries of an unexpected shape were skipped; "
                                    "the file is rewritten from what the daemon knows")
    for replaces, fp, creds, _members in journal.pending():
        REDACTOR.add(creds.access, creds.refresh, until=creds.expires_at + REDACT_GRACE)
        history.link(replaces, fp)
        history.remember(fp, creds, issued_at=time.time())
        log.warning("journal_replay", family=fp[:12],
                    message="tokens received before a crash or a failed write are "
                            "being written to their stores")
    return pending


def _finite(value: object) -> bool:
    """A JSON number we can use as a time: not a bool, not NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def hook_status(value: object) -> HookStatus | None:
    """A ``hook`` row of a previous ``state.json``, or None if it is not one we would write."""
    if not isinstance(value, dict):
        return None
    ok: Any = value.get("ok")
    at: Any = value.get("at")
    rc: Any = value.get("returncode")
    timed_out: Any = value.get("timed_out", False)
    output: Any = value.get("output", "")
    since: Any = value.get("failing_since")
    failures: Any = value.get("failures", 0)
    retry: Any = value.get("next_retry_at")
    if not isinstance(ok, bool) or not _finite(at) or \
            not (rc is None or (isinstance(rc, int) and not isinstance(rc, bool))) or \
            not isinstance(timed_out, bool) or not isinstance(output, str) or \
            not (since is None or _finite(since)) or isinstance(failures, bool) or \
            not isinstance(failures, int) or not (retry is None or _finite(retry)):
        return None
    status: HookStatus = {"ok": ok, "at": float(at), "returncode": rc, "timed_out": timed_out,
            "output": output[:300], "failing_since": float(since) if since is not None else None,
            "failures": max(0, failures), "next_retry_at": float(retry) if retry is not None
            else None}
    return status


def _rejections(previous: dict[str, Any], bad: list[str]) -> dict[str, tuple[float, str]]:
    rejected = previous.get("rejected", {})
    good: dict[str, tuple[float, str]] = {}
    if not isinstance(rejected, dict):
        bad.append("rejected")
        return good
    for n, (fp, v) in enumerate(rejected.items()):
        if isinstance(fp, str) and isinstance(v, list) and len(v) == 2 and \
                _finite(v[0]) and isinstance(v[1], str):
            good[fp] = (float(v[0]), v[1])
        else:
            bad.append(f"rejected #{n}")
    return good


def restore_state(previous: Any, memory: Memory, history: TokenHistory,
                  ) -> tuple[dict[ProfileKey, HookStatus], list[str]]:
    """Take what ``state.json`` remembers: rejected tokens, last refresh times, and each
    profile whose ``on_rotate`` was failing (``failing_since``): the gateway was never told
    of the last rotation. Returns those failing hooks and the entries skipped.

    The file is ours, but an older or newer version, a hand edit or a bad disk can give it
    any shape: an entry that is not what we write is skipped (and named), the rest is used.
    """
    bad: list[str] = []
    history.load_rejected(_rejections(previous, bad))
    pending: dict[ProfileKey, HookStatus] = {}
    profiles = previous.get("profiles", [])
    if not isinstance(profiles, list):
        bad.append("profiles")
        profiles = []
    for n, prof in enumerate(profiles):
        if not isinstance(prof, dict) or not isinstance(prof.get("store"), str) or \
                not prof["store"] or not isinstance(prof.get("profile"), str):
            bad.append(f"profiles #{n}")
            continue
        key = ProfileKey(Path(prof["store"]), prof["profile"])
        last = prof.get("last_refresh_at")
        if last is not None and not _finite(last):
            bad.append(f"profiles #{n} last_refresh_at")
            last = None
        memory.runtime[key].last_refresh_at = float(last) if last is not None else None
        if prof.get("hook") is not None:
            hook = hook_status(prof["hook"])
            if hook is None:
                bad.append(f"profiles #{n} hook")
            elif hook["failing_since"] is not None:
                pending[key] = hook
    return pending, bad
