"""The ``qwen-refresher`` command line.

Each subcommand's module is imported only when that subcommand runs: ``status`` is run by
health checks every few seconds and must not pay for pydantic, httpx, the scheduler or
watchdog. Errors carry their exit code (``errors.QwenRefresherError.exit_code``), so every
command fails the same way: one line on stderr naming what is wrong, and a meaningful code.
"""

from __future__ import annotations

import sys

from . import __version__
from .report import EX_BROKEN_PIPE, EX_INTERRUPTED, EX_USAGE

TYPE_CHECKING = False  # not `from typing import ...`: status must not pay for typing
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn

#: subcommand -> module that provides ``add_parser(subparsers)`` (or ``add_parsers``).
COMMANDS: dict[str, str] = {
    "run": "qwen_refresher.cli",
    "status": "qwen_refresher.commands.status",
    "login": "qwen_refresher.commands.login",
    "install-service": "qwen_refresher.commands.service",
    "uninstall-service": "qwen_refresher.commands.service",
    "demo": "qwen_refresher.commands.demo",
    "config": "qwen_refresher.commands.config",
    "completion": "qwen_refresher.completion",
    "fleet": "qwen_refresher.commands.fleet",
}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override settings; None means "not given" so lower layers apply."""
    g = p.add_argument_group("settings (flags > QWEN_REFRESHER_* env > config file > defaults)")
    g.add_argument("--config", type=str, help="TOML config file "
                   "(default $XDG_CONFIG_HOME/qwen-refresher/config.toml)")
    g.add_argument("--store", dest="stores", action="append", metavar="PATH",
                   help="an auth-profiles.json (or oauth_creds.json) to manage; repeatable")
    g.add_argument("--state-dir", help="where the daemon keeps its state and journal")
    g.add_argument("--token-url")
    g.add_argument("--device-code-url")
    g.add_argument("--client-id")
    g.add_argument("--margin", help="refresh this long before expiry (e.g. 900, 15m)")
    g.add_argument("--jitter", help="spread refreshes by up to this much (e.g. 60s)")
    g.add_argument("--sweep-interval", help="re-read every store this often (e.g. 5m)")
    g.add_argument("--retry-max", help="longest back-off between retries (e.g. 5m)")
    g.add_argument("--http-timeout", help="timeout of one token request")
    g.add_argument("--lock-timeout", help="how long to wait for a store's lock")
    g.add_argument("--on-rotate", help="command run after each rotation ('none' disables)")
    g.add_argument("--on-needs-login", help="command run when a login is needed")
    g.add_argument("--listen", help="HOST:PORT for /healthz /readyz /metrics ('' disables)")
    g.add_argument("--log-format", choices=["auto", "json", "console"])
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    g.add_argument("--poll", action="store_const", const=True,
                   help="poll for changes instead of inotify (network file systems)")
    g.add_argument("--no-discover", dest="discover", action="store_const", const=False,
                   help="manage only --store files, not every OpenClaw agent")
    g.add_argument("--no-qwen-code", dest="qwen_code", action="store_const", const=False,
                   help="leave Qwen Code's ~/.qwen/oauth_creds.json alone")
    g.add_argument("--auto-login", action="store_const", const=True,
                   help="start a device-code login by itself when one is needed")
    g.add_argument("--fleet", metavar="URLS",
                   help="etcd client URLs, comma-separated: share families with other hosts "
                        "(docs/fleet.md)")
    g.add_argument("--fleet-namespace", help="etcd key prefix of this fleet")
    g.add_argument("--fleet-secret-file", help="the fleet's secret (same file on every host)")
    g.add_argument("--fleet-ca", help="CA bundle for etcd's TLS")
    g.add_argument("--fleet-cert", help="client certificate for etcd")
    g.add_argument("--fleet-key", help="client key for etcd")
    g.add_argument("--fleet-user", help="etcd user")
    g.add_argument("--fleet-password-file", help="file holding the etcd user's password")


SETTINGS_FLAGS = ("stores", "state_dir", "token_url", "device_code_url", "client_id", "margin",
                  "jitter", "sweep_interval", "retry_max", "http_timeout", "lock_timeout",
                  "on_rotate", "on_needs_login", "listen", "log_format", "log_level", "poll",
                  "discover", "qwen_code", "auto_login", "fleet", "fleet_namespace",
                  "fleet_secret_file", "fleet_ca", "fleet_cert", "fleet_key", "fleet_user",
                  "fleet_password_file")


def settings_overrides(args: argparse.Namespace) -> dict[str, object]:
    given: dict[str, object] = {name: getattr(args, name) for name in SETTINGS_FLAGS
                                if getattr(args, name, None) is not None}
    if "log_level" not in given:
        if getattr(args, "verbose", False):
            given["log_level"] = "debug"
        elif getattr(args, "quiet", False):
            given["log_level"] = "warning"
    return given


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the refresh daemon in the foreground",
                       description="Keep every qwen-portal profile fresh until stopped.")
    p.add_argument("--once", action="store_true",
                   help="refresh whatever is due now, wait for it, and exit")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="log at debug level (same as --log-level debug)")
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="log warnings and errors only (same as --log-level warning)")
    _add_settings_flags(p)
    p.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import logsetup
    from .config import load_settings

    config_file = Path(args.config) if args.config else None
    overrides = settings_overrides(args)
    settings = load_settings(overrides, config_file=config_file)
    logsetup.configure(fmt=settings.log_format, level=settings.log_level)
    from .daemon import Daemon

    daemon = Daemon(settings, overrides=overrides, config_file=config_file)
    return daemon.run_once() if args.once else daemon.run()


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse's parser, exiting 64 (EX_USAGE) on a usage error instead of 2, which a health
    check would read as "needs login" (``status`` exits 2 for that). Built on first use:
    argparse is not imported when ``status`` is parsed without it (``_fast_status``)."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")

    return _Parser


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    import importlib

    parser_class = _parser_class()
    parser = parser_class(
        prog="qwen-refresher",
        description="Keeps OpenClaw's qwen-portal OAuth tokens fresh.",
    )
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    loaded: set[str] = set()
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        if module_name in loaded:
            continue
        loaded.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        adder = getattr(module, "add_parser", None) or getattr(module, "add_parsers", None)
        if adder is not None:
            adder(sub)
    return parser


def _fast_status(arguments: list[str]) -> object | None:
    """``status`` parsed without argparse when its argv is one of the plain forms health
    checks use: argparse, its gettext and shutil cost about a third of ``status``'s run.
    None for anything else (help, abbreviations, mistakes): argparse then parses it and says
    what is wrong exactly as before (``tests/test_status.py`` holds the two to one result)."""
    if arguments[:1] != ["status"]:
        return None
    from .commands.status import parse_simple

    return parse_simple(arguments[1:])


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _fast_status(arguments)
    if args is None:
        command = next((a for a in arguments if not a.startswith("-")), None)
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(arguments)
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return EX_USAGE
    handler = args.handler  # type: ignore[attr-defined]  # set by every command's parser
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except BrokenPipeError:
        # `qwen-refresher status | head`: the reader left; not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except Exception as exc:
        # errors is imported only when something failed: status must not pay for it.
        from .errors import QwenRefresherError

        if not isinstance(exc, QwenRefresherError):
            raise
        from .escape import printable

        # Messages name files and profiles, which anyone who can create a directory chooses.
        print(f"qwen-refresher: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
