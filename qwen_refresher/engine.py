"""One refresh of one token family: lock, re-read, decide, call, journal, write, release.

A *family* is every profile, in any store, that holds the same refresh-token lineage. The
engine takes every member store's lock in one global order (sorted lock paths, so two of our
workers or two processes can never deadlock), re-reads under the locks, and then:

1. finds the newest credentials of the lineage (a member, or our memory of what we rotated);
2. writes them to members that lag behind (another program rotated one member, or a gateway
   wrote a consumed token back: a revert);
3. if the newest token is due, refreshes it once, journals the answer before touching any
   store, and writes it to every member.

Locks are held only for this sequence, never across a back-off wait: retries are the daemon's
business, expressed as the job's next run time.

In a fleet (``fleet/``, docs/fleet.md) the same sequence asks etcd first: after the re-read the
family is reconciled with the fleet's record (a newer generation there is written to the
members instead of refreshing), the spend needs the fleet's lock, and the answer is
compare-and-swapped into etcd before the journal and the stores. Without etcd nothing is spent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import (
    LockTimeout,
    QwenRefresherError,
    RefreshTokenRejected,
    RotatedUnusableAccess,
    StoreError,
    StoreMalformed,
    StoreUnreadable,
    StoreWriteError,
    TransientOAuthError,
    UnusableAnswer,
)
from .fleet.errors import FleetBusy, FleetError, FleetMoved, FleetUnavailable
from .history import TokenHistory
from .journal import Journal
from .lockfile import FileLock
from .models import Credentials, ProfileKey, fingerprint
from .protocols import StopSignal
from .qwen import QwenOAuthClient
from .stores.base import Store, StoreSnapshot

if TYPE_CHECKING:
    from .fleet.coordinator import Fleet, Ticket

#: How one run ended. ``adopted`` is the daemon's, not the engine's: instead of refreshing (or
#: after a rejection) the family took a token seen replacing its own in a sibling's store.
Result = Literal["rotated", "synced", "not_due", "adopted",
                 # a failure's: ``errors.FailedResult``, the ``result`` of its kind
                 "transient", "rejected", "unavailable", "lock_timeout", "write_failed"]


@dataclass(frozen=True)
class Member:
    store: Store
    profile: str

    @property
    def key(self) -> ProfileKey:
        return ProfileKey(self.store.path, self.profile)


@dataclass
class Outcome:
    """How one run of one family ended, as data the daemon applies.

    ``failure`` is the typed kind of a failed run (an ``errors.QwenRefresherError`` whose
    ``result`` equals ``result``): the daemon takes the metric label, the exit code and any
    decision from its type, never from ``reason``, which is for people. None when the run did
    not fail (rotated, synced, not_due, adopted).
    """

    result: Result
    creds: Credentials | None = None
    fp: str | None = None
    reason: str | None = None
    retry_after: float | None = None
    written: list[ProfileKey] = field(default_factory=list)
    reapplied: list[ProfileKey] = field(default_factory=list)
    errors: dict[ProfileKey, str] = field(default_factory=dict)
    consumed: str | None = None
    journal_error: str | None = None
    duration: float = 0.0
    failure: QwenRefresherError | None = None

    @classmethod
    def failed(cls, failure: QwenRefresherError,
               errors: dict[ProfileKey, str] | None = None) -> Outcome:
        """An outcome whose result and reason come from ``failure``'s kind and message."""
        outcome = cls("not_due", errors=dict(errors or {}))
        outcome.fail(failure)
        return outcome

    def fail(self, failure: QwenRefresherError, reason: str | None = None) -> None:
        """Mark this outcome failed with ``failure``: its kind decides ``result``."""
        if failure.result is None:
            raise TypeError(f"{type(failure).__name__} is not a kind a refresh can end in")
        self.result = failure.result
        self.failure = failure
        self.reason = str(failure) if reason is None else reason


class WriteGate:
    """A shutdown barrier around store writes: any number of writers at once, and
    ``acquire(timeout=)`` (shutdown's) waits until none is writing and keeps new ones out
    until ``release()``.

    A plain lock did the same for shutdown but also made every refresh wait for every other
    refresh's journal and store fsyncs (measured: 40 % of a 2,000-family storm's worker time
    was spent queueing on it). What a write needs excluded is excluded elsewhere: the
    family's store locks (per-path mutex + lock file), ``Journal``'s and ``TokenHistory``'s
    own locks. A writer waiting at a closed gate waits only as long as shutdown holds it
    (``acquire`` then ``release``, at once).
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._writers = 0
        self._closed = False

    def __enter__(self) -> WriteGate:
        with self._cv:
            while self._closed:
                self._cv.wait()
            self._writers += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._writers -= 1
            if self._writers == 0:
                self._cv.notify_all()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Close the gate and wait until no writer is inside; False (gate open again) when
        ``timeout`` seconds pass first, or at once when not ``blocking`` and one is inside."""
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._cv:
            while self._closed:  # one closer at a time
                left = None if deadline is None else deadline - time.monotonic()
                if not blocking or (left is not None and left <= 0):
                    return False
                self._cv.wait(left)
            self._closed = True
            while self._writers:
                left = None if deadline is None else deadline - time.monotonic()
                if not blocking or (left is not None and left <= 0):
                    self._closed = False
                    self._cv.notify_all()
                    return False
                self._cv.wait(left)
            return True

    def release(self) -> None:
        """Open the gate again (after ``acquire`` returned True)."""
        with self._cv:
            self._closed = False
            self._cv.notify_all()

    @property
    def writers(self) -> int:
        """How many writers are inside right now (for tests and diagnostics)."""
        with self._cv:
            return self._writers


class Engine:
    def __init__(
        self,
        *,
        client: QwenOAuthClient,
        salt: bytes,
        history: TokenHistory,
        journal: Journal,
        lock_timeout: float,
        stop: StopSignal | None = None,
        clock: Callable[[], float] = time.time,
        fleet: Fleet | None = None,
    ) -> None:
        self.client = client
        #: etcd coordination of this host's families with other hosts (None: single host).
        self.fleet = fleet
        #: The fleet's family id and spend ticket of the run on this thread (fleet only).
        self._spend = threading.local()
        self.salt = salt
        self.history = history
        self.journal = journal
        self.lock_timeout = lock_timeout
        self.stop = stop
        self.clock = clock
        #: Entered while stores are being written: shutdown waits for every writer to leave
        #: it, so SIGTERM never interrupts a write between journal and store. Writers of
        #: different families do not exclude each other (their store locks, the journal's and
        #: the lineage's own locks do): a storm's fsyncs overlap instead of queueing.
        self.writing = WriteGate()
        #: Every store lock held right now, so a shutdown that cannot wait any longer for a
        #: stuck refresh still leaves no lock file behind.
        self.held: set[FileLock] = set()

    def release_all(self) -> None:
        """Last resort at shutdown: drop every lock we still hold."""
        for lock in list(self.held):
            lock.release()
            self.held.discard(lock)

    def fp(self, creds: Credentials) -> str:
        return fingerprint(creds.refresh, self.salt)

    # -- the whole sequence -----------------------------------------------------------------
    def run(self, members: Sequence[Member], *, due_at: float,
            planned_fp: str | None = None) -> Outcome:
        """One refresh of one family under every member's lock.

        ``planned_fp`` is the fingerprint of the token ``due_at`` was computed for. If the
        re-read under the locks finds another token (another daemon, OpenClaw or Qwen Code
        rotated meanwhile), ``due_at`` says nothing about it: nothing is sent, the outcome is
        ``not_due`` and the caller re-plans from what the stores now hold. We never spend a
        token we did not plan to spend.
        """
        started = time.monotonic()
        held: list[FileLock] = []
        try:
            for store in in_lock_order(m.store for m in members):
                try:
                    lock = store.lock(timeout=self.lock_timeout, stop=self.stop)
                except StoreError as exc:
                    return Outcome.failed(exc)
                try:
                    lock.acquire()
                except (LockTimeout, StoreError) as exc:  # StoreError: LockUnusable
                    return Outcome.failed(exc)
                except OSError as exc:
                    return Outcome.failed(StoreUnreadable(
                        lock.lock_path, f"cannot create lock file: {exc.strerror}"))
                held.append(lock)
                self.held.add(lock)
            outcome = self._locked(members, due_at, planned_fp)
        finally:
            for lock in reversed(held):
                lock.release()
                self.held.discard(lock)
        outcome.duration = time.monotonic() - started
        return outcome

    # -- under the locks ----------------------------------------------------------------------
    def _read(self, members: Sequence[Member]) -> tuple[
        dict[Store, StoreSnapshot], dict[Member, Credentials], dict[ProfileKey, StoreError]
    ]:
        snapshots: dict[Store, StoreSnapshot] = {}
        current: dict[Member, Credentials] = {}
        errors: dict[ProfileKey, StoreError] = {}
        for member in members:
            if member.store not in snapshots:
                try:
                    snapshots[member.store] = member.store.read_settled()
                except StoreError as exc:
                    errors[member.key] = exc
                    continue
            record = snapshots[member.store].records.get(member.profile)
            if record is None:
                errors[member.key] = StoreUnreadable(member.store.path,
                                                     f"profile {member.profile} is gone")
            elif record.creds is None:
                errors[member.key] = StoreMalformed(member.store.path,
                                                    f"{member.profile}: {record.problem}")
            else:
                current[member] = record.creds
        return snapshots, current, errors

    def _newest(self, current: dict[Member, Credentials]) -> tuple[Credentials, str] | None:
        """The newest credentials of the lineage, from the stores or from our memory."""
        picked = current_token(self.history, [(self.fp(c), c) for c in current.values()])
        if picked is None:
            return None
        fp, creds = picked
        return creds, fp

    def _write(
        self,
        snapshots: dict[Store, StoreSnapshot],
        targets: Sequence[Member],
        creds: Credentials,
        outcome: Outcome,
    ) -> StoreWriteError | None:
        """Write ``creds`` to ``targets``; the first failure, as a write failure, or None."""
        first: StoreWriteError | None = None
        by_store: dict[Store, list[Member]] = {}
        for member in targets:
            by_store.setdefault(member.store, []).append(member)
        for store, group in by_store.items():
            snapshot = snapshots.get(store)
            if snapshot is None:
                continue
            try:
                store.write(snapshot, {m.profile: creds for m in group})
            except StoreError as exc:
                for m in group:
                    outcome.errors[m.key] = str(exc)
                first = first or _as_write_error(exc)
            else:
                outcome.written.extend(m.key for m in group)
        return first

    def _locked(self, members: Sequence[Member], due_at: float,
                planned_fp: str | None = None) -> Outcome:
        snapshots, current, read_errors = self._read(members)
        errors = {key: str(exc) for key, exc in read_errors.items()}
        if not current:
            return Outcome.failed(next(iter(read_errors.values()), None)
                                  or StoreUnreadable("-", "no readable member"), errors)
        newest = self._newest(current)
        assert newest is not None
        best, best_fp = newest
        outcome = Outcome("not_due", creds=best, fp=best_fp, errors=errors)

        lagging = [m for m, c in current.items() if self.fp(c) != best_fp]
        if lagging:
            with self.writing:
                write_error = self._write(snapshots, lagging, best, outcome)
            outcome.reapplied = [m.key for m in lagging
                                 if self.history.is_superseded(self.fp(current[m]))]
            outcome.result = "synced"
            if write_error is not None:
                outcome.fail(write_error)
                return outcome

        if self.fleet is not None:
            agreed = self._fleet_reconcile(members, snapshots, current, best, best_fp,
                                           due_at, outcome)
            if agreed is not None:
                return agreed
        if not outcome.errors and self.journal.holds(best_fp):
            # Every member holds the journaled tokens (now, or already before a crash that
            # came between the last write and the settle): they need no journal any more.
            with contextlib.suppress(OSError, StoreError):
                self.journal.settle(best_fp)
        if self.clock() < due_at:
            return outcome
        if planned_fp and best_fp != planned_fp:
            return outcome  # the token changed since planning: re-plan, never spend blindly
        rejection = self.history.rejection(best_fp)
        if rejection is not None:
            outcome.fail(RefreshTokenRejected(rejection[1]))
            return outcome
        return self._refresh(members, snapshots, best, best_fp, outcome)

    def _refresh(
        self,
        members: Sequence[Member],
        snapshots: dict[Store, StoreSnapshot],
        best: Credentials,
        best_fp: str,
        outcome: Outcome,
    ) -> Outcome:
        if self.fleet is not None and not self._fleet_begin(outcome):
            return outcome
        try:
            return self._spend_once(members, snapshots, best, best_fp, outcome)
        finally:
            self._fleet_release()

    def _spend_once(
        self,
        members: Sequence[Member],
        snapshots: dict[Store, StoreSnapshot],
        best: Credentials,
        best_fp: str,
        outcome: Outcome,
    ) -> Outcome:
        try:
            grant = self.client.refresh(best.refresh, stop=self.stop)
        except RotatedUnusableAccess as exc:
            return self._rotated_unusable(members, snapshots, best, best_fp, exc, outcome)
        except UnusableAnswer as exc:
            # A 200 we cannot use and no usable refresh token in it: nothing of it is written
            # or journaled (there is nothing usable to keep). The retry, after a back-off,
            # re-reads the stores under the lock first; if the server did rotate, its
            # rejection of the spent token then decides.
            outcome.fail(exc, f"server answered, unusable response: {exc.reason}")
            outcome.retry_after = None
            return outcome
        except TransientOAuthError as exc:
            outcome.fail(exc)
            outcome.retry_after = exc.retry_after
            return outcome
        except RefreshTokenRejected as exc:
            adopted = self._fleet_rejected(members, snapshots, best_fp, outcome)
            if adopted is not None:
                return adopted
            return self._rejected(members, best_fp, exc, outcome)
        # From here to the journal nothing may raise: the old token is spent and ``grant`` is
        # the only copy of the new one. ``client.refresh`` has held every value to the store
        # rules already (tokens valid, expiry clamped), so the arithmetic below cannot fail.
        new = grant.to_credentials(int(self.clock() * 1000), best.refresh)
        self._commit(members, snapshots, best_fp, new, outcome)
        return outcome

    def _keep(self, old_fp: str, new: Credentials, members: Sequence[Member],
              outcome: Outcome) -> str:
        """Persist a rotation before any store sees it: lineage link, memory, journal.
        From here on the old refresh token is dead and this is the only copy of the new one
        until the stores have it. Returns the new fingerprint."""
        new_fp = self.fp(new)
        self.history.link(old_fp, new_fp)
        self.history.remember(new_fp, new, issued_at=self.clock())
        try:
            self.journal.record(old_fp, new_fp, new, [m.key for m in members])
        except (OSError, StoreError) as exc:
            # Still in memory and about to be written; the daemon says so loudly.
            outcome.journal_error = str(exc)
        return new_fp

    def _commit(self, members: Sequence[Member], snapshots: dict[Store, StoreSnapshot],
                old_fp: str, new: Credentials, outcome: Outcome) -> None:
        """Journal a rotation, write it to every readable member, and say how that went."""
        readable = [m for m in members if m.store in snapshots and m.key not in outcome.errors]
        with self.writing:
            new_fp = self._keep(old_fp, new, members, outcome)
            # A fleet's journal is etcd: the answer goes there before any store sees it, and
            # after our own journal, so a crash between the two is replayed at start and then
            # published (docs/fleet.md). Never raises.
            self._fleet_commit(members, new)
            write_error = self._write(snapshots, readable, new, outcome)
        outcome.creds, outcome.fp = new, new_fp
        outcome.consumed = outcome.consumed or old_fp
        if all(m.key in outcome.written for m in members):
            with contextlib.suppress(OSError, StoreError):
                self.journal.settle(new_fp)
            outcome.result = "rotated"
        else:
            # The reason stays the first error met, a read error included (a member unreadable
            # before the request is not written either); the kind is a write failure.
            reason = next(iter(outcome.errors.values()), "not every member was written")
            unwritten = next((m.store.path for m in members if m.key not in outcome.written),
                             Path("-"))
            outcome.fail(write_error or StoreWriteError(unwritten, "not written: it could not "
                                                                   "be read"), reason)

    def _rotated_unusable(
        self,
        members: Sequence[Member],
        snapshots: dict[Store, StoreSnapshot],
        best: Credentials,
        best_fp: str,
        exc: RotatedUnusableAccess,
        outcome: Outcome,
    ) -> Outcome:
        """The server rotated but its access token fails the store rules.

        The new refresh token is the lineage's only live one: it is journaled at once (with
        the old, still well-formed access token and its expiry, so nothing invalid is ever
        written anywhere) and spent right away for a usable access token. If that second
        refresh fails too, the stores get the interim credentials: they then hold the live
        refresh token, and the retry spends it.
        """
        interim = Credentials(access=best.access, refresh=exc.refresh_token,
                              expires_ms=best.expires_ms, resource_url=best.resource_url,
                              token_type=best.token_type)
        with self.writing:
            interim_fp = self._keep(best_fp, interim, members, outcome)
        outcome.consumed = best_fp
        first = f"server rotated but its answer was unusable ({exc.reason})"
        try:
            grant = self.client.refresh(interim.refresh, stop=self.stop)
        except RefreshTokenRejected as again:
            return self._rejected(members, interim_fp, again, outcome)
        except TransientOAuthError as again:
            # Includes a second unusable answer: keep what is live, retry after a back-off.
            self._commit(members, snapshots, best_fp, interim, outcome)
            if outcome.result == "rotated":
                outcome.fail(again, f"{first}; its new refresh token is kept, and getting a "
                                    f"usable access token with it failed: {again.reason}")
                outcome.retry_after = again.retry_after
            return outcome
        new = grant.to_credentials(int(self.clock() * 1000), interim.refresh)
        self._commit(members, snapshots, interim_fp, new, outcome)
        if outcome.journal_error is None:
            with contextlib.suppress(OSError, StoreError):
                self.journal.settle(interim_fp)  # the journal holds its successor now
        return outcome

    def _rejected(
        self,
        members: Sequence[Member],
        best_fp: str,
        exc: RefreshTokenRejected,
        outcome: Outcome,
    ) -> Outcome:
        """Before declaring a lost login, look again: a writer that ignores the lock (a login
        by ``openclaw models auth login``) may have put a new token in meanwhile."""
        snapshots, current, _ = self._read(members)
        fresh = {self.fp(c): (m, c) for m, c in current.items()
                 if self.fp(c) != best_fp and not self.history.is_superseded(self.fp(c))}
        if fresh:
            fp, (_, creds) = max(fresh.items(), key=lambda item: item[1][1].expires_ms)
            lagging = [m for m, c in current.items() if self.fp(c) != fp]
            with self.writing:
                self._write(snapshots, lagging, creds, outcome)
            outcome.result, outcome.creds, outcome.fp = "synced", creds, fp
            return outcome
        self.history.reject(best_fp, exc.reason)
        outcome.fail(exc, exc.reason)
        return outcome

    # -- the fleet seam (fleet/coordinator.py has the protocol) -----------------------------
    def _fleet_reconcile(self, members: Sequence[Member],
                         snapshots: dict[Store, StoreSnapshot],
                         current: dict[Member, Credentials], best: Credentials, best_fp: str,
                         due_at: float, outcome: Outcome) -> Outcome | None:
        """Agree with the fleet before anything is spent. Returns the finished outcome when
        the run ends here: the fleet holds a newer generation (written to every member, as a
        sync: ``on_rotate`` runs) or the fleet cannot be asked while the family is due."""
        assert self.fleet is not None
        self._spend.fid = None
        try:
            seen = self.fleet.reconcile(
                [m.key for m in members], best,
                superseded=lambda c: self.history.is_superseded(self.fp(c)))
        except FleetError as exc:
            if self.clock() < due_at:
                return outcome  # not due: local reads and syncs go on without the fleet
            outcome.fail(exc if isinstance(exc, FleetUnavailable)
                         else FleetUnavailable(str(exc)))
            return outcome
        if seen.adopt is None:
            self._spend.fid = seen.fid
            return None
        return self._fleet_adopt(members, snapshots, current, best_fp, seen.adopt, outcome)

    def _fleet_adopt(self, members: Sequence[Member], snapshots: dict[Store, StoreSnapshot],
                     current: dict[Member, Credentials], old_fp: str, creds: Credentials,
                     outcome: Outcome) -> Outcome:
        """Write the fleet's newer tokens to every member that lacks them."""
        new_fp = self.fp(creds)
        self.history.link(old_fp, new_fp)
        self.history.remember(new_fp, creds, issued_at=self.clock())
        lagging = [m for m in members if m in current and self.fp(current[m]) != new_fp]
        with self.writing:
            write_error = self._write(snapshots, lagging, creds, outcome)
        outcome.result, outcome.creds, outcome.fp = "synced", creds, new_fp
        outcome.failure, outcome.reason = None, None
        if write_error is not None:
            outcome.fail(write_error)
        return outcome

    def _fleet_begin(self, outcome: Outcome) -> bool:
        """Take the fleet's right to spend; False (outcome set) when we may not."""
        assert self.fleet is not None
        self._spend.ticket = None
        fid = getattr(self._spend, "fid", None)
        if fid is None:
            outcome.fail(FleetUnavailable("fleet: the family was not reconciled"))
            return False
        try:
            self._spend.ticket = self.fleet.begin_spend(fid)
        except (FleetBusy, FleetMoved) as exc:
            # Another host is spending (its answer arrives by the watch) or just did:
            # nothing failed; look again soon.
            outcome.reason, outcome.retry_after = str(exc), 1.0
            return False
        except FleetError as exc:
            outcome.fail(exc if isinstance(exc, FleetUnavailable)
                         else FleetUnavailable(str(exc)))
            return False
        return True

    def _fleet_commit(self, members: Sequence[Member], new: Credentials) -> None:
        ticket: Ticket | None = getattr(self._spend, "ticket", None)
        if self.fleet is None or ticket is None:
            return
        self._spend.ticket = None
        self.fleet.commit(ticket, [m.key for m in members], new)

    def _fleet_release(self) -> None:
        ticket: Ticket | None = getattr(self._spend, "ticket", None)
        if self.fleet is not None and ticket is not None:
            self._spend.ticket = None
            self.fleet.release(ticket)

    def _fleet_rejected(self, members: Sequence[Member],
                        snapshots: dict[Store, StoreSnapshot], best_fp: str,
                        outcome: Outcome) -> Outcome | None:
        """The server refused the fleet's current token: another host may have spent it (we
        were paused past our lease). Adopt the fleet's newer token if one arrives in time."""
        ticket: Ticket | None = getattr(self._spend, "ticket", None)
        if self.fleet is None or ticket is None:
            return None
        self._spend.ticket = None
        newer = self.fleet.after_rejection(ticket)
        if newer is None:
            return None
        snapshots, current, _ = self._read(members)
        return self._fleet_adopt(members, snapshots, current, best_fp, newer, outcome)


def current_token(history: TokenHistory, held: Iterable[tuple[str, Credentials]],
                  ) -> tuple[str, Credentials] | None:
    """The family's current token, as (fingerprint, credentials): the one rule that both the
    daemon's plan and the engine's run use, so that what was planned is what is refreshed.

    ``held`` is what the members' stores hold. Candidates are those tokens and, for each, the
    newest of its lineage if we remember its credentials. A token nobody has superseded wins;
    the latest expiry breaks ties. When every candidate is superseded (the lineage head is in
    no store and not in memory: a restart after a revert), the newest token a store actually
    holds is the one: refreshing it is the only move left, and the server's answer (a
    rotation, or a rejection that means a login) decides, instead of waiting for ever for a
    head nobody can produce.
    """
    candidates: dict[str, Credentials] = {}
    for fp, creds in held:
        candidates[fp] = creds
        head = history.newest(fp)
        remembered = history.credentials(head)
        if remembered is not None:
            candidates[head] = remembered
    live = {fp: c for fp, c in candidates.items() if not history.is_superseded(fp)}
    pool = live or candidates
    if not pool:
        return None
    return max(pool.items(), key=lambda item: item[1].expires_ms)


def lock_order_key(store: Store) -> str:
    """The one global order every writer of ours takes store locks in (the engine for a
    family, ``login`` for its targets): sorted by lock path, so two workers or two processes
    can never wait on each other in a cycle. A store whose lock path cannot be worked out
    sorts by its own path (taking its lock then fails, and says why)."""
    try:
        return str(store.lock_path())
    except StoreError:
        return str(store.path)


def in_lock_order(stores: Iterable[Store]) -> list[Store]:
    """``stores`` in ``lock_order_key`` order, one per lock file: two Store objects for one
    file (two spellings of it) share a lock path, and taking it twice would wait on ourselves
    until the timeout."""
    by_lock: dict[str, Store] = {}
    for store in stores:
        by_lock.setdefault(lock_order_key(store), store)
    return [by_lock[key] for key in sorted(by_lock)]


def _as_write_error(exc: StoreError) -> StoreWriteError:
    """A store error met while writing is a write failure, whatever its own kind."""
    if isinstance(exc, StoreWriteError):
        return exc
    error = StoreWriteError(exc.path, exc.problem)
    error.__cause__ = exc
    return error
