"""The fleet protocol: one spender per token family across hosts, etcd as the fleet's journal.

Keys (``ns`` is ``fleet_namespace``; ids are HMACs under the fleet's id key, never tokens)::

    ns/t/<token id>          -> family id            index: which family a refresh token is of
    ns/f/<fid>/current       -> AES-GCM(record)       the family's newest tokens + generation
    ns/f/<fid>/lock          -> host id   (lease A)   who may spend now; kept alive while spending
    ns/f/<fid>/inflight      -> host id   (lease B)   "a spend was sent": never kept alive, so it
                                                      outlives a paused holder by ``inflight_grace``

One refresh (the engine calls these, under the local store locks):

1. ``reconcile``: find the family (index of the token the stores hold; a new family is created
   with id = that token's id), read ``current``. Same token: in sync. Otherwise the fleet's
   record wins (adopt it: the stores lag a generation, or another host logged in), except when
   our token was never in the fleet and either the record is marked ``needs_login`` or it has
   not moved since we last agreed with it: then ours is a login (or our own rotation whose
   publish never landed) and is published as the next generation (compare on the revision).
2. ``begin_spend``: one transaction creates ``lock`` and ``inflight`` only if neither exists
   and ``current`` is still at the revision read (the token we will spend is the fleet's
   current one). The lock's lease is kept alive by a thread while the request runs.
3. The engine sends the request. Then ``commit``: compare-and-swap ``current`` on the revision
   read (not on the lease: a late answer from a holder that lost its lease still lands, since
   nobody could have moved ``current`` without spending the same token, which the server would
   have refused) and put the new token's index key. This happens after the local journal (a
   crash between the two is replayed at start, then published) and before any store. If
   etcd cannot be reached, the stores get the tokens anyway (never lose a rotation) and the
   next reconcile publishes them (rule 1).
4. Release: revoke both leases (only our own keys go).

Followers watch ``ns/f/`` and, when a family they hold moves, ask the daemon to run that
family now: its engine run reconciles (rule 1) and writes the new tokens to the local stores
under the local locks, and the daemon runs ``on_rotate`` as for any sync.

Without a valid answer from etcd (no quorum, partition, bad answer) nothing is spent: safety
over liveness. See docs/fleet.md for the failure table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..models import Credentials, ProfileKey
from .crypto import FleetKeys
from .errors import FleetBusy, FleetError, FleetMoved, FleetRecordUnreadable, FleetUnavailable
from .etcd import Compare, EtcdClient, Get, Put, WatchCompacted, prefix_end

log = logging.getLogger("qwen_refresher.fleet")

#: Largest record we accept after decryption.
MAX_RECORD = 16 * 1024
#: Largest ``fleet.json`` we read back.
MAX_KNOWN_FILE = 4 * 1024 * 1024


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

    def to_bytes(self) -> bytes:
        c = self.creds
        return json.dumps({
            "access": c.access, "refresh": c.refresh, "expires_ms": c.expires_ms,
            "resource_url": c.resource_url, "token_type": c.token_type,
            "generation": self.generation, "host": self.host, "time": self.time,
            "needs_login": self.needs_login}).encode()

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
            return cls(creds, _whole(doc["generation"]), _text(doc["host"]),
                       float(doc["time"]), bool(doc.get("needs_login", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetRecordUnreadable(
                f"a fleet record has the wrong shape ({type(exc).__name__})") from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 8192:
        raise ValueError("not a non-empty string")
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


class Fleet:
    """One host's view of the fleet. Thread-safe."""

    def __init__(self, config: FleetConfig, *, keys: FleetKeys | None = None,
                 client: EtcdClient | None = None) -> None:
        self.config = config
        self.keys = keys or FleetKeys.from_file(config.secret_file, config.namespace)
        self.client = client or EtcdClient(
            config.urls, timeout=config.timeout, ca=config.ca, cert=config.cert,
            key=config.key, user=config.user, password=config.password)
        self.ns = config.namespace.strip("/").encode() + b"/"
        self._lock = threading.Lock()
        self._known: dict[str, Known] = {}
        self._holding: set[str] = set()
        #: When the fleet stopped answering (None: it answers). Set by every failing call.
        self.unavailable_since: float | None = None
        self.last_problem: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Called with (fid, member keys) when another host moved a family this host holds.
        self.on_change: Callable[[str, frozenset[ProfileKey]], None] | None = None
        self.on_health: Callable[[], None] | None = None
        self._load_known()

    # -- what this host agreed with the fleet, across restarts ----------------------------------
    def _load_known(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read(MAX_KNOWN_FILE))
            for fid, entry in doc.get("families", {}).items():
                members = frozenset(ProfileKey(Path(str(p)), str(i))
                                    for p, i in entry["members"])
                self._known[str(fid)] = Known(members, synced_rev=int(entry["synced_rev"]),
                                              refresh_id=str(entry["refresh_id"]))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self._known.clear()  # only a memory: start from the stores and the fleet

    def _save_known(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        from ..fileio import atomic_write

        with self._lock:
            doc = {"families": {fid: {"members": sorted([str(m.store), m.profile]
                                                        for m in k.members),
                                      "synced_rev": k.synced_rev, "refresh_id": k.refresh_id}
                                for fid, k in self._known.items()}}
        with contextlib.suppress(Exception):
            atomic_write(path, json.dumps(doc, sort_keys=True).encode(), mode=0o600)

    # -- keys ---------------------------------------------------------------------------------
    def _index(self, token_id: str) -> bytes:
        return self.ns + b"t/" + token_id.encode()

    def _fkey(self, fid: str, leaf: str) -> bytes:
        return self.ns + b"f/" + fid.encode() + b"/" + leaf.encode()

    def _seal(self, fid: str, record: Record) -> bytes:
        return self.keys.seal(self._fkey(fid, "current"), record.to_bytes())

    def _open(self, fid: str, sealed: bytes) -> Record:
        return Record.from_bytes(self.keys.open(self._fkey(fid, "current"), sealed))

    # -- health -----------------------------------------------------------------------------
    def _ok(self) -> None:
        changed = self.unavailable_since is not None
        self.unavailable_since, self.last_problem = None, None
        if changed:
            log.warning("fleet available again")
            if self.on_health:
                self.on_health()

    def _failed(self, exc: FleetUnavailable) -> None:
        changed = self.unavailable_since is None
        if changed:
            self.unavailable_since = time.time()
        self.last_problem = str(exc)
        if changed and self.on_health:
            self.on_health()

    def _guard(self, func: Callable[[], Any]) -> Any:
        try:
            result = func()
        except FleetUnavailable as exc:
            self._failed(exc)
            raise
        self._ok()
        return result

    @property
    def available(self) -> bool:
        return self.unavailable_since is None

    def probe(self) -> bool:
        """One linearizable read: True when a quorum answered."""
        try:
            self._guard(lambda: self.client.get(self.ns + b"health"))
        except FleetUnavailable:
            return False
        return True

    def family_status(self) -> dict[str, dict[str, Any]]:
        """Per family id: role and generation, for status."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for fid, k in self._known.items():
                if fid in self._holding:
                    role = "refreshing here"
                elif k.last_host is None or k.last_host == self.config.host_id:
                    role = "refreshed here last"
                else:
                    role = f"follower of {k.last_host}"
                out[fid] = {"role": role, "generation": k.generation,
                            "members": sorted(str(m) for m in k.members),
                            "needs_login": k.needs_login}
            return out

    def fid_for(self, members: Sequence[ProfileKey]) -> str | None:
        wanted = frozenset(members)
        with self._lock:
            for fid, k in self._known.items():
                if k.members == wanted:
                    return fid
            for fid, k in self._known.items():
                if k.members & wanted:
                    return fid
        return None

    def _remember(self, fid: str, members: Sequence[ProfileKey], revision: int,
                  record: Record) -> None:
        with self._lock:
            k = self._known.setdefault(fid, Known(frozenset(members)))
            k.members = frozenset(members)
            k.synced_rev = revision
            k.refresh_id = self.keys.token_id(record.creds.refresh)
            k.last_host = record.host
            k.generation = record.generation
            k.needs_login = record.needs_login
        self._save_known()

    # -- 1. reconcile -----------------------------------------------------------------------
    def read(self, fid: str) -> tuple[Record | None, int]:
        """The family's record and its mod revision (0: none)."""
        kv, _ = self._guard(lambda: self.client.get(self._fkey(fid, "current")))
        if kv is None:
            return None, 0
        return self._open(fid, kv.value), kv.mod_revision

    def reconcile(self, members: Sequence[ProfileKey], best: Credentials,
                  superseded: Callable[[Credentials], bool] | None = None) -> Reconciled:
        """Agree with the fleet on the family whose stores hold ``best`` (see rule 1).

        ``superseded`` says whether this host's lineage knows a token as already rotated
        away: a record holding such a token (etcd restored from a backup, or re-created by a
        lagging host after it lost its data) is replaced by ours instead of adopted, since
        its token is dead at the server.
        """
        for _ in range(3):
            found = self._reconcile_once(members, best, superseded)
            if found is not None:
                return found
        raise FleetUnavailable("fleet: the family's record kept moving; retrying later")

    def _reconcile_once(self, members: Sequence[ProfileKey], best: Credentials,
                        superseded: Callable[[Credentials], bool] | None,
                        ) -> Reconciled | None:
        tid = self.keys.token_id(best.refresh)
        index, _ = self._guard(lambda: self.client.get(self._index(tid)))
        fid = index.value.decode("ascii", "replace") if index is not None else None
        if fid is None:
            fid = self.fid_for(members)
        if fid is None or not fid.isalnum() or len(fid) > 64:
            return self._create(tid, members, best)
        record, revision = self.read(fid)
        if record is None:
            return self._create(fid, members, best, index_id=tid)
        known = self._known.get(fid)
        if record.creds.refresh == best.refresh:
            self._remember(fid, members, revision, record)
            return Reconciled(fid, "in_sync")
        ours_is_new = index is None
        if ours_is_new and (record.needs_login
                            or (known is not None and known.synced_rev == revision)):
            return self._publish(fid, members, best, record, revision)
        if superseded is not None and superseded(record.creds):
            log.warning("the fleet's record holds a token this host saw rotated away; "
                        "publishing this host's newer one")
            return self._publish(fid, members, best, record, revision)
        self._remember(fid, members, revision, record)
        return Reconciled(fid, "adopt", adopt=record.creds)

    def _create(self, fid: str, members: Sequence[ProfileKey], best: Credentials, *,
                index_id: str | None = None) -> Reconciled | None:
        record = Record(best, 1, self.config.host_id, time.time())
        current = self._fkey(fid, "current")
        tid = index_id or fid
        done = self._guard(lambda: self.client.txn(
            [Compare(current, "CREATE", 0)],
            [Put(current, self._seal(fid, record)), Put(self._index(tid), fid.encode())]))
        if not done.succeeded:
            return None  # another host created it meanwhile: read it again
        self._remember(fid, members, done.revision, record)
        log.info("fleet family created")
        return Reconciled(fid, "created")

    def _publish(self, fid: str, members: Sequence[ProfileKey], best: Credentials,
                 record: Record, revision: int) -> Reconciled | None:
        new = Record(best, record.generation + 1, self.config.host_id, time.time())
        current = self._fkey(fid, "current")
        tid = self.keys.token_id(best.refresh)
        done = self._guard(lambda: self.client.txn(
            [Compare(current, "MOD", revision)],
            [Put(current, self._seal(fid, new)), Put(self._index(tid), fid.encode())]))
        if not done.succeeded:
            return None
        self._remember(fid, members, done.revision, new)
        return Reconciled(fid, "published")

    # -- 2. spend ---------------------------------------------------------------------------
    def begin_spend(self, fid: str) -> Ticket:
        """Take the family's lock and announce the spend, in one transaction, only if nobody
        holds it, no spend is in flight and ``current`` is at the revision we agreed on."""
        known = self._known.get(fid)
        if known is None:
            raise FleetMoved("fleet: family not reconciled yet")
        record, revision = self.read(fid)
        if record is None or revision != known.synced_rev:
            raise FleetMoved("fleet: the family's record moved since it was read")
        lock, inflight = self._fkey(fid, "lock"), self._fkey(fid, "inflight")
        host = self.config.host_id.encode()
        lock_lease = self._guard(lambda: self.client.grant(self.config.lease_ttl))
        try:
            inflight_lease = self._guard(
                lambda: self.client.grant(self.config.inflight_grace))
        except FleetUnavailable:
            self._revoke(lock_lease)
            raise
        try:
            done = self._guard(lambda: self.client.txn(
                [Compare(lock, "CREATE", 0), Compare(inflight, "CREATE", 0),
                 Compare(self._fkey(fid, "current"), "MOD", revision)],
                [Put(lock, host, lock_lease), Put(inflight, host, inflight_lease)],
                [Get(lock), Get(inflight)]))
        except FleetUnavailable:
            # Ambiguous: the leases expire on their own if the txn did land.
            self._revoke(lock_lease)
            self._revoke(inflight_lease)
            raise
        if not done.succeeded:
            self._revoke(lock_lease)
            self._revoke(inflight_lease)
            holders = [kvs[0].value.decode("utf-8", "replace")[:100]
                       for kvs in done.ranges if kvs]
            if holders:
                raise FleetBusy(fid, holders[0], "holds this family's lock or has a spend "
                                "in flight")
            raise FleetMoved("fleet: the family's record moved since it was read")
        ticket = Ticket(fid, revision, record, lock_lease, inflight_lease)
        ticket.thread = threading.Thread(target=self._keep_alive, args=(ticket,),
                                         name=f"fleet-keepalive-{fid[:8]}", daemon=True)
        ticket.thread.start()
        with self._lock:
            self._holding.add(fid)
        return ticket

    def _keep_alive(self, ticket: Ticket) -> None:
        every = max(0.2, self.config.lease_ttl / 3)
        while not ticket.stop.wait(every):
            try:
                ttl = self.client.keepalive(ticket.lock_lease)
            except FleetError:
                continue
            if ttl <= 0:
                ticket.lost.set()  # commit still lands on the revision; noted in logs
                return

    def _revoke(self, lease: int) -> None:
        with contextlib.suppress(FleetError):
            self.client.revoke(lease)

    def release(self, ticket: Ticket) -> None:
        """Give the lock and the in-flight marker back (only our own keys: we revoke our
        leases; a key another host created after ours expired is left alone)."""
        ticket.stop.set()
        if ticket.thread is not None:
            ticket.thread.join(timeout=self.config.timeout * 2)
        self._revoke(ticket.lock_lease)
        self._revoke(ticket.inflight_lease)
        with self._lock:
            self._holding.discard(ticket.fid)

    # -- 3. commit --------------------------------------------------------------------------
    def commit(self, ticket: Ticket, members: Sequence[ProfileKey], new: Credentials) -> str:
        """CAS the new tokens into the fleet, before any local store sees them.

        Never raises: the caller holds the only copy of a live token and must journal it next.
        Returns "published", "conflict" (someone else moved the record: the next reconcile
        adopts theirs) or "pending" (etcd did not answer: the next reconcile publishes ours).
        """
        try:
            return self._commit(ticket, members, new)
        except Exception as exc:
            log.warning("fleet publish failed: %s", type(exc).__name__)
            return "pending"
        finally:
            self.release(ticket)

    def _commit(self, ticket: Ticket, members: Sequence[ProfileKey], new: Credentials) -> str:
        if ticket.lost.is_set():
            log.warning("this host's fleet lock expired while it was spending (paused?); its "
                        "answer is published by revision, as nobody else could spend meanwhile")
        record = Record(new, ticket.record.generation + 1, self.config.host_id, time.time())
        current = self._fkey(ticket.fid, "current")
        tid = self.keys.token_id(new.refresh)
        sealed = self._seal(ticket.fid, record)
        for attempt in range(2):
            try:
                done = self._guard(lambda: self.client.txn(
                    [Compare(current, "MOD", ticket.revision)],
                    [Put(current, sealed), Put(self._index(tid), ticket.fid.encode())]))
            except FleetUnavailable:
                if attempt == 0:
                    continue
                return "pending"
            if done.succeeded:
                self._remember(ticket.fid, members, done.revision, record)
                return "published"
            # Perhaps our own first attempt landed without an answer: look.
            now, revision = self.read(ticket.fid)
            if now is not None and now.creds.refresh == new.refresh:
                self._remember(ticket.fid, members, revision, now)
                return "published"
            log.error("fleet record moved while this host was spending; the fleet's wins")
            return "conflict"
        return "pending"

    def after_rejection(self, ticket: Ticket) -> Credentials | None:
        """The server refused the token we spent under the lock. If another host spent it
        (we were paused past our lease, or its answer is still on its way), the fleet's record
        moves: wait up to ``adopt_wait`` for that and return the newer credentials. None: the
        fleet has nothing newer, the rejection stands (the record is marked ``needs_login``,
        so a login on any host becomes the family's token)."""
        self.release(ticket)
        deadline = time.monotonic() + self.config.adopt_wait
        while True:
            try:
                record, revision = self.read(ticket.fid)
            except (FleetUnavailable, FleetRecordUnreadable):
                record, revision = None, ticket.revision
            if record is not None and revision != ticket.revision and \
                    record.creds.refresh != ticket.record.creds.refresh:
                return record.creds
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        marked = Record(ticket.record.creds, ticket.record.generation, self.config.host_id,
                        time.time(), needs_login=True)
        with contextlib.suppress(FleetError):
            current = self._fkey(ticket.fid, "current")
            done = self.client.txn([Compare(current, "MOD", ticket.revision)],
                                   [Put(current, self._seal(ticket.fid, marked))])
            if done.succeeded:
                with self._lock:
                    k = self._known.get(ticket.fid)
                    if k is not None:
                        k.synced_rev, k.needs_login = done.revision, True
        return None

    # -- followers ----------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._watch_loop, "fleet-watch"),
                             (self._probe_loop, "fleet-probe")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads[1:]:  # the prober first: it never waits long
            thread.join(timeout=self.config.timeout * len(self.config.urls) + 1)
        self.client.close()  # ends the watch stream's read, then the watcher returns
        for thread in self._threads[:1]:
            thread.join(timeout=self.config.timeout + 1)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.config.probe_interval):
            try:
                self.probe()
            except Exception:  # a closed client at shutdown; never kill the prober
                if self._stop.is_set():
                    return
                log.exception("fleet probe failed")

    def _watch_loop(self) -> None:
        prefix = self.ns + b"f/"
        start = 0
        while not self._stop.is_set():
            try:
                if start == 0:
                    _, revision = self._guard(lambda: self.client.get(self.ns + b"health"))
                    start = revision + 1
                for revision, events in self.client.watch(
                        prefix, prefix_end(prefix), start, idle=self.config.watch_idle,
                        stop=self._stop):
                    start = max(start, revision + 1)
                    for event in events:
                        self._seen(event.kind, event.kv.key, event.kv.value,
                                   event.kv.mod_revision)
            except WatchCompacted:
                start = 0
                self._changed_all()
            except FleetUnavailable as exc:
                if self._stop.is_set():
                    return
                self._failed(exc)
                self._stop.wait(min(1.0, self.config.probe_interval))
            except Exception:  # the watch must outlive any one bad message
                if self._stop.is_set():
                    return  # stopping: the client was closed under the stream
                log.exception("fleet watch failed; re-opening")
                self._stop.wait(1.0)

    def _seen(self, kind: str, key: bytes, value: bytes, revision: int) -> None:
        head = self.ns + b"f/"
        if kind != "PUT" or not key.startswith(head) or not key.endswith(b"/current"):
            return
        fid = key[len(head):-len(b"/current")].decode("ascii", "replace")
        with self._lock:
            known = self._known.get(fid)
            if known is None or revision <= known.synced_rev:
                return
            members = known.members
        try:
            record = self._open(fid, value)
        except FleetRecordUnreadable:
            log.error("fleet record failed authentication; ignored")
            return
        if self.keys.token_id(record.creds.refresh) == known.refresh_id:
            with self._lock:
                known.needs_login = record.needs_login
            return
        with self._lock:
            known.last_host = record.host
        if self.on_change is not None:
            self.on_change(fid, members)

    def _changed_all(self) -> None:
        with self._lock:
            items = [(fid, k.members) for fid, k in self._known.items()]
        if self.on_change is not None:
            for fid, members in items:
                self.on_change(fid, members)
