"""SIGHUP rebuilds every component from the new settings (issue 14), on the real daemon.

Before the runtime split, a reload patched the engine's client by hand and kept the health
server and the notifier built at start: a new ``listen`` address or a new ``on_needs_login``
hook took effect only after a restart. These tests change each in the config file, send
SIGHUP, and look at what the running daemon does next.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, all_tokens, assert_no_secrets, wait_for
from tests.test_login import hook_runs, hook_script
from tests.test_relogin_e2e import seed_rejected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthz(port: int) -> int | None:
    """The status of GET /healthz on ``port``, or None if nothing listens there."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def env_without_listen(oc: OpenClawHome, **extra: str) -> dict[str, str]:
    """The suite's environment minus ``QWEN_REFRESHER_LISTEN``: the config file decides it
    (the environment would win over the file, and the file is what a reload re-reads)."""
    env = oc.env(**extra)
    env.pop("QWEN_REFRESHER_LISTEN", None)
    return env


def test_a_reload_moves_the_health_endpoint(oc: OpenClawHome, fake: FakeQwen,
                                            tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'listen = "127.0.0.1:{first}"\n')
    with DaemonProcess(oc, fake, "--config", str(config), env=env_without_listen(oc)) as daemon:
        daemon.wait_event("started")
        assert daemon.wait_event("health_listening")["address"] == f"127.0.0.1:{first}"
        assert healthz(first) is not None

        config.write_text(f'listen = "127.0.0.1:{second}"\n')
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded")
        event = daemon.wait_event("health_listening", at_least=2)
        assert event["address"] == f"127.0.0.1:{second}"
        wait_for(lambda: healthz(second) is not None, 10, "health on the new port", daemon)
        wait_for(lambda: healthz(first) is None, 10, "the old port closed", daemon)

        # An address that cannot be bound keeps the server where it is, and the daemon alive.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config.write_text(f'listen = "127.0.0.1:{taken.getsockname()[1]}"\n')
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("reloaded", at_least=2)
            assert any(e.get("event") == "reload_failed" and "cannot listen" in
                       str(e.get("error")) for e in daemon.events())
            assert healthz(second) is not None
            assert daemon.proc.poll() is None
    assert_no_secrets([daemon.output], all_tokens(fake))


def test_a_reload_gives_a_login_episode_the_new_notification_hook(
        oc: OpenClawHome, fake: FakeQwen, tmp_path: Path) -> None:
    """The profile needs a login; the person then configures a (new) ``on_needs_login``. After
    SIGHUP the new hook is told of the episode in progress, without waiting for a restart."""
    path, _ = seed_rejected(oc, fake)
    old_hook, old_out = hook_script(tmp_path, "old")
    new_hook, new_out = hook_script(tmp_path, "new")
    config = tmp_path / "config.toml"
    config.write_text(f"on_needs_login = {old_hook!r}\n")
    env = oc.env()
    with DaemonProcess(oc, fake, "--store", str(path), "--config", str(config), margin="5",
                       env=env) as daemon:
        daemon.wait_event("needs_login")
        wait_for(lambda: len(hook_runs(old_out)) == 1, 15, "the first hook", daemon)

        config.write_text(f"on_needs_login = {new_hook!r}\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded")
        wait_for(lambda: len(hook_runs(new_out)) == 1, 15, "the new hook", daemon)
        run = hook_runs(new_out)[0]
        assert run["QWEN_REFRESHER_EVENT"] == "needs_login"
        assert run["QWEN_REFRESHER_PROFILE"] == "qwen-portal:default"
        # The old hook is told nothing more, and the new one once, not once per reload.
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded", at_least=2)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: len(hook_runs(new_out)) > 1, 2, "a second notice")
        assert len(hook_runs(new_out)) == 1, "an unchanged setting keeps the notifier"
        assert len(hook_runs(old_out)) == 1
    assert_no_secrets([daemon.output, new_out.read_text()], all_tokens(fake))
