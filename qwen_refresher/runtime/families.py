"""Views and lineage -> families, and when each family's job runs.

Pure in the sense that matters for testing: no I/O, no clock (``now`` is passed in), no
scheduler. ``reconcile`` changes only the ``Memory`` it is handed (families, each profile's
planned state) and returns the job changes for the daemon to apply; everything else here
returns values. ``planner.py`` keeps the two formulas (``refresh_at``, ``backoff_delay``);
this module decides which token a family refreshes, and when.

Lineage is the ``TokenHistory``: its reads (``newest``, ``rejection``, ``credentials``...)
touch memory only, so a test can build one without a file.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..engine import current_token
from ..history import TokenHistory
from ..models import Credentials, ProfileKey
from ..planner import Timing, refresh_at
from .memory import Family, Memory, Runtime, View

#: Consecutive re-applications of one family that we allow before backing off: a writer that
#: keeps reverting us must not turn the daemon into a loop.
REVERT_FREE_RETRIES = 2
#: A family run that changed nothing lasting (``not_due``, ``synced``) and is planned for
#: "now" again waits this long, doubling per such run up to ``IDLE_RETRY_CAP``: whatever
#: makes plan and engine disagree, it never becomes a busy loop on OpenClaw's lock.
IDLE_RETRY_BASE = 0.25
IDLE_RETRY_CAP = 60.0


@dataclass
class JobChanges:
    """What the scheduler must do after a reconcile, in order: ``(job id, run time)`` to
    (re)schedule, ``(job id, None)`` to remove."""

    steps: list[tuple[str, float | None]] = field(default_factory=list)


def family_id(first: ProfileKey) -> str:
    """A family's job id: its first member's (so a family of one is a job per profile)."""
    return f"refresh:{first}"


def affected(memory: Memory, history: TokenHistory,
             touched: set[ProfileKey]) -> tuple[set[ProfileKey], set[str]]:
    """The profiles whose grouping can change when ``touched`` changed, and their old
    families: the touched profiles' families, and any family sharing a head with them."""
    views, family_of = memory.views, memory.family_of
    touched = {k for k in touched if k in views} | {k for k in touched if k in family_of}
    old_ids = {family_of[k] for k in touched if k in family_of}
    heads = {history.newest(v.fp) for k in touched
             if (v := views.get(k)) is not None and v.fp is not None}
    # Every family f with newest(f.head) in heads, through the head index instead of a scan
    # of all families (quadratic in a storm): f.head itself in heads, or f.head superseded
    # (a family planned on a token below its lineage head, ``current_token``) and leading
    # there. Only superseded heads are walked, and they are few.
    by_head = _head_index(memory)
    for head in heads:
        old_ids |= by_head.get(head, set())
    for head in _superseded_heads(memory, history, by_head):
        if history.newest(head) in heads:
            old_ids |= by_head[head]
    keys = {k for k in touched if k in views}
    for job_id in old_ids:
        family = memory.families.get(job_id)
        if family is not None:
            keys |= {k for k in family.keys if k in views}
    return keys, old_ids


def _head_index(memory: Memory) -> dict[str, set[str]]:
    """``memory.families_by_head``, rebuilt first if ``families`` was changed behind
    ``reconcile``'s back (a test building a Memory by hand): never a stale answer."""
    if len(memory.indexed_head) != len(memory.families) or any(
            memory.indexed_head.get(f.id) != f.head for f in _sample(memory)):
        memory.families_by_head.clear()
        memory.indexed_head.clear()
        memory.links_seen = -1  # and the superseded heads among them, in full
        for family in memory.families.values():
            _index_family(memory, family, add=True)
    return memory.families_by_head


def _superseded_heads(memory: Memory, history: TokenHistory,
                      by_head: dict[str, set[str]]) -> list[str]:
    """The indexed heads a newer token superseded: ``memory.superseded_heads`` brought up
    to date with the links made since the last call, then pruned (a head no longer
    indexed, or evicted from the lineage). A head indexed while already superseded is added
    by ``reconcile``. The full intersection (thousands of fingerprints, ~6 % of a storm's
    CPU when done per refresh) only after a ``load`` or a rebuilt index."""
    olds, serial = history.linked_since(memory.links_seen)
    if olds is None or memory.links_seen < 0:
        found = history.superseded_among(by_head.keys())
    else:
        found = memory.superseded_heads | {old for old in olds if old in by_head}
    memory.links_seen = serial
    if found:
        found = {h for h in found if h in by_head} & history.superseded_among(found)
    memory.superseded_heads = found
    return list(found)


def _sample(memory: Memory) -> list[Family]:
    """Up to two families to spot-check the index with (O(1), not a scan)."""
    out: list[Family] = []
    for family in memory.families.values():
        out.append(family)
        if len(out) == 2:
            break
    return out


def _index_family(memory: Memory, family: Family | None, *, add: bool) -> None:
    if family is None:
        return
    index = memory.families_by_head
    if add:
        index.setdefault(family.head, set()).add(family.id)
        memory.indexed_head[family.id] = family.head
        return
    head = memory.indexed_head.pop(family.id, family.head)
    ids = index.get(head)
    if ids is not None:
        ids.discard(family.id)
        if not ids:
            del index[head]


def family_token(history: TokenHistory, head: str,
                 views: list[View]) -> tuple[str, Credentials, float | None]:
    """The token a family of these views refreshes: (fingerprint, credentials, issued at).

    By the engine's own rule (``current_token``, one home): a lineage head no store holds and
    we do not remember is not it, or plan and run disagree.
    """
    picked = current_token(history, [(v.fp, v.creds) for v in views
                                     if v.fp is not None and v.creds is not None])
    if picked is not None:
        head = picked[0]
    holders = [v for v in views if v.fp == head and v.creds is not None]
    if holders:
        best = max(holders, key=lambda v: v.creds.expires_ms if v.creds else 0)
        creds, issued = best.creds, best.issued_at
    else:
        remembered = history.credentials(head)
        fallback = max(views, key=lambda v: v.creds.expires_ms if v.creds else 0)
        creds = remembered or fallback.creds
        issued = history.issued_at(head) or fallback.issued_at
    assert creds is not None
    return head, creds, issued


def run_time(family: Family, *, memory: Memory, history: TokenHistory,
             now: float) -> float | None:
    """When the family's job runs: None while a login is needed, at once while members lag
    (unless a writer keeps reverting them, or a failed write waits for its retry), at the
    retry time after a failure, else at the planned time; and never again "now" right after
    a run that changed nothing (idle back-off)."""
    retry_at = max((memory.runtime[k].retry_at or 0.0) for k in family.keys) or None
    run_at: float | None
    if history.rejection(family.head) is not None:
        run_at = None
    elif family.lagging:
        revert = memory.reverts[family.head]
        run_at = now
        if revert.count > REVERT_FREE_RETRIES:
            run_at = max(now, revert.last + min(2.0 ** (revert.count - REVERT_FREE_RETRIES),
                                                300.0))
        if retry_at is not None:
            run_at = max(run_at, retry_at)
    elif retry_at is not None:
        run_at = retry_at
    else:
        run_at = family.planned
    idle = memory.idle_runs.get(family.id, 0)
    if run_at is not None and run_at <= now and idle:
        # The last run changed nothing lasting and the plan says "now" again: back off.
        run_at = now + min(IDLE_RETRY_BASE * 2.0 ** (idle - 1), IDLE_RETRY_CAP)
    elif run_at is None or run_at > now:
        memory.idle_runs.pop(family.id, None)
    return run_at


def row_state(rt: Runtime, family: Family, rejection: tuple[float, str] | None,
              now: float) -> None:
    """A member's state as ``status`` shows it, from its family's plan."""
    if rejection is not None:
        rt.state, rt.last_error = "needs_login", rejection[1]
    elif rt.state == "refreshing":
        pass
    elif rt.retry_at is not None:
        rt.state = "retrying"
    elif family.creds.expires_at <= now:
        rt.state = "expired"
    elif family.planned <= now:
        rt.state = "due"
    else:
        rt.state = "ok"


def plan_family(memory: Memory, history: TokenHistory, timing: Timing, head: str,
                keys: list[ProfileKey], now: float) -> tuple[Family, float | None]:
    """One family of ``keys`` (sorted), and when its job runs (None: no job)."""
    head, creds, issued = family_token(history, head, [memory.views[k] for k in keys])
    job_id = family_id(keys[0])
    previous = memory.families.get(job_id)
    if previous is not None and previous.head == head and previous.timing == timing and \
            previous.creds.expires_ms == creds.expires_ms:
        planned = previous.planned  # same token, expiry, settings: keep the jitter drawn once
    else:
        planned = refresh_at(now=now, expires_at=creds.expires_at, issued_at=issued,
                             timing=timing)
    lagging = any(memory.views[k].fp != head for k in keys)
    family = Family(job_id, head, keys, creds, issued, planned, lagging, timing)
    run_at = run_time(family, memory=memory, history=history, now=now)
    rejection = history.rejection(head)
    for key in keys:
        rt = memory.runtime[key]
        rt.family = head[:12]
        rt.next_refresh_at = run_at
        row_state(rt, family, rejection, now)
    return family, run_at


def reconcile(memory: Memory, history: TokenHistory, timing: Timing, now: float,
              touched: set[ProfileKey] | None = None) -> JobChanges:
    """Group profiles into families and plan each; the caller holds ``memory.lock``.

    ``touched``: only these profiles changed (one store read, one refresh), so only their
    families are re-planned; without it, everything is (start, sweep, discovery). A refresh
    storm over thousands of stores stays O(family) per refresh this way.
    """
    if touched is None:
        # Old families stay readable while planning: a family whose token is the same keeps
        # the jitter drawn once (``plan_family``); the ones gone are dropped below.
        keys, old_ids = set(memory.views), set(memory.families)
    else:
        keys, old_ids = affected(memory, history, touched)
    groups: dict[str, list[ProfileKey]] = defaultdict(list)
    for key in keys:
        view, rt = memory.views[key], memory.runtime[key]
        if view.creds is None or view.fp is None:
            rt.state, rt.last_error, rt.family = "invalid_store", view.problem, None
            rt.next_refresh_at = None
            continue
        groups[history.newest(view.fp)].append(key)
    changes = JobChanges()
    families: dict[str, Family] = {}
    for head, members in groups.items():
        members.sort()
        family, run_at = plan_family(memory, history, timing, head, members, now)
        families[family.id] = family
        changes.steps.append((family.id, run_at))
    for job_id in old_ids - set(families):
        _index_family(memory, memory.families.pop(job_id, None), add=False)
        changes.steps.append((job_id, None))
    for family in families.values():
        _index_family(memory, memory.families.get(family.id), add=False)
        _index_family(memory, family, add=True)
    # A family planned on a token already superseded (``current_token``'s last resort):
    # no later link will name its head, so ``_superseded_heads`` learns it here.
    memory.superseded_heads |= history.superseded_among(f.head for f in families.values())
    memory.families.update(families)
    for family in families.values():
        for key in family.keys:
            memory.family_of[key] = family.id
    if touched is None:
        memory.family_of = {k: f.id for f in memory.families.values() for k in f.keys}
    else:
        grouped = {k for f in families.values() for k in f.keys}
        for key in (keys | touched) - grouped:
            memory.family_of.pop(key, None)
    return changes


def due_now(memory: Memory, history: TokenHistory, now: float) -> list[str]:
    """The families ``run --once`` refreshes: lagging or due, and not waiting for a login."""
    return [f.id for f in memory.families.values()
            if (f.lagging or f.planned <= now) and history.rejection(f.head) is None]


def orphans(memory: Memory, history: TokenHistory, scheduled: set[str],
            running: set[str]) -> set[ProfileKey]:
    """Profiles whose family should have a job and has none (a job that died before
    re-planning), and profiles with a token in no family: what a quiet rescan re-plans."""
    out: set[ProfileKey] = set()
    for family in memory.families.values():
        if family.id not in scheduled and family.id not in running and \
                history.rejection(family.head) is None:
            out.update(family.keys)
    out.update(k for k, v in memory.views.items() if v.fp is not None and k not in memory.family_of)
    return out


def find_heir(memory: Memory, history: TokenHistory, family: Family) -> tuple[str, str] | None:
    """The newest live token seen replacing the family's head, and where it is held.

    Live: a store we manage holds it (or we rotated it ourselves) and the server has not
    rejected it. A sibling seen replacing our token may have spent it: the family takes its
    token rather than send ours (a consumed token sent is a rejection, and a lost login).
    """
    for heir in reversed(history.heirs(family.head)):  # the newest first
        if history.rejection(heir) is not None:
            continue
        holder = next((k for k, v in sorted(memory.views.items())
                       if v.fp == heir and v.creds is not None), None)
        if holder is None and history.credentials(heir) is None:
            continue
        where = (f"{memory.views[holder].store.describe()}#{holder.profile}"
                 if holder is not None else "the daemon's memory")
        return heir, where
    return None
