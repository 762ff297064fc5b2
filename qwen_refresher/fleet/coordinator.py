"""The fleet protocol: one spender per token family across hosts, etcd as the fleet's journal.

Keys (``ns`` is ``fleet_namespace``; ids are HMACs under the fleet's id key, never tokens)::

    ns/t/<token id>          -> family id            index: which family a refresh token is of
                                                      (the last ``INDEX_KEEP`` generations)
    ns/m/<HMAC(host, profile)> -> family id          which family this host's profile is of
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
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..models import Credentials, ProfileKey
from .crypto import FleetKeys
from .errors import (
    FleetBusy,
    FleetError,
    FleetMoved,
    FleetNeedsLogin,
    FleetRecordUnreadable,
    FleetUnavailable,
)
from .etcd import Compare, Delete, EtcdClient, Get, Put
from .follower import Follower
from .known import KnownFamilies, MemberKeys
from .records import FleetConfig, Known, Reconciled, Record, Ticket

__all__ = ["Fleet", "FleetConfig", "Known", "Reconciled", "Record", "Ticket"]

log = logging.getLogger("qwen_refresher.fleet")


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
        #: What this host agreed with the fleet, per family (and ``fleet.json``).
        self.known = KnownFamilies(config.state_file, self.keys.token_id)
        #: When the fleet stopped answering (None: it answers). Set by every failing call.
        self.unavailable_since: float | None = None
        self.last_problem: str | None = None
        self._follower = Follower(self)
        #: This host's profiles -> family ids, in etcd (found without ``fleet.json``).
        self.member_keys = MemberKeys(self)
        #: Called with (fid, member keys) when another host moved a family this host holds.
        self.on_change: Callable[[str, frozenset[ProfileKey]], None] | None = None
        self.on_health: Callable[[], None] | None = None

    # -- keys ---------------------------------------------------------------------------------
    def _index(self, token_id: str) -> bytes:
        return self.ns + b"t/" + token_id.encode()

    def _fkey(self, fid: str, leaf: str) -> bytes:
        return self.ns + b"f/" + fid.encode() + b"/" + leaf.encode()

    def _forget(self, token_ids: Sequence[str]) -> list[Delete]:
        """Deletes of index keys a new generation pushed out (``records.INDEX_KEEP``)."""
        return [Delete(self._index(i)) for i in token_ids]

    def _seal(self, fid: str, record: Record) -> bytes:
        return self.keys.seal(self._fkey(fid, "current"), record.to_bytes())

    def open_record(self, fid: str, sealed: bytes) -> Record:
        return Record.from_bytes(self.keys.open(self._fkey(fid, "current"), sealed))

    # -- health -----------------------------------------------------------------------------
    def _ok(self) -> None:
        changed = self.unavailable_since is not None
        self.unavailable_since, self.last_problem = None, None
        if changed:
            log.warning("fleet available again")
            if self.on_health:
                self.on_health()

    def failed(self, exc: FleetUnavailable) -> None:
        """A call found no quorum: note when it began (and tell ``on_health`` once)."""
        changed = self.unavailable_since is None
        if changed:
            self.unavailable_since = time.time()
        self.last_problem = str(exc)
        if changed and self.on_health:
            self.on_health()

    def guard(self, func: Callable[[], Any]) -> Any:
        """``func()``, with the fleet's availability updated from how it went."""
        try:
            result = func()
        except FleetUnavailable as exc:
            self.failed(exc)
            raise
        self._ok()
        return result

    @property
    def available(self) -> bool:
        return self.unavailable_since is None

    def probe(self) -> bool:
        """One linearizable read: True when a quorum answered."""
        try:
            self.guard(lambda: self.client.get(self.ns + b"health"))
        except FleetUnavailable:
            return False
        return True

    def family_status(self) -> dict[str, dict[str, Any]]:
        """Per family id: role and generation, for status."""
        return self.known.status(self.config.host_id)

    def fid_for(self, members: Sequence[ProfileKey]) -> str | None:
        return self.known.fid_for(members)

    # -- 1. reconcile -----------------------------------------------------------------------
    def read(self, fid: str) -> tuple[Record | None, int]:
        """The family's record and its mod revision (0: none)."""
        kv, _ = self.guard(lambda: self.client.get(self._fkey(fid, "current")))
        if kv is None:
            return None, 0
        return self.open_record(fid, kv.value), kv.mod_revision

    def reconcile(self, members: Sequence[ProfileKey], best: Credentials,
                  superseded: Callable[[Credentials], bool] | None = None) -> Reconciled:
        """Agree with the fleet on the family whose stores hold ``best`` (see rule 1).

        ``superseded`` says whether this host's lineage knows a token as already rotated
        away: a record holding such a token (etcd restored from a backup, or re-created by a
        lagging host after it lost its data) is replaced by ours instead of adopted, since
        its token is dead at the server.
        """
        with self.client.deadline(self.config.step_budget):
            for _ in range(3):
                found = self._reconcile_once(members, best, superseded)
                if found is not None:
                    return found
        raise FleetUnavailable("fleet: the family's record kept moving; retrying later")

    def _reconcile_once(self, members: Sequence[ProfileKey], best: Credentials,
                        superseded: Callable[[Credentials], bool] | None,
                        ) -> Reconciled | None:
        tid = self.keys.token_id(best.refresh)
        index, _ = self.guard(lambda: self.client.get(self._index(tid)))
        fid = index.value.decode("ascii", "replace") if index is not None else None
        if fid is None:
            fid = self.fid_for(members) or self.member_keys.find(members)
        if fid is None or not fid.isalnum() or len(fid) > 64:
            return self._create(tid, members, best)
        record, revision = self.read(fid)
        if record is None:
            return self._create(fid, members, best, index_id=tid)
        self.member_keys.note(fid, members)
        known = self.known.get(fid)
        if record.creds.refresh == best.refresh:
            self.known.remember(fid, members, revision, record)
            return Reconciled(fid, "in_sync")
        ours_is_new = index is None
        if ours_is_new and (record.needs_login
                            or (known is not None and known.synced_rev == revision)):
            return self._publish(fid, members, best, record, revision)
        if superseded is not None and superseded(record.creds):
            log.warning("the fleet's record holds a token this host saw rotated away; "
                        "publishing this host's newer one")
            return self._publish(fid, members, best, record, revision)
        self.known.remember(fid, members, revision, record)
        return Reconciled(fid, "adopt", adopt=record.creds)

    def _create(self, fid: str, members: Sequence[ProfileKey], best: Credentials, *,
                index_id: str | None = None) -> Reconciled | None:
        tid = index_id or fid
        record = Record(best, 1, self.config.host_id, time.time(), index_ids=(tid,))
        current = self._fkey(fid, "current")
        done = self.guard(lambda: self.client.txn(
            [Compare(current, "CREATE", 0)],
            [Put(current, self._seal(fid, record)), Put(self._index(tid), fid.encode())]))
        if not done.succeeded:
            return None  # another host created it meanwhile: read it again
        self.known.remember(fid, members, done.revision, record)
        self.member_keys.note(fid, members)
        log.info("fleet family created")
        return Reconciled(fid, "created")

    def _publish(self, fid: str, members: Sequence[ProfileKey], best: Credentials,
                 record: Record, revision: int) -> Reconciled | None:
        tid = self.keys.token_id(best.refresh)
        new, dropped = record.successor(best, self.config.host_id, tid)
        current = self._fkey(fid, "current")
        done = self.guard(lambda: self.client.txn(
            [Compare(current, "MOD", revision)],
            [Put(current, self._seal(fid, new)), Put(self._index(tid), fid.encode()),
             *self._forget(dropped)]))
        if not done.succeeded:
            return None
        self.known.remember(fid, members, done.revision, new)
        return Reconciled(fid, "published")

    # -- 2. spend ---------------------------------------------------------------------------
    def begin_spend(self, fid: str) -> Ticket:
        """Take the family's lock and announce the spend, in one transaction, only if nobody
        holds it, no spend is in flight and ``current`` is at the revision we agreed on."""
        with self.client.deadline(self.config.step_budget):
            return self._begin_spend(fid)

    def _begin_spend(self, fid: str) -> Ticket:
        known = self.known.get(fid)
        if known is None:
            raise FleetMoved("fleet: family not reconciled yet")
        record, revision = self.read(fid)
        if record is None or revision != known.synced_rev:
            raise FleetMoved("fleet: the family's record moved since it was read")
        if record.needs_login:
            raise FleetNeedsLogin(fid)  # its token was refused once: never spend it again
        lock, inflight = self._fkey(fid, "lock"), self._fkey(fid, "inflight")
        host = self.config.host_id.encode()
        lock_lease = self.guard(lambda: self.client.grant(self.config.lease_ttl))
        try:
            inflight_lease = self.guard(
                lambda: self.client.grant(self.config.inflight_grace))
        except FleetUnavailable:
            self._revoke(lock_lease)
            raise
        try:
            done = self.guard(lambda: self.client.txn(
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
        self.known.holding(fid, True)
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
        with self.client.deadline(self.config.release_budget):  # else the leases lapse
            self._revoke(ticket.lock_lease)
            self._revoke(ticket.inflight_lease)
        self.known.holding(ticket.fid, False)

    # -- 3. commit --------------------------------------------------------------------------
    def commit(self, ticket: Ticket, members: Sequence[ProfileKey], new: Credentials) -> str:
        """CAS the new tokens into the fleet, before any local store sees them.

        Never raises: the caller holds the only copy of a live token and must journal it next.
        Returns "published", "conflict" (someone else moved the record: the next reconcile
        adopts theirs) or "pending" (etcd did not answer: the next reconcile publishes ours).
        """
        try:
            with self.client.deadline(self.config.step_budget):
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
        tid = self.keys.token_id(new.refresh)
        record, dropped = ticket.record.successor(new, self.config.host_id, tid)
        current = self._fkey(ticket.fid, "current")
        sealed = self._seal(ticket.fid, record)
        for attempt in range(2):
            try:
                done = self.guard(lambda: self.client.txn(
                    [Compare(current, "MOD", ticket.revision)],
                    [Put(current, sealed), Put(self._index(tid), ticket.fid.encode()),
                     *self._forget(dropped)]))
            except FleetUnavailable:
                if attempt == 0:
                    continue
                return "pending"
            if done.succeeded:
                self.known.remember(ticket.fid, members, done.revision, record)
                return "published"
            # Perhaps our own first attempt landed without an answer: look.
            now, revision = self.read(ticket.fid)
            if now is not None and now.creds.refresh == new.refresh:
                self.known.remember(ticket.fid, members, revision, now)
                return "published"
            log.error("fleet record moved while this host was spending; the fleet's wins")
            return "conflict"
        return "pending"

    def after_rejection(self, ticket: Ticket) -> Credentials | None:
        """The server refused the token we spent under the lock. If another host spent it
        (we were paused past our lease, or its answer is still on its way), the fleet's record
        moves: wait up to ``adopt_wait`` for that and return the newer credentials. None: the
        fleet has nothing newer, the rejection stands (the record is marked ``needs_login``,
        so a login on any host becomes the family's token, and nobody spends it again).

        The lock is held until then: another host must not spend the same dead token while
        we wait (each refusal would be one more rejected request, and tell nothing new)."""
        try:
            return self._after_rejection(ticket)
        finally:
            self.release(ticket)

    def _after_rejection(self, ticket: Ticket) -> Credentials | None:
        deadline = min(time.monotonic() + self.config.adopt_wait,
                       ticket.started + self.config.hold_budget)
        while True:
            try:
                with self.client.deadline(max(0.5, deadline - time.monotonic())):
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
                        time.time(), needs_login=True, index_ids=ticket.record.index_ids)
        with contextlib.suppress(FleetError), self.client.deadline(self.config.release_budget):
            current = self._fkey(ticket.fid, "current")
            done = self.client.txn([Compare(current, "MOD", ticket.revision)],
                                   [Put(current, self._seal(ticket.fid, marked))])
            if done.succeeded:
                self.known.marked_needs_login(ticket.fid, done.revision)
        return None

    # -- followers (``follower.py``) -------------------------------------------------------
    def start(self) -> None:
        """Start the watch and the prober."""
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()
