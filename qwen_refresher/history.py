"""What the daemon remembers about token lineage, as fingerprints, never tokens.

``successors`` maps a refresh token's fingerprint to the one that replaced it: every rotation we
perform adds a link, and so does a rotation we watch another program perform. Following the
links from any fingerprint gives the newest token of its lineage, which is how a store that
shows an old token is recognised as reverted (or lagging) and healed, rather than refreshed
again with a token the server has already consumed.

``rejected`` holds fingerprints the server refused: a family whose newest token is in it needs
a login, and we never send that token again.

Only the newest credentials of each lineage are kept in memory (never on disk here: the
journal does that while a write is pending), so a store that was reverted can be re-applied.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .models import Credentials

#: Lineage links kept: several rotations' worth for thousands of profiles (each link is two
#: 24-character hex strings, ~200 bytes with the dict: ~10 MB at the cap).
MAX_LINKS = 50_000


class TokenHistory:
    def __init__(self, log_path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._log_path = log_path
        self._successors: OrderedDict[str, str] = OrderedDict()
        self._rejected: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._latest: dict[str, Credentials] = {}
        self._issued: dict[str, float] = {}

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
            self._successors[old] = new
            self._successors.move_to_end(old)
            while len(self._successors) > MAX_LINKS:
                self._successors.popitem(last=False)
            if self._log_path is not None:
                with contextlib.suppress(OSError):
                    fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    try:
                        os.write(fd, f"{old} {new}\n".encode())
                    finally:
                        os.close(fd)

    def load(self) -> None:
        """Read the lineage log and rewrite it compacted (the newest ``MAX_LINKS`` links)."""
        if self._log_path is None:
            return
        try:
            lines = self._log_path.read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            return
        with self._lock:
            for line in lines:
                parts = line.split()
                if len(parts) == 2 and parts[0] != parts[1]:
                    self._successors[parts[0]] = parts[1]
                    self._successors.move_to_end(parts[0])
            while len(self._successors) > MAX_LINKS:
                self._successors.popitem(last=False)
            if len(lines) > len(self._successors):
                from .fileio import atomic_write

                data = "".join(f"{a} {b}\n" for a, b in self._successors.items()).encode()
                with contextlib.suppress(OSError, ValueError):
                    atomic_write(self._log_path, data, mode=0o600)

    def is_superseded(self, fp: str) -> bool:
        with self._lock:
            return fp in self._successors

    def newest(self, fp: str) -> str:
        """Follow the links to the newest fingerprint of ``fp``'s lineage (cycle-safe)."""
        with self._lock:
            seen = {fp}
            while fp in self._successors:
                fp = self._successors[fp]
                if fp in seen:
                    break
                seen.add(fp)
            return fp

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
            self._latest[fp] = creds
            if issued_at is not None:
                self._issued[fp] = issued_at
            # Keep only lineage heads: anything superseded is dead weight (and a dead secret).
            for old in [k for k in self._latest if k in self._successors]:
                del self._latest[old]
            for old in [k for k in self._issued if k in self._successors]:
                del self._issued[old]

    def issued_at(self, fp: str) -> float | None:
        with self._lock:
            return self._issued.get(fp)

    def credentials(self, fp: str) -> Credentials | None:
        with self._lock:
            return self._latest.get(fp)
