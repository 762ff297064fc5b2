"""The engine's fleet seam: what a run asks etcd (``fleet/``, docs/fleet.md) and when.

After the re-read under the locks the family is reconciled with the fleet's record (a newer
generation there is written to the members instead of refreshing), the spend needs the
fleet's lock (a ticket, per thread), the answer is compare-and-swapped into etcd after our
journal and before the stores (``Writer.fleet_commit``), and a rejection may mean another
host spent the token: its newer one is adopted if it arrives in time. Without etcd nothing
is spent. Split from ``engine.py`` (issue 14); only an engine built with a ``fleet`` has one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .fleet.errors import FleetBusy, FleetError, FleetMoved, FleetNeedsLogin, FleetUnavailable
from .history import TokenHistory
from .models import Credentials, ProfileKey
from .stores.base import Store, StoreSnapshot

if TYPE_CHECKING:
    from .engine import Member, Outcome
    from .engine_commit import Writer
    from .errors import StoreError
    from .fleet.coordinator import Fleet, Ticket

#: ``Engine.read``: (snapshots, current credentials, read errors) of the members.
Read = Callable[[Sequence["Member"]], tuple[
    dict[Store, StoreSnapshot], dict["Member", Credentials], dict[ProfileKey, "StoreError"]]]


class FleetSeam:
    """One engine's dealings with the fleet; the spend ticket is per thread (``_spend``)."""

    def __init__(self, fleet: Fleet, *, history: TokenHistory,
                 fp: Callable[[Credentials], str], clock: Callable[[], float],
                 writer: Writer, read: Read) -> None:
        self.fleet = fleet
        self.history = history
        self.fp = fp
        self.clock = clock
        self.writer = writer
        self.read = read
        #: The fleet's family id and spend ticket of the run on this thread.
        self._spend = threading.local()

    def reconcile(self, members: Sequence[Member], snapshots: dict[Store, StoreSnapshot],
                  current: dict[Member, Credentials], best: Credentials, best_fp: str,
                  due_at: float, outcome: Outcome) -> Outcome | None:
        """Agree with the fleet before anything is spent. Returns the finished outcome when
        the run ends here: the fleet holds a newer generation (written to every member, as a
        sync: ``on_rotate`` runs) or the fleet cannot be asked while the family is due."""
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
        return self.adopt(members, snapshots, current, best_fp, seen.adopt, outcome)

    def adopt(self, members: Sequence[Member], snapshots: dict[Store, StoreSnapshot],
              current: dict[Member, Credentials], old_fp: str, creds: Credentials,
              outcome: Outcome) -> Outcome:
        """Write the fleet's newer tokens to every member that lacks them."""
        new_fp = self.fp(creds)
        self.history.link(old_fp, new_fp)
        self.history.remember(new_fp, creds, issued_at=self.clock())
        lagging = [m for m in members if m in current and self.fp(current[m]) != new_fp]
        with self.writer.writing:
            write_error = self.writer.write(snapshots, lagging, creds, outcome)
        outcome.result, outcome.creds, outcome.fp = "synced", creds, new_fp
        outcome.failure, outcome.reason = None, None
        if write_error is not None:
            outcome.fail(write_error)
        return outcome

    def begin(self, outcome: Outcome) -> bool:
        """Take the fleet's right to spend; False (outcome set) when we may not. Raises
        ``FleetNeedsLogin`` when the fleet's record says the token was refused: nobody may
        spend it again, and this is the family's rejection, not an unavailable fleet."""
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
        except FleetNeedsLogin:
            raise  # the engine looks for a login, then declares one needed
        except FleetError as exc:
            outcome.fail(exc if isinstance(exc, FleetUnavailable)
                         else FleetUnavailable(str(exc)))
            return False
        return True

    def commit(self, members: Sequence[Member], new: Credentials) -> None:
        """Publish a rotation to etcd (``Writer.fleet_commit``: after our journal, before
        the stores). Never raises."""
        ticket: Ticket | None = getattr(self._spend, "ticket", None)
        if ticket is None:
            return
        self._spend.ticket = None
        self.fleet.commit(ticket, [m.key for m in members], new)

    def release(self) -> None:
        """Give back the spend ticket a run still holds (it ended without a commit)."""
        ticket: Ticket | None = getattr(self._spend, "ticket", None)
        if ticket is not None:
            self._spend.ticket = None
            self.fleet.release(ticket)

    def rejected(self, members: Sequence[Member], snapshots: dict[Store, StoreSnapshot],
                 best_fp: str, outcome: Outcome) -> Outcome | None:
        """The server refused the fleet's current token: another host may have spent it (we
        were paused past our lease). Adopt the fleet's newer token if one arrives in time."""
        ticket: Ticket | None = getattr(self._spend, "ticket", None)
        if ticket is None:
            return None
        self._spend.ticket = None
        newer = self.fleet.after_rejection(ticket)
        if newer is None:
            return None
        snapshots, current, _ = self.read(members)
        return self.adopt(members, snapshots, current, best_fp, newer, outcome)
