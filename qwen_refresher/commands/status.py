"""``qwen-refresher status``: parse the command line, render what ``status.collect`` gathered.

Exit codes (``report``), most severe first: 2 a profile needs a new login or its token is past
its expiry; 3 the daemon is not running; 1 any other degradation; 0 good.

Rendering is on the health-check path too: ``--json`` rows are encoded by the C encoder one per
line (``_dumps``), and the redactor is imported only when this run read a token from a store.
Names come from files we do not control, so every line goes through ``escape.printable``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .. import __version__
from ..durations import format_duration
from ..escape import printable, shell_join
from ..report import EX_CONFIG, NEEDS_LOGIN_STATES, reload_failure, shorten_home, summary_line
from ..settings_core import settings_error
from ..status import (
    SCHEMA_VERSION,
    Report,
    as_number,
    as_text,
    collect,
    families,
    resolve_settings,
    seen_tokens,
)

TYPE_CHECKING = False  # ``typing`` costs ~3 ms per run; mypy treats this as True
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, TextIO

    from ..state import ProfileStatus


#: minute number -> "YYYY-MM-DDTHH:MM:": ``strftime`` once per minute seen, the seconds from a
#: table. ``--json`` formats three times per row, and ``strftime(gmtime())`` for each was most
#: of the document's cost at 1,000 profiles.
_MINUTES: dict[int, str] = {}
_SECONDS = tuple(f"{n:02d}Z" for n in range(60))


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with ``Z``, whole seconds (``time.strftime``'s, held equal by a test)."""
    if ts is None:
        return None
    minute, second = divmod(int(ts), 60)
    prefix = _MINUTES.get(minute)
    if prefix is None:
        prefix = _MINUTES[minute] = time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))
    return prefix + _SECONDS[second]


def _json_profile(p: ProfileStatus, now: float) -> dict[str, Any]:
    """One ``--json`` row; the arithmetic inline (no call per field: 1,000 rows per run)."""
    expires, upcoming = p["expires_at"], p["next_refresh_at"]
    return {
        "store": p["store"],
        "store_kind": p["store_kind"],
        "agent": p["agent"],
        "profile": p["profile"] or None,
        "family": p["family"],
        "state": p["state"],
        "expires_at": iso(expires),
        "expires_in_seconds": None if expires is None else round(expires - now, 3),
        "next_refresh_at": iso(upcoming),
        "next_refresh_in_seconds": None if upcoming is None else round(upcoming - now, 3),
        "last_refresh_at": iso(p["last_refresh_at"]),
        "attempts": p["attempts"],
        "last_error": p["last_error"],
        "login_command": p["login_command"] if p["state"] in NEEDS_LOGIN_STATES else None,
        "hook": p.get("hook"),
    }


#: The C string escaper ``json.dumps`` itself uses (ASCII output, as ``ensure_ascii``).
_ENCODE = json.encoder.encode_basestring_ascii


def _json_daemon(report: Report) -> dict[str, Any]:
    d: Mapping[str, Any] = report.daemon or {}
    started = as_number(d.get("started_at"))
    return {
        "running": report.running,
        "pid": report.pid if report.pid and report.pid > 0 else None,
        "version": as_text(d.get("version")),
        "started_at": iso(started),
        "uptime_seconds": round(report.now - started, 3) if started and report.running else None,
        "updated_at": iso(as_number(d.get("updated_at"))),
        "state_dir": str(report.state_dir),
    }


class Encoded(list[str]):
    """Rows already encoded as JSON text (``_json_row``): ``_dumps`` writes them as they are."""


def _json_row(p: ProfileStatus, now: float) -> str:
    """``json.dumps(_json_profile(p, now))``, written directly: no dict per row and no encoder
    pass over it. At 1,000 profiles building the dicts and encoding them was a third of
    ``status --json``; this is one f-string per row around the C string escaper
    (``json.encoder.encode_basestring_ascii``, what ``json.dumps`` uses). The fields come out
    of ``status._coerce`` with their types checked, so each is a str, a finite number or None
    as written here; ``tests/test_status.py`` holds the text to ``json.dumps``'s.
    """
    enc = _ENCODE
    expires, upcoming, last = p["expires_at"], p["next_refresh_at"], p["last_refresh_at"]
    agent, profile, family = p["agent"], p["profile"], p["family"]
    error, hook = p["last_error"], p.get("hook")
    login = p["login_command"] if p["state"] in NEEDS_LOGIN_STATES else None
    if expires is None:
        expires_at = expires_in = "null"
    else:
        expires_at, expires_in = f'"{iso(expires)}"', repr(round(expires - now, 3))
    if upcoming is None:
        next_at = next_in = "null"
    else:
        next_at, next_in = f'"{iso(upcoming)}"', repr(round(upcoming - now, 3))
    return (
        f'{{"store": {enc(p["store"])}, "store_kind": {enc(p["store_kind"])}, '
        f'"agent": {"null" if agent is None else enc(agent)}, '
        f'"profile": {enc(profile) if profile else "null"}, '
        f'"family": {"null" if family is None else enc(family)}, '
        f'"state": {enc(p["state"])}, '
        f'"expires_at": {expires_at}, "expires_in_seconds": {expires_in}, '
        f'"next_refresh_at": {next_at}, "next_refresh_in_seconds": {next_in}, '
        f'"last_refresh_at": {"null" if last is None else chr(34) + str(iso(last)) + chr(34)}, '
        f'"attempts": {p["attempts"]!r}, '
        f'"last_error": {"null" if error is None else enc(error)}, '
        f'"login_command": {"null" if login is None else enc(login)}, '
        f'"hook": {"null" if hook is None else json.dumps(hook)}}}'
    )


def to_json(report: Report, *, encoded: bool = False) -> dict[str, Any]:
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
        "profiles": Encoded(_json_row(p, report.now) for p in report.profiles) if encoded
        else [_json_profile(p, report.now) for p in report.profiles],
        "stores": [{"store": s["path"], "kind": s["kind"], "error": s["error"]}
                   for s in report.stores],
        "families": [
            {"id": fam, "members": [{"store": p["store"], "profile": p["profile"]}
                                    for p in members]}
            for fam, members in families(report.profiles).items()
        ],
        "problems": [p.as_dict() for p in report.problems],
        "fleet": {"lines": report.fleet_lines, "exit_code": report.fleet_code}
        if report.fleet_lines else None,
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


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{format_duration(max(0.0, now - ts))} ago"


def _cells(p: ProfileStatus, now: float, home: str) -> list[str]:
    """One table row; names and errors escaped (``printable``) before widths are measured.
    ``home`` is ``$HOME`` + "/", looked up once per run (``paths.shorten_home`` per row reads
    the environment each time: 1,000 lookups at 1,000 profiles)."""
    store = p["store"]
    if home and store.startswith(home):
        store = "~" + store[len(home) - 1:]
    error = p["last_error"] if "hook" not in p else reload_failure(p, now) or p["last_error"]
    expires, upcoming, last = p["expires_at"], p["next_refresh_at"], p["last_refresh_at"]
    # _until/_next/_ago inline: three calls fewer per row, 1,000 rows per health check.
    agent, profile = p["agent"] or "-", p["profile"] or "(whole file)"
    return [store if store.isprintable() else printable(store),
            agent if agent.isprintable() else printable(agent),
            profile if profile.isprintable() else printable(profile), p["state"],
            "-" if expires is None else format_duration(expires - now) if expires > now
            else f"expired {format_duration(now - expires)} ago",
            "-" if upcoming is None else f"in {format_duration(upcoming - now)}"
            if upcoming > now else "now",
            "-" if last is None else f"{format_duration(max(0.0, now - last))} ago",
            _one_line(printable(error)) if error else "-"]


def _table(rows: list[list[str]], states: list[str], colour: bool) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; the state coloured on a tty."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    if not colour:
        return ["  ".join(map(str.ljust, row, widths)).rstrip() for row in rows]
    lines = []
    for n, row in enumerate(rows):
        cells = list(map(str.ljust, row, widths))
        if n > 0:
            code = _COLOURS.get(states[n - 1], "0")
            cells[_STATE_COLUMN] = f"\033[{code}m{cells[_STATE_COLUMN]}\033[0m"
        lines.append("  ".join(cells).rstrip())
    return lines


def _daemon_line(report: Report) -> str:
    if not report.running:
        return (f"daemon: not running (state dir {shorten_home(report.state_dir)}); "
                f"qwen-refresher {__version__}")
    d: Mapping[str, Any] = report.daemon or {}
    parts = [f"daemon: running, pid {report.pid if report.pid and report.pid > 0 else '?'}"]
    started = as_number(d.get("started_at"))
    if started:
        parts.append(f"up {format_duration(max(0.0, report.now - started))}")
    parts.append(f"version {as_text(d.get('version')) or '?'}")
    updated = as_number(d.get("updated_at"))
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
        home = os.environ.get("HOME", "").rstrip("/")
        home = home + "/" if home else ""
        rows = [list(_HEADERS)] + [_cells(p, now, home) for p in report.profiles]
        table = _table(rows, [p["state"] for p in report.profiles], colour)
    lines: list[str] = []
    for fam, members in families(report.profiles).items():
        names = ", ".join(f"{p['profile']} ({shorten_home(p['store'])})" for p in members)
        lines.append(f"family {fam[:8]}: {names} share one refresh token")
    for p in report.profiles:
        if p["state"] == "needs_login":
            login = shell_join(["qwen-refresher", "login", "--store", p["store"],
                                "--profile", p["profile"]])
            also = f" (or `{p['login_command']}`)" if p["login_command"] else ""
            lines.append(f"{p['profile']} in {shorten_home(p['store'])} needs a new login: "
                         f"run `{login}`{also}")
    for p in report.profiles:
        if (failure := reload_failure(p, now)) is not None:
            lines.append(f"{p['profile']} in {shorten_home(p['store'])}: on_rotate "
                         f"{failure}; the gateway keeps the old tokens until it succeeds")
    for problem in report.problems:
        lines.append(f"problem: {shorten_home(problem.path)} {problem.problem}")
    lines += report.looked
    lines += report.fleet_lines
    lines.append(f"summary: {summary_line(report.profiles, now)}")
    lines.append(_daemon_line(report))
    return "\n".join(table + [printable(line) for line in lines]) + "\n"


def _redacted(output: str) -> str:
    """The output path: every token this run read, in any encoding, masked. The daemon scrubs
    ``state.json`` before writing it; this covers what we read from stores ourselves. The
    redactor is only imported when there is something to look for."""
    tokens = seen_tokens()
    if not tokens:
        return output
    from ..logsetup import REDACTOR

    REDACTOR.add(*tokens)
    return REDACTOR.scrub(output)


def _row_encoder() -> Callable[[object], str]:
    """``json.dumps`` for many small documents: one C encoder built once and reused.

    ``json.dumps(row)`` builds a new encoder on every call, about a third of the cost of a
    row; at 1,000 rows per health check that is worth the stdlib's own constructor
    (``json.encoder.c_make_encoder``, what ``JSONEncoder.iterencode`` calls, with
    ``json.dumps``'s defaults). Where the C accelerator is missing, ``json.dumps`` itself.
    ``tests/test_status.py`` holds the two to the same text.
    """
    from json import encoder

    make = getattr(encoder, "c_make_encoder", None)  # typeshed does not list it
    if make is None:  # pragma: no cover - CPython always has it
        return json.dumps
    encode = make(None, encoder.JSONEncoder().default, encoder.encode_basestring_ascii, None,
                  ": ", ", ", False, False, True)
    return lambda row: "".join(encode(row, 0))


def _dumps(document: dict[str, Any]) -> str:
    """``--json``'s text: the top level indented by two, each row of a list on one line.

    ``json.dumps(indent=...)`` runs the pure-Python encoder (the C one serves only compact
    output), and at 2,000 profiles it was half of ``status --json``'s time. Rows are encoded
    compactly, by the C encoder, one per line: the same JSON, still readable and greppable
    row by row.
    """
    parts = []
    dumps_row = _row_encoder()
    for key, value in document.items():
        if isinstance(value, Encoded) and value:
            text = "[\n    " + ",\n    ".join(value) + "\n  ]"
        elif isinstance(value, list) and value:
            rows = ",\n    ".join(map(dumps_row, value))
            text = f"[\n    {rows}\n  ]"
        else:
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


def _redacted_json(report: Report) -> str:
    """``--json``'s document, its strings scrubbed like ``_redacted`` does the text (string by
    string: a mask put in the serialized text could cut through its syntax)."""
    text = _dumps(to_json(report, encoded=True))
    tokens = seen_tokens()
    if not tokens:
        return text
    from ..logsetup import REDACTOR, redact_document

    REDACTOR.add(*tokens)
    if REDACTOR.scrub(text) == text:  # the usual case: one scan of the whole text
        return text
    return _dumps(redact_document(to_json(report)))


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


class SimpleArgs:
    """What ``add_parser``'s parser gives ``run``, built by ``parse_simple`` without argparse."""

    __slots__ = ("command", "config", "handler", "json", "no_color", "quiet", "state_dir",
                 "store")

    def __init__(self) -> None:
        self.command = "status"
        self.json = False
        self.quiet = False
        self.no_color = False
        self.state_dir: str | None = None
        self.store: list[str] | None = None
        self.config: str | None = None
        self.handler = run

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


_SWITCHES = {"--json": "json", "--quiet": "quiet", "-q": "quiet", "--no-color": "no_color"}
_VALUES = {"--state-dir": "state_dir", "--store": "store", "--config": "config"}


def parse_simple(argv: Sequence[str]) -> SimpleArgs | None:
    """``status``'s own arguments parsed the way ``add_parser``'s parser would, for the plain
    forms only (whole option names, each value a separate or ``=`` word not starting with
    ``-``, ``--json`` and ``--quiet`` not together); None means "let argparse do it"."""
    args = SimpleArgs()
    words = list(argv)
    while words:
        word = words.pop(0)
        if word in _SWITCHES:
            setattr(args, _SWITCHES[word], True)
            continue
        name, eq, value = word.partition("=")
        if name not in _VALUES:
            return None
        if not eq:
            if not words or words[0].startswith("-"):
                return None
            value = words.pop(0)
        if value.startswith("-"):
            return None
        if name == "--store":
            args.store = [*(args.store or []), value]
        else:
            setattr(args, _VALUES[name], value)
    if args.json and args.quiet:
        return None  # argparse names the conflict
    return args


def _want_colour(args: argparse.Namespace | SimpleArgs, stream: TextIO,
                 env: Mapping[str, str]) -> bool:
    if getattr(args, "no_color", False) or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    return stream.isatty()


def run(args: argparse.Namespace | SimpleArgs) -> int:
    """Print the status as asked and return the exit code (see the module docstring)."""
    env = os.environ
    quiet = bool(getattr(args, "quiet", False))
    try:
        settings = resolve_settings(args, env)
    except settings_error() as exc:
        if not quiet:
            print(printable(f"qwen-refresher status: {exc}"), file=sys.stderr)
        return EX_CONFIG
    report = collect(settings, env, time.time())
    if quiet:
        return report.exit_code
    if getattr(args, "json", False):
        sys.stdout.write(_redacted_json(report) + "\n")
    else:
        sys.stdout.write(_redacted(to_text(report, _want_colour(args, sys.stdout, env))))
    sys.stdout.flush()
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``status`` on its own (``python -m qwen_refresher.status``); the CLI is ``cli.main``."""
    import argparse

    parser = argparse.ArgumentParser(prog="qwen-refresher")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["status", *(argv if argv is not None else sys.argv[1:])])
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
