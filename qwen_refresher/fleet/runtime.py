"""Settings -> a running ``Fleet``, and the fleet's part of the daemon.

The daemon holds one ``FleetPart`` (``join_fleet``: ``NoFleet`` when ``fleet`` is unset, else a
``FleetLink``) and calls it at its lifecycle moments; it hands ``part.fleet`` to the engine.
The link sets the fleet's ``on_change`` to "run that family now", turns a store change into the
same (a login is published at once), logs and publishes availability changes, and gives
state.json its ``fleet`` object (``fleet_state``), which ``status`` and ``/readyz`` read.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from .errors import FleetSecretError

if TYPE_CHECKING:
    from ..config import Settings
    from ..models import ProfileKey
    from ..protocols import Logger
    from .coordinator import Fleet, FleetConfig

#: Largest password file we read.
MAX_PASSWORD_FILE = 4096


def fleet_config(settings: Settings) -> FleetConfig:
    from .coordinator import FleetConfig

    password = None
    if settings.fleet_password_file is not None:
        try:
            with open(settings.fleet_password_file, "rb") as f:
                password = f.read(MAX_PASSWORD_FILE).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FleetSecretError(f"fleet_password_file {settings.fleet_password_file}: "
                                   f"{getattr(exc, 'strerror', None) or 'unreadable'}"
                                   ) from None
    assert settings.fleet_secret_file is not None  # Settings insists when fleet is set
    ttl = max(1, round(settings.fleet_lease_ttl))
    return FleetConfig(
        urls=settings.fleet_urls, secret_file=settings.fleet_secret_file,
        namespace=settings.fleet_namespace.strip("/"),
        host_id=settings.fleet_host_id or socket.gethostname() or f"pid-{os.getpid()}",
        ca=settings.fleet_ca, cert=settings.fleet_cert, key=settings.fleet_key,
        user=settings.fleet_user, password=password, timeout=settings.fleet_timeout,
        lease_ttl=ttl, inflight_grace=max(ttl, round(settings.fleet_inflight_grace)),
        adopt_wait=max(2.0, min(15.0, settings.fleet_inflight_grace / 2)),
        probe_interval=settings.fleet_probe_interval,
        watch_idle=max(5.0, min(60.0, settings.fleet_probe_interval * 4)),
        state_file=settings.state_dir / "fleet.json")


def start_fleet(settings: Settings) -> Fleet | None:
    """The host's ``Fleet`` (secret read and checked now: a bad one stops start-up, exit 78),
    with its watch and probe threads running; None without ``fleet``."""
    if not settings.fleet:
        return None
    from .coordinator import Fleet

    fleet = Fleet(fleet_config(settings))
    fleet.probe()
    fleet.start()
    return fleet


def fleet_state(fleet: Fleet | None) -> dict[str, Any] | None:
    """The ``fleet`` object of state.json: availability and each family's role.

    ``families`` maps ProfileKey text (``path#profile``) to the family's role, so ``status``
    can show it on each profile's row without knowing fleet ids.
    """
    if fleet is None:
        return None
    profiles: dict[str, dict[str, Any]] = {}
    for fid, info in fleet.family_status().items():
        for member in info["members"]:
            profiles[member] = {"family": fid[:12], "role": info["role"],
                                "generation": info["generation"],
                                "needs_login": info["needs_login"]}
    return {
        "host": fleet.config.host_id,
        "namespace": fleet.config.namespace,
        "members": list(fleet.config.urls),
        "key": fleet.keys.key_id,
        "available": fleet.available,
        "unavailable_since": fleet.unavailable_since,
        "problem": fleet.last_problem,
        "profiles": profiles,
    }


class SharedTables(Protocol):
    """What the link reads of the daemon's tables (``runtime.memory.Memory``)."""

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    @property
    def family_of(self) -> Mapping[ProfileKey, str]: ...

    @property
    def views(self) -> Mapping[ProfileKey, object]: ...


class FleetPart(Protocol):
    """What the daemon holds of fleet mode: a seam, so ``runtime/daemon.py`` carries no fleet
    logic. ``fleet`` goes to the engine; the rest are the daemon's moments and hooks."""

    @property
    def fleet(self) -> Fleet | None: ...

    def nudge(self, keys: set[ProfileKey]) -> None:
        """These profiles' stores changed: their families ask the fleet now."""

    def joined(self) -> None:
        """Start-up is done: every family asks the fleet once, now."""

    def state(self) -> dict[str, Any] | None:
        """The ``fleet`` object of state.json (None: no fleet)."""

    def not_ready(self) -> list[str]:
        """Why ``/readyz`` should answer 503 (empty: ready)."""

    def settings_changed(self, old: Settings, new: Settings) -> None:
        """A reload read new settings (fleet settings take effect at the next start)."""

    def stop(self) -> None:
        """After the refreshes: an in-flight one publishes to etcd first."""


class NoFleet:
    """Fleet mode off: every moment is a no-op (and ``cryptography`` is never loaded)."""

    def __init__(self, log: Logger) -> None:
        self._log = log

    @property
    def fleet(self) -> Fleet | None:
        return None

    def nudge(self, keys: set[ProfileKey]) -> None:
        return None

    def joined(self) -> None:
        return None

    def state(self) -> dict[str, Any] | None:
        return None

    def not_ready(self) -> list[str]:
        return []

    def settings_changed(self, old: Settings, new: Settings) -> None:
        _warn_fleet_settings(old, new, self._log)

    def stop(self) -> None:
        return None


class FleetLink:
    """Fleet mode on: connects one ``Fleet`` to the daemon's jobs (a family another host
    moved is run now), to its state.json and ``/readyz``, and logs availability changes."""

    def __init__(self, fleet: Fleet, *, tables: SharedTables, stop: threading.Event,
                 run_now: Callable[[str, float], None], publish: Callable[[], None],
                 log: Logger) -> None:
        self._fleet = fleet
        self._tables, self._stop, self._run_now = tables, stop, run_now
        self._publish, self._log = publish, log
        fleet.on_change = lambda _fid, members: self.nudge(set(members))
        fleet.on_health = self._health

    @property
    def fleet(self) -> Fleet | None:
        return self._fleet

    def nudge(self, keys: set[ProfileKey]) -> None:
        """Run these profiles' families now: their engine runs reconcile with the fleet and
        write any newer tokens here (another host rotated, or we just started)."""
        if self._stop.is_set():
            return
        with self._tables.lock:
            job_ids = {self._tables.family_of[k] for k in keys if k in self._tables.family_of}
        now = time.time()
        for job_id in job_ids:
            self._run_now(job_id, now)

    def joined(self) -> None:
        # A host joining with an older generation (or a login made while it was down) is
        # brought up to date at once, not at due.
        with self._tables.lock:
            keys = set(self._tables.views)
        self.nudge(keys)

    def _health(self) -> None:
        if self._fleet.available:
            self._log.warning("fleet_available", message="etcd answers again; fleet families "
                                                         "are refreshed again")
            self.joined()
        else:
            self._log.error("fleet_unavailable", problem=self._fleet.last_problem,
                            message="no quorum of etcd answers: no host refreshes a fleet "
                                    "family until it does (local reads go on)")
        self._publish()

    def state(self) -> dict[str, Any] | None:
        return fleet_state(self._fleet)

    def not_ready(self) -> list[str]:
        from .published import fleet_not_ready

        return fleet_not_ready(fleet_state(self._fleet))

    def settings_changed(self, old: Settings, new: Settings) -> None:
        _warn_fleet_settings(old, new, self._log)

    def stop(self) -> None:
        self._fleet.stop()


def _warn_fleet_settings(old: Settings, new: Settings, log: Logger) -> None:
    if any(getattr(new, n) != getattr(old, n)
           for n in type(new).model_fields if n.startswith("fleet")):
        log.warning("restart_needed", message="fleet settings take effect at the next start")


def join_fleet(settings: Settings, *, tables: SharedTables, stop: threading.Event,
               run_now: Callable[[str, float], None], publish: Callable[[], None],
               log: Logger) -> FleetPart:
    """Fleet mode for one daemon: ``NoFleet`` without ``fleet``; else read the secret (a bad
    one stops start-up, exit 78), start the watch and the quorum probe, and connect them."""
    fleet = start_fleet(settings)
    if fleet is None:
        return NoFleet(log)
    log.info("fleet_joined", host=fleet.config.host_id, members=len(fleet.config.urls),
             namespace=fleet.config.namespace, key=fleet.keys.key_id,
             available=fleet.available)
    return FleetLink(fleet, tables=tables, stop=stop, run_now=run_now, publish=publish, log=log)
