"""What the daemon remembers about token lineage, as fingerprints, never tokens.

``successors`` maps a refresh token's fingerprint to the one that replaced it: every rotation we
perform adds a link, and so does a rotation we watch another program perform. Following the
links from any fingerprint gives the newest token of its lineage, which is how a store that
shows an old token is recognised as reverted (or lagging) and healed, rather than refreshed
again with a token the server has already consumed.

``rejected`` holds fingerprints the server refused: a family whose newest token is in it needs
a login, and we never send that token again.

``observed`` maps a fingerprint to one seen *replacing* it in a store outside any rotation we
know of (a sibling refreshed early, or a new login: the content cannot tell which). It is not
lineage yet, the family splits, but it is the heir the family adopts, instead of spending its
own refresh token, once that token is due or is rejected: if the sibling refreshed, ours is
consumed and spending it is the road to a lock-out; if it was a login, adopting costs nothing.
On disk an observation is a line ``obs <old> <new>``, which older versions skip.

Only the newest credentials of each lineage are kept in memory (never on disk here: the
journal does that while a write is pending), so a store that was reverted can be re-applied.

Links are kept per lineage, the newest ``LINKS_PER_LINEAGE`` of each (and ``MAX_LINKS`` in
all): a link is worth keeping only while a store may still show the token it supersedes, and
that is a recent token of the lineage, not one of every rotation ever made. Kept for every
rotation up to a global cap, a daemon refreshing 40 profiles every 2 seconds grew ~0.23 MB
per 1,000 refreshes until 50,000 links (issue 16); bounded per lineage it is flat from
``LINKS_PER_LINEAGE`` rotations of each family on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path

from .models import Credentials

#: Links kept per lineage (the newest). A store is recognised as holding a consumed token of
#: its lineage (a writer that put back the copy it held, a store that could not be written for
#: a while, a restored backup) only while the link from that token is kept; past it, the
#: store's token is taken as a lineage of its own. Real tokens are rotated once per lifetime
#: (hours), so 64 rotations are days to weeks: far older than any copy a writer still holds
#: (OpenClaw re-reads its store at each reload, ``on_rotate``), and more than the global cap
#: below left each lineage at a few thousand profiles (25 at 2,000). Tokens rotated every
#: 2 seconds (the churn benchmark) reach it in ~2 minutes, and memory stops growing there.
LINKS_PER_LINEAGE = 64
#: Lineage links kept in all (each link is two 24-character hex strings, ~220 bytes with the
#: dict and its place in a lineage: ~11 MB at the cap). Past it, the lineages extended least
#: recently (lineages that ended: a profile removed, a new login) lose their oldest links
#: first.
MAX_LINKS = 50_000
#: Links ``linked_since`` can still list; a caller further behind recomputes in full.
RECENT_LINKS = 4096
#: The most of the lineage log ``load`` reads; a larger file is not read at all.
MAX_LOG_BYTES = 64 * 1024 * 1024
#: The log is appended to at every rotation and rewritten compacted once it has this many
#: times more lines than the links and observations kept (plus ``LOG_SLACK``), at start
#: (``load``) and while running: at most ~22 MB with both at ``MAX_LINKS`` (~54 bytes a
#: line), well under ``MAX_LOG_BYTES``. Compacted only at start, a daemon serving 2,000
#: profiles rotated every ~6 hours passed it in ~5 months (40 profiles of 2-second tokens:
#: ~9 hours), and its next start forgot every lineage.
LOG_GROWTH = 4
LOG_SLACK = 4096


class TokenHistory:
    def __init__(self, log_path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._log_path = log_path
        #: old -> new, in the order made (a re-made link moves to the end)
        self._successors: dict[str, str] = {}
        #: lineage head -> the tokens it superseded whose links are kept, oldest first; the
        #: lineages extended least recently first (what ``MAX_LINKS`` trims first)
        self._chains: OrderedDict[str, deque[str]] = OrderedDict()
        self._rejected: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._latest: dict[str, Credentials] = {}
        self._issued: dict[str, float] = {}
        self._observed: OrderedDict[str, str] = OrderedDict()
        #: How many links were made (``load`` counts as ``RECENT_LINKS`` + 1: "everything"),
        #: and the fingerprints the latest of them superseded (``linked_since``).
        self._serial = 0
        self._recent: deque[str] = deque(maxlen=RECENT_LINKS)
        #: lines in the log file (as far as we know: appended, or written by ``_compact``)
        self._log_lines = 0

    # -- lineage ----------------------------------------------------------------------------
    def link(self, old: str, new: str) -> None:
        """Record that ``old`` was replaced by ``new`` (a rotation), in memory and on disk.

        On disk the links form an append-only log (one short line per rotation, no rewrite
        of anything), so a restarted daemon still recognises a store reverted to a token
        consumed long ago; ``load`` compacts it.
        """
        if old == new:
            return
        with self._lock:
            if self._successors.get(old) == new:
                return
            self._add_link(old, new)
            self._forget_superseded(old)
            self._serial += 1
            self._recent.append(old)
            self._append(f"{old} {new}\n")

    def _add_link(self, old: str, new: str) -> None:
        """``old`` -> ``new`` into the links and ``new``'s lineage, then the bounds (caller
        holds ``_lock``). ``old`` heading a lineage, that lineage continues under ``new``;
        ``new`` heading one already (a token that rejoins another lineage), they become one.

        A token in two lineages (``old`` linked again to another token: two rotations from
        one token, which the server never grants both of) is dropped by whichever trims it
        first: a link forgotten early, never a wrong one.
        """
        self._successors.pop(old, None)  # a re-made link moves to the end: the newest
        self._successors[old] = new
        chain = self._chains.pop(old, None)
        if chain is None:
            chain = deque()
        chain.append(old)
        joined = self._chains.pop(new, None)
        if joined is not None:
            chain.extend(joined)
        self._chains[new] = chain
        while len(chain) > LINKS_PER_LINEAGE:
            self._successors.pop(chain.popleft(), None)
        while len(self._successors) > MAX_LINKS and self._chains:
            head, oldest = next(iter(self._chains.items()))
            if oldest:
                self._successors.pop(oldest.popleft(), None)
            if not oldest:
                del self._chains[head]

    def _forget_superseded(self, fp: str) -> None:
        """Drop what we keep of ``fp`` now that it is superseded (caller holds ``_lock``):
        ``_latest`` and ``_issued`` hold lineage heads only. Done at the one place a head
        stops being one, instead of a scan of every remembered token per ``remember`` (two
        passes over 2,000 entries per rotation in a storm)."""
        self._latest.pop(fp, None)
        self._issued.pop(fp, None)

    def _append(self, line: str) -> None:
        """One line onto the log (caller holds ``_lock``: lines land in the order made)."""
        if self._log_path is None:
            return
        with contextlib.suppress(OSError):
            # O_NOFOLLOW|O_NONBLOCK: a symlink or FIFO planted here is never appended through.
            fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self._log_lines += 1
        if self._log_lines > LOG_GROWTH * (len(self._successors) + len(self._observed)) \
                + LOG_SLACK:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the log as the links and observations kept (caller holds ``_lock``),
        atomically, 0600. A failed write leaves the longer log, tried again after as many
        more lines (never a rewrite per rotation on a full disk)."""
        if self._log_path is None:
            return
        from .fileio import atomic_write

        data = "".join([*(f"{a} {b}\n" for a, b in self._successors.items()),
                        *(f"obs {a} {b}\n" for a, b in self._observed.items())]).encode()
        self._log_lines = len(self._successors) + len(self._observed)
        with contextlib.suppress(OSError, ValueError):
            atomic_write(self._log_path, data, mode=0o600)

    def observe(self, old: str, new: str) -> None:
        """Record that a store's ``old`` token was seen replaced by ``new`` by someone else
        (not a rotation we could confirm): the heir ``old``'s family adopts when due."""
        if old == new:
            return
        with self._lock:
            if self._observed.get(old) == new:
                return
            self._observed[old] = new
            self._observed.move_to_end(old)
            while len(self._observed) > MAX_LINKS:
                self._observed.popitem(last=False)
            self._append(f"obs {old} {new}\n")

    def heirs(self, fp: str) -> list[str]:
        """Tokens seen replacing ``fp``'s lineage, nearest first, each followed to the newest
        token of its own lineage (cycle-safe)."""
        out: list[str] = []
        with self._lock:
            seen = {fp}
            current = self._follow(fp, seen)
            while (nxt := self._observed.get(current)) is not None and nxt not in seen:
                seen.add(nxt)
                current = self._follow(nxt, seen)
                out.append(current)
        return out

    def _follow(self, fp: str, seen: set[str]) -> str:
        while fp in self._successors and self._successors[fp] not in seen:
            fp = self._successors[fp]
            seen.add(fp)
        return fp

    def load(self) -> None:
        """Read the lineage log and rewrite it compacted (the links ``link`` would have
        kept: the newest ``LINKS_PER_LINEAGE`` of each lineage, ``MAX_LINKS`` in all)."""
        if self._log_path is None:
            return
        from .errors import StoreError
        from .fileio import read_regular_file

        try:  # no symlink followed, no FIFO waited on, size capped
            data = read_regular_file(self._log_path, MAX_LOG_BYTES).data
        except StoreError:
            return
        lines = data.decode("ascii", errors="replace").splitlines()
        with self._lock:
            for line in lines:
                parts = line.split()
                if len(parts) == 2 and parts[0] != parts[1]:
                    if self._successors.get(parts[0]) != parts[1]:
                        self._add_link(parts[0], parts[1])
                elif len(parts) == 3 and parts[0] == "obs" and parts[1] != parts[2]:
                    self._observed[parts[1]] = parts[2]
                    self._observed.move_to_end(parts[1])
            while len(self._observed) > MAX_LINKS:
                self._observed.popitem(last=False)
            self._serial += RECENT_LINKS + 1
            self._recent.clear()
            for old in [k for k in self._latest if k in self._successors]:
                self._forget_superseded(old)
            for old in [k for k in self._issued if k in self._successors]:
                self._forget_superseded(old)
            self._log_lines = len(lines)
            if len(lines) > len(self._successors) + len(self._observed):
                self._compact()

    def is_superseded(self, fp: str) -> bool:
        with self._lock:
            return fp in self._successors

    def newest(self, fp: str) -> str:
        """Follow the links to the newest fingerprint of ``fp``'s lineage (cycle-safe)."""
        if fp not in self._successors:
            # The common case, without the lock: a lineage head. One dict lookup is atomic
            # under the GIL, and a link made just after it is as if made after this call.
            # (A storm re-plans per refresh and asked this of every family: ~10 % of its CPU.)
            return fp
        with self._lock:
            seen = {fp}
            while fp in self._successors:
                fp = self._successors[fp]
                if fp in seen:
                    break
                seen.add(fp)
            return fp

    def superseded_among(self, fps: Iterable[str]) -> set[str]:
        """Those of ``fps`` that a newer token replaced: one set operation at C speed, for
        callers holding thousands of fingerprints of which a handful are superseded."""
        with self._lock:
            return self._successors.keys() & fps

    def linked_since(self, serial: int) -> tuple[list[str] | None, int]:
        """(the fingerprints superseded by links made after ``serial``, the serial now);
        None instead of the list when more were made than are kept (``load`` counts as
        that): the caller then asks ``superseded_among`` in full. Lets a caller keep its own
        "which of mine are superseded" up to date per link instead of intersecting thousands
        of fingerprints with every link on each question."""
        with self._lock:
            behind = self._serial - serial
            if behind < 0 or behind > len(self._recent):
                return None, self._serial
            recent, n = self._recent, len(self._recent)
            return [recent[i] for i in range(n - behind, n)], self._serial  # the newest

    def superseded(self) -> list[str]:
        with self._lock:
            return list(self._successors)

    def links(self) -> dict[str, str]:
        with self._lock:
            return dict(self._successors)

    # -- rejection --------------------------------------------------------------------------
    def reject(self, fp: str, reason: str) -> None:
        with self._lock:
            self._rejected[fp] = (time.time(), reason)
            while len(self._rejected) > MAX_LINKS:
                self._rejected.popitem(last=False)

    def rejection(self, fp: str) -> tuple[float, str] | None:
        with self._lock:
            return self._rejected.get(fp)

    def rejected(self) -> dict[str, tuple[float, str]]:
        with self._lock:
            return dict(self._rejected)

    def load_rejected(self, entries: dict[str, tuple[float, str]]) -> None:
        with self._lock:
            self._rejected.update(entries)

    # -- newest credentials -----------------------------------------------------------------
    def remember(self, fp: str, creds: Credentials, *, issued_at: float | None = None) -> None:
        """Keep the newest credentials of a lineage, and when we obtained them.

        The time is recorded here, before any store is written, so that a scan triggered by
        our own write already knows the token's lifetime (a short-lived token is then planned
        at half its life, not by the margin alone).
        """
        with self._lock:
            if fp in self._successors:
                # Keep only lineage heads: anything superseded is dead weight (and a dead
                # secret). ``link`` drops a head's entries when it stops being one.
                self._forget_superseded(fp)
                return
            self._latest[fp] = creds
            if issued_at is not None:
                self._issued[fp] = issued_at

    def issued_at(self, fp: str) -> float | None:
        with self._lock:
            return self._issued.get(fp)

    def credentials(self, fp: str) -> Credentials | None:
        with self._lock:
            return self._latest.get(fp)
