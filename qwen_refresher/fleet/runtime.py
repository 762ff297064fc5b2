"""Settings -> a running ``Fleet``, and the fleet's part of the published state.

The daemon calls ``start_fleet(settings)`` once (None when ``fleet`` is unset), hands the
result to the engine, sets ``on_change`` to "run that family now", and publishes
``fleet_state(fleet)`` with the rest of its state, which ``status`` and ``/readyz`` read.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from .errors import FleetSecretError

if TYPE_CHECKING:
    from ..config import Settings
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
