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

Here the decisions; the write half (lineage, journal, then the stores, under the shutdown
gate) is ``engine_commit.Writer``, the fleet's questions are ``engine_fleet.FleetSeam``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .engine_commit import WriteGate, Writer, as_write_error
from .engine_fleet import FleetSeam
from .errors import (
    LockTimeout,
    QwenRefresherError,
    RefreshTokenRejected,
    RotatedUnusableAccess,
    StoreError,
    StoreMalformed,
    StoreUnreadable,
    TransientOAuthError,
    UnusableAnswer,
)
from .fleet.errors import FleetNeedsLogin
from .history import TokenHistory
from .journal import Journal
from .lockfile import FileLock
from .models import Credentials, ProfileKey, fingerprint
from .protocols import StopSignal
from .qwen import QwenOAuthClient
from .stores.base import Store, StoreSnapshot

if TYPE_CHECKING:
    from .fleet.coordinator import Fleet

#: Names other modules import from here (the write half and the fleet seam moved out).
__all__ = ["Engine", "Member", "Outcome", "Result", "WriteGate", "as_write_error",
           "current_token", "in_lock_order", "lock_order_key"]

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
        self.salt = salt
        self.history = history
        self.journal = journal
        self.lock_timeout = lock_timeout
        self.stop = stop
        self.clock = clock
        #: The write half (``engine_commit``): lineage, journal, then the stores.
        self.writer = Writer(history=history, journal=journal, fp=self.fp,
                             clock=lambda: self.clock())
        #: Entered while stores are being written (``WriteGate``): shutdown waits for every
        #: writer to leave it, so SIGTERM never interrupts a write between journal and store.
        self.writing = self.writer.writing
        #: What a run asks etcd (``engine_fleet``); None without a fleet.
        self.seam: FleetSeam | None = None
        if fleet is not None:
            self.seam = FleetSeam(fleet, history=history, fp=self.fp,
                                  clock=lambda: self.clock(), writer=self.writer,
                                  read=self._read)
            self.writer.fleet_commit = self.seam.commit
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
            planned_fp: str | None = None,
            before_send: Callable[[], object] | None = None) -> Outcome:
        """One refresh of one family under every member's lock.

        ``planned_fp`` is the fingerprint of the token ``due_at`` was computed for. If the
        re-read under the locks finds another token (another daemon, OpenClaw or Qwen Code
        rotated meanwhile), ``due_at`` says nothing about it: nothing is sent, the outcome is
        ``not_due`` and the caller re-plans from what the stores now hold. We never spend a
        token we did not plan to spend.

        ``before_send`` is called right before each request leaves (the daemon's
        ``RateLimiter.pace``: the sends themselves kept ``1 / rate`` apart).
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
            outcome = self._locked(members, due_at, planned_fp, before_send)
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

    def _locked(self, members: Sequence[Member], due_at: float,
                planned_fp: str | None = None,
                before_send: Callable[[], object] | None = None) -> Outcome:
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
                write_error = self.writer.write(snapshots, lagging, best, outcome)
            outcome.reapplied = [m.key for m in lagging
                                 if self.history.is_superseded(self.fp(current[m]))]
            outcome.result = "synced"
            if write_error is not None:
                outcome.fail(write_error)
                return outcome

        if self.seam is not None:
            agreed = self.seam.reconcile(members, snapshots, current, best, best_fp,
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
        return self._refresh(members, snapshots, best, best_fp, outcome, before_send)

    def _refresh(
        self,
        members: Sequence[Member],
        snapshots: dict[Store, StoreSnapshot],
        best: Credentials,
        best_fp: str,
        outcome: Outcome,
        before_send: Callable[[], object] | None = None,
    ) -> Outcome:
        if self.seam is not None:
            try:
                begun = self.seam.begin(outcome)
            except FleetNeedsLogin as exc:
                return self._rejected(members, best_fp, exc, outcome)  # a login first?
            if not begun:
                return outcome
        try:
            return self._spend_once(members, snapshots, best, best_fp, outcome, before_send)
        finally:
            if self.seam is not None:
                self.seam.release()

    def _spend_once(
        self,
        members: Sequence[Member],
        snapshots: dict[Store, StoreSnapshot],
        best: Credentials,
        best_fp: str,
        outcome: Outcome,
        before_send: Callable[[], object] | None = None,
    ) -> Outcome:
        if before_send is not None:
            before_send()  # a stop meanwhile: the client sends nothing (NotSent)
        try:
            grant = self.client.refresh(best.refresh, stop=self.stop)
        except RotatedUnusableAccess as exc:
            return self._rotated_unusable(members, snapshots, best, best_fp, exc, outcome,
                                          before_send)
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
            adopted = (self.seam.rejected(members, snapshots, best_fp, outcome)
                       if self.seam is not None else None)
            if adopted is not None:
                return adopted
            return self._rejected(members, best_fp, exc, outcome)
        # From here to the journal nothing may raise: the old token is spent and ``grant`` is
        # the only copy of the new one. ``client.refresh`` has held every value to the store
        # rules already (tokens valid, expiry clamped), so the arithmetic below cannot fail.
        new = grant.to_credentials(int(self.clock() * 1000), best.refresh)
        self.writer.commit(members, snapshots, best_fp, new, outcome)
        return outcome

    def _rotated_unusable(
        self,
        members: Sequence[Member],
        snapshots: dict[Store, StoreSnapshot],
        best: Credentials,
        best_fp: str,
        exc: RotatedUnusableAccess,
        outcome: Outcome,
        before_send: Callable[[], object] | None = None,
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
            interim_fp = self.writer.keep(best_fp, interim, members, outcome)
        outcome.consumed = best_fp
        first = f"server rotated but its answer was unusable ({exc.reason})"
        if before_send is not None:
            before_send()
        try:
            grant = self.client.refresh(interim.refresh, stop=self.stop)
        except RefreshTokenRejected as again:
            return self._rejected(members, interim_fp, again, outcome)
        except TransientOAuthError as again:
            # Includes a second unusable answer: keep what is live, retry after a back-off.
            self.writer.commit(members, snapshots, best_fp, interim, outcome)
            if outcome.result == "rotated":
                outcome.fail(again, f"{first}; its new refresh token is kept, and getting a "
                                    f"usable access token with it failed: {again.reason}")
                outcome.retry_after = again.retry_after
            return outcome
        new = grant.to_credentials(int(self.clock() * 1000), interim.refresh)
        self.writer.commit(members, snapshots, interim_fp, new, outcome)
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
                self.writer.write(snapshots, lagging, creds, outcome)
            outcome.result, outcome.creds, outcome.fp = "synced", creds, fp
            return outcome
        self.history.reject(best_fp, exc.reason)
        outcome.fail(exc, exc.reason)
        return outcome

    # -- the fleet seam (fleet/coordinator.py has the protocol) -----------------------------


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
