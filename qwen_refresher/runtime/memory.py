"""What the daemon believes: a cache of the stores plus the records only the daemon keeps.

Every runtime component reads and writes these under one lock (``Memory.lock``). Nothing here
does I/O: the stores are the truth, and everything in a ``Memory`` can be rebuilt from them
(plus lineage fingerprints and the journal) by one sweep, which is why a missed event, a
suspend or a restart costs at most one sweep.

The records are slotted dataclasses: at 1,000 stores x 2 profiles there are ~7,000 of them,
and a ``__dict__`` each was ~0.7 MB of the idle RSS (issue 16).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..models import Credentials, ProfileKey
from ..planner import Timing
from ..state import ProfileState
from ..stores.base import Store


@dataclass(slots=True)
class View:
    """One profile as last read from its store."""

    store: Store
    creds: Credentials | None
    problem: str | None
    fp: str | None
    issued_at: float | None


@dataclass(slots=True)
class Runtime:
    """What the daemon knows about one profile beyond its file: for status and scheduling."""

    state: ProfileState = "ok"
    family: str | None = None
    attempts: int = 0
    retry_at: float | None = None
    last_error: str | None = None
    last_refresh_at: float | None = None
    next_refresh_at: float | None = None


@dataclass(slots=True)
class Family:
    """Profiles that share one refresh-token lineage: refreshed together by one job ``id``.

    ``head`` is the token the engine will refresh, ``planned`` when it is due, ``lagging``
    whether some member holds an older token than ``head`` (then the job runs at once, to
    copy the newest tokens over), ``timing`` the settings ``planned`` was drawn with (a
    reload that changes them re-plans).
    """

    id: str
    head: str
    keys: list[ProfileKey]
    creds: Credentials
    issued_at: float | None
    planned: float
    lagging: bool
    timing: Timing | None = None


@dataclass(slots=True)
class Reverts:
    """How often a writer put a consumed token back into a family, and when last."""

    count: int = 0
    last: float = 0.0


@dataclass(eq=False, slots=True)  # identity: one per managed store
class StoreInfo:
    store: Store
    explicit: bool
    digest: str | None = None
    error: str | None = None
    #: ``stat_key`` taken just before the last successful read, or None (never read, failed,
    #: or changed too recently to trust): a sweep skips a store whose key is unchanged.
    stat: tuple[int, int, int, int, int] | None = None
    #: (directory, file names) whose stale temp files a rescan removes; computed once.
    temp_names: list[tuple[Path, str]] | None = None


class Memory:
    """The shared tables, and the one lock that guards them all (re-entrant: a component
    holding it may call another that takes it)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stores: dict[Path, StoreInfo] = {}
        self.views: dict[ProfileKey, View] = {}
        self.runtime: defaultdict[ProfileKey, Runtime] = defaultdict(Runtime)
        self.families: dict[str, Family] = {}
        self.family_of: dict[ProfileKey, str] = {}
        self.reverts: defaultdict[str, Reverts] = defaultdict(Reverts)
        #: family job id -> consecutive runs that ended ``not_due``/``synced`` (idle back-off)
        self.idle_runs: dict[str, int] = {}
        #: store path -> its profile keys, so one store's update never scans every profile
        self.keys_by_store: defaultdict[Path, set[ProfileKey]] = defaultdict(set)
        #: family head -> ids of the families planned on it, kept by ``families.reconcile``
        #: (the only writer of ``families``): a refresh finds the families sharing its
        #: lineage without scanning all of them (that scan was ~20 % of a storm's CPU).
        self.families_by_head: dict[str, set[str]] = {}
        #: family id -> the head it is indexed under in ``families_by_head``
        self.indexed_head: dict[str, str] = {}
        #: the heads of ``families_by_head`` that a newer token superseded (a family planned
        #: below its lineage head, or one a rotation just moved on), kept per link
        #: (``families._superseded_heads``) instead of intersected with every link per
        #: refresh; ``links_seen`` is ``TokenHistory.linked_since``'s serial (-1: recompute)
        self.superseded_heads: set[str] = set()
        self.links_seen = -1
