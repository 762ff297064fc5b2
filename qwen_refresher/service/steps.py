"""What ``install-service`` and ``uninstall-service`` decide and do, without a word printed.

The commands (``commands/service.py``) parse the arguments, call these steps in order and
tell the person what happened; every decision (which sandbox, which hook runner, whether a
unit is ours to replace, what systemd is asked) is made here, and every warning is handed
back as text for the command to show.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ServiceError
from . import systemd
from .machine import Resolved, default_unit_dir
from .unit import HOOK_RUNNER, NAMESPACE_SETTINGS, UNIT_NAME, is_ours

SANDBOX_MODES = ("auto", "full", "basic")


@dataclass
class SandboxChoice:
    """The ``NAMESPACE_SETTINGS`` to leave out of the unit, and why (warnings)."""

    omitted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if "PrivateUsers" in self.omitted:
            return "basic"
        return "full" if not self.omitted else "full except " + ", ".join(self.omitted)


@dataclass
class RunnerChoice:
    """``hook_runner`` of the unit (empty: hooks run inside the sandbox), and why."""

    runner: tuple[str, ...] = HOOK_RUNNER
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ("in units of their own (systemd-run), MemoryDenyWriteExecute=yes" if self.runner
                else "inside the sandbox, without MemoryDenyWriteExecute=")


def check_platform() -> None:
    """Only a Linux with a reachable user manager can take the unit (checked before anything
    is written, so a failure leaves no half-install)."""
    if not sys.platform.startswith("linux"):
        raise ServiceError("systemd user services exist only on Linux; use --dry-run to "
                           "see the unit, or run `qwen-refresher run` under your own "
                           "supervisor")
    systemd.preflight()


def choose_sandbox(mode: str) -> SandboxChoice:
    """``full``: every setting; ``basic``: none that needs a user namespace; ``auto``: what the
    user manager accepts (``systemd.probe_sandbox``)."""
    every = [name for name, _ in NAMESPACE_SETTINGS]
    if mode == "basic":
        return SandboxChoice(every)
    if mode != "auto":
        return SandboxChoice()
    refused, detail = systemd.probe_sandbox()
    if refused is None:
        return SandboxChoice([], [
            f"could not check whether the full sandbox works here ({detail}); using it. If "
            "the service fails with 226/NAMESPACE, reinstall with --sandbox basic"])
    if "PrivateUsers" in refused:
        return SandboxChoice(every, [
            "this user manager cannot run sandboxed user services (user namespaces are "
            "restricted); installing with the basic (seccomp-only) sandbox. "
            f"systemd said: {detail or 'no details'}"])
    if refused:
        return SandboxChoice(refused, [
            "this user manager refuses " + ", ".join(f"{n}=" for n in refused) +
            " in a user service; installing the sandbox without them"])
    return SandboxChoice()


def choose_hook_runner(mode: str, dry_run: bool) -> RunnerChoice:
    """Hooks in units of their own unless ``auto`` finds that the manager cannot run them."""
    if mode != "auto":
        return RunnerChoice()
    works, detail = systemd.probe_hook_runner()
    if works is None and dry_run:
        return RunnerChoice(HOOK_RUNNER, [
            f"could not check whether hooks can run in units of their own ({detail}); "
            "assuming they can"])
    if not works:
        # With the manager reachable (preflight), "could not ask" means no session bus.
        return RunnerChoice((), [
            "this user manager cannot run hooks in units of their own (`systemd-run --user "
            "--wait` failed: " + (detail or "no details") + "); installing without "
            "MemoryDenyWriteExecute= so that Node.js hooks (OpenClaw's CLI) still run. A D-Bus "
            "session bus (Debian/Ubuntu: dbus-user-session) fixes it"])
    return RunnerChoice()


def unit_path(unit_dir: str | None) -> Path:
    """Where the unit goes: ``--unit-dir``, else the user manager's own directory."""
    directory = Path(unit_dir).expanduser().absolute() if unit_dir \
        else default_unit_dir()
    return directory / UNIT_NAME


@dataclass
class Written:
    """What ``put_unit`` did."""

    target: Path
    existing: str | None  # the unit that was there before, None if none
    changed: bool
    backup: Path | None = None  # where someone else's unit was kept (``force``)


def put_unit(target: Path, text: str, state_dir: Path, *, force: bool) -> Written:
    """Write ``text`` to ``target`` unless it is someone else's unit (``force``: replace it,
    keeping a ``.bak`` copy), and create the state dir (0700) the unit names."""
    existing = read_existing(target)
    backup: Path | None = None
    if existing is not None and not is_ours(existing):
        if not force:
            raise ServiceError(f"{target} exists and was not written by qwen-refresher "
                               "install-service; not overwriting it. Move it away, or pass "
                               "--force to replace it (a copy is kept as "
                               f"{UNIT_NAME}.bak)")
        backup = target.with_name(UNIT_NAME + ".bak")
        try:
            shutil.copyfile(target, backup, follow_symlinks=True)
        except OSError:
            backup.write_text(existing, encoding="utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServiceError(f"cannot create {exc.filename}: {exc.strerror}") from None
    changed = existing != text
    if changed:
        write_atomic(target, text)
    return Written(target, existing, changed, backup)


def activate(written: Written, *, now: bool) -> None:
    """``daemon-reload``; with ``now`` also restart a running old version and enable + start."""
    systemd.systemctl("daemon-reload")
    if now:
        if written.existing is not None and written.changed:
            systemd.systemctl("try-restart", UNIT_NAME)  # a running old version picks it up
        systemd.systemctl("enable", "--now", UNIT_NAME)


def missing_dirs(resolved: Resolved, omitted: list[str]) -> list[tuple[str, Path]]:
    """Writable directories that do not exist yet: with ``ProtectSystem=`` the service can
    write them only after a restart once they do."""
    if "ProtectSystem" in omitted:
        return []
    return [(label, directory) for label, directory in (
        ("OpenClaw state dir", resolved.openclaw_state_dir),
        ("Qwen Code dir", resolved.qwen_home)) if not directory.exists()]


@dataclass
class Removed:
    """What ``remove_unit`` did."""

    target: Path
    existed: bool
    stop_failure: str | None = None  # ``disable --now`` failed (the file is removed anyway)


def remove_unit(target: Path, *, force: bool) -> Removed:
    """Stop, disable and remove our unit (``force``: anyone's); the state dir is kept."""
    existing = read_existing(target)
    if existing is None:
        return Removed(target, existed=False)
    if not is_ours(existing) and not force:
        raise ServiceError(f"{target} was not written by qwen-refresher install-service; not "
                           "removing it. Pass --force to remove it anyway")
    systemd.preflight()
    stopped = systemd.systemctl("disable", "--now", UNIT_NAME, check=False)
    failure = None
    if stopped.returncode != 0:
        failure = (f"`systemctl --user disable --now {UNIT_NAME}` failed: "
                   f"{(stopped.stderr or stopped.stdout).strip() or stopped.returncode}; "
                   "removing the unit file anyway")
    try:
        target.unlink()
    except OSError as exc:
        raise ServiceError(f"cannot remove {target}: {exc.strerror}") from None
    systemd.systemctl("daemon-reload")
    systemd.systemctl("reset-failed", UNIT_NAME, check=False)
    return Removed(target, existed=True, stop_failure=failure)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_existing(path: Path) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""  # unreadable or a dangling symlink: certainly not a unit we wrote


