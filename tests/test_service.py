"""install-service / uninstall-service against a fake ``systemctl``, and the shipped unit.

The fake ``systemctl`` and ``systemd-run`` are shell scripts first on PATH that append their
arguments to a log file, so each test sees exactly which commands the installer ran. The
shipped unit is checked with the real ``systemd-analyze`` when the machine has it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_refresher import service
from qwen_refresher.errors import ServiceError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "systemd" / "qwen-refresher.service"
MAX_EXPOSURE = 2.0
PREFLIGHT = "systemctl --user show --property=Version"

FAKE_TOOL = """#!/bin/sh
printf '%s %s\\n' "$(basename "$0")" "$*" >> "$FAKE_SYSTEMD_LOG"
if [ "$(basename "$0")" = systemd-run ]; then
  for refused in $FAKE_SYSTEMD_RUN_REFUSE; do
    case " $* " in *" $refused "*) echo "Job failed: status=226/NAMESPACE" >&2; exit 1;; esac
  done
  [ -n "$FAKE_SYSTEMD_RUN_ERR" ] && echo "$FAKE_SYSTEMD_RUN_ERR" >&2
  exit "${FAKE_SYSTEMD_RUN_RC:-0}"
fi
[ -n "$FAKE_SYSTEMCTL_ERR" ] && echo "$FAKE_SYSTEMCTL_ERR" >&2
exit "${FAKE_SYSTEMCTL_RC:-0}"
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Env:
    """A throw-away HOME, a fake systemctl/systemd-run on PATH and an installed executable."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "systemd.log"
        self.unit_dir = tmp_path / "units"
        for tool in ("systemctl", "systemd-run"):
            _executable(self.bin / tool, FAKE_TOOL)
        self.exe = _executable(tmp_path / "venv" / "bin" / "qwen-refresher", "#!/bin/sh\n")
        for name in list(os.environ):
            if name.startswith(("QWEN_", "OPENCLAW_", "XDG_", "CLAWDBOT_", "PI_CODING")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("HOME", str(self.home))
        monkeypatch.setenv("PATH", f"{self.bin}:/usr/bin:/bin")
        monkeypatch.setenv("FAKE_SYSTEMD_LOG", str(self.log))
        monkeypatch.setattr(sys, "argv", [str(self.exe), "install-service"])
        monkeypatch.setattr(service, "LINGER_DIR", tmp_path / "linger")
        self.monkeypatch = monkeypatch

    @property
    def unit(self) -> Path:
        return self.unit_dir / service.UNIT_NAME

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def systemctl_calls(self) -> list[str]:
        """What systemctl was asked to do, the read-only preflight left out."""
        return [c.removeprefix("systemctl ") for c in self.calls()
                if c.startswith("systemctl ") and c != PREFLIGHT]

    def run(self, *argv: str) -> int:
        parser = argparse.ArgumentParser()
        service.add_parsers(parser.add_subparsers(dest="command"))
        args = parser.parse_args(list(argv))
        return int(args.handler(args))

    def install(self, *extra: str) -> int:
        return self.run("install-service", "--unit-dir", str(self.unit_dir), *extra)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def _settings(text: str) -> dict[str, list[str]]:
    """Active ``Key=value`` lines of a unit, comments skipped; repeated keys accumulate."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


# --- install ------------------------------------------------------------------------------------

def test_install_writes_a_filled_in_unit_and_reloads_systemd(env: Env,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert env.install("--sandbox", "full") == 0
    text = env.unit.read_text()
    assert text.startswith(service.MARKER)
    s = _settings(text)
    assert s["ExecStart"] == [f"{env.exe} run"]
    assert f'"OPENCLAW_STATE_DIR={env.home}/.openclaw"' in s["Environment"]
    assert f'"QWEN_HOME={env.home}/.qwen"' in s["Environment"]
    path_line = next(v for v in s["Environment"] if v.startswith('"PATH='))
    assert path_line.startswith(f'"PATH={env.exe.parent}:')
    state_dir = env.home / ".local" / "state" / "qwen-refresher"
    assert s["ReadWritePaths"] == [f"-{env.home}/.openclaw", f"-{env.home}/.qwen", f"-{state_dir}"]
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert env.systemctl_calls() == ["--user daemon-reload"]
    out = capsys.readouterr().out
    assert "systemctl --user enable --now qwen-refresher.service" in out
    assert "loginctl enable-linger" in out


def test_install_now_enables_and_starts(env: Env) -> None:
    env.install("--now", "--sandbox", "full")
    assert env.systemctl_calls() == ["--user daemon-reload",
                                     "--user enable --now qwen-refresher.service"]


def test_reinstall_restarts_a_running_old_version(env: Env) -> None:
    env.install("--now", "--sandbox", "full")
    env.monkeypatch.setenv("QWEN_HOME", str(env.tmp / "elsewhere"))
    env.install("--now", "--sandbox", "full")
    assert env.systemctl_calls()[2:] == ["--user daemon-reload",
                                         "--user try-restart qwen-refresher.service",
                                         "--user enable --now qwen-refresher.service"]
    assert f"QWEN_HOME={env.tmp}/elsewhere" in env.unit.read_text()


def test_reinstall_of_an_identical_unit_does_not_restart(env: Env) -> None:
    env.install("--now", "--sandbox", "full")
    before = env.unit.stat().st_mtime_ns
    env.install("--now", "--sandbox", "full")
    assert env.unit.stat().st_mtime_ns == before
    assert "--user try-restart qwen-refresher.service" not in env.systemctl_calls()


def test_refuses_to_overwrite_a_unit_it_did_not_write(env: Env) -> None:
    env.unit_dir.mkdir()
    env.unit.write_text("[Service]\nExecStart=/usr/bin/my-own-refresher\n")
    with pytest.raises(ServiceError, match="not written by qwen-refresher"):
        env.install("--sandbox", "full")
    assert env.unit.read_text() == "[Service]\nExecStart=/usr/bin/my-own-refresher\n"
    assert env.systemctl_calls() == []


def test_force_replaces_a_foreign_unit_and_keeps_a_copy(env: Env) -> None:
    env.unit_dir.mkdir()
    env.unit.write_text("[Service]\nExecStart=/usr/bin/my-own-refresher\n")
    assert env.install("--force", "--sandbox", "full") == 0
    assert service.is_ours(env.unit.read_text())
    backup = env.unit_dir / "qwen-refresher.service.bak"
    assert backup.read_text() == "[Service]\nExecStart=/usr/bin/my-own-refresher\n"


def test_dry_run_prints_the_unit_and_changes_nothing(env: Env,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert env.install("--dry-run", "--sandbox", "full") == 0
    out = capsys.readouterr().out
    assert out.startswith(service.MARKER)
    assert f"ExecStart={env.exe} run" in out
    assert not env.unit_dir.exists()
    assert not (env.home / ".local").exists()
    assert env.calls() == []


def test_sandbox_auto_keeps_the_full_sandbox_when_the_probe_passes(env: Env) -> None:
    env.install("--sandbox", "auto")
    probe = next(c for c in env.calls() if c.startswith("systemd-run "))
    assert "--user --wait" in probe
    for name, value in service.NAMESPACE_SETTINGS:
        assert f"-p {name}={value}" in probe
    assert _settings(env.unit.read_text())["PrivateUsers"] == ["yes"]


def test_sandbox_auto_falls_back_to_basic_when_user_namespaces_are_refused(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_ERR",
                           "Job failed. See journalctl: status=226/NAMESPACE")
    env.install("--sandbox", "auto")
    s = _settings(env.unit.read_text())
    for name, _ in service.NAMESPACE_SETTINGS:
        assert name not in s, name
    assert "ReadWritePaths" not in s
    for kept in ("NoNewPrivileges", "SystemCallFilter", "RestrictAddressFamilies", "UMask"):
        assert kept in s
    assert "226/NAMESPACE" in capsys.readouterr().err


def test_sandbox_auto_leaves_out_only_the_settings_this_manager_refuses(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    # What a systemd 252 user manager inside a container refused on the development machine.
    refused = ("PrivateIPC", "ProtectKernelTunables", "ProtectKernelLogs")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_REFUSE", " ".join(f"{n}=yes" for n in refused))
    env.install("--sandbox", "auto")
    text = env.unit.read_text()
    s = _settings(text)
    for name, value in service.NAMESPACE_SETTINGS:
        if name in refused:
            assert name not in s, name
        else:
            assert s[name] == [value], name
    assert len(s["ReadWritePaths"]) == 3
    assert "\n# PrivateIPC=, ProtectKernelTunables=, ProtectKernelLogs=\n" in text
    assert "full except PrivateIPC, ProtectKernelTunables, ProtectKernelLogs" in \
        capsys.readouterr().out
    # The survivors were tried together before they were written.
    last_probe = [c for c in env.calls() if c.startswith("systemd-run ")][-1]
    assert "-p PrivateUsers=yes -p ProtectSystem=strict" in last_probe
    assert not any(f"-p {n}=" in last_probe for n in refused)


def test_read_write_paths_follow_protect_system_without_protect_home() -> None:
    text = service.render_unit(service.UnitParams(
        exec_start=("/x/qwen-refresher", "run"), read_write_paths=("/data",),
        omitted=("ProtectHome",)))
    lines = text.splitlines()
    assert lines[lines.index("ProtectSystem=strict") + 1] == "ReadWritePaths=-/data"
    assert "ProtectHome=read-only" not in lines


def test_an_unreachable_user_manager_stops_before_anything_is_written(env: Env) -> None:
    env.monkeypatch.setenv("FAKE_SYSTEMCTL_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMCTL_ERR", "Failed to connect to bus: No medium found")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_ERR", "Failed to connect to bus: No medium found")
    with pytest.raises(ServiceError, match="not through sudo"):
        env.install("--sandbox", "auto")
    assert not env.unit_dir.exists()
    assert env.calls() == [PREFLIGHT]  # no probe, no write, no reload


def test_dry_run_without_a_user_manager_assumes_the_full_sandbox(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_ERR", "Failed to connect to bus: No medium found")
    env.install("--dry-run")
    captured = capsys.readouterr()
    assert "PrivateUsers=yes" in captured.out
    assert "could not check" in captured.err


def test_missing_systemctl_is_a_service_error(env: Env) -> None:
    (env.bin / "systemctl").unlink()
    env.monkeypatch.setenv("PATH", str(env.bin))
    with pytest.raises(ServiceError, match="systemctl not found"):
        env.install("--sandbox", "full")


def test_configured_and_symlinked_stores_stay_writable(env: Env) -> None:
    config = env.home / ".config" / "qwen-refresher" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('state_dir = "~/custom-state"\n'
                      'stores = ["/srv/agents/x/auth-profiles.json"]\n')
    real = env.tmp / "shared" / "auth-profiles.json"
    real.parent.mkdir()
    real.write_text("{}")
    agent = env.home / ".openclaw" / "agents" / "main" / "agent"
    agent.mkdir(parents=True)
    (agent / "auth-profiles.json").symlink_to(real)
    env.install("--sandbox", "full")
    rw = _settings(env.unit.read_text())["ReadWritePaths"]
    assert f"-{env.home}/custom-state" in rw
    assert "-/srv/agents/x" in rw
    assert f"-{env.tmp}/shared" in rw  # OpenClaw's lock sits next to the symlink's target
    assert f"-{env.home}/.openclaw" in rw
    assert not any(p.startswith(f"-{env.home}/.openclaw/") for p in rw)  # covered by the dir
    assert (env.home / "custom-state").is_dir()


def test_shell_paths_are_pinned_so_status_and_daemon_agree(env: Env) -> None:
    env.monkeypatch.setenv("QWEN_REFRESHER_STATE_DIR", str(env.tmp / "st"))
    env.monkeypatch.setenv("OPENCLAW_GATEWAY_TOKEN", "secret-token-value")
    env.install("--sandbox", "full")
    text = env.unit.read_text()
    assert f'Environment="QWEN_REFRESHER_STATE_DIR={env.tmp}/st"' in text
    assert "secret-token-value" not in text


def test_paths_with_spaces_and_percent_signs_are_quoted(env: Env) -> None:
    exe = _executable(env.tmp / "my apps" / "100%" / "qwen-refresher", "#!/bin/sh\n")
    env.monkeypatch.setattr(sys, "argv", [str(exe)])
    env.install("--sandbox", "full")
    s = _settings(env.unit.read_text())
    assert s["ExecStart"] == [f'"{env.tmp}/my apps/100%%/qwen-refresher" run']
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", str(env.unit)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr  # it found the executable: quoting is right


# --- uninstall ----------------------------------------------------------------------------------

def test_uninstall_stops_disables_and_removes(env: Env) -> None:
    env.install("--now", "--sandbox", "full")
    assert env.run("uninstall-service", "--unit-dir", str(env.unit_dir)) == 0
    assert not env.unit.exists()
    assert env.systemctl_calls()[2:] == ["--user disable --now qwen-refresher.service",
                                         "--user daemon-reload",
                                         "--user reset-failed qwen-refresher.service"]
    assert (env.home / ".local" / "state" / "qwen-refresher").is_dir()  # state is kept


def test_uninstall_refuses_a_foreign_unit_unless_forced(env: Env) -> None:
    env.unit_dir.mkdir()
    env.unit.write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(ServiceError, match="not written by qwen-refresher"):
        env.run("uninstall-service", "--unit-dir", str(env.unit_dir))
    assert env.unit.exists()
    assert env.calls() == []
    env.run("uninstall-service", "--unit-dir", str(env.unit_dir), "--force")
    assert not env.unit.exists()


def test_uninstall_without_a_unit_is_a_no_op(env: Env) -> None:
    assert env.run("uninstall-service", "--unit-dir", str(env.unit_dir)) == 0
    assert env.calls() == []


# --- the module and the shipped unit ------------------------------------------------------------

def test_cli_contract() -> None:
    parser = argparse.ArgumentParser()
    service.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["install-service", "--now", "--force", "--dry-run",
                              "--unit-dir", "/x"])
    assert (args.now, args.force, args.dry_run, args.unit_dir, args.sandbox) == \
        (True, True, True, "/x", "auto")
    assert args.handler is service.install
    args = parser.parse_args(["uninstall-service"])
    assert args.handler is service.uninstall


def test_importing_the_module_stays_cheap() -> None:
    code = ("import sys, qwen_refresher.service; "
            "print([m for m in ('pydantic', 'httpx', 'structlog', 'apscheduler', 'watchdog', "
            "'prometheus_client') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "[]"


def test_shipped_unit_is_the_rendered_template() -> None:
    assert SHIPPED.read_text() == service.shipped_unit(), (
        "systemd/qwen-refresher.service is generated; regenerate it with: python -c \"from "
        "qwen_refresher import service; print(service.shipped_unit(), end='')\" > "
        "systemd/qwen-refresher.service")
    assert not service.is_ours(SHIPPED.read_text())  # a hand-copied template is the user's


def test_shipped_unit_has_the_promised_settings() -> None:
    s = _settings(SHIPPED.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"]
    assert one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) > 0 and one["StartLimitIntervalSec"]
    assert "-HUP $MAINPID" in one["ExecReload"]
    assert one["UMask"] == "0077"
    for key in ("NoNewPrivileges", "PrivateTmp", "LockPersonality", "RestrictRealtime",
                "PrivateUsers"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert s["SystemCallFilter"][0] == "@system-service"
    assert s["ReadWritePaths"] == ["-%h/.openclaw", "-%h/.qwen",
                                   "-%h/.local/state/qwen-refresher"]
    # The default on_rotate hook is OpenClaw's Node.js CLI, which aborts under
    # MemoryDenyWriteExecute (V8's JIT; --jitless breaks undici's WebAssembly parser).
    assert "MemoryDenyWriteExecute" not in s
    # System-only settings would only flatter the score in a user unit.
    for system_only in ("ProtectProc", "ProcSubset", "ProtectControlGroups", "RemoveIPC",
                        "User", "DynamicUser", "StateDirectory"):
        assert system_only not in s, system_only


def _exposure(unit: Path) -> float:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze not installed")


@needs_systemd_analyze
def test_shipped_unit_exposure_score(tmp_path: Path) -> None:
    unit = tmp_path / service.UNIT_NAME
    shutil.copyfile(SHIPPED, unit)
    assert _exposure(unit) <= MAX_EXPOSURE


@needs_systemd_analyze
def test_installed_unit_exposure_score(env: Env) -> None:
    env.install("--sandbox", "full")
    assert _exposure(env.unit) <= MAX_EXPOSURE
