"""The fleet's values: its settings, a family's record, what a host knows, a spend ticket.

Plain data (the protocol is in ``coordinator.py``). A ``Record`` is what ``ns/f/<fid>/current``
holds once decrypted; ``from_bytes`` checks every field, since a record that authenticates
can still come from another version of this program.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..models import Credentials, ProfileKey
from .errors import FleetRecordUnreadable

#: Largest record we accept after decryption.
MAX_RECORD = 16 * 1024
#: Index keys kept per family: a host whose store holds one of the last ``INDEX_KEEP``
#: generations' tokens finds its family by it even without its ``fleet.json`` (at the default
#: 6 h token life, 8 days of them); older ones are deleted as new generations come.
INDEX_KEEP = 32
@dataclass(frozen=True)
class FleetConfig:
    """Resolved fleet settings (``config.Settings.fleet_*``)."""

    urls: list[str]
    secret_file: Path
    namespace: str = "qwen-refresher"
    host_id: str = field(default_factory=socket.gethostname)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Seconds an etcd request may take per member.
    timeout: float = 3.0
    #: TTL of the lock's lease; renewed every third of it while a spend runs.
    lease_ttl: int = 10
    #: TTL of the "a spend was sent" marker: how long another host waits for a holder that
    #: went silent (killed, paused) before it spends the same token itself. Longer than a
    #: refresh request can take (qwen.MAX_REQUEST_SECONDS), so a live holder always answers.
    inflight_grace: int = 30
    #: After the server rejected a token, how long to wait for the fleet's newer one.
    adopt_wait: float = 15.0
    #: etcd time allowed to each step of a spend (reconcile, begin, commit; release gets
    #: ``release_budget``), over all members together. The engine holds the family's store
    #: locks across them and the token request (at most qwen.MAX_REQUEST_SECONDS, 20 s): 2.5 x
    #: 3 + 1 + 20 = 28.5 s, under the 30 s after which OpenClaw takes a lock over as stale.
    step_budget: float = 2.5
    release_budget: float = 1.0
    #: After a rejection, the wait for the fleet's newer token ends this long after the spend
    #: began at the latest (same reason: the store locks are still held).
    hold_budget: float = 20.0
    #: Seconds between quorum probes (a linearizable read) while idle.
    probe_interval: float = 15.0
    #: A watch stream with no message for this long is re-opened.
    watch_idle: float = 60.0
    #: Where this host keeps which family id its profiles belong to and the revision it last
    #: agreed on (no token: ids, paths, numbers), so that a rotation whose publish never
    #: landed before a restart is still published as the family's (rule 1). None: memory only.
    state_file: Path | None = None


@dataclass(frozen=True)
class Record:
    """One family's newest tokens as the fleet holds them (decrypted)."""

    creds: Credentials
    generation: int
    host: str
    time: float
    needs_login: bool = False
    #: Ids of this family's index keys (``ns/t/<id>``), oldest first, at most ``INDEX_KEEP``:
    #: the one a new generation pushes out is deleted in the same transaction.
    index_ids: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        c = self.creds
        return json.dumps({
            "access": c.access, "refresh": c.refresh, "expires_ms": c.expires_ms,
            "resource_url": c.resource_url, "token_type": c.token_type,
            "generation": self.generation, "host": self.host, "time": self.time,
            "needs_login": self.needs_login, "index_ids": list(self.index_ids)}).encode()

    def successor(self, creds: Credentials, host: str, token_id: str,
                  ) -> tuple[Record, tuple[str, ...]]:
        """The next generation holding ``creds``, and the index ids it lets go."""
        ids = (*[i for i in self.index_ids if i != token_id], token_id)
        return (Record(creds, self.generation + 1, host, time.time(),
                       index_ids=ids[-INDEX_KEEP:]), ids[:-INDEX_KEEP])

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        if len(data) > MAX_RECORD:
            raise FleetRecordUnreadable("a fleet record is larger than the cap")
        try:
            doc = json.loads(data)
            creds = Credentials(
                access=_text(doc["access"]), refresh=_text(doc["refresh"]),
                expires_ms=_whole(doc["expires_ms"]),
                resource_url=(None if doc.get("resource_url") is None
                              else _text(doc["resource_url"])),
                token_type=_text(doc.get("token_type") or "Bearer"))
            ids = _index_ids(doc.get("index_ids") or [])
            return cls(creds, _whole(doc["generation"]), _text(doc["host"]),
                       float(doc["time"]), bool(doc.get("needs_login", False)),
                       tuple(ids))
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetRecordUnreadable(
                f"a fleet record has the wrong shape ({type(exc).__name__})") from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 8192:
        raise ValueError("not a non-empty string")
    return value


def _index_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > INDEX_KEEP or not all(
            isinstance(i, str) and i.isalnum() and len(i) <= 128 for i in value):
        raise ValueError("index_ids: not a short list of ids")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("not a non-negative integer")
    return value


@dataclass
class Known:
    """What this host last agreed with the fleet about one family."""

    members: frozenset[ProfileKey]
    synced_rev: int = 0
    refresh_id: str | None = None
    last_host: str | None = None
    generation: int = 0
    needs_login: bool = False


@dataclass(frozen=True)
class Reconciled:
    """What ``reconcile`` found. ``adopt``: the stores must take these credentials."""

    fid: str
    kind: Literal["in_sync", "adopt", "published", "created"]
    adopt: Credentials | None = None


@dataclass
class Ticket:
    """A granted right to spend one family's current token once."""

    fid: str
    revision: int
    record: Record
    lock_lease: int
    inflight_lease: int
    stop: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    #: When the spend was granted (monotonic): bounds the wait after a rejection.
    started: float = field(default_factory=time.monotonic)
