"""Severity, exit codes and the one-line summary: how a set of profile rows is judged.

One home for the verdicts that ``status`` prints, the daemon sends to systemd (``STATUS=``) and
health checks act on; ``errors`` takes its exit codes from here, so an exception's code and a
status verdict cannot drift apart.

Exit codes, most severe first: 2 a profile needs a new login or its token is past its expiry
(whatever the daemon is doing about it); 3 the daemon is not running; 1 any other degradation
(retrying, unusable store, no profile, an unusable file in the state dir); 0 good.

Stdlib only and neither ``typing`` nor ``pathlib`` at run time: ``status`` imports this on every
health check.
"""

from __future__ import annotations

import os

from .durations import format_duration
from .escape import printable

TYPE_CHECKING = False  # not `from typing import ...`: status must not pay for typing
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from .state import ProfileState, ProfileStatus, StoreStatus

EX_OK = 0
EX_FAILURE = 1
EX_NEEDS_LOGIN = 2
EX_NOT_RUNNING = 3
EX_USAGE = 64
EX_TEMPFAIL = 75
EX_CONFIG = 78
#: 128 + SIGINT: the shell's own convention for a command ended by Ctrl-C.
EX_INTERRUPTED = 130
#: 128 + SIGPIPE: the reader of our stdout went away (``status | head``).
EX_BROKEN_PIPE = 141

NO_PROFILE = "no qwen-portal profile found"
NEEDS_LOGIN_STATES = frozenset({"needs_login", "expired"})
DEGRADED_STATES = frozenset({"retrying", "invalid_store"})
#: Derived from the expiry alone, so a fresher expiry read from the store may replace them.
EXPIRY_STATES = frozenset({"ok", "due", "expired"})
#: Every state, worst first: the order of words in summaries.
SEVERITY: tuple[ProfileState, ...] = (
    "needs_login", "expired", "invalid_store", "retrying", "refreshing", "due", "ok",
)


def shorten_home(path: Path | str, env: Mapping[str, str] | None = None) -> str:
    """Show a path with the home dir as ``~``: shorter rows in ``status``, same meaning.

    The one home of this rule (``paths.shorten_home`` is this): text in, text out, so that
    ``status`` renders without importing ``pathlib``."""
    text = str(path)
    home = (os.environ if env is None else env).get("HOME", "").rstrip("/")
    if home and (text == home or text.startswith(home + "/")):
        return "~" + text[len(home):]
    return text


def past_expiry(p: ProfileStatus, now: float | None) -> bool:
    """The token has run out, whatever the daemon says it is doing about it (refreshing,
    retrying): the agents cannot use it now."""
    return now is not None and p["expires_at"] is not None and p["expires_at"] <= now


def reload_failure(p: ProfileStatus, now: float) -> str | None:
    """"reload failed since 2m ago: <the hook's last output line>" while the gateway has
    not been told of the newest tokens (``on_rotate`` failing, being retried), else None."""
    hook = p.get("hook")
    if hook is None or hook["ok"] or hook["failing_since"] is None:
        return None
    since = format_duration(max(0.0, now - hook["failing_since"]))
    what = hook["output"] or ("timed out" if hook["timed_out"] else
                              f"exit status {hook['returncode']}")
    return f"reload failed since {since} ago ({hook['failures']} attempts): {what}"


def exit_code(profiles: Sequence[ProfileStatus], running: bool,
              stores: Sequence[StoreStatus] = (), *, now: float | None = None) -> int:
    """Most severe wins: 2 needs login or expired, 3 no daemon, 1 degraded, 0 all good.

    With ``now``, a token past its expiry is 2 in any state: a health check must not read
    "refreshing" (0) or "retrying" (1) while the agents hold an expired token."""
    states = {p["state"] for p in profiles}
    if states & NEEDS_LOGIN_STATES or any(past_expiry(p, now) for p in profiles):
        return EX_NEEDS_LOGIN
    if not running:
        return EX_NOT_RUNNING
    if not profiles or states & DEGRADED_STATES or any(s.get("error") for s in stores) or \
            any(reload_failure(p, 0.0) for p in profiles):
        return EX_FAILURE
    return EX_OK


def _label(p: ProfileStatus, ambiguous: set[str]) -> str:
    """The profile id, with its agent (or store) when another store has the same id; escaped,
    because the summary also goes to systemd's ``STATUS=`` and the terminal."""
    if not p["profile"]:
        return printable(shorten_home(p["store"]))
    if p["profile"] in ambiguous:
        return printable(f"{p['profile']} ({p['agent'] or shorten_home(p['store'])})")
    return printable(p["profile"])


def _names(chosen: Sequence[ProfileStatus], everyone: Sequence[ProfileStatus]) -> tuple[str, int]:
    """"a", "a and b" or "a, b and 3 more", and how many distinct names there were."""
    seen: dict[str, int] = {}
    for p in everyone:
        seen[p["profile"]] = seen.get(p["profile"], 0) + 1
    ambiguous = {name for name, n in seen.items() if n > 1}
    names = list(dict.fromkeys(_label(p, ambiguous) for p in chosen))
    if len(names) > 2:
        return f"{names[0]}, {names[1]} and {len(names) - 2} more", len(names)
    return " and ".join(names), len(names)


def _counts(profiles: Sequence[ProfileStatus], named: bool) -> list[str]:
    """"2 profiles ok" alone; "3 profiles: 1 retrying, 2 ok" mixed; bare counts after names."""
    tally: dict[str, int] = {}
    for p in profiles:
        tally[p["state"]] = tally.get(p["state"], 0) + 1
    counts = {s: tally.get(s, 0) for s in SEVERITY[2:]}
    words = [f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n]
    total = sum(counts.values())
    if named or not words:
        return words
    if len(words) == 1:
        state = next(s for s, n in counts.items() if n).replace("_", " ")
        return [f"{total} profile{'s' if total != 1 else ''} {state}"]
    return [f"{total} profiles: {words[0]}", *words[1:]]


def summary_line(profiles: Sequence[ProfileStatus], now: float) -> str:
    """One line for systemd's ``STATUS=`` and the status footer.

    "2 profiles ok, next refresh in 5h41m", "qwen-portal:default needs login",
    "no qwen-portal profile found". What needs a person comes first, by name.
    """
    if not profiles:
        return NO_PROFILE
    parts: list[str] = []
    login = [p for p in profiles if p["state"] == "needs_login"]
    expired = [p for p in profiles if p["state"] == "expired" or
               (p["state"] != "needs_login" and past_expiry(p, now))]
    if login:
        names, count = _names(login, profiles)
        parts.append(f"{names} need{'s' if count == 1 else ''} login")
    if expired:
        parts.append(f"{_names(expired, profiles)[0]} expired")
    parts += _counts(profiles, named=bool(parts))
    upcoming = [p["next_refresh_at"] for p in profiles if p["next_refresh_at"] is not None]
    if upcoming:
        wait = min(upcoming) - now
        parts.append("next refresh now" if wait <= 0 else
                     f"next refresh in {format_duration(wait)}")
    return ", ".join(parts)
