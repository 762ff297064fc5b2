"""Fleet mode (issue 17): one token family on many hosts, refreshed exactly once, through etcd v3.

The daemon talks to one object, :class:`Fleet` (``coordinator.py``): the engine asks it before
spending and tells it the answer first; a watch brings other hosts' rotations. ``etcd.py`` is
the bounded JSON-gateway client, ``crypto.py`` the fleet secret (family ids, AES-GCM records).
A real loopback etcd cluster for tests and benchmarks is ``testing/etcd_cluster.py``.
docs/fleet.md has the protocol and the failure table.

Names are imported lazily: the engine imports the error kinds on every daemon start, and a
daemon without a fleet should not pay for loading ``cryptography``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    FleetAnswerInvalid,
    FleetBusy,
    FleetError,
    FleetMoved,
    FleetNeedsLogin,
    FleetRecordUnreadable,
    FleetSecretError,
    FleetUnavailable,
)

if TYPE_CHECKING:
    from .coordinator import Fleet
    from .crypto import FleetKeys, write_secret_file
    from .records import FleetConfig, Reconciled, Record, Ticket

_LAZY = {"Fleet": "coordinator", "FleetConfig": "records", "Reconciled": "records",
         "Record": "records", "Ticket": "records", "FleetKeys": "crypto",
         "write_secret_file": "crypto"}

__all__ = [
    "Fleet", "FleetAnswerInvalid", "FleetBusy", "FleetConfig", "FleetError", "FleetKeys",
    "FleetMoved", "FleetNeedsLogin", "FleetRecordUnreadable", "FleetSecretError",
    "FleetUnavailable", "Reconciled", "Record", "Ticket", "write_secret_file",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
