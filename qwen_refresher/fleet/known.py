"""What this host last agreed with the fleet, per family, kept in memory and in ``fleet.json``,
and which family each of its profiles is of, kept in etcd (``MemberKeys``).

``fleet.json`` (in the state dir, 0600) holds family ids, member profiles, the revision last
agreed on and the id (an HMAC, not the token) of the refresh token then current: enough for
rule 1 of the protocol to recognise, after a restart, a rotation of ours whose publish never
landed (the record has not moved since we agreed with it). It holds no token. A lost or
unreadable file is only a lost memory: the host starts from its stores and the fleet.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..models import ProfileKey
from .errors import FleetError
from .etcd import KeyValue, Put
from .records import Known, Record

if TYPE_CHECKING:
    from .coordinator import Fleet

#: Largest ``fleet.json`` we read back.
MAX_KNOWN_FILE = 4 * 1024 * 1024


class KnownFamilies:
    """The host's families (fid -> ``Known``) and which of them it is spending now.
    Thread-safe: the engine's threads, the watch and ``status`` read it."""

    def __init__(self, state_file: Path | None, token_id: Callable[[str], str]) -> None:
        self._path = state_file
        self._token_id = token_id
        self._lock = threading.Lock()
        self._known: dict[str, Known] = {}
        self._holding: set[str] = set()
        self._load()

    # -- fleet.json -----------------------------------------------------------------------------
    def _load(self) -> None:
        if self._path is None:
            return
        try:
            with open(self._path, "rb") as f:
                doc = json.loads(f.read(MAX_KNOWN_FILE))
            for fid, entry in doc.get("families", {}).items():
                members = frozenset(ProfileKey(Path(str(p)), str(i))
                                    for p, i in entry["members"])
                self._known[str(fid)] = Known(members, synced_rev=int(entry["synced_rev"]),
                                              refresh_id=str(entry["refresh_id"]))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self._known.clear()  # only a memory: start from the stores and the fleet

    def _save(self) -> None:
        if self._path is None:
            return
        from ..fileio import atomic_write

        with self._lock:
            doc = {"families": {fid: {"members": sorted([str(m.store), m.profile]
                                                        for m in k.members),
                                      "synced_rev": k.synced_rev, "refresh_id": k.refresh_id}
                                for fid, k in self._known.items()}}
        with contextlib.suppress(Exception):
            atomic_write(self._path, json.dumps(doc, sort_keys=True).encode(), mode=0o600)

    # -- reading --------------------------------------------------------------------------------
    def get(self, fid: str) -> Known | None:
        with self._lock:
            return self._known.get(fid)

    def items(self) -> list[tuple[str, Known]]:
        with self._lock:
            return list(self._known.items())

    def snapshot(self) -> dict[str, Known]:
        """A copy of the table (what ``fleet.json`` holds), for a test's restart."""
        with self._lock:
            return dict(self._known)

    def restore(self, known: dict[str, Known]) -> None:
        with self._lock:
            self._known = dict(known)

    def fid_for(self, members: Sequence[ProfileKey]) -> str | None:
        """The family these profiles were last agreed to be (exact set first, then overlap)."""
        wanted = frozenset(members)
        with self._lock:
            for fid, k in self._known.items():
                if k.members == wanted:
                    return fid
            for fid, k in self._known.items():
                if k.members & wanted:
                    return fid
        return None

    def status(self, host_id: str) -> dict[str, dict[str, Any]]:
        """Per family id: role and generation, for status."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for fid, k in self._known.items():
                if fid in self._holding:
                    role = "refreshing here"
                elif k.last_host is None or k.last_host == host_id:
                    role = "refreshed here last"
                else:
                    role = f"follower of {k.last_host}"
                out[fid] = {"role": role, "generation": k.generation,
                            "members": sorted(str(m) for m in k.members),
                            "needs_login": k.needs_login}
            return out

    # -- writing --------------------------------------------------------------------------------
    def remember(self, fid: str, members: Sequence[ProfileKey], revision: int,
                 record: Record) -> None:
        """We now agree with the fleet on ``record`` at ``revision``."""
        with self._lock:
            k = self._known.setdefault(fid, Known(frozenset(members)))
            k.members = frozenset(members)
            k.synced_rev = revision
            k.refresh_id = self._token_id(record.creds.refresh)
            k.last_host = record.host
            k.generation = record.generation
            k.needs_login = record.needs_login
        self._save()

    def marked_needs_login(self, fid: str, revision: int) -> None:
        with self._lock:
            k = self._known.get(fid)
            if k is not None:
                k.synced_rev, k.needs_login = revision, True

    def seen(self, fid: str, revision: int, record: Record) -> frozenset[ProfileKey] | None:
        """A watch event put ``record`` at ``revision``: the members to run now when it holds
        a token this host has not agreed on yet, else None (ours, old, or not our family)."""
        refresh_id = self._token_id(record.creds.refresh)
        with self._lock:
            known = self._known.get(fid)
            if known is None or revision <= known.synced_rev:
                return None
            if refresh_id == known.refresh_id:
                known.needs_login = record.needs_login
                return None
            known.last_host = record.host
            return known.members

    def is_new(self, fid: str, revision: int) -> bool:
        """Whether a watch event at ``revision`` is past what we agreed on for ``fid``."""
        with self._lock:
            known = self._known.get(fid)
            return known is not None and revision > known.synced_rev

    def holding(self, fid: str, now: bool) -> None:
        """Whether this host is spending ``fid`` right now (its role in status)."""
        with self._lock:
            if now:
                self._holding.add(fid)
            else:
                self._holding.discard(fid)


class MemberKeys:
    """``ns/m/<HMAC(host id, profile)>`` -> family id: this host's profiles and their family,
    in etcd. Found by a host that lost ``fleet.json`` and holds a token no index knows (a
    login made while its daemon was down, or a generation older than the index keeps), so it
    joins its family instead of starting one of its own. Written once per family and process.
    """

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._lock = threading.Lock()
        self._noted: dict[str, frozenset[ProfileKey]] = {}

    def key(self, member: ProfileKey) -> bytes:
        fleet = self._fleet
        return fleet.ns + b"m/" + fleet.keys.token_id(
            f"{fleet.config.host_id}\0{member}").encode()

    def find(self, members: Sequence[ProfileKey]) -> str | None:
        for member in sorted(members, key=str):
            found: tuple[KeyValue | None, int] = self._fleet.guard(
                partial(self._fleet.client.get, self.key(member)))
            if found[0] is not None:
                return found[0].value.decode("ascii", "replace")
        return None

    def note(self, fid: str, members: Sequence[ProfileKey]) -> None:
        """Best effort: ``fleet.json`` remembers the same locally."""
        with self._lock:
            if self._noted.get(fid) == frozenset(members):
                return
            self._noted[fid] = frozenset(members)
        with contextlib.suppress(FleetError):
            self._fleet.client.txn([], [Put(self.key(m), fid.encode()) for m in members])
