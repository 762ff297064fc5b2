"""``install-service`` / ``uninstall-service``: parse and print; the steps are ``service``'s.

Why a user unit, what the sandbox holds and why: the ``service`` package's docstring. The
decisions (which sandbox, which hook runner, whether a unit is ours to replace, what systemd
is asked) are ``service.steps``; this module calls them in order and tells the person what
happened and what to do next.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import service
from ..report import EX_OK
from ..service import steps
from ..service.unit import UNIT_NAME


def _out(message: str) -> None:
    print(message, flush=True)


def _warn(message: str) -> None:
    print(f"qwen-refresher: warning: {message}", file=sys.stderr, flush=True)


def install(args: argparse.Namespace) -> int:
    """Write the unit, reload systemd, optionally enable and start it."""
    from .. import __version__

    resolved = service.resolve()
    if not args.dry_run:
        steps.check_platform()
    sandbox = steps.choose_sandbox(args.sandbox)
    for warning in sandbox.warnings:
        _warn(warning)
    runner = steps.choose_hook_runner(args.sandbox, args.dry_run)
    for warning in runner.warnings:
        _warn(warning)
    text = service.render_unit(service.unit_params(resolved, sandbox.omitted, __version__,
                                                   runner.runner))
    if args.dry_run:
        sys.stdout.write(text)
        for warning in resolved.warnings:
            _warn(warning)
        return EX_OK

    written = steps.put_unit(steps.unit_path(args.unit_dir), text, resolved.state_dir,
                             force=args.force)
    if written.backup is not None:
        _out(f"Kept the previous unit as {written.backup}")
    _out(f"{'Wrote' if written.changed else 'Unchanged:'} {written.target}")
    _out(f"  runs: {' '.join(resolved.exec_start)}")
    _out(f"  sandbox: {sandbox.label}")
    _out(f"  hooks: {runner.label}")
    steps.activate(written, now=args.now)
    if args.now:
        _out(f"Enabled and started {UNIT_NAME}.")
    else:
        if written.existing is not None and written.changed:
            _out(f"If it is running, apply the new unit: systemctl --user restart {UNIT_NAME}")
        _out(f"Start it now and at every login: systemctl --user enable --now {UNIT_NAME}")
    for label, directory in steps.missing_dirs(resolved, sandbox.omitted):
        _out(f"Note: {label} {directory} does not exist yet; the service can write there "
             "only after a restart once it does.")
    for warning in resolved.warnings:
        _warn(warning)
    user = service.user_name()
    if not service.lingering(user):
        _out("Note: user services stop when your last login session ends. To keep it running "
             f"after logout and start it at boot: loginctl enable-linger {user}")
    _out(f"Check it with: qwen-refresher status   Logs: journalctl --user -u {UNIT_NAME}")
    return EX_OK


def uninstall(args: argparse.Namespace) -> int:
    """Stop, disable and remove the unit; the state dir (history, journal) is kept."""
    removed = steps.remove_unit(steps.unit_path(args.unit_dir), force=args.force)
    if not removed.existed:
        _out(f"{removed.target} does not exist; nothing to remove.")
        return EX_OK
    if removed.stop_failure is not None:
        _warn(removed.stop_failure)
    _out(f"Removed {removed.target}.")
    state_dir = service.configured(os.environ, []).state_dir
    _out(f"Kept the state dir {state_dir} (status history; a token journal if a write ever "
         "failed) and any linger setting (`loginctl disable-linger` undoes that).")
    return EX_OK


def add_parsers(subparsers: Any) -> None:
    """Register ``install-service`` and ``uninstall-service`` (``argparse._SubParsersAction``)."""
    p = subparsers.add_parser(
        "install-service",
        help="install the refresher as a systemd user service",
        description="Write ~/.config/systemd/user/qwen-refresher.service for this "
                    "installation and this user's OpenClaw, then `systemctl --user "
                    "daemon-reload` (and `enable --now` with --now).",
    )
    p.add_argument("--now", action="store_true", help="also enable and start it")
    p.add_argument("--force", action="store_true",
                   help="replace a qwen-refresher.service that install-service did not write")
    p.add_argument("--dry-run", action="store_true",
                   help="print the unit and change nothing")
    p.add_argument("--sandbox", choices=list(steps.SANDBOX_MODES), default="auto",
                   help="auto (default): probe which sandbox settings this user manager "
                        "allows and whether hooks can run in units of their own, and use "
                        "those; full: every setting, no probe (systemd-analyze exposure 1.9); "
                        "basic: only the settings that need no user namespace (seccomp "
                        "filters, no new privileges; exposure 6.2), for managers that refuse "
                        "one (226/NAMESPACE)")
    p.add_argument("--unit-dir", help="directory to write the unit to "
                                      "(default $XDG_CONFIG_HOME/systemd/user)")
    p.set_defaults(handler=install)

    u = subparsers.add_parser(
        "uninstall-service",
        help="stop and remove the systemd user service",
        description="`systemctl --user disable --now`, remove the unit written by "
                    "install-service, daemon-reload. Keeps the state dir.",
    )
    u.add_argument("--force", action="store_true",
                   help="remove qwen-refresher.service even if install-service did not write it")
    u.add_argument("--unit-dir", help="directory the unit is in "
                                      "(default $XDG_CONFIG_HOME/systemd/user)")
    u.set_defaults(handler=uninstall)
