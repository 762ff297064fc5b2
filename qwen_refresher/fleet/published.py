"""The fleet's part of ``state.json``, read back for ``status`` and ``/readyz``. Stdlib only.

The daemon writes ``fleet_state(...)`` (``fleet/runtime.py``) under the key ``fleet``;
``status`` calls ``fleet_report(doc, now)`` for its lines and exit code, ``/readyz`` calls
``fleet_not_ready(state)`` for its reasons. Everything read is checked for type: a state file
is a file anyone with the state dir's access could have edited.
"""

from __future__ import annotations

import time
from typing import Any

#: ``status`` exits with this while the fleet is unavailable (EX_FAILURE).
EX_FLEET_UNAVAILABLE = 1
#: Profiles whose fleet role status lists one per line; the rest are counted.
MAX_ROLE_LINES = 20


def _text(value: object, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def fleet_not_ready(state: Any) -> list[str]:
    """Reasons ``/readyz`` is not ready because of the fleet (empty: no fleet, or it answers)."""
    if not isinstance(state, dict) or state.get("available") is not False:
        return []
    since = _number(state.get("unavailable_since"))
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else "?"
    return [f"fleet unavailable since {when}: no fleet family is refreshed anywhere"]


def fleet_report(doc: Any) -> tuple[list[str], int, dict[str, str]]:
    """(lines for status, exit code contribution, role text per ``path#profile``).

    Exit 1 while the daemon last said the fleet is unavailable: no host refreshes then, and
    tokens run out fleet-wide unless someone acts.
    """
    state = doc.get("fleet") if isinstance(doc, dict) else None
    if not isinstance(state, dict):
        return [], 0, {}
    host = _text(state.get("host")) or "?"
    members = state.get("members")
    count = len(members) if isinstance(members, list) else 0
    key = _text(state.get("key"), 16) or "?"
    roles: dict[str, str] = {}
    profiles = state.get("profiles")
    if isinstance(profiles, dict):
        for name, info in list(profiles.items())[:10000]:
            if isinstance(name, str) and isinstance(info, dict):
                role = _text(info.get("role"))
                if role:
                    roles[name] = role
    head = f"fleet: this host is {host}, {count} etcd member(s), key {key}"
    shown = [f"  {name}: {role}" for name, role in sorted(roles.items())[:MAX_ROLE_LINES]]
    if len(roles) > MAX_ROLE_LINES:
        shown.append(f"  ... and {len(roles) - MAX_ROLE_LINES} more profile(s)")
    reasons = fleet_not_ready(state)
    if reasons:
        problem = _text(state.get("problem"), 300)
        detail = f" (last error: {problem})" if problem else ""
        return [head, reasons[0] + detail, *shown], EX_FLEET_UNAVAILABLE, roles
    return [head + ", etcd healthy", *shown], 0, roles
