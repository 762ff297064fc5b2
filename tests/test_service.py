"""install-service / uninstall-service against a fake ``systemctl``, and the shipped unit.

The fake ``systemctl`` and ``systemd-run`` are shell scripts first on PATH that append their
arguments to a log file, so each test sees exactly which commands the installer ran. The
shipped unit is checked with the real ``systemd-analyze`` when the machine has it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_refresher import hooks, service
from qwen_refresher.config import load_settings
from qwen_refresher.errors import ConfigError, ServiceError

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
        monkeypatch.setattr(service.systemd, "LINGER_DIR", tmp_path / "linger")
        self.monkeypatch = monkeypatch

    @property
    def unit(self) -> Path:
        return self.unit_dir / service.UNIT_NAME

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def namespace_probes(self) -> list[str]:
        """The systemd-run calls that tried sandbox settings (not the hook runner's)."""
        return [c for c in self.calls()
                if c.startswith("systemd-run ") and "-p PrivateUsers=yes" in c]

    def runner_probes(self) -> list[str]:
        return [c for c in self.calls()
                if c.startswith("systemd-run ") and "--unit=qwen-refresher-hook-probe-" in c]

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


def _environment(text: str) -> dict[str, str]:
    """A unit's ``Environment=`` assignments (quoted the way install-service writes them)."""
    out: dict[str, str] = {}
    for value in _settings(text).get("Environment", []):
        for word in shlex.split(value):
            name, _, val = word.partition("=")
            out[name] = val
    return out


def _runner(text: str) -> tuple[str, ...] | None:
    """The unit's hook runner as the daemon reads it (through its settings); None: not set."""
    value = _environment(text).get(service.RUNNER_ENV)
    if value is None:
        return None
    return load_settings(env={"HOME": "/nonexistent", service.RUNNER_ENV: value}).hook_runner_argv


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
    probe = env.namespace_probes()[0]
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
    refused = ("PrivateMounts", "ProtectKernelTunables", "ProtectKernelLogs")
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
    assert "\n# PrivateMounts=, ProtectKernelTunables=, ProtectKernelLogs=\n" in text
    assert "full except PrivateMounts, ProtectKernelTunables, ProtectKernelLogs" in \
        capsys.readouterr().out
    # The survivors were tried together before they were written.
    last_probe = env.namespace_probes()[-1]
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


def test_sandbox_auto_runs_hooks_in_their_own_units_when_the_runner_works(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.install("--sandbox", "auto")
    probe = env.runner_probes()
    assert len(probe) == 1
    # The probe is a hook run exactly as run_hook runs one: the runner, then --wait --pipe ...
    assert probe[0].startswith("systemd-run " + " ".join(service.HOOK_RUNNER[1:]) +
                               " --quiet --wait --pipe --collect ")
    assert probe[0].endswith(" -- /bin/sh -c true")
    text = env.unit.read_text()
    assert _settings(text)["MemoryDenyWriteExecute"] == ["yes"]
    assert _runner(text) == service.HOOK_RUNNER
    assert "hooks: in units of their own" in capsys.readouterr().out


def test_without_a_session_bus_hooks_stay_in_the_sandbox_without_mdwe(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    # systemctl reaches the manager through its private socket; `systemd-run --wait` needs the
    # D-Bus session bus (Debian without dbus-user-session).
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_ERR",
                           "Failed to connect to bus: No such file or directory")
    env.install("--sandbox", "auto")
    text = env.unit.read_text()
    s = _settings(text)
    assert "MemoryDenyWriteExecute" not in s
    assert "\n#MemoryDenyWriteExecute=yes\n" in text
    assert _runner(text) is None
    assert s["PrivateUsers"] == ["yes"]  # the namespace probe could not tell: full sandbox
    captured = capsys.readouterr()
    assert "hooks: inside the sandbox" in captured.out
    assert "dbus-user-session" in captured.err


def test_dry_run_without_a_user_manager_assumes_the_hook_runner(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_ERR", "Failed to connect to bus: No medium found")
    env.install("--dry-run")
    captured = capsys.readouterr()
    assert _settings(captured.out)["MemoryDenyWriteExecute"] == ["yes"]
    assert _runner(captured.out) == service.HOOK_RUNNER
    assert "could not check whether hooks can run" in captured.err


def test_sandbox_full_and_basic_keep_the_runner_without_probing(env: Env) -> None:
    for sandbox in ("full", "basic"):
        env.install("--sandbox", sandbox, "--dry-run")
    assert env.runner_probes() == []
    env.install("--sandbox", "basic")
    text = env.unit.read_text()
    assert _settings(text)["MemoryDenyWriteExecute"] == ["yes"]
    assert _runner(text) == service.HOOK_RUNNER


def test_a_hook_runner_in_config_toml_is_reported_as_overridden(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    config = env.home / ".config" / "qwen-refresher" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('hook_runner = "systemd-run --user --property=Nice=5"\n')
    env.install("--sandbox", "full")
    assert "takes precedence" in capsys.readouterr().err
    assert _runner(env.unit.read_text()) == service.HOOK_RUNNER


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


# --- the hook runner (hooks.runner_argv, run_hook(runner=...), the hook_runner setting) ----------

FAKE_SYSTEMD_RUN = """#!{python}
# systemd-run, as far as run_hook uses it: log the argv, start the command after "--" with a
# manager's environment plus --setenv (NAME alone: the value from our own environment), wait,
# return its exit status. The unit name goes to a file so that a test can see it was killed.
import json, os, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_SYSTEMD_LOG"], "a") as fh:
    fh.write(json.dumps(argv) + "\\n")
split = argv.index("--")
env = {{"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]}}
for arg in argv[:split]:
    if arg.startswith("--setenv="):
        name, eq, value = arg[len("--setenv="):].partition("=")
        env[name] = value if eq else os.environ[name]
sys.exit(subprocess.run(argv[split + 1:], env=env).returncode)
"""

RUNNER = ("systemd-run", "--user", "--property=UMask=0077")
VARIABLES = {"EVENT": "rotated", "PROFILE": "qwen-portal:default",
             "STORE": "/home/u/.openclaw/agents/main/agent/auth-profiles.json",
             "EXPIRES_AT": "2026-11-30T12:00:00Z", "EXPIRES_MS": "1796040000000",
             "PROFILES": "/a/auth-profiles.json#qwen-portal:default\n/b/oauth_creds.json#qwen"}


def test_runner_argv_passes_hook_variables_by_value_and_our_environment_by_name() -> None:
    environ = {"PATH": "/opt/node/bin:/usr/bin", "OPENCLAW_STATE_DIR": "/home/u/.openclaw",
               "OPENCLAW_GATEWAY_TOKEN": "gw-secret-value",  # from the unit's EnvironmentFile
               "NOTIFY_SOCKET": "/run/user/1000/systemd/notify", "WATCHDOG_USEC": "60000000",
               "INVOCATION_ID": "abc", "BASH_FUNC_f%%": "() { :; }",
               "QWEN_REFRESHER_EVENT": "stale"}
    argv = hooks.runner_argv(RUNNER, "openclaw secrets reload", VARIABLES, timeout=30,
                             unit="qwen-refresher-hook-1", environ=environ)
    assert argv == [
        "systemd-run", "--user", "--property=UMask=0077",
        "--quiet", "--wait", "--pipe", "--collect", "--unit=qwen-refresher-hook-1",
        "--property=RuntimeMaxSec=35s", "--property=TimeoutStopSec=5s",
        "--setenv=PATH", "--setenv=OPENCLAW_STATE_DIR", "--setenv=OPENCLAW_GATEWAY_TOKEN",
        "--setenv=QWEN_REFRESHER_EVENT=rotated",
        "--setenv=QWEN_REFRESHER_PROFILE=qwen-portal:default",
        "--setenv=QWEN_REFRESHER_STORE=/home/u/.openclaw/agents/main/agent/auth-profiles.json",
        "--setenv=QWEN_REFRESHER_EXPIRES_AT=2026-11-30T12:00:00Z",
        "--setenv=QWEN_REFRESHER_EXPIRES_MS=1796040000000",
        "--setenv=QWEN_REFRESHER_PROFILES=/a/auth-profiles.json#qwen-portal:default\n"
        "/b/oauth_creds.json#qwen",
        "--", "/bin/sh", "-c", "openclaw secrets reload"]
    # No value of our environment is on the command line (`ps` shows it); only names.
    assert not any("gw-secret-value" in arg or "/opt/node" in arg for arg in argv)


def test_runner_argv_rounds_the_unit_limit_up_past_the_timeout() -> None:
    argv = hooks.runner_argv(RUNNER, "true", {}, timeout=0.5, unit="u", environ={})
    assert "--property=RuntimeMaxSec=6s" in argv
    assert argv[-4:] == ["--", "/bin/sh", "-c", "true"]


@pytest.fixture
def fake_runner(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    _executable(env.bin / "systemd-run", FAKE_SYSTEMD_RUN.format(python=sys.executable))
    monkeypatch.setenv("OPENCLAW_GATEWAY_TOKEN", "gw-secret-value")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/user/1000/systemd/notify")
    return (str(env.bin / "systemd-run"), "--user")


def _runner_calls(env: Env) -> list[list[str]]:
    return [json.loads(line) for line in env.calls() if line.startswith("[")]


def test_run_hook_through_a_runner_gets_the_variables_and_the_exit_status(
        env: Env, fake_runner: tuple[str, ...]) -> None:
    command = ('printf "%s|%s|%s|%s" "$QWEN_REFRESHER_PROFILE" "$OPENCLAW_GATEWAY_TOKEN" '
               '"${NOTIFY_SOCKET-unset}" "$(umask)"; exit 7')
    result = hooks.run_hook(command, VARIABLES, timeout=30, runner=fake_runner)
    assert (result.returncode, result.timed_out) == (7, False)
    assert result.output == "qwen-portal:default|gw-secret-value|unset|" + result.output[-4:]
    (argv,) = _runner_calls(env)
    assert argv[-3:] == ["/bin/sh", "-c", command]
    assert "--setenv=OPENCLAW_GATEWAY_TOKEN" in argv
    assert not any("gw-secret-value" in arg for arg in argv)
    assert not any(arg.startswith("--setenv=NOTIFY_SOCKET") for arg in argv)


def test_run_hook_through_a_runner_kills_the_unit_at_the_timeout(
        env: Env, fake_runner: tuple[str, ...]) -> None:
    started = time.monotonic()
    result = hooks.run_hook("echo started; sleep 30", {}, timeout=1, runner=fake_runner)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - started < 10
    (argv,) = _runner_calls(env)
    unit = next(a for a in argv if a.startswith("--unit=")).removeprefix("--unit=")
    assert unit.startswith(hooks.RUNNER_UNIT_PREFIX)
    # systemd-run is only our window on the unit: the unit itself is killed, in the same scope.
    assert f"systemctl --user kill --signal=SIGKILL {unit}.service" in env.calls()
    assert "--property=RuntimeMaxSec=6s" in argv  # and ends by itself should we die first


def test_run_hook_without_a_runner_is_unchanged(env: Env) -> None:
    result = hooks.run_hook('printf %s "$QWEN_REFRESHER_EVENT"', {"EVENT": "rotated"},
                            timeout=30)
    assert (result.returncode, result.output) == (0, "rotated")
    assert env.calls() == []


def test_run_hook_reports_a_runner_that_cannot_start(env: Env) -> None:
    result = hooks.run_hook("true", {}, timeout=5, runner=(str(env.tmp / "no-such-run"),))
    assert result.returncode is None and "could not start" in result.output


@pytest.mark.parametrize(("value", "argv"), [
    ("", ()),
    ("none", ()),
    ("systemd-run --user", ("systemd-run", "--user")),
    ("/usr/bin/systemd-run --user '--property=Description=qwen hook'",
     ("/usr/bin/systemd-run", "--user", "--property=Description=qwen hook")),
])
def test_hook_runner_setting(tmp_path: Path, value: str, argv: tuple[str, ...]) -> None:
    s = load_settings(env={"HOME": str(tmp_path), "QWEN_REFRESHER_HOOK_RUNNER": value})
    assert s.hook_runner_argv == argv


@pytest.mark.parametrize(("value", "message"), [
    ("sudo -u gateway", "systemd-run"),
    ("systemd-run --user --scope", "--scope"),
    ("systemd-run '--property=unterminated", "split"),
])
def test_hook_runner_setting_rejects(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(env={"HOME": str(tmp_path), "QWEN_REFRESHER_HOOK_RUNNER": value})
    assert "QWEN_REFRESHER_HOOK_RUNNER" in str(info.value)


def test_hook_runner_default_is_off(tmp_path: Path) -> None:
    assert load_settings(env={"HOME": str(tmp_path)}).hook_runner_argv == ()


def _user_manager_runs_hooks() -> bool:
    if shutil.which("systemd-run") is None or shutil.which("node") is None:
        return False
    try:
        return subprocess.run(["systemd-run", "--user", "--quiet", "--wait", "--pipe",
                               "--collect", "/bin/true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


MDWE_PROBE = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from qwen_refresher.hooks import run_hook
runner = tuple(sys.argv[2:])
hook = ("node -e \\"require('fs').writeFileSync(process.argv[1], "
        "process.env.QWEN_REFRESHER_PROFILE)\\" ")
out = {}
for name, use in (("inside", ()), ("runner", runner)):
    target = os.environ["QWEN_TEST_OUT"] + "." + name
    r = run_hook(hook + target, {"PROFILE": "qwen-portal:default"}, timeout=60, runner=use)
    out[name] = [r.returncode, r.timed_out]
print(json.dumps(out))
"""


@pytest.mark.skipif(not _user_manager_runs_hooks(),
                    reason="needs a systemd user manager with a D-Bus session bus, and node")
def test_a_node_hook_escapes_memory_deny_write_execute_through_the_runner(
        tmp_path: Path) -> None:
    """For real: a process under MemoryDenyWriteExecute=yes (as the service runs) cannot run a
    Node.js hook as its child, and can through the shipped runner."""
    out = tmp_path / "hook-ran"
    proc = subprocess.run(
        ["systemd-run", "--user", "--quiet", "--wait", "--pipe", "--collect",
         "--property=MemoryDenyWriteExecute=yes", f"--setenv=QWEN_TEST_OUT={out}",
         f"--setenv=PATH={os.environ['PATH']}", "--", sys.executable, "-c", MDWE_PROBE,
         str(ROOT), *service.HOOK_RUNNER],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["inside"][0] not in (0, None)  # V8 aborts under MemoryDenyWriteExecute
    assert not Path(f"{out}.inside").exists()
    assert result["runner"] == [0, False]
    assert Path(f"{out}.runner").read_text() == "qwen-portal:default"


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
    # On, with the hook runner that keeps Node.js hooks (OpenClaw's CLI) out of it.
    assert one["MemoryDenyWriteExecute"] == "yes"
    assert _runner(SHIPPED.read_text()) == service.HOOK_RUNNER
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


@needs_systemd_analyze
def test_installed_unit_without_the_runner_stays_under_the_limit(env: Env) -> None:
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_RC", "1")
    env.monkeypatch.setenv("FAKE_SYSTEMD_RUN_ERR", "Failed to connect to bus: No such file")
    env.install("--sandbox", "auto")
    assert "MemoryDenyWriteExecute" not in _settings(env.unit.read_text())
    assert _exposure(env.unit) <= MAX_EXPOSURE
