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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import (
    LockTimeout,
    RefreshTokenRejected,
    StoreError,
    TransientOAuthError,
)
from .history import TokenHistory
from .journal import Journal
from .lockfile import FileLock
from .models import Credentials, ProfileKey, fingerprint
from .qwen import QwenOAuthClient
from .stores.base import Store, StoreSnapshot

Result = Literal[
    "rotated", "synced", "not_due", "transient", "rejected", "write_failed", "lock_timeout",
    "unavailable",
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
    def run(self, members: Sequence[Member], *, due_at: float) -> Outcome:
        started = time.monotonic()
        stores = sorted({m.store.path: m.store for m in members}.values(),
                        key=lambda s: str(_lock_path_or_self(s)))
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
                except OSError as exc:
                    return Outcome("unavailable", reason=f"{lock.lock_path}: cannot create lock "
                                                         f"file: {exc.strerror}")
                held.append(lock)
                self.held.add(lock)
            outcome = self._locked(members, due_at)
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
        candidates: dict[str, Credentials] = {}
        for creds in current.values():
            fp = self.fp(creds)
            candidates[fp] = creds
            head = self.history.newest(fp)
            remembered = self.history.credentials(head)
            if remembered is not None:
                candidates[head] = remembered
        live = {fp: c for fp, c in candidates.items() if not self.history.is_superseded(fp)}
        pool = live or candidates
        if not pool:
            return None
        fp, creds = max(pool.items(), key=lambda item: item[1].expires_ms)
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

    def _locked(self, members: Sequence[Member], due_at: float) -> Outcome:
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
            grant = self.client.refresh(best.refresh)
        except TransientOAuthError as exc:
            outcome.result, outcome.reason, outcome.retry_after = (
                "transient", exc.reason, exc.retry_after)
            return outcome
        except RefreshTokenRejected as exc:
            return self._rejected(members, best_fp, exc, outcome)
        received_at = self.clock()
        new = grant.to_credentials(int(received_at * 1000), best.refresh)
        new_fp = self.fp(new)
        readable = [m for m in members if m.store in snapshots and m.key not in outcome.errors]
        with self.writing:
            # Persist first: from here on the old refresh token is dead, and this is the only
            # copy of the new one until the stores have it.
            self.history.link(best_fp, new_fp)
            self.history.remember(new_fp, new, issued_at=received_at)
            try:
                self.journal.record(best_fp, new_fp, new, [m.key for m in members])
            except (OSError, StoreError) as exc:
                # Still in memory and about to be written; the daemon says so loudly.
                outcome.journal_error = str(exc)
            self._write(snapshots, readable, new, outcome)
        outcome.creds, outcome.fp, outcome.consumed = new, new_fp, best_fp
        if all(m.key in outcome.written for m in members):
            with contextlib.suppress(OSError, StoreError):
                self.journal.settle(new_fp)
            outcome.result = "rotated"
        else:
            outcome.result = "write_failed"
            outcome.reason = next(iter(outcome.errors.values()), "not every member was written")
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


def _lock_path_or_self(store: Store) -> object:
    try:
        return store.lock_path()
    except StoreError:
        return store.path
