"""``run --once``: refresh whatever is due now, wait for it, and exit with a verdict.

For timers and cron: the same components as the long-running daemon (``Daemon`` builds them),
driven to one end instead of a main loop. Nothing is scheduled: the scan plans every family,
the due ones run here one after the other, and the exit code says how it went (0 all done,
2 a profile needs a login, 1 something due could not be refreshed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..coredump import disable_core_dumps
from ..report import EX_FAILURE, EX_NEEDS_LOGIN, EX_OK
from . import families as plans
from .outcomes import ONCE_SUCCESS

if TYPE_CHECKING:
    from ..engine import Outcome
    from .daemon import Daemon


def run_once(daemon: Daemon) -> int:
    """One pass over what is due now, under the daemon lock (no second daemon meanwhile)."""
    disable_core_dumps()
    daemon.daemon_lock.acquire()
    try:
        daemon._prepare()
        daemon.stop.set()  # reconcile plans but schedules nothing
        daemon.rescan_all()
        daemon.stop.clear()
        daemon.onrotate.resume()
        daemon._say_what_is_missing()
        with daemon.memory.lock:
            due = plans.due_now(daemon.memory, daemon.history, time.time())
        results = [_run_family(daemon, job_id) for job_id in due]
        done = [o for o in results if o is not None and o.result in ONCE_SUCCESS]
        daemon.stop.set()
        daemon.reconcile()
        statuses = daemon.profile_statuses()
        daemon.log.info("once_done", due=len(due), refreshed=len(done),
                        failed=len(due) - len(done), profiles=len(statuses))
        if any(p["state"] in ("needs_login", "expired") for p in statuses):
            return EX_NEEDS_LOGIN
        if len(done) < len(due) or not statuses or any(
                p["state"] in ("retrying", "invalid_store") for p in statuses):
            return EX_FAILURE  # something due could not be refreshed: say so
        return EX_OK
    finally:
        daemon.publish_now()
        daemon.client.close()
        daemon.fleet_part.stop()
        daemon.daemon_lock.release()


def _run_family(daemon: Daemon, job_id: str) -> Outcome | None:
    """One family: its crash never keeps the others from their turn."""
    try:
        return daemon.refresher.run(job_id)
    except Exception as exc:
        with daemon.memory.lock:
            family = daemon.memory.families.get(job_id)
            keys = set(family.keys) if family is not None else set()
        return daemon.refresher.crashed(job_id, keys, exc)
