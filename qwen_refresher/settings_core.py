"""Which config file, which state dir, which stores: resolved ONCE, for every command.

The daemon (``config.load_settings``, which adds pydantic validation of every setting on top),
``status`` and ``install-service`` must agree on what is managed, or a store the daemon writes
is missing from ``status`` or read-only in the service's sandbox (issue 14: agent dirs set in
``openclaw.json`` were found by the daemon only). So the facts live here, once:

- the environment prefix and the config file in use (``--config`` > ``QWEN_REFRESHER_CONFIG``
  > ``$XDG_CONFIG_HOME/qwen-refresher/config.toml`` if it exists), read by one hardened reader;
- the settings that decide what is looked at (``state_dir``, ``stores``, ``discover``,
  ``qwen_code``, ``margin``): flag > ``QWEN_REFRESHER_*`` environment > file > default, the
  daemon's order (``tests/test_one_view.py`` holds ``resolve`` to ``load_settings``);
- store discovery (``store_paths``): explicit stores, OpenClaw's agents under its state dir and
  those set in ``openclaw.json`` (``agents.list[].agentDir``), Qwen Code's file, each file once
  (``paths.unique_files``).

Stdlib only, and neither ``typing`` nor ``pathlib`` at run time: ``status`` imports it on every
health check, and ``pathlib`` (with the ``urllib.parse`` and ``ipaddress`` it loads) costs
about half a bare interpreter start. The settings are kept as text and handed out as ``Path``
objects on demand (``CoreSettings.state_dir`` ...); the default dirs are computed here as text
(``xdg_dir``) and ``paths`` wraps them.
``openclaw.json`` is read through ``fileio`` (imported only when that file exists) and parsed as
JSON, or JSON5 only when plain JSON fails.
"""

from __future__ import annotations

import json
import os

from .durations import parse_duration
from .published import problem_kind, read_state_file

TYPE_CHECKING = False  # not `from typing import ...`: status must not pay for typing
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path
    from typing import Any

    from .errors import SettingsError as SettingsError  # served at run time by __getattr__

ENV_PREFIX = "QWEN_REFRESHER_"
DEFAULT_MARGIN = 900.0
#: ``Store.kind`` of each adapter (``stores/``), restated here so discovery needs no adapter
#: import; ``tests/test_one_view.py`` keeps them equal.
KIND_OPENCLAW = "openclaw"
KIND_QWEN_CODE = "qwen-code"
#: Our own config is a few hundred bytes; this is far above any real one, far below harm.
MAX_TOML_BYTES = 1024 * 1024
#: OpenClaw configs are a few KiB; the JSON5 parser takes seconds per 100 KiB, so a file past
#: this is refused from its size rather than parsed for minutes on every rescan.
MAX_CONFIG_BYTES = 256 * 1024
#: Real configs nest about eight levels; the JSON5 parser recurses and dies near fifty.
MAX_CONFIG_DEPTH = 32

def __getattr__(name: str) -> object:
    """``settings_core.SettingsError`` and ``ConfigUnusable``: their one home is ``errors``
    (the tree), which ``status``'s fast path imports only when something is wrong; fetched
    when asked for."""
    if name in ("SettingsError", "ConfigUnusable"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n"})


def settings_error() -> type[SettingsError]:
    """``errors.SettingsError`` (exit 78), imported only when a setting is bad: ``errors``
    defines the whole tree, ~1.3 ms of a ~40 ms ``status``. Usable in ``except`` clauses too:
    Python evaluates those only when an exception reaches them."""
    from .errors import SettingsError

    return SettingsError


def _bad(setting: str, problem: str) -> SettingsError:
    return settings_error()(setting, problem)


# -- where our files live -------------------------------------------------------------------------


def _home(env: Mapping[str, str]) -> str:
    home = env.get("HOME", "").strip()
    return home or os.path.expanduser("~")


def xdg_dir(var: str, fallback: str, env: Mapping[str, str] | None = None) -> str:
    """``$XDG_*`` when it is set to an absolute path, else ``$HOME/<fallback>`` (text)."""
    e = os.environ if env is None else env
    value = e.get(var, "").strip()
    if value and value.startswith("/"):
        return value
    return os.path.join(_home(e), fallback)


def default_state_dir_text(env: Mapping[str, str] | None = None) -> str:
    """``$XDG_STATE_HOME/qwen-refresher`` (``paths.default_state_dir`` is this as a Path)."""
    return os.path.join(xdg_dir("XDG_STATE_HOME", ".local/state", env), "qwen-refresher")


def default_config_file_text(env: Mapping[str, str] | None = None) -> str:
    """``$XDG_CONFIG_HOME/qwen-refresher/config.toml`` (``paths.default_config_file``)."""
    return os.path.join(xdg_dir("XDG_CONFIG_HOME", ".config", env), "qwen-refresher",
                        "config.toml")


def _path(text: str) -> Path:
    from pathlib import Path  # only where a Path is asked for: not on status's fast path

    return Path(text)


# -- the config file ---------------------------------------------------------------------------


def config_file_text(config_file: Path | str | None, env: Mapping[str, str]) -> str | None:
    """``config_file_in_use`` as text."""
    explicit = config_file or env.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return os.path.expanduser(str(explicit))
    default = default_config_file_text(env)
    return default if os.path.exists(default) else None


def config_file_in_use(config_file: Path | str | None, env: Mapping[str, str]) -> Path | None:
    """The TOML file a load reads: ``--config``, else ``QWEN_REFRESHER_CONFIG``, else the
    default path if it exists. An explicitly named file is returned even when missing, so
    that loading it fails with a clear error instead of silently using defaults."""
    text = config_file_text(config_file, env)
    return None if text is None else _path(text)


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The TOML file as a dict, or ``SettingsError`` naming the file and what is wrong.

    A symlink is followed (dotfile managers link config files into place); what it points at
    gets ``published.read_state_file``'s checks: regular file (a FIFO cannot hang us), capped.
    """
    try:
        data, _ = read_state_file(os.path.realpath(path), MAX_TOML_BYTES)
    except FileNotFoundError:
        raise _bad("config", f"{path}: cannot be read: does not exist") from None
    except problem_kind() as exc:
        raise _bad("config", f"{path}: cannot be read: {exc.problem}") from None
    except OSError as exc:
        raise _bad("config", f"{path}: cannot be read: {exc.strerror}") from None
    import tomllib  # only when there is a file: it costs a few ms on every health check

    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad("config", f"{path}: not valid TOML: not UTF-8 (byte {exc.start})"
                            ) from None
    except tomllib.TOMLDecodeError as exc:
        raise _bad("config", f"{path}: not valid TOML: {exc}") from None


# -- the settings that decide what is looked at -------------------------------------------------


class CoreSettings:
    """What every command must agree on: where our state is and which stores are managed.

    Paths are kept as the text they were given (``state_dir_text``, ``store_texts``,
    ``config_file_text``) and turned into ``Path`` objects only when asked for, the way the
    daemon's settings spell them (``Path(text).expanduser().absolute()``).
    """

    __slots__ = ("config_file_text", "discover", "file", "margin", "qwen_code",
                 "state_dir_text", "store_texts")

    def __init__(self, state_dir: Path | str, stores: Sequence[Path | str] = (), *,
                 discover: bool = True, qwen_code: bool = True, margin: float = DEFAULT_MARGIN,
                 config_file: Path | str | None = None, file: Mapping[str, Any] | None = None,
                 ) -> None:
        self.state_dir_text = str(state_dir)
        self.store_texts = tuple(str(s) for s in stores)
        self.discover = discover
        self.qwen_code = qwen_code
        self.margin = margin
        self.config_file_text = None if config_file is None else str(config_file)
        #: the config file's whole content (``{}`` without one), for the caller's own keys
        self.file: Mapping[str, Any] = file or {}

    @property
    def state_dir(self) -> Path:
        return _path(self.state_dir_text)

    @property
    def stores(self) -> tuple[Path, ...]:
        return tuple(_path(s) for s in self.store_texts)

    @property
    def config_file(self) -> Path | None:
        return None if self.config_file_text is None else _path(self.config_file_text)

    def store_paths(self, env: Mapping[str, str] | None = None,
                    problems: list[tuple[Path, str]] | None = None) -> list[tuple[Path, str]]:
        """``store_paths`` with these settings: what a daemon with them manages now."""
        return store_paths(explicit=self.stores, discover=self.discover,
                           qwen_code=self.qwen_code, env=env, problems=problems)


def parse_bool(name: str, value: object) -> bool:
    """A boolean as pydantic reads one (``yes``/``no``, ``1``/``0``, ``on``/``off`` ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _bad(f"{name} ({ENV_PREFIX}{name.upper()})", f"{value!r} is not a boolean")


def absolute(value: object, env: Mapping[str, str] | None = None) -> str:
    """A path setting as the daemon stores it: ``~`` expanded against ``env``'s ``HOME`` (the
    daemon's environment, as pydantic's ``expanduser`` sees it), made absolute, not resolved
    (``..`` stays, as ``Path.absolute`` leaves it)."""
    text = str(value)
    home = (os.environ if env is None else env).get("HOME", "")
    if home and (text == "~" or text.startswith("~/")):
        text = home + text[1:]
    text = os.path.expanduser(text)
    return text if text.startswith("/") else os.path.join(os.getcwd(), text)


def _pick(name: str, flag: object, env: Mapping[str, str], file: Mapping[str, Any]) -> object:
    """flag > environment > file; None when none of them sets it."""
    if flag is not None:
        return flag
    raw = env.get(ENV_PREFIX + name.upper())
    if raw is not None and raw.strip() != "":
        return raw
    return file.get(name)


def _stores(flag: Sequence[str | Path] | None, env: Mapping[str, str],
            file: Mapping[str, Any]) -> list[str]:
    if flag:
        return [absolute(s, env) for s in flag]
    raw_env = env.get(ENV_PREFIX + "STORES", "")
    if raw_env.strip():
        try:
            value = json.loads(raw_env)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(f"stores ({ENV_PREFIX}STORES)", "must be a JSON list of paths, "
                                'e.g. ["/path/one.json", "/path/two.json"]')
        return [absolute(v, env) for v in value]
    value = file.get("stores")
    if value is None:
        return []
    if isinstance(value, str):
        return [absolute(value, env)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [absolute(v, env) for v in value]
    raise _bad("stores", "expected a list of paths")


def resolve(env: Mapping[str, str], *, config: Path | str | None = None,
            state_dir: str | Path | None = None, stores: Sequence[str | Path] | None = None,
            file: Mapping[str, Any] | None = None) -> CoreSettings:
    """Flags (the keyword arguments) > ``QWEN_REFRESHER_*`` environment > file > defaults.

    ``file`` given: that document stands for the config file (a caller that already read it,
    or ``{}`` after a file it could not read); else the file in use is read here.
    """
    path = config_file_text(config, env)
    doc = file if file is not None else (read_config_file(path) if path is not None else {})
    raw_state = _pick("state_dir", state_dir, env, doc)
    discover = _pick("discover", None, env, doc)
    qwen_code = _pick("qwen_code", None, env, doc)
    margin = _pick("margin", None, env, doc)
    try:
        margin_s = DEFAULT_MARGIN if margin is None else parse_duration(margin)
    except ValueError as exc:
        raise _bad(f"margin ({ENV_PREFIX}MARGIN)", str(exc)) from None
    return CoreSettings(
        absolute(raw_state, env) if raw_state is not None else default_state_dir_text(env),
        _stores(stores, env, doc),
        discover=True if discover is None else parse_bool("discover", discover),
        qwen_code=True if qwen_code is None else parse_bool("qwen_code", qwen_code),
        margin=margin_s,
        config_file=path,
        file=doc,
    )


# -- discovery -----------------------------------------------------------------------------------


#: Qwen Code's credentials file name (``paths.QWEN_CREDS_NAME``).
_QWEN_CREDS_NAME = "oauth_creds.json"


def kind_of(path: Path | str) -> str:
    """The store format a file is in, from its name (Qwen Code's is ``oauth_creds.json``)."""
    return KIND_QWEN_CODE if os.path.basename(path) == _QWEN_CREDS_NAME else KIND_OPENCLAW


def store_paths(
    *,
    explicit: Iterable[Path],
    discover: bool,
    qwen_code: bool,
    env: Mapping[str, str] | None = None,
    problems: list[tuple[Path, str]] | None = None,
) -> list[tuple[Path, str]]:
    """(path, kind) of every store to manage now, explicit ones first, without duplicates.

    THE discovery: the daemon (through ``discovery.store_paths``), ``status`` and
    ``install-service`` all call it. Explicit stores are managed even before they exist;
    discovered ones when they exist. A duplicate is the same file under another name
    (``paths.unique_files``: a symlinked state dir, a bind mount); the first spelling is kept,
    so one lock is never taken twice. An unusable ``openclaw.json`` adds no agent dir and is
    appended to ``problems`` as (file, problem).
    """
    from pathlib import Path

    from . import paths

    out: dict[Path, str] = {}
    for path in explicit:
        out.setdefault(Path(path).absolute(), kind_of(path))
    if discover:
        for path in paths.discover_openclaw_stores(env):
            out.setdefault(path.absolute(), KIND_OPENCLAW)
        for agent_dir in configured_agent_dirs(env, problems):
            store = agent_dir / paths.AUTH_STORE_NAME
            if os.path.lexists(store):
                out.setdefault(store.absolute(), KIND_OPENCLAW)
    if qwen_code:
        creds = paths.qwen_code_creds(env)
        if os.path.lexists(creds):
            out.setdefault(creds.absolute(), KIND_QWEN_CODE)
    return [(path, out[path]) for path in paths.unique_files(out)]


def json5_depth(text: str) -> int:
    """How deep ``[``/``{`` nest in a JSON5 text, skipping strings and comments.

    Counted before parsing, because the JSON5 parser recurses per level and a 60-deep file
    raises ``RecursionError`` inside it.
    """
    depth = best = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            quote = ch
            i += 1
            while i < n and text[i] != quote:
                i += 2 if text[i] == "\\" else 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 1
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
        i += 1
    return best


def load_openclaw_config(config: Path) -> object:
    """Parse ``openclaw.json`` (JSON5) safely: ``ConfigUnusable`` for a file we must not use.

    A symlink is followed, as OpenClaw follows it: dotfile managers (GNU stow, chezmoi, Nix
    home-manager) link ``openclaw.json`` into place, and refusing it would silently leave
    every agent with its own ``agentDir`` unmanaged. The config holds no secret and we never
    write it, so following a link cannot leak or clobber anything; what is at the end of the
    link gets the full treatment of ``fileio.read_regular_file``: a FIFO cannot hang us, a
    directory or device is refused, the size is capped. Then depth-checked before parsing,
    and parsed as plain JSON first, which is what OpenClaw writes and costs microseconds;
    JSON5 only when that fails.
    """
    if not os.path.lexists(config):
        return None  # the usual case for status: no fileio import, no resolve
    from .errors import ConfigUnusable, FileMissing, StoreError
    from .fileio import read_regular_file

    try:
        real = config.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise ConfigUnusable("is a symlink that cannot be resolved (a loop?)") from None
    try:
        data = read_regular_file(real, MAX_CONFIG_BYTES, shown=config).data
    except FileMissing:
        return None
    except StoreError as exc:
        raise ConfigUnusable(exc.problem) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigUnusable(f"is not valid UTF-8 (byte {exc.start})") from None
    if json5_depth(text) > MAX_CONFIG_DEPTH:
        raise ConfigUnusable(f"nests deeper than {MAX_CONFIG_DEPTH} levels")
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigUnusable("nests too deeply to parse") from None
    except ValueError:
        pass
    import json5

    try:
        return json5.loads(text)
    except RecursionError:
        raise ConfigUnusable("nests too deeply to parse") from None
    except ValueError as exc:
        raise ConfigUnusable(f"is not valid JSON5: {str(exc)[:200]}") from None


def configured_agent_dirs(env: Mapping[str, str] | None = None,
                          problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Agent dirs set in ``openclaw.json`` (``agents.list[].agentDir``), which may live anywhere.

    A config we cannot use adds nothing and is appended to ``problems``: the layout under
    ``<state>/agents`` still covers every agent without an override.
    """
    from . import paths

    config = paths.openclaw_config_file(env)
    if not os.path.lexists(config):
        return []  # status's usual case: errors (and its imports) stay unloaded
    from .errors import ConfigUnusable

    try:
        doc = load_openclaw_config(config)
    except ConfigUnusable as exc:
        if problems is not None:
            problems.append((config, str(exc)))
        return []
    agents = doc.get("agents") if isinstance(doc, dict) else None
    entries = agents.get("list") if isinstance(agents, dict) else None
    found: list[Path] = []
    for entry in entries if isinstance(entries, list) else []:
        raw = entry.get("agentDir") if isinstance(entry, dict) else None
        if isinstance(raw, str) and raw.strip():
            found.append(paths.expand_user_path(raw, env))
    return found
