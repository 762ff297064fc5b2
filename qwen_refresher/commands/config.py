"""``qwen-refresher config``: the effective settings and where each one came from.

A newcomer's first question after "is it running?" is "what is it using?". The answer must be
the daemon's own: the values come from ``config.load_settings`` (the one place settings are
resolved), and only the *origin* of each value is worked out here, by asking the same layers
in the same order (flag > ``QWEN_REFRESHER_*`` > TOML file > default).

Nothing secret is printed: apprise URLs (``notify_urls``) can carry passwords or tokens, so only
their scheme and host are shown; hooks are commands the user wrote and are shown as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ENV_PREFIX, Settings, config_file_in_use, load_settings, read_toml
from ..report import EX_OK


def _masked_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}/…" if parts.scheme else "…"


def _shown(name: str, value: Any) -> Any:
    if name == "notify_urls":
        return [_masked_url(str(u)) for u in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    return value


def effective(overrides: dict[str, object], config_file: Path | None,
              environ: dict[str, str]) -> list[dict[str, Any]]:
    """One row per setting: name, value (masked where secret), origin."""
    settings = load_settings(overrides, config_file=config_file, env=environ)
    toml_path = config_file_in_use(config_file, environ)
    in_file: dict[str, Any] = {}
    if toml_path is not None:
        in_file = read_toml(toml_path)  # the one reader load_settings used a moment ago
    rows = []
    for name in Settings.model_fields:
        env_name = ENV_PREFIX + name.upper()
        if name in overrides:
            origin = "flag --" + name.replace("_", "-")
        elif any(k.upper() == env_name for k in environ):
            origin = "env " + env_name
        elif name in in_file:
            origin = f"file {toml_path}"
        else:
            origin = "default"
        rows.append({"name": name, "value": _shown(name, getattr(settings, name)),
                     "origin": origin})
    return rows


def config_command(args: argparse.Namespace) -> int:
    from ..cli import settings_overrides

    config_file = Path(args.config) if args.config else None
    rows = effective(settings_overrides(args), config_file, dict(os.environ))
    if args.json:
        json.dump({r["name"]: {"value": r["value"], "origin": r["origin"]} for r in rows},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EX_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        value = r["value"]
        text = json.dumps(value) if not isinstance(value, str) else value
        print(f"{r['name']:<{width}}  {text}    ({r['origin']})")
    return EX_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..cli import _add_settings_flags

    p = sub.add_parser("config", help="print the effective settings and where each came from",
                       description="Print every setting as `run` would use it, with its "
                                   "origin: a flag, a QWEN_REFRESHER_* variable, the config "
                                   "file, or the default. Secrets in apprise URLs are masked.")
    p.add_argument("--json", action="store_true", help="one JSON object")
    _add_settings_flags(p)
    p.set_defaults(handler=config_command)
