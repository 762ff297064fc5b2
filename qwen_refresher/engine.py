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
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import (
    LockTimeout,
    RefreshTokenRejected,
    RotatedUnusableAccess,
    StoreError,
    TransientOAuthError,
    UnusableAnswer,
)
from .history import TokenHistory
from .journal import Journal
from .lockfile import FileLock
from .models import Credentials, ProfileKey, fingerprint
from .qwen import QwenOAuthClient
from .stores.base import Store, StoreSnapshot

#: How one run ended. ``adopted`` is the daemon's, not the engine's: instead of refreshing (or
#: after a rejection) the family took a token seen replacing its own in a sibling's store.
Result = Literal[
    "rotated", "synced", "not_due", "transient", "rejected", "write_failed", "lock_timeout",
    "unavailable", "adopted",
]


@dataclass(frozen=True)
class Member:
    store: Store
    profile: str

    @property
    def key(self) -> ProfileKey:
        return ProfileKey(self.store.path, self.profile)


@dataclass
class Outcome:
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


class Engine:
    def __init__(
        self,
        *,
        client: QwenOAuthClient,
        salt: bytes,
        history: TokenHistory,
        journal: Journal,
        lock_timeout: float,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.salt = salt
        self.history = history
        self.journal = journal
        self.lock_timeout = lock_timeout
        self.stop = stop
        self.clock = clock
        #: Held while stores are being written: shutdown waits for it, so SIGTERM never
        #: interrupts a write between journal and store.
        self.writing = threading.Lock()
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
        # One lock file, one acquisition: two Store objects for one file (two spellings of
        # it) share a lock path, and taking it twice would wait on ourselves until timeout.
        by_lock: dict[object, Store] = {}
        for m in members:
            by_lock.setdefault(_lock_path_or_self(m.store), m.store)
        stores = [by_lock[k] for k in sorted(by_lock, key=str)]
        held: list[FileLock] = []
        try:
            for store in stores:
                try:
                    lock = store.lock(timeout=self.lock_timeout, stop=self.stop)
                except StoreError as exc:
                    return Outcome("unavailable", reason=str(exc))
                try:
                    lock.acquire()
                except LockTimeout as exc:
                    return Outcome("lock_timeout", reason=str(exc))
                except StoreError as exc:  # LockUnusable: not a file at the lock path
                    return Outcome("unavailable", reason=str(exc))
                except OSError as exc:
                    return Outcome("unavailable", reason=f"{lock.lock_path}: cannot create lock "
                                                         f"file: {exc.strerror}")
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
        dict[Store, StoreSnapshot], dict[Member, Credentials], dict[ProfileKey, str]
    ]:
        snapshots: dict[Store, StoreSnapshot] = {}
        current: dict[Member, Credentials] = {}
        errors: dict[ProfileKey, str] = {}
        for member in members:
            if member.store not in snapshots:
                try:
                    snapshots[member.store] = member.store.read_settled()
                except StoreError as exc:
                    errors[member.key] = str(exc)
                    continue
            record = snapshots[member.store].records.get(member.profile)
            if record is None:
                errors[member.key] = f"{member.store.path}: profile {member.profile} is gone"
            elif record.creds is None:
                errors[member.key] = f"{member.store.path}: {member.profile}: {record.problem}"
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
    ) -> None:
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
            else:
                outcome.written.extend(m.key for m in group)

    def _locked(self, members: Sequence[Member], due_at: float,
                planned_fp: str | None = None) -> Outcome:
        snapshots, current, errors = self._read(members)
        if not current:
            return Outcome("unavailable", errors=errors,
                           reason=next(iter(errors.values()), "no readable member"))
        newest = self._newest(current)
        assert newest is not None
        best, best_fp = newest
        outcome = Outcome("not_due", creds=best, fp=best_fp, errors=dict(errors))

        lagging = [m for m, c in current.items() if self.fp(c) != best_fp]
        if lagging:
            with self.writing:
                self._write(snapshots, lagging, best, outcome)
            outcome.reapplied = [m.key for m in lagging
                                 if self.history.is_superseded(self.fp(current[m]))]
            outcome.result = "synced"
            failed = [outcome.errors[m.key] for m in lagging if m.key in outcome.errors]
            if failed:
                outcome.result, outcome.reason = "write_failed", failed[0]
                return outcome


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
            outcome.result, outcome.reason = "rejected", rejection[1]
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
        try:
            grant = self.client.refresh(best.refresh, stop=self.stop)
        except RotatedUnusableAccess as exc:
            return self._rotated_unusable(members, snapshots, best, best_fp, exc, outcome)
        except UnusableAnswer as exc:
            # A 200 we cannot use and no usable refresh token in it: nothing of it is written
            # or journaled (there is nothing usable to keep). The retry, after a back-off,
            # re-reads the stores under the lock first; if the server did rotate, its
            # rejection of the spent token then decides.
            outcome.result, outcome.retry_after = "transient", None
            outcome.reason = f"server answered, unusable response: {exc.reason}"
            return outcome
        except TransientOAuthError as exc:
            outcome.result, outcome.reason, outcome.retry_after = (
                "transient", exc.reason, exc.retry_after)
            return outcome
        except RefreshTokenRejected as exc:
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
            self._write(snapshots, readable, new, outcome)
        outcome.creds, outcome.fp = new, new_fp
        outcome.consumed = outcome.consumed or old_fp
        if all(m.key in outcome.written for m in members):
            with contextlib.suppress(OSError, StoreError):
                self.journal.settle(new_fp)
            outcome.result = "rotated"
        else:
            outcome.result = "write_failed"
            outcome.reason = next(iter(outcome.errors.values()), "not every member was written")

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
                outcome.result = "transient"
                outcome.reason = (f"{first}; its new refresh token is kept, and getting a "
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
        outcome.result, outcome.reason = "rejected", exc.reason
        return outcome


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


def _lock_path_or_self(store: Store) -> object:
    try:
        return store.lock_path()
    except StoreError:
        return store.path
