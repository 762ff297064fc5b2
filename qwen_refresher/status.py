"""``qwen-refresher status``: what every managed profile looks like now, and an exit code to match.

Health checks run this every few seconds, so it must cost little more than starting Python. It
never talks to the daemon and never imports ``config`` (pydantic), structlog, httpx or the
scheduler. It asks the kernel, through the daemon's flock, whether a daemon is alive, and reads
what that daemon published in ``state.json`` (atomic, 0600, no tokens).

Speed: on the common path (daemon running, no store written since its last publish) it imports
only ``argparse``, ``json``, ``fcntl`` and our ``paths``/``durations``/``errors``; even
``typing`` and ``dataclasses`` stay out, which is why this module reads the state file and the
lock itself instead of importing ``state`` (whose import pulls ``fileio`` and ``dataclasses``,
about 15 ms, 1.3x a bare interpreter start). ``tests/test_status.py`` checks that both readings
agree. The store adapters are imported only when a store must be read: no daemon runs, it has
not published yet, or a store file changed after the last publish (someone else rotated).

Exit codes, most severe first: 2 a profile needs a new login or its token is past its expiry
(whatever the daemon is doing about it); 3 the daemon is not running; 1 any other degradation
(retrying, unusable store, no profile, an unusable file in the state dir); 0 good.

Files in the state dir are opened non-blocking, without following symlinks, type-checked and
read with a size cap (``read_state_file``): a FIFO, a directory or ``/dev/zero`` there is named
in the output, never waited on.

No token can reach the output: rows hold only ``ProfileStatus`` fields, expiry times and store
problems, none of which ever contain a token value.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import stat
import sys
import time
from pathlib import Path

from . import __version__, paths
from .durations import format_duration, parse_duration
from .errors import EX_CONFIG, EX_FAILURE, EX_NEEDS_LOGIN, EX_NOT_RUNNING, EX_OK, StoreError
from .escape import printable, shell_join

# ``typing`` costs ~3 ms per run; mypy treats this constant as True, the interpreter as False.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any, TextIO

    from .state import (
        DaemonInfo,
        HookStatus,
        ProfileState,
        ProfileStatus,
        PublishedState,
        StoreStatus,
    )
    from .stores import Store, StoreSnapshot

ENV_PREFIX = "QWEN_REFRESHER_"
DEFAULT_MARGIN = 900.0
#: These three mirror ``state``'s constants (a test keeps them equal).
SCHEMA_VERSION = 1
STATE_FILE = "state.json"
DAEMON_LOCK = "daemon.lock"
#: ``profile`` of a row that stands for a whole store file that could not be read.
WHOLE_STORE = ""
NO_PROFILE = "no qwen-portal profile found"

NEEDS_LOGIN_STATES = frozenset({"needs_login", "expired"})
DEGRADED_STATES = frozenset({"retrying", "invalid_store"})
#: Derived from the expiry alone, so a fresher expiry read from the store may replace them.
EXPIRY_STATES = frozenset({"ok", "due", "expired"})
#: Every state, worst first: the order of words in summaries.
SEVERITY: tuple[ProfileState, ...] = (
    "needs_login", "expired", "invalid_store", "retrying", "refreshing", "due", "ok",
)
_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n"})


class SettingsError(Exception):
    """A setting status needs is unusable; exit 78, as the daemon would."""


# -- settings -------------------------------------------------------------------------------


class StatusSettings:
    """The handful of settings status needs, resolved without pydantic."""

    __slots__ = ("discover", "margin", "qwen_code", "state_dir", "stores")

    def __init__(self, state_dir: Path, stores: Sequence[Path] = (), *, discover: bool = True,
                 qwen_code: bool = True, margin: float = DEFAULT_MARGIN) -> None:
        self.state_dir = state_dir
        self.stores = tuple(stores)
        self.discover = discover
        self.qwen_code = qwen_code
        self.margin = margin


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(f"invalid setting {name} ({ENV_PREFIX}{name.upper()}): {value!r} is "
                        "not a boolean")


def _path(value: object) -> Path:
    return Path(str(value)).expanduser().absolute()


def _load_toml(path: Path, explicit: bool) -> dict[str, Any]:
    """The config file as a dict; a missing default file is simply no file."""
    if not explicit and not path.exists():
        return {}
    import tomllib  # only when there is a file: it costs a few ms on every health check

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"invalid setting config: {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"invalid setting config: {path}: cannot be read: "
                            f"{exc.strerror}") from None


def _env_stores(raw: str) -> list[Path]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"invalid setting stores ({ENV_PREFIX}STORES): must be a JSON list "
                            'of paths, e.g. ["/path/one.json", "/path/two.json"]')
    return [_path(v) for v in value]


def _file_stores(value: object) -> list[Path]:
    if isinstance(value, str):
        return [_path(value)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_path(v) for v in value]
    raise SettingsError("invalid setting stores: expected a list of paths")


def _pick(name: str, flag: object, env: Mapping[str, str], toml: Mapping[str, Any]) -> object:
    """flag > environment > file; None when none of them sets it."""
    if flag is not None:
        return flag
    raw = env.get(ENV_PREFIX + name.upper())
    if raw is not None and raw.strip() != "":
        return raw
    return toml.get(name)


def _stores_setting(flag: list[str] | None, env: Mapping[str, str],
                    toml: Mapping[str, Any]) -> list[Path]:
    if flag:
        return [_path(s) for s in flag]
    if env.get(ENV_PREFIX + "STORES", "").strip():
        return _env_stores(env[ENV_PREFIX + "STORES"])
    if "stores" in toml:
        return _file_stores(toml["stores"])
    return []


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str]) -> StatusSettings:
    """Flags > ``QWEN_REFRESHER_*`` environment > TOML file > defaults, as the daemon does.

    Only the settings that decide what to look at are read; the rest of the file is the
    daemon's business (it validates them at start-up).
    """
    config_flag = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG") or None
    config = Path(config_flag).expanduser() if config_flag else paths.default_config_file(env)
    toml = _load_toml(config, explicit=config_flag is not None)
    state_dir = _pick("state_dir", getattr(args, "state_dir", None), env, toml)
    discover = _pick("discover", None, env, toml)
    qwen_code = _pick("qwen_code", None, env, toml)
    margin = _pick("margin", None, env, toml)
    try:
        margin_s = DEFAULT_MARGIN if margin is None else parse_duration(margin)
    except ValueError as exc:
        raise SettingsError(f"invalid setting margin ({ENV_PREFIX}MARGIN): {exc}") from None
    return StatusSettings(
        _path(state_dir) if state_dir is not None else paths.default_state_dir(env),
        _stores_setting(getattr(args, "store", None), env, toml),
        discover=True if discover is None else _parse_bool("discover", discover),
        qwen_code=True if qwen_code is None else _parse_bool("qwen_code", qwen_code),
        margin=margin_s,
    )


def managed_stores(settings: StatusSettings, env: Mapping[str, str]) -> list[Path]:
    """The store files a daemon with these settings would manage, without duplicates.

    Duplicates by the daemon's rule (``paths.unique_files``): one file under two names is
    one row, under the first spelling, as the daemon manages it.
    """
    candidates: list[Path] = list(settings.stores)
    if settings.discover:
        candidates += paths.discover_openclaw_stores(env)
    qwen_file = paths.qwen_code_creds(env)
    if settings.qwen_code and os.path.lexists(qwen_file):
        candidates.append(qwen_file)
    return paths.unique_files(candidates)


# -- what the daemon published ----------------------------------------------------------------


class StateFileProblem(Exception):
    """A file in our state dir is not what the daemon writes there (a FIFO, a directory, a
    symlink, a huge or garbled file). status names it and carries on without it: a health
    check must answer, not hang on an ``open`` or read a gigabyte."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "problem": self.problem}


#: A published state is a few hundred bytes per profile; anything this big is not ours.
MAX_STATE_BYTES = 8 * 1024 * 1024
_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def open_state_file(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor on a regular file of our state dir, or ``StateFileProblem``.

    ``O_NONBLOCK`` so that a FIFO cannot block the ``open``, ``O_NOFOLLOW`` because the daemon
    never puts a symlink here (one to ``/dev/zero`` would read forever), and the type checked
    on the open descriptor (``fstat``), so nothing can be swapped in between. A missing file
    raises ``FileNotFoundError``: that is the normal "no daemon ever ran" case. (Stdlib only, on
    purpose: ``fileio``'s readers pull ``dataclasses`` and cost every health check ~15 ms.)
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileProblem(path, "is a symlink, which the daemon never creates here; "
                                         "not read") from None
        raise StateFileProblem(path, f"cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a file")
        raise StateFileProblem(path, f"is {kind}, not a regular file; not read")
    return fd, st


def read_state_file(path: Path, cap: int = MAX_STATE_BYTES) -> tuple[bytes, float]:
    """The whole of a regular state-dir file and its mtime, at most ``cap`` bytes read."""
    fd, st = open_state_file(path)
    try:
        if st.st_size > cap:
            raise StateFileProblem(path, f"is {st.st_size} bytes, more than the {cap} bytes a "
                                         "state file can be; not read")
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:  # it grew while we read
            raise StateFileProblem(path, f"is more than {cap} bytes; not read")
        return b"".join(chunks), st.st_mtime
    finally:
        os.close(fd)


def daemon_pid(state_dir: Path, problems: list[StateFileProblem] | None = None) -> int | None:
    """The running daemon's pid (-1 if unreadable), or None: ``state.daemon_pid``, restated.

    An flock cannot outlive its process, unlike a pid file, so this cannot be fooled by a
    daemon killed with -9. A lock path that is not a regular file is added to ``problems``:
    no daemon can be holding it.
    """
    try:
        fd, _ = open_state_file(state_dir / DAEMON_LOCK)
    except FileNotFoundError:
        return None
    except StateFileProblem as exc:
        if problems is not None:
            problems.append(exc)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.read(fd, 32).decode(errors="replace").strip()
            return int(raw) if raw.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_published(state_dir: Path, problems: list[StateFileProblem] | None = None,
                   ) -> tuple[PublishedState | None, float]:
    """The daemon's last published state and when it was written (its mtime), or (None, 0).

    A state file we cannot use is added to ``problems`` (named, with what is wrong)."""
    path = state_dir / STATE_FILE
    try:
        data, mtime = read_state_file(path)
    except FileNotFoundError:
        return None, 0.0
    except StateFileProblem as exc:
        data, mtime = b"", 0.0
        if problems is not None:
            problems.append(exc)
    if not data:
        return None, 0.0
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        if problems is not None:
            problems.append(StateFileProblem(path, "is not valid JSON (a JSON object); not read"))
        return None, 0.0
    if doc.get("schema_version") != SCHEMA_VERSION:
        return None, 0.0
    return doc, mtime  # type: ignore[return-value]


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _coerce(raw: object) -> ProfileStatus | None:
    """One published profile entry with the types we print; None if it is not one.

    The state file is ours, but a health check must not crash on a half-upgraded daemon.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("store"), str) or \
            not isinstance(raw.get("profile"), str):
        return None
    state = raw.get("state")
    attempts = raw.get("attempts")
    row: ProfileStatus = {
        "store": raw["store"], "store_kind": _text(raw.get("store_kind")) or "openclaw",
        "agent": _text(raw.get("agent")), "profile": raw["profile"],
        "family": _text(raw.get("family")),
        "state": state if state in SEVERITY else "invalid_store",
        "expires_at": _num(raw.get("expires_at")),
        "next_refresh_at": _num(raw.get("next_refresh_at")),
        "last_refresh_at": _num(raw.get("last_refresh_at")),
        "attempts": attempts if isinstance(attempts, int) else 0,
        "last_error": _text(raw.get("last_error")),
        "login_command": _text(raw.get("login_command")),
    }
    hook = _coerce_hook(raw.get("hook"))
    if hook is not None:
        row["hook"] = hook
    return row


def _coerce_hook(raw: object) -> HookStatus | None:
    """The last ``on_rotate`` result of a profile, if the daemon published one."""
    if not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool):
        return None
    code, failures = raw.get("returncode"), raw.get("failures")
    return {"ok": raw["ok"], "at": _num(raw.get("at")) or 0.0,
            "returncode": code if isinstance(code, int) and not isinstance(code, bool) else None,
            "timed_out": raw.get("timed_out") is True, "output": _text(raw.get("output")) or "",
            "failing_since": _num(raw.get("failing_since")),
            "failures": failures if isinstance(failures, int) else 0,
            "next_retry_at": _num(raw.get("next_retry_at"))}


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


def published_profiles(published: PublishedState) -> list[ProfileStatus]:
    raw = published.get("profiles")
    entries: list[Any] = raw if isinstance(raw, list) else []
    return [row for entry in entries if (row := _coerce(entry)) is not None]


def published_stores(published: PublishedState) -> list[StoreStatus]:
    raw = published.get("stores")
    entries: list[Any] = raw if isinstance(raw, list) else []
    return [{"path": e["path"], "kind": _text(e.get("kind")) or "openclaw",
             "error": _text(e.get("error"))}
            for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]


def _published_by(published: PublishedState, pid: int | None) -> bool:
    """The state file belongs to the daemon holding the lock, not to one that died before it."""
    daemon = published.get("daemon")
    if not isinstance(daemon, dict) or not isinstance(published.get("profiles"), list):
        return False
    return pid is None or pid <= 0 or daemon.get("pid") == pid


# -- reading stores ourselves -----------------------------------------------------------------


def _store_for(path: Path, kind: str | None) -> Store:
    """The adapter for a file: the kind the daemon recorded, else guessed from the name."""
    from .stores import STORE_KINDS, OpenClawStore, QwenCodeStore

    if kind is not None and kind in STORE_KINDS:
        return STORE_KINDS[kind](path)
    if path.name == paths.QWEN_CREDS_NAME:
        return QwenCodeStore(path)
    return OpenClawStore(path)


#: Tokens of the stores this run read: what ``_redacted`` masks in the output.
_SEEN_TOKENS: list[str] = []


def _read(store: Store) -> StoreSnapshot | StoreError:
    try:
        snapshot = store.read()
    except StoreError as exc:
        return exc
    for record in snapshot.records.values():
        if record.creds is not None:
            _SEEN_TOKENS.extend((record.creds.access, record.creds.refresh))
    return snapshot


def _redacted(output: str) -> str:
    """The output path: every token this run read, in any encoding, masked. The daemon scrubs
    ``state.json`` before writing it; this covers what we read from stores ourselves. The
    redactor (and pyahocorasick) is only imported when there is something to look for."""
    if not _SEEN_TOKENS:
        return output
    from .logsetup import REDACTOR

    REDACTOR.add(*_SEEN_TOKENS)
    return REDACTOR.scrub(output)


def _dumps(document: dict[str, Any]) -> str:
    """``--json``'s text: the top level indented by two, each row of a list on one line.

    ``json.dumps(indent=...)`` runs the pure-Python encoder (the C one serves only compact
    output), and at 2,000 profiles it was half of ``status --json``'s time. Rows are encoded
    compactly, by the C encoder, one per line: the same JSON, still readable and greppable
    row by row.
    """
    parts = []
    for key, value in document.items():
        if isinstance(value, list) and value:
            rows = ",\n    ".join(json.dumps(row) for row in value)
            text = f"[\n    {rows}\n  ]"
        else:
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


def _redacted_json(document: dict[str, Any]) -> str:
    """``--json``'s document, its strings scrubbed like ``_redacted`` does the text (string by
    string: a mask put in the serialized text could cut through its syntax)."""
    text = _dumps(document)
    if not _SEEN_TOKENS:
        return text
    from .logsetup import REDACTOR, redact_document

    REDACTOR.add(*_SEEN_TOKENS)
    if REDACTOR.scrub(text) == text:  # the usual case: one scan of the whole text
        return text
    return _dumps(redact_document(document))


def derive_state(expires_at: float, now: float, margin: float) -> ProfileState:
    """What the expiry alone says: past it, inside the refresh margin, or fine."""
    if expires_at <= now:
        return "expired"
    if expires_at - margin <= now:
        return "due"
    return "ok"


def _row(store: Store, profile: str, state: ProfileState, *, expires_at: float | None = None,
         error: str | None = None, login: str | None = None) -> ProfileStatus:
    return {
        "store": str(store.path), "store_kind": store.kind, "agent": store.agent,
        "profile": profile, "family": None, "state": state, "expires_at": expires_at,
        "next_refresh_at": None, "last_refresh_at": None, "attempts": 0, "last_error": error,
        "login_command": login,
    }


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


def collect_from_stores(files: Sequence[Path], now: float, margin: float,
                        previous: PublishedState | None,
                        ) -> tuple[list[ProfileStatus], list[StoreStatus]]:
    """Read every store ourselves: no daemon runs, or it has not published yet.

    Stores the last daemon knew about are included even if today's settings would not find
    them, and the kind it recorded for each file is believed over a guess from the name.
    """
    old_stores = published_stores(previous) if previous else []
    known = _index(published_profiles(previous)) if previous else {}
    kinds = {s["path"]: s["kind"] for s in old_stores}
    ordered = list(dict.fromkeys([*files, *(Path(s["path"]) for s in old_stores)]))
    profiles: list[ProfileStatus] = []
    statuses: list[StoreStatus] = []
    for path in ordered:
        store = _store_for(path, kinds.get(str(path)))
        read = _read(store)
        error = read.problem if isinstance(read, StoreError) else None
        statuses.append({"path": str(store.path), "kind": store.kind, "error": error})
        profiles += _rows_from_store(store, read, now, margin, known)
    return profiles, statuses


def _changed_since(store: str, published_at: float) -> bool:
    """The store was written after the daemon last published (or we cannot tell)."""
    try:
        return Path(store).stat().st_mtime >= published_at
    except OSError:
        return False


def _expire_if_past(row: ProfileStatus, now: float) -> None:
    """A token published as ok or due may have run out since (a stuck daemon, a suspended
    machine): say so, rather than repeat "ok" about an expired token."""
    if row["state"] in ("ok", "due") and row["expires_at"] is not None and \
            row["expires_at"] <= now:
        row["state"] = "expired"


def refresh_expiries(profiles: list[ProfileStatus], now: float, margin: float,
                     published_at: float) -> None:
    """Show the expiry a store holds now if it was written after the last publish, in case
    someone else rotated or logged in since.

    The daemon stays authoritative for what only it knows (refreshing, retrying, needs_login,
    unless a newer token has appeared); a store we cannot read right now, say a writer caught
    mid-write, changes nothing.
    """
    reads: dict[str, StoreSnapshot | StoreError | None] = {}
    for row in profiles:
        name = row["store"]
        if row["profile"] == WHOLE_STORE:
            continue
        _expire_if_past(row, now)
        if name not in reads:
            changed = _changed_since(name, published_at)
            reads[name] = _read(_store_for(Path(name), row["store_kind"])) if changed else None
        read = reads[name]
        record = None if read is None or isinstance(read, StoreError) else \
            read.records.get(row["profile"])
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

    __slots__ = ("daemon", "looked", "now", "pid", "problems", "profiles", "running", "source",
                 "state_dir", "stores")

    def __init__(self, now: float, state_dir: Path, pid: int | None, daemon: DaemonInfo | None,
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

    @property
    def exit_code(self) -> int:
        code = exit_code(self.profiles, self.running, self.stores, now=self.now)
        return EX_FAILURE if code == EX_OK and self.problems else code


def _broken_store_rows(stores: Sequence[StoreStatus],
                       profiles: Sequence[ProfileStatus]) -> list[ProfileStatus]:
    """A row for each unusable store the daemon reported without any profile in it, so that
    the table shows why the exit code says degraded."""
    shown = {p["store"] for p in profiles}
    return [{"store": s["path"], "store_kind": s["kind"], "agent": None,
             "profile": WHOLE_STORE, "family": None, "state": "invalid_store",
             "expires_at": None, "next_refresh_at": None, "last_refresh_at": None,
             "attempts": 0, "last_error": s["error"], "login_command": None}
            for s in stores if s["error"] and s["path"] not in shown]


def collect(settings: StatusSettings, env: Mapping[str, str], now: float) -> Report:
    """The daemon's published view while it runs, else our own reading of the stores."""
    problems: list[StateFileProblem] = []
    pid = daemon_pid(settings.state_dir, problems)
    published, published_at = read_published(settings.state_dir, problems)
    if pid is not None and published is not None and _published_by(published, pid):
        profiles = published_profiles(published)
        # The running daemon's margin decides what is "due", not the one these flags say.
        margin = published["daemon"].get("margin")
        margin = float(margin) if isinstance(margin, int | float) else settings.margin
        refresh_expiries(profiles, now, margin, published_at)
        stores = published_stores(published)
        profiles += _broken_store_rows(stores, profiles)
        daemon = published["daemon"]
        shown_pid = daemon.get("pid") if pid <= 0 else pid
        return Report(now, settings.state_dir, shown_pid if isinstance(shown_pid, int) else -1,
                      daemon, profiles, stores, "daemon", problems)
    profiles, statuses = collect_from_stores(managed_stores(settings, env), now, settings.margin,
                                             published)
    last = published["daemon"] if published is not None and pid is not None else None
    report = Report(now, settings.state_dir, pid, last, profiles, statuses, "stores", problems)
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


def where_we_looked(settings: StatusSettings, env: Mapping[str, str]) -> list[str]:
    """What a newcomer needs when nothing was found: where we searched and what to run next
    (as ``gh auth status`` says "To log in, run: gh auth login")."""
    lines = []
    if settings.discover:
        state = paths.openclaw_state_dir(env)
        there = "" if os.path.isdir(state) else " (does not exist)"
        lines.append(f"looked in OpenClaw's state dir {paths.shorten_home(state)}{there}: "
                     "agents/*/agent/auth-profiles.json (OPENCLAW_STATE_DIR moves it)")
    else:
        lines.append("discovery is off (discover = false): only the stores named by --store")
    for store in settings.stores:
        lines.append(f"looked at {paths.shorten_home(store)}")
    if settings.qwen_code:
        lines.append(f"looked at Qwen Code's {paths.shorten_home(paths.qwen_code_creds(env))}")
    openclaw = _on_path("openclaw", env)
    lines.append(f"openclaw on PATH: {openclaw}" if openclaw else
                 "openclaw is not on PATH: the gateway cannot be told after a rotation "
                 "(on_rotate = auto does nothing)")
    lines.append("to log in, run: qwen-refresher login")
    if not os.path.isdir(settings.state_dir):
        lines.append(f"the daemon has never run here (no {paths.shorten_home(settings.state_dir)}"
                     "); start it with: qwen-refresher run, or qwen-refresher install-service "
                     "--now")
    return lines


# -- verdicts ---------------------------------------------------------------------------------


def past_expiry(p: ProfileStatus, now: float | None) -> bool:
    """The token has run out, whatever the daemon says it is doing about it (refreshing,
    retrying): the agents cannot use it now."""
    return now is not None and p["expires_at"] is not None and p["expires_at"] <= now


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
        return printable(paths.shorten_home(p["store"]))
    if p["profile"] in ambiguous:
        return printable(f"{p['profile']} ({p['agent'] or paths.shorten_home(p['store'])})")
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
    counts = {s: sum(1 for p in profiles if p["state"] == s) for s in SEVERITY[2:]}
    words = [f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n]
    total = sum(counts.values())
    if named or not words:
        return words
    if len(words) == 1:
        state = next(s for s, n in counts.items() if n).replace("_", " ")
        return [f"{total} profile{'s' if total != 1 else ''} {state}"]
    return [f"{total} profiles: {words[0]}", *words[1:]]


def summary_line(profiles: list[ProfileStatus], now: float) -> str:
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


def families(profiles: Sequence[ProfileStatus]) -> dict[str, list[ProfileStatus]]:
    """Profiles that share one refresh token, which the daemon refreshes as one."""
    groups: dict[str, list[ProfileStatus]] = {}
    for p in profiles:
        if p["family"]:
            groups.setdefault(p["family"], []).append(p)
    return {k: v for k, v in groups.items() if len(v) > 1}


# -- rendering --------------------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with ``Z``, whole seconds."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _seconds(ts: float | None, now: float) -> float | None:
    return None if ts is None else round(ts - now, 3)


def _json_profile(p: ProfileStatus, now: float) -> dict[str, Any]:
    return {
        "store": p["store"],
        "store_kind": p["store_kind"],
        "agent": p["agent"],
        "profile": p["profile"] or None,
        "family": p["family"],
        "state": p["state"],
        "expires_at": iso(p["expires_at"]),
        "expires_in_seconds": _seconds(p["expires_at"], now),
        "next_refresh_at": iso(p["next_refresh_at"]),
        "next_refresh_in_seconds": _seconds(p["next_refresh_at"], now),
        "last_refresh_at": iso(p["last_refresh_at"]),
        "attempts": p["attempts"],
        "last_error": p["last_error"],
        "login_command": p["login_command"] if p["state"] in NEEDS_LOGIN_STATES else None,
        "hook": p.get("hook"),
    }


def _json_daemon(report: Report) -> dict[str, Any]:
    d: Mapping[str, Any] = report.daemon or {}
    started = _num(d.get("started_at"))
    return {
        "running": report.running,
        "pid": report.pid if report.pid and report.pid > 0 else None,
        "version": _text(d.get("version")),
        "started_at": iso(started),
        "uptime_seconds": round(report.now - started, 3) if started and report.running else None,
        "updated_at": iso(_num(d.get("updated_at"))),
        "state_dir": str(report.state_dir),
    }


def to_json(report: Report) -> dict[str, Any]:
    """The ``--json`` document, ``schema_version`` 1.

    Times are ISO 8601 UTC strings ending in ``Z`` (or null), durations are seconds (negative
    once past). Top level: ``generated_at``, ``exit_code``, ``summary``, ``source`` ("daemon"
    or "stores"), ``daemon`` {running, pid, version, started_at, uptime_seconds, updated_at,
    state_dir}, ``problems`` [{path, problem}] (files of the state dir that could not be
    used: not a regular file, too big, not JSON), ``profiles`` [{store (absolute path),
    store_kind, agent, profile (null for a whole unreadable file), family, state, expires_at,
    expires_in_seconds, next_refresh_at, next_refresh_in_seconds, last_refresh_at, attempts,
    last_error, login_command (only when a login helps)}], ``stores`` [{store, kind, error}],
    ``families`` [{id, members: [{store, profile}]}] (only families with more than one
    member). Fields may be added, never renamed or removed, without a new ``schema_version``.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": iso(report.now),
        "status_version": __version__,
        "exit_code": report.exit_code,
        "summary": summary_line(report.profiles, report.now),
        "source": report.source,
        "daemon": _json_daemon(report),
        "profiles": [_json_profile(p, report.now) for p in report.profiles],
        "stores": [{"store": s["path"], "kind": s["kind"], "error": s["error"]}
                   for s in report.stores],
        "families": [
            {"id": fam, "members": [{"store": p["store"], "profile": p["profile"]}
                                    for p in members]}
            for fam, members in families(report.profiles).items()
        ],
        "problems": [p.as_dict() for p in report.problems],
        "looked": report.looked,
    }


_COLOURS = {"ok": "32", "due": "36", "refreshing": "36", "retrying": "33",
            "invalid_store": "33", "needs_login": "31;1", "expired": "31;1"}
_HEADERS = ("STORE", "AGENT", "PROFILE", "STATE", "EXPIRES IN", "NEXT REFRESH", "LAST REFRESH",
            "LAST ERROR")
_STATE_COLUMN = 3
_ERROR_WIDTH = 60


def _one_line(text: str | None, width: int = _ERROR_WIDTH) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _until(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    delta = ts - now
    return f"expired {format_duration(-delta)} ago" if delta <= 0 else format_duration(delta)


def _next(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return "now" if ts <= now else f"in {format_duration(ts - now)}"


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{format_duration(max(0.0, now - ts))} ago"


def _cells(p: ProfileStatus, now: float) -> list[str]:
    """One table row; names and errors escaped (``printable``) before widths are measured."""
    return [printable(paths.shorten_home(p["store"])), printable(p["agent"] or "-"),
            printable(p["profile"] or "(whole file)"), p["state"], _until(p["expires_at"], now),
            _next(p["next_refresh_at"], now), _ago(p["last_refresh_at"], now),
            _one_line(printable(reload_failure(p, now) or p["last_error"] or ""))]


def _table(rows: list[list[str]], states: list[str], colour: bool) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if colour and n > 0:
            code = _COLOURS.get(states[n - 1], "0")
            cells[_STATE_COLUMN] = f"\033[{code}m{cells[_STATE_COLUMN]}\033[0m"
        lines.append("  ".join(cells).rstrip())
    return lines


def _daemon_line(report: Report) -> str:
    if not report.running:
        return (f"daemon: not running (state dir {paths.shorten_home(report.state_dir)}); "
                f"qwen-refresher {__version__}")
    d: Mapping[str, Any] = report.daemon or {}
    parts = [f"daemon: running, pid {report.pid if report.pid and report.pid > 0 else '?'}"]
    started = _num(d.get("started_at"))
    if started:
        parts.append(f"up {format_duration(max(0.0, report.now - started))}")
    parts.append(f"version {_text(d.get('version')) or '?'}")
    updated = _num(d.get("updated_at"))
    if updated:
        parts.append(f"state published {_ago(updated, report.now)}")
    return ", ".join(parts)


def to_text(report: Report, colour: bool) -> str:
    """Aligned rows for people, then families, login hints, a summary and the daemon.

    Names come from files we do not control: every line but the table (whose cells are
    escaped one by one, before the colour codes go in) passes through ``printable``, so no
    escape sequence, CR or undecodable byte in an id or a path reaches the terminal raw.
    """
    now = report.now
    table: list[str] = []
    if report.profiles:
        rows = [list(_HEADERS)] + [_cells(p, now) for p in report.profiles]
        table = _table(rows, [p["state"] for p in report.profiles], colour)
    lines: list[str] = []
    for fam, members in families(report.profiles).items():
        names = ", ".join(f"{p['profile']} ({paths.shorten_home(p['store'])})" for p in members)
        lines.append(f"family {fam[:8]}: {names} share one refresh token")
    for p in report.profiles:
        if p["state"] == "needs_login":
            login = shell_join(["qwen-refresher", "login", "--store", p["store"],
                                "--profile", p["profile"]])
            also = f" (or `{p['login_command']}`)" if p["login_command"] else ""
            lines.append(f"{p['profile']} in {paths.shorten_home(p['store'])} needs a new login: "
                         f"run `{login}`{also}")
    for p in report.profiles:
        if (failure := reload_failure(p, now)) is not None:
            lines.append(f"{p['profile']} in {paths.shorten_home(p['store'])}: on_rotate "
                         f"{failure}; the gateway keeps the old tokens until it succeeds")
    for problem in report.problems:
        lines.append(f"problem: {paths.shorten_home(problem.path)} {problem.problem}")
    lines += report.looked
    lines.append(f"summary: {summary_line(report.profiles, now)}")
    lines.append(_daemon_line(report))
    return "\n".join(table + [printable(line) for line in lines]) + "\n"


# -- command line ----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register ``status`` on the CLI's subparsers (an ``argparse._SubParsersAction``)."""
    parser = subparsers.add_parser(
        "status",
        help="show every managed profile and whether the daemon runs",
        description="Show each managed qwen-portal profile and the daemon. Exit code: 0 all "
                    "good, 1 degraded, 2 a profile needs a new login or is expired, "
                    "3 the daemon is not running (most severe wins).",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON document on stdout")
    output.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing; only the exit code")
    parser.add_argument("--no-color", action="store_true", help="never colour the output")
    parser.add_argument("--state-dir", default=None, help="the daemon's state dir")
    parser.add_argument("--store", action="append", default=None, metavar="PATH",
                        help="a store file to check (repeatable)")
    parser.add_argument("--config", default=None, metavar="FILE", help="TOML config file")
    parser.set_defaults(handler=run)


def _want_colour(args: argparse.Namespace, stream: TextIO, env: Mapping[str, str]) -> bool:
    if getattr(args, "no_color", False) or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    return stream.isatty()


def run(args: argparse.Namespace) -> int:
    """Print the status as asked and return the exit code (see the module docstring)."""
    env = os.environ
    quiet = bool(getattr(args, "quiet", False))
    try:
        settings = resolve_settings(args, env)
    except SettingsError as exc:
        if not quiet:
            print(printable(f"qwen-refresher status: {exc}"), file=sys.stderr)
        return EX_CONFIG
    report = collect(settings, env, time.time())
    if quiet:
        return report.exit_code
    if getattr(args, "json", False):
        sys.stdout.write(_redacted_json(to_json(report)) + "\n")
    else:
        sys.stdout.write(_redacted(to_text(report, _want_colour(args, sys.stdout, env))))
    sys.stdout.flush()
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``status`` on its own (``python -m qwen_refresher.status``); the CLI is ``cli.main``."""
    parser = argparse.ArgumentParser(prog="qwen-refresher")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["status", *(argv if argv is not None else sys.argv[1:])])
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
