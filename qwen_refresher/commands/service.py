"""``install-service`` / ``uninstall-service``: parse, decide, print; the unit is ``service``'s.

Why a user unit, what the sandbox holds and why: ``service.py``'s docstring. This module is
the conversation: probe what this user manager allows, write the unit only if it is ours to
write, reload systemd, and tell the person what happened and what to do next.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .. import service as unit
from ..errors import ServiceError
from ..service import (
    HOOK_RUNNER,
    NAMESPACE_SETTINGS,
    UNIT_NAME,
    default_unit_dir,
    is_ours,
    preflight,
    probe_hook_runner,
    probe_sandbox,
    read_existing,
    render_unit,
    resolve,
    systemctl,
    unit_params,
    user_name,
    write_atomic,
)


def _out(message: str) -> None:
    print(message, flush=True)


def _warn(message: str) -> None:
    print(f"qwen-refresher: warning: {message}", file=sys.stderr, flush=True)


def install(args: argparse.Namespace) -> int:
    """Write the unit, reload systemd, optionally enable and start it."""
    from .. import __version__

    resolved = resolve()
    if not args.dry_run:
        if not sys.platform.startswith("linux"):
            raise ServiceError("systemd user services exist only on Linux; use --dry-run to "
                               "see the unit, or run `qwen-refresher run` under your own "
                               "supervisor")
        preflight()
    every = [name for name, _ in NAMESPACE_SETTINGS]
    omitted: list[str] = []
    if args.sandbox == "basic":
        omitted = every
    elif args.sandbox == "auto":
        refused, detail = probe_sandbox()
        if refused is None:
            _warn(f"could not check whether the full sandbox works here ({detail}); "
                  "using it. If the service fails with 226/NAMESPACE, reinstall with "
                  "--sandbox basic")
        elif "PrivateUsers" in refused:
            omitted = every
            _warn("this user manager cannot run sandboxed user services (user namespaces are "
                  "restricted); installing with the basic (seccomp-only) sandbox. "
                  f"systemd said: {detail or 'no details'}")
        elif refused:
            omitted = refused
            _warn("this user manager refuses " + ", ".join(f"{n}=" for n in refused) +
                  " in a user service; installing the sandbox without them")
    sandbox = ("basic" if "PrivateUsers" in omitted else
               "full" if not omitted else "full except " + ", ".join(omitted))
    runner = HOOK_RUNNER
    if args.sandbox == "auto":
        works, detail = probe_hook_runner()
        if works is None and args.dry_run:
            _warn(f"could not check whether hooks can run in units of their own ({detail}); "
                  "assuming they can")
        elif not works:
            # With the manager reachable (preflight), "could not ask" means no session bus.
            runner = ()
            _warn("this user manager cannot run hooks in units of their own (`systemd-run "
                  "--user --wait` failed: " + (detail or "no details") + "); installing "
                  "without MemoryDenyWriteExecute= so that Node.js hooks (OpenClaw's CLI) "
                  "still run. A D-Bus session bus (Debian/Ubuntu: dbus-user-session) fixes it")
    hooks_line = ("in units of their own (systemd-run), MemoryDenyWriteExecute=yes" if runner
                  else "inside the sandbox, without MemoryDenyWriteExecute=")
    text = render_unit(unit_params(resolved, omitted, __version__, runner))
    if args.dry_run:
        sys.stdout.write(text)
        for warning in resolved.warnings:
            _warn(warning)
        return 0

    unit_dir = Path(args.unit_dir).expanduser().absolute() if args.unit_dir \
        else default_unit_dir()
    target = unit_dir / UNIT_NAME
    existing = read_existing(target)
    if existing is not None and not is_ours(existing):
        if not args.force:
            raise ServiceError(f"{target} exists and was not written by qwen-refresher "
                               "install-service; not overwriting it. Move it away, or pass "
                               "--force to replace it (a copy is kept as "
                               f"{UNIT_NAME}.bak)")
        backup = target.with_name(UNIT_NAME + ".bak")
        try:
            shutil.copyfile(target, backup, follow_symlinks=True)
        except OSError:
            backup.write_text(existing, encoding="utf-8")
        _out(f"Kept the previous unit as {backup}")
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        resolved.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServiceError(f"cannot create {exc.filename}: {exc.strerror}") from None
    changed = existing != text
    if changed:
        write_atomic(target, text)
    _out(f"{'Wrote' if changed else 'Unchanged:'} {target}")
    _out(f"  runs: {' '.join(resolved.exec_start)}")
    _out(f"  sandbox: {sandbox}")
    _out(f"  hooks: {hooks_line}")
    systemctl("daemon-reload")
    if args.now:
        if existing is not None and changed:
            systemctl("try-restart", UNIT_NAME)  # a running old version picks up the new unit
        systemctl("enable", "--now", UNIT_NAME)
        _out(f"Enabled and started {UNIT_NAME}.")
    else:
        if existing is not None and changed:
            _out(f"If it is running, apply the new unit: systemctl --user restart {UNIT_NAME}")
        _out(f"Start it now and at every login: systemctl --user enable --now {UNIT_NAME}")
    for label, directory in (("OpenClaw state dir", resolved.openclaw_state_dir),
                             ("Qwen Code dir", resolved.qwen_home)):
        if "ProtectSystem" not in omitted and not directory.exists():
            _out(f"Note: {label} {directory} does not exist yet; the service can write there "
                 "only after a restart once it does.")
    for warning in resolved.warnings:
        _warn(warning)
    user = user_name()
    if not unit.lingering(user):
        _out("Note: user services stop when your last login session ends. To keep it running "
             f"after logout and start it at boot: loginctl enable-linger {user}")
    _out(f"Check it with: qwen-refresher status   Logs: journalctl --user -u {UNIT_NAME}")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    """Stop, disable and remove the unit; the state dir (history, journal) is kept."""
    unit_dir = Path(args.unit_dir).expanduser().absolute() if args.unit_dir \
        else default_unit_dir()
    target = unit_dir / UNIT_NAME
    existing = read_existing(target)
    if existing is None:
        _out(f"{target} does not exist; nothing to remove.")
        return 0
    if not is_ours(existing) and not args.force:
        raise ServiceError(f"{target} was not written by qwen-refresher install-service; not "
                           "removing it. Pass --force to remove it anyway")
    preflight()
    stopped = systemctl("disable", "--now", UNIT_NAME, check=False)
    if stopped.returncode != 0:
        _warn(f"`systemctl --user disable --now {UNIT_NAME}` failed: "
              f"{(stopped.stderr or stopped.stdout).strip() or stopped.returncode}; "
              "removing the unit file anyway")
    try:
        target.unlink()
    except OSError as exc:
        raise ServiceError(f"cannot remove {target}: {exc.strerror}") from None
    systemctl("daemon-reload")
    systemctl("reset-failed", UNIT_NAME, check=False)
    _out(f"Removed {target}.")
    state_dir = unit.configured(os.environ, []).state_dir
    _out(f"Kept the state dir {state_dir} (status history; a token journal if a write ever "
         "failed) and any linger setting (`loginctl disable-linger` undoes that).")
    return 0


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
    p.add_argument("--sandbox", choices=["auto", "full", "basic"], default="auto",
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
