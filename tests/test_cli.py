"""The command line's conventions, run as a user runs them: the installed console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_refresher import __version__

EXE = str(Path(sys.executable).with_name("qwen-refresher"))


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("argv", [["--bogus"], ["status", "--bogus"], ["run", "--margin"],
                                  ["no-such-command"], []])
def test_a_usage_error_exits_64_not_2(argv: list[str]) -> None:
    """2 means "needs login" to a health check; a typo must not look like that."""
    result = _run(*argv)
    assert result.returncode == 64, result
    assert "usage:" in result.stderr


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    result = _run(flag)
    assert result.returncode == 0
    assert result.stdout.strip() == f"qwen-refresher {__version__}"


def test_verbose_and_quiet_exclude_each_other() -> None:
    assert _run("run", "-v", "-q").returncode == 64


def test_config_names_the_origin_of_every_setting_and_masks_urls(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text('jitter = "7s"\nnotify_urls = ["tgram://123456:SECRETBOT@telegram/42"]\n')
    env = {**os.environ, "QWEN_REFRESHER_MARGIN": "10m", "XDG_STATE_HOME": str(tmp_path)}
    env.pop("QWEN_REFRESHER_CONFIG", None)
    result = _run("config", "--json", "--config", str(toml), "--retry-max", "2m", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["margin"] == {"value": 600.0, "origin": "env QWEN_REFRESHER_MARGIN"}
    assert doc["jitter"] == {"value": 7.0, "origin": f"file {toml}"}
    assert doc["retry_max"] == {"value": 120.0, "origin": "flag --retry-max"}
    assert doc["sweep_interval"]["origin"] == "default"
    assert "SECRETBOT" not in result.stdout
    assert doc["notify_urls"]["value"] == ["tgram://telegram/…"]
    text = _run("config", "--config", str(toml), env=env)
    assert text.returncode == 0
    assert "margin" in text.stdout and "(env QWEN_REFRESHER_MARGIN)" in text.stdout


def test_config_with_a_bad_setting_exits_78_naming_it(tmp_path: Path) -> None:
    env = {**os.environ, "QWEN_REFRESHER_MARGIN": "soon"}
    result = _run("config", env=env)
    assert result.returncode == 78
    assert "margin" in result.stderr


def test_output_into_a_closed_pipe_is_quiet() -> None:
    proc = subprocess.run(f"{EXE} config | head -1", shell=True, capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_generated(shell: str) -> None:
    result = _run("completion", shell)
    assert result.returncode == 0
    assert "qwen-refresher" in result.stdout
    assert "--margin" in result.stdout and "status" in result.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes_commands_and_flags(tmp_path: Path) -> None:
    script = tmp_path / "qwen-refresher.bash"
    script.write_text(_run("completion", "bash").stdout)
    probe = (f"source {script}; COMP_WORDS=(qwen-refresher sta); COMP_CWORD=1; "
             "_shtab_qwen_refresher; echo \"${COMPREPLY[@]}\"; "
             "COMP_WORDS=(qwen-refresher run --sweep); COMP_CWORD=2; "
             "_shtab_qwen_refresher; echo \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    assert out == ["status", "--sweep-interval"]


def _once_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN_REFRESHER_", "NO_COLOR",
                                                                    "JOURNAL_STREAM"))}
    env.update(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"),
               XDG_CONFIG_HOME=str(tmp_path / "config"),
               OPENCLAW_STATE_DIR=str(tmp_path / "openclaw"), QWEN_HOME=str(tmp_path / "qwen"),
               QWEN_REFRESHER_LISTEN="", QWEN_REFRESHER_ON_ROTATE="none")
    return env


def test_journald_priorities_prefix_every_line(tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM names our stdout) each line carries <N>, so that
    `journalctl -p warning` filters by severity."""
    log = tmp_path / "out.log"
    env = _once_env(tmp_path)
    with open(log, "w") as out:
        st = os.fstat(out.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([EXE, "run", "--once"], stdout=out, stderr=subprocess.STDOUT, env=env,
                       timeout=60, stdin=subprocess.DEVNULL)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    assert all(re.match(r"<[0-7]>\{", line) for line in lines), lines
    assert any(line.startswith("<6>") for line in lines)
    # A stream that is not the journal's gets no prefix, whatever the variable says.
    env["JOURNAL_STREAM"] = "1:1"
    plain = subprocess.run([EXE, "run", "--once"], capture_output=True, text=True, env=env,
                           timeout=60, stdin=subprocess.DEVNULL)
    assert plain.stdout.startswith("{"), plain.stdout


def test_no_color_is_honoured_by_run_on_a_terminal(tmp_path: Path) -> None:
    import pty

    env = _once_env(tmp_path)

    def run_on_tty(extra: dict[str, str]) -> bytes:
        pid, fd = pty.fork()
        if pid == 0:  # child: the daemon's console output goes to the pty
            os.execve(EXE, [EXE, "run", "--once"], {**env, **extra})
        chunks = []
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        os.waitpid(pid, 0)
        return b"".join(chunks)

    assert b"\x1b[" in run_on_tty({})
    assert b"\x1b[" not in run_on_tty({"NO_COLOR": "1"})


# -- a newcomer's first runs: nothing found, nothing to tell, something failed ---------------


def _fresh(tmp_path: Path) -> dict[str, str]:
    """A fresh user: empty HOME, no OpenClaw, no `openclaw` on PATH."""
    env = _once_env(tmp_path)
    for name in ("OPENCLAW_STATE_DIR", "QWEN_HOME", "QWEN_REFRESHER_ON_ROTATE"):
        env.pop(name)
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_status_with_nothing_found_says_where_it_looked_and_what_to_run(tmp_path: Path) -> None:
    result = _run("status", "--no-color", env=_fresh(tmp_path))
    assert result.returncode == 3  # no daemon: the most severe
    out = result.stdout
    assert "looked in OpenClaw's state dir ~/.openclaw (does not exist)" in out
    assert "looked at Qwen Code's ~/.qwen/oauth_creds.json" in out
    assert "openclaw is not on PATH" in out
    assert "to log in, run: qwen-refresher login" in out
    assert "the daemon has never run here" in out and "qwen-refresher run" in out
    doc = json.loads(_run("status", "--json", env=_fresh(tmp_path)).stdout)
    assert any("looked in" in line for line in doc["looked"])


def test_run_warns_when_it_cannot_do_its_job(tmp_path: Path) -> None:
    env = _fresh(tmp_path)
    env["QWEN_REFRESHER_LOG_FORMAT"] = "json"
    result = _run("run", "--once", env=env)
    events = {json.loads(line)["event"]: json.loads(line) for line in result.stdout.splitlines()
              if line.startswith("{")}
    assert events["no_profile_found"]["level"] == "warning"
    assert "qwen-refresher login" in events["no_profile_found"]["message"]
    assert events["gateway_not_told"]["level"] == "warning"
    assert "openclaw is not on PATH" in events["gateway_not_told"]["message"]
    assert result.returncode == 1  # nothing to refresh is degraded, not fine


def test_run_once_counts_successes_and_fails_when_a_due_refresh_failed(tmp_path: Path) -> None:
    from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
    from tests.harness import OpenClawHome, qwen_profile

    oc = OpenClawHome(tmp_path)
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as fake:
        access, refresh, _ = fake.issue_tokens()
        import time

        soon = int(time.time() * 1000) + 60_000  # inside the 15-minute margin: due now
        oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, soon)}})
        env = oc.env(QWEN_REFRESHER_TOKEN_URL=fake.token_url, QWEN_REFRESHER_LISTEN="",
                     QWEN_REFRESHER_ON_ROTATE="none", QWEN_REFRESHER_LOG_FORMAT="json")
        fake.inject("503", count=5)
        failed = _run("run", "--once", env=env)
        done = [json.loads(line) for line in failed.stdout.splitlines()
                if '"once_done"' in line][0]
        assert (done["due"], done["refreshed"], done["failed"]) == (1, 0, 1)
        assert failed.returncode == 1
        fake.clear_faults()
        ok = _run("run", "--once", env=env)
        done = [json.loads(line) for line in ok.stdout.splitlines() if '"once_done"' in line][0]
        assert (done["due"], done["refreshed"], done["failed"]) == (1, 1, 0)
        assert ok.returncode == 0, ok.stdout
