"""The bad-input corpus: hostile or broken stores and configurations, and what the daemon must
say about each. ``docs/bad-input.md`` is generated from these lists::

    .venv/bin/python -m tests.reliability.corpus     # rewrite docs/bad-input.md

and ``test_bad_input.py::test_the_docs_table_matches_the_cases`` fails when they disagree.

A store case builds one ``auth-profiles.json`` (or Qwen Code's ``oauth_creds.json``) that the
daemon must refuse with ``expect`` in its ``store_invalid`` error or ``profile_invalid``
problem, leaving the file byte-identical, while a healthy profile beside it is served. A config
case is one ``qwen-refresher run`` that must exit 78 with one line on stderr naming ``setting``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "bad-input.md"

Tokens = Callable[[], tuple[str, str, int]]
"""A fresh (access, refresh, expires_ms) from the fake, so leaks of bad files' tokens show."""


@dataclass(frozen=True)
class StoreCase:
    name: str
    what: str
    expect: str
    event: str  # "store_invalid" or "profile_invalid"
    build: Callable[[Path, Tokens, Path], None]  # (store path, tokens, a dir outside agents)
    #: Run alone (its own daemon): the case used to take the whole daemon down.
    isolated: bool = False
    #: Needs a daemon bound by file permissions (root without its override reads nothing here).
    needs_permission_checks: bool = False
    kind: str = "openclaw"
    bug: str | None = None  # set while the daemon gets this case wrong (xfail, strict)


@dataclass(frozen=True)
class ConfigCase:
    name: str
    what: str
    setting: str
    expect: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    toml: bytes | None = None
    bug: str | None = None


# -- store builders -----------------------------------------------------------------------------


def _profile(tokens: Tokens, **changes: Any) -> dict[str, Any]:
    access, refresh, expires = tokens()
    entry: dict[str, Any] = {"type": "oauth", "provider": "qwen-portal", "access": access,
                             "refresh": refresh, "expires": expires}
    for key, value in changes.items():
        if value is _DROP:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


_DROP = object()


def _store(profile: Any) -> dict[str, Any]:
    return {"version": 1, "profiles": {
        "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-ant-x"},
        "qwen-portal:default": profile}}


def _dump(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def _write(data: bytes) -> Callable[[Path, Tokens, Path], None]:
    def build(path: Path, tokens: Tokens, outside: Path) -> None:
        path.write_bytes(data)

    return build


def _doc(make: Callable[[Tokens], Any]) -> Callable[[Path, Tokens, Path], None]:
    def build(path: Path, tokens: Tokens, outside: Path) -> None:
        path.write_bytes(_dump(make(tokens)))

    return build


def _raw(make: Callable[[Tokens], bytes]) -> Callable[[Path, Tokens, Path], None]:
    def build(path: Path, tokens: Tokens, outside: Path) -> None:
        path.write_bytes(make(tokens))

    return build


def _valid(tokens: Tokens) -> bytes:
    return _dump(_store(_profile(tokens)))


def _symlink_outside(path: Path, tokens: Tokens, outside: Path) -> None:
    target = outside / f"{path.parent.parent.name}.json"
    target.write_bytes(_valid(tokens))
    os.symlink(target, path)


def _symlink_device(path: Path, tokens: Tokens, outside: Path) -> None:
    os.symlink("/dev/zero", path)


def _symlink_loop(path: Path, tokens: Tokens, outside: Path) -> None:
    os.symlink(path.name, path)


def _fifo(path: Path, tokens: Tokens, outside: Path) -> None:
    os.mkfifo(path, 0o600)


def _directory(path: Path, tokens: Tokens, outside: Path) -> None:
    path.mkdir(mode=0o700)
    (path / "inside.json").write_bytes(_valid(tokens))


def _unreadable(path: Path, tokens: Tokens, outside: Path) -> None:
    path.write_bytes(_valid(tokens))
    path.chmod(0)


def _big(path: Path, tokens: Tokens, outside: Path) -> None:
    head = _valid(tokens)[:-2] + b', "padding": "'
    with path.open("wb") as fh:
        fh.write(head)
        chunk = b"x" * (1 << 20)
        for _ in range(50):
            fh.write(chunk)
        fh.write(b'"}\n')


def _qwen_doc(tokens: Tokens, **changes: Any) -> dict[str, Any]:
    access, refresh, expires = tokens()
    doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                           "refresh_token": refresh, "resource_url": "portal.qwen.ai",
                           "expiry_date": expires}
    doc.update(changes)
    return doc


def _utf16(tokens: Tokens) -> bytes:
    return _valid(tokens).decode().encode("utf-16")


def _latin1(tokens: Tokens) -> bytes:
    profile = _profile(tokens)
    profile["email"] = "ren\u00e9@example.com"
    return _dump(_store(profile)).decode().encode("latin-1")


def _duplicate_refresh(tokens: Tokens) -> bytes:
    access, refresh, expires = tokens()
    _, other, _ = tokens()
    return ('{"version": 1, "profiles": {"qwen-portal:default": {"type": "oauth", '
            f'"provider": "qwen-portal", "access": "{access}", "refresh": "{refresh}", '
            f'"refresh": "{other}", "expires": {expires}}}}}}}\n').encode()


def _duplicate_profile(tokens: Tokens) -> bytes:
    one = json.dumps(_profile(tokens))
    two = json.dumps(_profile(tokens))
    return ('{"version": 1, "profiles": {"qwen-portal:default": ' + one
            + ', "qwen-portal:default": ' + two + "}}\n").encode()


def _deep(tokens: Tokens) -> bytes:
    depth = 100_000
    return (b'{"version": 1, "profiles": {}, "x": ' + b"[" * depth + b"]" * depth + b"}\n")


def _truncated(tokens: Tokens) -> bytes:
    data = _valid(tokens)
    return data[: len(data) * 2 // 3]


def _huge_number(tokens: Tokens) -> bytes:
    return _valid(tokens).replace(b'"version": 1', b'"version": ' + b"9" * 5000)


def _nan_elsewhere(tokens: Tokens) -> bytes:
    doc = _store(_profile(tokens))
    doc["usageStats"] = {"qwen-portal:default": {"lastUsed": "NAN_HERE"}}
    return _dump(doc).replace(b'"NAN_HERE"', b"NaN")


def _surrogate(tokens: Tokens) -> bytes:
    access, refresh, expires = tokens()
    return _dump(_store(_profile(lambda: (access, "\\ud800" + refresh, expires)))) \
        .replace(b"\\\\ud800", b"\\ud800")


def _bom(tokens: Tokens) -> bytes:
    return b"\xef\xbb\xbf" + _valid(tokens)


def _nul(tokens: Tokens) -> bytes:
    data = _valid(tokens)
    return data[:40] + b"\x00" * 16 + data[40:]


def _comments(tokens: Tokens) -> bytes:
    return b"// written by hand\n" + _valid(tokens)


def _single_quotes(tokens: Tokens) -> bytes:
    return _valid(tokens).replace(b'"', b"'")


def _trailing(tokens: Tokens) -> bytes:
    return _valid(tokens) + b"}\n"


def _huge_token(tokens: Tokens) -> Any:
    return _store(_profile(tokens, refresh="fakeref-" + "R" * (1 << 20)))


STORE_CASES: list[StoreCase] = [
    StoreCase("empty", "empty file (0 bytes)", "is empty", "store_invalid", _write(b"")),
    StoreCase("whitespace", "only whitespace", "is empty", "store_invalid", _write(b" \n\t\n")),
    StoreCase("truncated", "truncated JSON (a write cut short)", "is not valid JSON",
              "store_invalid", _raw(_truncated)),
    StoreCase("bom", "UTF-8 byte-order mark before the JSON", "byte-order mark",
              "store_invalid", _raw(_bom)),
    StoreCase("nul", "NUL bytes inside", "contains NUL bytes", "store_invalid", _raw(_nul)),
    StoreCase("utf16", "saved as UTF-16", "contains NUL bytes", "store_invalid", _raw(_utf16)),
    StoreCase("latin1", "not UTF-8 (Latin-1 é)", "is not valid UTF-8", "store_invalid",
              _raw(_latin1)),
    StoreCase("big", "50 MB file", "larger than the 4194304-byte limit", "store_invalid", _big),
    StoreCase("deep", "100 000 levels of nesting", "nests deeper than 64 levels",
              "store_invalid", _raw(_deep)),
    StoreCase("comments", "JSON with a // comment", "is not valid JSON", "store_invalid",
              _raw(_comments)),
    StoreCase("single-quotes", "single-quoted strings", "is not valid JSON", "store_invalid",
              _raw(_single_quotes)),
    StoreCase("trailing", "a second closing brace after the document", "is not valid JSON",
              "store_invalid", _raw(_trailing)),
    StoreCase("duplicate-key", "the key \"refresh\" twice in one profile",
              "has the key 'refresh' twice", "store_invalid", _raw(_duplicate_refresh)),
    StoreCase("duplicate-profile", "the profile id twice in \"profiles\"",
              "has the key 'qwen-portal:default' twice", "store_invalid",
              _raw(_duplicate_profile)),
    StoreCase("top-list", "a JSON array at the top", "holds a JSON list, not an object",
              "store_invalid", _doc(lambda t: [_store(_profile(t))])),
    StoreCase("top-null", "JSON null", "not an object", "store_invalid", _write(b"null\n")),
    StoreCase("profiles-list", "\"profiles\" is an array", "\"profiles\" is a list",
              "store_invalid", _doc(lambda t: {"version": 1, "profiles": [_profile(t)]})),
    StoreCase("profile-string", "the qwen profile is a string",
              "is a str, expected an object", "profile_invalid",
              _doc(lambda t: _store("qwen-portal"))),
    StoreCase("refresh-missing", "no \"refresh\"", "refresh is missing", "profile_invalid",
              _doc(lambda t: _store(_profile(t, refresh=_DROP)))),
    StoreCase("refresh-empty", "\"refresh\": \"\"", "refresh is empty", "profile_invalid",
              _doc(lambda t: _store(_profile(t, refresh="")))),
    StoreCase("refresh-number", "\"refresh\" is a number", "refresh is a int",
              "profile_invalid", _doc(lambda t: _store(_profile(t, refresh=12345)))),
    StoreCase("access-number", "\"access\" is a number", "access is a int, expected a string",
              "profile_invalid", _doc(lambda t: _store(_profile(t, access=12345)))),
    StoreCase("expires-seconds", "\"expires\" in seconds", "looks like seconds",
              "profile_invalid", _doc(lambda t: _store(_profile(t, expires=1772812345)))),
    StoreCase("expires-negative", "\"expires\" negative", "expires is negative",
              "profile_invalid", _doc(lambda t: _store(_profile(t, expires=-1)))),
    StoreCase("expires-string", "\"expires\" as a string of digits",
              "expires is a str, expected milliseconds", "profile_invalid",
              _doc(lambda t: _store(_profile(t, expires="1772812345678")))),
    StoreCase("expires-missing", "no \"expires\"", "expires is missing", "profile_invalid",
              _doc(lambda t: _store(_profile(t, expires=_DROP)))),
    StoreCase("expires-bool", "\"expires\": true", "expires is a bool", "profile_invalid",
              _doc(lambda t: _store(_profile(t, expires=True)))),
    StoreCase("expires-far", "\"expires\" in the year 3000",
              "too far in the future", "profile_invalid",
              _doc(lambda t: _store(_profile(t, expires=32503680000000)))),
    StoreCase("expires-infinite", "\"expires\": 1e400 (infinity)",
              "expires is not a finite number", "profile_invalid",
              _raw(lambda t: _dump(_store(_profile(t, expires="INF_HERE")))
                   .replace(b'"INF_HERE"', b"1e400"))),
    StoreCase("symlink-outside", "symlink to a store outside the agent dir",
              "outside", "store_invalid", _symlink_outside),
    StoreCase("symlink-device", "symlink to /dev/zero", "outside", "store_invalid",
              _symlink_device),
    StoreCase("fifo", "a FIFO", "is not a regular file", "store_invalid", _fifo),
    StoreCase("directory", "a directory", "is a directory, not a file", "store_invalid",
              _directory),
    StoreCase("unreadable", "mode 000", "permission denied",
              "store_invalid", _unreadable, needs_permission_checks=True),
    StoreCase("qwen-code-seconds", "Qwen Code's oauth_creds.json, expiry_date in seconds",
              "expiry_date looks like seconds", "profile_invalid",
              _doc(lambda t: _qwen_doc(t, expiry_date=1772812345)), kind="qwen-code"),
    # These used to take the daemon down (or, for NaN, to be served silently); each runs
    # with a daemon of its own so that a regression cannot hide the verdict on the others.
    StoreCase("nan-elsewhere", "NaN in usageStats (JSON.parse refuses it)",
              "contains NaN, which is not JSON", "store_invalid", _raw(_nan_elsewhere),
              isolated=True),
    StoreCase("symlink-loop", "a symlink pointing at itself", "Symlink loop", "store_invalid",
              _symlink_loop, isolated=True),
    StoreCase("huge-number", "a 5000-digit number", "cannot be parsed", "store_invalid",
              _raw(_huge_number), isolated=True),
    StoreCase("lone-surrogate", "a lone UTF-16 surrogate (\\ud800) in the refresh token",
              "refresh contains invalid Unicode", "profile_invalid", _raw(_surrogate),
              isolated=True),
    StoreCase("huge-token", "a 1 MiB refresh token", "longer than any real token",
              "profile_invalid", _doc(_huge_token), isolated=True),
]

PUBLIC_HTTP = "http://chat.qwen.ai/api/v1/oauth2/token"

CONFIG_CASES: list[ConfigCase] = [
    ConfigCase("toml-syntax", "config file is not TOML", "config", "not valid TOML",
               toml=b"margin = [unclosed\n"),
    ConfigCase("toml-unknown-key", "a misspelt key in the file", "marginn", "unknown setting",
               toml=b"marginn = 60\n"),
    ConfigCase("toml-not-utf8", "config file in Latin-1", "config", "config.toml",
               toml=b'on_rotate = "caf\xe9"\n'),
    ConfigCase("toml-wrong-type", "a boolean where a duration belongs", "margin", "duration",
               toml=b"margin = true\n"),
    ConfigCase("toml-stores-type", "a number where a list of paths belongs", "stores",
               "stores", toml=b"stores = 5\n"),
    ConfigCase("toml-state-dir-type", "a number where a path belongs", "state_dir", "path",
               toml=b"state_dir = 5\n"),
    ConfigCase("toml-workers-zero", "zero refresh workers",
               "max_concurrent_refreshes", "greater than or equal to 1",
               toml=b"max_concurrent_refreshes = 0\n"),
    ConfigCase("toml-workers-text", "a word where a count belongs",
               "max_concurrent_refreshes", "integer",
               toml=b'max_concurrent_refreshes = "many"\n'),
    ConfigCase("toml-log-level", "an unknown log level", "log_level", "debug",
               toml=b'log_level = "loud"\n'),
    ConfigCase("toml-hook-type", "a number where a command line belongs", "on_rotate",
               "command line", toml=b"on_rotate = 5\n"),
    ConfigCase("toml-device-url-http", "device_code_url on http to a public host",
               "device_code_url", "clear text",
               toml=b'device_code_url = "http://chat.qwen.ai/api/v1/oauth2/device/code"\n'),
    ConfigCase("config-missing", "--config names a missing file", "config", "cannot be read",
               args=("--config", "{dir}/missing.toml")),
    ConfigCase("config-directory", "--config names a directory", "config", "cannot be read",
               args=("--config", "{dir}")),
    ConfigCase("token-url-not-url", "token URL without a scheme", "token_url",
               "is not an http(s) URL", args=("--token-url", "chat.qwen.ai/token")),
    ConfigCase("token-url-ftp", "token URL on ftp://", "token_url", "is not an http(s) URL",
               args=("--token-url", "ftp://chat.qwen.ai/token")),
    ConfigCase("token-url-no-host", "token URL without a host", "token_url",
               "is not an http(s) URL", args=("--token-url", "https:///token")),
    ConfigCase("token-url-http-public", "token URL on http to a public host", "token_url",
               "clear text", args=("--token-url", PUBLIC_HTTP)),
    ConfigCase("token-url-http-private", "token URL on http to a private address",
               "token_url", "clear text", args=("--token-url", "http://10.0.0.5/token")),
    ConfigCase("token-url-userinfo", "loopback address as the URL's user name, public host",
               "token_url", "clear text",
               args=("--token-url", "http://127.0.0.1@evil.example/token")),
    ConfigCase("token-url-lookalike", "a public host whose name starts with localhost", "token_url",
               "clear text", args=("--token-url", "http://localhost.evil.example/token")),
    ConfigCase("margin-word", "a word where a duration belongs", "margin", "is not a duration",
               args=("--margin", "soon")),
    ConfigCase("margin-negative", "a negative margin", "margin", "must not be negative",
               args=("--margin=-5",)),
    ConfigCase("margin-infinite", "an infinite margin", "margin", "finite",
               env={"QWEN_REFRESHER_MARGIN": "inf"}),
    ConfigCase("jitter-unit", "an unknown duration unit", "jitter", "is not a duration",
               args=("--jitter", "5x")),
    ConfigCase("http-timeout-zero", "a zero HTTP timeout", "http_timeout", "greater than 0",
               args=("--http-timeout", "0")),
    ConfigCase("retry-max-small", "a back-off cap under a second", "retry_max", "at least 1 second",
               args=("--retry-max", "0.5")),
    ConfigCase("sweep-zero", "a zero sweep interval", "sweep_interval", "at least 1 second",
               args=("--sweep-interval", "0")),
    ConfigCase("listen-garbage", "not HOST:PORT", "listen", "HOST:PORT",
               args=("--listen", "not-an-address")),
    ConfigCase("listen-port", "a port over 65535", "listen", "out of range",
               args=("--listen", "127.0.0.1:70000")),
    ConfigCase("client-id-empty", "an empty client id", "client_id", "must not be empty",
               args=("--client-id", "")),
    ConfigCase("env-stores-not-json", "a comma list where a JSON list belongs", "stores",
               "JSON lists", env={"QWEN_REFRESHER_STORES": "/a.json,/b.json"}),
    ConfigCase("env-notify-not-json", "a bare URL where a JSON list belongs", "notify_urls",
               "JSON lists", env={"QWEN_REFRESHER_NOTIFY_URLS": "mailto://x"}),
    ConfigCase("env-discover-word", "neither true nor false", "discover", "boolean",
               env={"QWEN_REFRESHER_DISCOVER": "maybe"}),
]


# -- the docs table -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _given(case: ConfigCase) -> str:
    parts = [f"`{' '.join(case.args)}`"] if case.args else []
    parts += [f"`{name}={value}`" for name, value in case.env.items()]
    if case.toml is not None:
        text = case.toml.decode("utf-8", "backslashreplace").strip()
        parts.append(f"`config.toml`: `{text}`")
    return " ".join(parts)


def render_markdown() -> str:
    lines = [
        "# Bad input: what qwen-refresher does with broken stores, settings and hostile input",
        "",
        "Generated from `tests/reliability/corpus.py` by "
        "`.venv/bin/python -m tests.reliability.corpus`; "
        "`tests/reliability/test_bad_input.py` runs every case and fails when this file and "
        "the cases disagree. A case marked **open bug** fails today and is run as a strict "
        "xfail; once the daemon is fixed, remove `bug=` from the case and regenerate this "
        "file.",
        "",
        "The cases run with a daemon of their own (`own daemon run`) used to take the whole "
        "daemon down, or, for NaN, to be served silently; they were fixed in commit 94fd15a "
        "and stay isolated so that a regression cannot hide the verdict on the others.",
        "",
        "## Stores",
        "",
        "Each broken store sits in its own agent directory (`agents/bad-<case>/agent/"
        "auth-profiles.json`; the Qwen Code case is `~/.qwen/oauth_creds.json`) next to a "
        "healthy agent, all under one daemon. For every case the daemon logs exactly one "
        "error naming the file — `store_invalid` (`error` field) when the file as a whole "
        "is unusable, `profile_invalid` (`problem` field) when only the qwen profile is — "
        "and `status` shows it; the file (and its directory) stays byte-identical; the "
        "healthy agent keeps being refreshed; no token from the broken file appears in any "
        "log, status output or metric.",
        "",
        "| case | input | event | expected message (contains) | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in STORE_CASES:
        note = []
        if c.isolated:
            note.append("own daemon run")
        if c.needs_permission_checks:
            note.append("as root, the daemon runs without CAP_DAC_OVERRIDE")
        if c.bug:
            note.append("**open bug** (xfail): " + c.bug.removeprefix("BUG: "))
        lines.append(f"| `{c.name}` | {_cell(c.what)} | `{c.event}` | `{_cell(c.expect)}` "
                     f"| {_cell('; '.join(note))} |")
    lines += [
        "",
        "## Settings",
        "",
        "Each case is one `qwen-refresher run --once` with the bad setting (flag, "
        "`QWEN_REFRESHER_*` variable or `--config` TOML file). Expected: exit code 78, "
        "exactly one line on stderr, `qwen-refresher: error: invalid setting <setting> ...`, "
        "naming the setting and containing the expected text; nothing is written.",
        "",
        "| case | input | given as | setting named | expected message (contains) | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in CONFIG_CASES:
        bug = ("**open bug** (xfail): " + k.bug.removeprefix("BUG: ")) if k.bug else ""
        lines.append(f"| `{k.name}` | {_cell(k.what)} | {_cell(_given(k))} | `{k.setting}` "
                     f"| `{_cell(k.expect)}` | {_cell(bug)} |")
    lines += _adversarial_section()
    return "\n".join(lines) + "\n"


def _adversarial_section() -> list[str]:
    """The hostile-input cases of ``tests/adversarial/``, one table per boundary."""
    from tests.adversarial.registry import BOUNDARIES, all_cases

    cases = all_cases()
    lines = [
        "",
        "## Hostile inputs at every boundary",
        "",
        f"{len(cases)} cases from `tests/adversarial/` (each test registers its case in "
        "`tests/adversarial/registry.py`). Unless a row says otherwise, every case also "
        "asserts that the healthy profiles beside the attacked one keep being refreshed, that "
        "no token appears in any output in any encoding, that the attacked file is "
        "byte-identical, and that SIGTERM is honoured within 10 s.",
    ]
    for boundary in BOUNDARIES:
        rows = [c for c in cases if c.boundary == boundary]
        if not rows:
            continue
        lines += ["", f"### {boundary[0].upper()}{boundary[1:]}", "",
                  "| case | attack | defence |", "| --- | --- | --- |"]
        lines += [f"| `{c.name}` | {_cell(c.attack)} | {_cell(c.defence)} |" for c in rows]
    return lines


def main() -> int:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
