"""A host's two fleet threads: the watch that brings other hosts' rotations, and the prober.

The watch follows ``ns/f/`` from the revision of a first read; when a family this host holds
moves to a token it has not agreed on, ``on_change`` asks the daemon to run that family now
(its engine run reconciles and writes the new tokens under the local locks). A compacted
start revision means events may be lost: every family is run once. The prober does one
linearizable read every ``probe_interval`` so an idle host still notices a lost quorum (and
its return) and says so in status and ``/readyz``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .errors import FleetRecordUnreadable, FleetUnavailable
from .etcd import WatchCompacted, prefix_end

if TYPE_CHECKING:
    from .coordinator import Fleet

log = logging.getLogger("qwen_refresher.fleet")


class Follower:
    """The watch and probe threads of one ``Fleet``."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._watch_loop, "fleet-watch"),
                             (self._probe_loop, "fleet-probe")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        config = self.fleet.config
        self._stop.set()
        for thread in self._threads[1:]:  # the prober first: it never waits long
            thread.join(timeout=config.timeout * len(config.urls) + 1)
        self.fleet.client.close()  # ends the watch stream's read, then the watcher returns
        for thread in self._threads[:1]:
            thread.join(timeout=config.timeout + 1)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.fleet.config.probe_interval):
            try:
                self.fleet.probe()
            except Exception:  # a closed client at shutdown; never kill the prober
                if self._stop.is_set():
                    return
                log.exception("fleet probe failed")

    def _watch_loop(self) -> None:
        fleet = self.fleet
        prefix = fleet.ns + b"f/"
        start = 0
        while not self._stop.is_set():
            try:
                if start == 0:
                    _, revision = fleet.guard(lambda: fleet.client.get(fleet.ns + b"health"))
                    start = revision + 1
                for revision, events in fleet.client.watch(
                        prefix, prefix_end(prefix), start, idle=fleet.config.watch_idle,
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
                fleet.failed(exc)
                self._stop.wait(min(1.0, fleet.config.probe_interval))
            except Exception:  # the watch must outlive any one bad message
                if self._stop.is_set():
                    return  # stopping: the client was closed under the stream
                log.exception("fleet watch failed; re-opening")
                self._stop.wait(1.0)

    def _seen(self, kind: str, key: bytes, value: bytes, revision: int) -> None:
        fleet = self.fleet
        head = fleet.ns + b"f/"
        if kind != "PUT" or not key.startswith(head) or not key.endswith(b"/current"):
            return
        fid = key[len(head):-len(b"/current")].decode("ascii", "replace")
        if not fleet.known.is_new(fid, revision):
            return
        try:
            record = fleet.open_record(fid, value)
        except FleetRecordUnreadable:
            log.error("fleet record failed authentication; ignored")
            return
        members = fleet.known.seen(fid, revision, record)
        if members is not None and fleet.on_change is not None:
            fleet.on_change(fid, members)

    def _changed_all(self) -> None:
        fleet = self.fleet
        if fleet.on_change is not None:
            for fid, known in fleet.known.items():
                fleet.on_change(fid, known.members)
