"""What ``qwen-refresher status`` reports: the rows, gathered once (``collect``).

Health checks run ``status`` every few seconds, so it must cost little more than starting
Python. It never talks to the daemon and never imports ``config`` (pydantic), structlog, httpx,
the scheduler, ``typing`` or ``dataclasses``. It asks the kernel, through the daemon's flock,
whether a daemon is alive, and reads what that daemon published in ``state.json``
(``published``: the one reader, hardened against FIFOs, symlinks and huge files).

One home per fact: the settings and the stores to look at come from ``settings_core`` (the
daemon's own resolution, ``openclaw.json`` agent dirs included), the state file and the lock from
``published``, the verdicts (severity, exit code, summary line) from ``report``. This module
only puts them together; ``commands/status.py`` parses the command line and renders.

The store adapters are imported only when a store must be read: no daemon runs, it has not
published yet, or a store file changed after the last publish (someone else rotated).

No token can reach the output: rows hold only ``ProfileStatus`` fields, expiry times and store
problems, none of which ever contain a token value; what this run read from stores is masked on
the way out (``seen_tokens``).
"""

from __future__ import annotations

import os

from .published import (
    DAEMON_LOCK,
    MAX_STATE_BYTES,
    SCHEMA_VERSION,
    STATE_FILE,
    as_number,
    as_text,
    daemon_pid,
    open_state_file,
    profile_row,
    published_by,
    published_profiles,
    published_stores,
    read_published,
    read_state_file,
    state_file_problem,
    store_row,
)
from .report import (
    DEGRADED_STATES,
    EX_FAILURE,
    EX_OK,
    EXPIRY_STATES,
    NEEDS_LOGIN_STATES,
    NO_PROFILE,
    SEVERITY,
    exit_code,
    past_expiry,
    reload_failure,
    shorten_home,
    summary_line,
)
from .settings_core import (
    DEFAULT_MARGIN,
    ENV_PREFIX,
    CoreSettings,
    configured_agent_dirs,
    kind_of,
)
from .settings_core import resolve as resolve_core

TYPE_CHECKING = False  # ``typing`` costs ~3 ms per run; mypy treats this as True
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path

    from .errors import SettingsError, StateFileProblem, StoreError
    from .state import (
        DaemonInfo,
        ProfileState,
        ProfileStatus,
        PublishedState,
        StoreStatus,
    )
    from .stores import Store, StoreSnapshot

__all__ = [
    "DAEMON_LOCK",
    "DEFAULT_MARGIN",
    "DEGRADED_STATES",
    "ENV_PREFIX",
    "EXPIRY_STATES",
    "MAX_STATE_BYTES",
    "NEEDS_LOGIN_STATES",
    "NO_PROFILE",
    "SCHEMA_VERSION",
    "SEVERITY",
    "STATE_FILE",
    "WHOLE_STORE",
    "CoreSettings",
    "Report",
    "SettingsError",
    "StateFileProblem",
    "as_number",
    "as_text",
    "collect",
    "collect_from_stores",
    "daemon_pid",
    "derive_state",
    "exit_code",
    "families",
    "open_state_file",
    "past_expiry",
    "profile_row",
    "published_by",
    "published_profiles",
    "published_stores",
    "read_published",
    "read_state_file",
    "refresh_expiries",
    "reload_failure",
    "resolve_settings",
    "seen_tokens",
    "store_row",
    "summary_line",
    "where_we_looked",
]

#: The command's parse-and-render half, ``commands/status.py``, under its old names here.
_COMMAND_NAMES = frozenset({"add_parser", "main", "run", "to_json", "to_text"})


def __getattr__(name: str) -> object:
    """``status.main``/``run``/``add_parser`` (tests, ``python -m``) live in
    ``commands.status``, which imports this module: fetched lazily, no import cycle."""
    if name in _COMMAND_NAMES:
        from .commands import status as command

        return getattr(command, name)
    if name in ("SettingsError", "StateFileProblem"):  # their home is ``errors``: on demand
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: ``profile`` of a row that stands for a whole store file that could not be read.
WHOLE_STORE = ""


def resolve_settings(args: object, env: Mapping[str, str]) -> CoreSettings:
    """``settings_core.resolve`` with status's flags: the daemon's resolution, not a copy."""
    return resolve_core(env, config=getattr(args, "config", None),
                        state_dir=getattr(args, "state_dir", None),
                        stores=getattr(args, "store", None))


# -- reading stores ourselves -----------------------------------------------------------------


def _as_path(path: Path | str) -> Path:
    from pathlib import Path  # with the store adapters: never on the fast path

    return Path(path)


def _store_for(path: Path | str, kind: str | None) -> Store:
    """The adapter for a file: the kind the daemon recorded, else the one its name says."""
    from .stores import STORE_KINDS

    path = _as_path(path)
    if kind is None or kind not in STORE_KINDS:
        kind = kind_of(path)
    return STORE_KINDS[kind](path)


#: Tokens of the stores this run read: what ``_redacted`` masks in the output.
_SEEN_TOKENS: list[str] = []


def _read(store: Store) -> StoreSnapshot | StoreError:
    """One store read by us; its tokens remembered for masking, a failure returned, not
    raised (one unreadable store must not hide the others)."""
    from .errors import StoreError  # with the adapters: never on the fast path

    try:
        snapshot = store.read()
    except StoreError as exc:
        return exc
    for record in snapshot.records.values():
        if record.creds is not None:
            _SEEN_TOKENS.extend((record.creds.access, record.creds.refresh))
    return snapshot


def seen_tokens() -> list[str]:
    """Every token this run read from a store: what the output must mask."""
    return _SEEN_TOKENS


def derive_state(expires_at: float, now: float, margin: float) -> ProfileState:
    """What the expiry alone says: past it, inside the refresh margin, or fine."""
    if expires_at <= now:
        return "expired"
    if expires_at - margin <= now:
        return "due"
    return "ok"


def _row(store: Store, profile: str, state: ProfileState, *, expires_at: float | None = None,
         error: str | None = None, login: str | None = None) -> ProfileStatus:
    """A row for a store this run read itself (``published.profile_row``)."""
    return profile_row(str(store.path), store.kind, store.agent, profile, state,
                       expires_at=expires_at, last_error=error, login_command=login)


def _same_time(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 0.0015


def _carry(row: ProfileStatus, previous: ProfileStatus | None) -> ProfileStatus:
    """Keep what a stopped daemon last knew: its last refresh, error and family, and a
    needs_login verdict for as long as the store still holds the token that was refused (the
    same expiry means nobody has written new tokens since)."""
    if previous is None:
        return row
    row["family"] = previous["family"]
    row["last_refresh_at"] = previous["last_refresh_at"]
    row["attempts"] = previous["attempts"]
    if row["last_error"] is None:
        row["last_error"] = previous["last_error"]
    if "hook" in previous:
        row["hook"] = previous["hook"]
    if (previous["state"] == "needs_login" and row["state"] != "invalid_store"
            and _same_time(previous["expires_at"], row["expires_at"])):
        row["state"] = "needs_login"
    return row


def _rows_from_store(store: Store, read: StoreSnapshot | StoreError, now: float, margin: float,
                     previous: Mapping[tuple[str, str], ProfileStatus]) -> list[ProfileStatus]:
    """Rows for one store read by us: one per qwen profile, or one for the whole file."""
    from .errors import StoreError

    if isinstance(read, StoreError):
        known = [p for (s, p) in previous if s == str(store.path)] or [WHOLE_STORE]
        return [_row(store, p, "invalid_store", error=read.problem) for p in known]
    rows: list[ProfileStatus] = []
    for profile_id, record in read.records.items():
        login = store.login_command(profile_id)
        if record.creds is None:
            row = _row(store, profile_id, "invalid_store", error=record.problem, login=login)
        else:
            expires = record.creds.expires_at
            row = _row(store, profile_id, derive_state(expires, now, margin), expires_at=expires,
                       login=login)
        rows.append(_carry(row, previous.get((str(store.path), profile_id))))
    return rows


def _index(profiles: Iterable[ProfileStatus]) -> dict[tuple[str, str], ProfileStatus]:
    return {(p["store"], p["profile"]): p for p in profiles}


def collect_from_stores(found: Sequence[tuple[Path, str]], now: float, margin: float,
                        previous: PublishedState | None,
                        ) -> tuple[list[ProfileStatus], list[StoreStatus]]:
    """Read every store ourselves: no daemon runs, or it has not published yet.

    ``found`` is ``settings_core.store_paths``: (path, kind) of what a daemon with today's
    settings manages. Stores the last daemon knew about are included even if today's settings
    would not find them, and the kind it recorded for each file is believed.
    """
    from pathlib import Path

    from .errors import StoreError

    old_stores = published_stores(previous) if previous else []
    known = _index(published_profiles(previous)) if previous else {}
    kinds = {str(path): kind for path, kind in found}
    kinds.update((s["path"], s["kind"]) for s in old_stores)
    ordered = list(dict.fromkeys([*(path for path, _ in found),
                                  *(Path(s["path"]) for s in old_stores)]))
    profiles: list[ProfileStatus] = []
    statuses: list[StoreStatus] = []
    for path in ordered:
        store = _store_for(path, kinds.get(str(path)))
        read = _read(store)
        error = read.problem if isinstance(read, StoreError) else None
        statuses.append(store_row(str(store.path), store.kind, error))
        profiles += _rows_from_store(store, read, now, margin, known)
    return profiles, statuses


def _read_if_changed(store: str, kind: str, published_at: float) -> StoreSnapshot | None:
    """The store as it is now if it was written after the daemon last published, else None
    (also when it cannot be read right now: the daemon's view stands).

    One ``os.stat`` of the name as published, no ``Path``: this runs once per store on every
    health check, 1,000 times at 1,000 stores.
    """
    try:
        if os.stat(store).st_mtime < published_at:
            return None
    except OSError:
        return None
    from .errors import StoreError

    read = _read(_store_for(store, kind))
    return None if isinstance(read, StoreError) else read


def refresh_expiries(profiles: list[ProfileStatus], now: float, margin: float,
                     published_at: float) -> None:
    """Show the expiry a store holds now if it was written after the last publish, in case
    someone else rotated or logged in since.

    The daemon stays authoritative for what only it knows (refreshing, retrying, needs_login,
    unless a newer token has appeared); a store we cannot read right now, say a writer caught
    mid-write, changes nothing.
    """
    reads: dict[str, StoreSnapshot | None] = {}
    for row in profiles:
        name = row["store"]
        if row["profile"] == WHOLE_STORE:
            continue
        expires = row["expires_at"]
        if expires is not None and expires <= now and row["state"] in ("ok", "due"):
            # Published ok or due, run out since (a stuck daemon, a suspended machine): say so
            # rather than repeat "ok" about an expired token. Inline: once per row per check.
            row["state"] = "expired"
        if name not in reads:
            reads[name] = _read_if_changed(name, row["store_kind"], published_at)
        read = reads[name]
        record = None if read is None else read.records.get(row["profile"])
        if record is None or record.creds is None:
            continue
        fresh = record.creds.expires_at
        if _same_time(fresh, row["expires_at"]):
            continue
        relogged = row["state"] == "needs_login" and fresh > max(now, row["expires_at"] or 0.0)
        row["expires_at"] = fresh
        if row["state"] in EXPIRY_STATES or relogged:
            row["state"] = derive_state(fresh, now, margin)


# -- collecting -------------------------------------------------------------------------------


class Report:
    """Everything status prints, gathered once so that text and JSON cannot disagree."""

    __slots__ = ("_code", "daemon", "fleet_code", "fleet_lines", "looked", "now", "pid",
                 "problems", "profiles", "running", "source", "state_dir", "stores")

    def __init__(self, now: float, state_dir: Path | str, pid: int | None,
                 daemon: DaemonInfo | None,
                 profiles: list[ProfileStatus], stores: list[StoreStatus], source: str,
                 problems: Sequence[StateFileProblem] = ()) -> None:
        self.now = now
        self.state_dir = state_dir
        self.pid = pid
        self.running = pid is not None
        self.daemon = daemon
        self.profiles = profiles
        self.stores = stores
        self.source = source  # "daemon": rows as the daemon published them; "stores": ours
        self.problems = list(problems)  # files of our state dir we could not use
        self.looked: list[str] = []  # where we searched, said when nothing was found
        #: the fleet's lines and exit code (``fleet.published.fleet_report``), when in one
        self.fleet_lines: list[str] = []
        self.fleet_code = EX_OK
        self._code: int | None = None

    @property
    def exit_code(self) -> int:
        """``report.exit_code``, then a problem file (1), then the fleet; worked out once, on
        first use (after ``collect`` has filled everything in)."""
        if self._code is None:
            code = exit_code(self.profiles, self.running, self.stores, now=self.now)
            if code == EX_OK:
                code = EX_FAILURE if self.problems else self.fleet_code
            self._code = code
        return self._code


def _broken_store_rows(stores: Sequence[StoreStatus],
                       profiles: Sequence[ProfileStatus]) -> list[ProfileStatus]:
    """A row for each unusable store the daemon reported without any profile in it, so that
    the table shows why the exit code says degraded."""
    shown = {p["store"] for p in profiles}
    return [profile_row(s["path"], s["kind"], None, WHOLE_STORE, "invalid_store",
                        last_error=s["error"])
            for s in stores if s["error"] and s["path"] not in shown]


def collect(settings: CoreSettings, env: Mapping[str, str], now: float) -> Report:
    """The daemon's published view while it runs, else our own reading of the stores."""
    problems: list[StateFileProblem] = []
    state_dir = settings.state_dir_text  # text: no pathlib on the fast path
    pid = daemon_pid(state_dir, problems)
    published, published_at = read_published(state_dir, problems)
    if pid is not None and published is not None and published_by(published, pid):
        profiles = published_profiles(published)
        # The running daemon's margin decides what is "due", not the one these flags say.
        margin = published["daemon"].get("margin")
        margin = float(margin) if isinstance(margin, int | float) else settings.margin
        refresh_expiries(profiles, now, margin, published_at)
        stores = published_stores(published)
        profiles += _broken_store_rows(stores, profiles)
        daemon = published["daemon"]
        shown_pid = daemon.get("pid") if pid <= 0 else pid
        report = Report(now, state_dir, shown_pid if isinstance(shown_pid, int) else -1,
                        daemon, profiles, stores, "daemon", problems)
        if "fleet" in published:  # only a fleet member pays for reading its part
            from .fleet.published import fleet_report

            report.fleet_lines, report.fleet_code, _ = fleet_report(published)
        return report
    config_problems: list[tuple[Path, str]] = []
    found = settings.store_paths(env, config_problems)
    problems += [state_file_problem(path, problem) for path, problem in config_problems]
    profiles, statuses = collect_from_stores(found, now, settings.margin, published)
    last = published["daemon"] if published is not None and pid is not None else None
    report = Report(now, state_dir, pid, last, profiles, statuses, "stores", problems)
    if not profiles:
        report.looked = where_we_looked(settings, env)
    return report


def _on_path(name: str, env: Mapping[str, str]) -> str | None:
    """``shutil.which`` without importing shutil (status stays light)."""
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def where_we_looked(settings: CoreSettings, env: Mapping[str, str]) -> list[str]:
    """What a newcomer needs when nothing was found: where we searched and what to run next
    (as ``gh auth status`` says "To log in, run: gh auth login")."""
    from . import paths

    lines = []
    if settings.discover:
        state = paths.openclaw_state_dir(env)
        there = "" if os.path.isdir(state) else " (does not exist)"
        lines.append(f"looked in OpenClaw's state dir {shorten_home(state)}{there}: "
                     "agents/*/agent/auth-profiles.json (OPENCLAW_STATE_DIR moves it)")
    else:
        lines.append("discovery is off (discover = false): only the stores named by --store")
        for agent_dir in configured_agent_dirs(env):
            lines.append(f"looked in {shorten_home(agent_dir)} (an agentDir set in "
                         f"{shorten_home(paths.openclaw_config_file(env))})")
    for store in settings.stores:
        lines.append(f"looked at {shorten_home(store)}")
    if settings.qwen_code:
        lines.append(f"looked at Qwen Code's {shorten_home(paths.qwen_code_creds(env))}")
    openclaw = _on_path("openclaw", env)
    lines.append(f"openclaw on PATH: {openclaw}" if openclaw else
                 "openclaw is not on PATH: the gateway cannot be told after a rotation "
                 "(on_rotate = auto does nothing)")
    lines.append("to log in, run: qwen-refresher login")
    if not os.path.isdir(settings.state_dir_text):
        lines.append(f"the daemon has never run here (no {shorten_home(settings.state_dir_text)}"
                     "); start it with: qwen-refresher run, or qwen-refresher install-service "
                     "--now")
    return lines


def families(profiles: Sequence[ProfileStatus]) -> dict[str, list[ProfileStatus]]:
    """Profiles that share one refresh token, which the daemon refreshes as one."""
    groups: dict[str, list[ProfileStatus]] = {}
    for p in profiles:
        if p["family"]:
            groups.setdefault(p["family"], []).append(p)
    return {k: v for k, v in groups.items() if len(v) > 1}


if __name__ == "__main__":  # ``python -m qwen_refresher.status``, as before the split
    from .commands.status import main

    raise SystemExit(main())
