"""Running the real daemon as a subprocess against real files, for end-to-end tests.

``OpenClawHome`` lays out a throw-away OpenClaw state dir and writes stores the way OpenClaw
writes them (``JSON.stringify(store, null, 2) + "\\n"``, mode 0600). ``DaemonProcess`` runs
``python -m qwen_refresher run`` with its own HOME, XDG dirs and state dir, collects its
output, and stops it with real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def openclaw_json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def qwen_profile(access: str, refresh: str, expires_ms: int) -> dict[str, Any]:
    return {"type": "oauth", "provider": "qwen-portal", "access": access, "refresh": refresh,
            "expires": expires_ms}


class OpenClawHome:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.state = self.home / ".openclaw"
        self.our_state = root / "refresher-state"
        self.home.mkdir(parents=True, exist_ok=True)

    def store_path(self, agent: str = "main") -> Path:
        return self.state / "agents" / agent / "agent" / "auth-profiles.json"

    def write_store(self, doc: dict[str, Any] | bytes, agent: str = "main",
                    path: Path | None = None) -> Path:
        path = path or self.store_path(agent)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = doc if isinstance(doc, bytes) else openclaw_json(doc)
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return path

    def read_store(self, agent: str = "main", path: Path | None = None) -> dict[str, Any]:
        return json.loads((path or self.store_path(agent)).read_bytes())

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("QWEN_REFRESHER_", "OPENCLAW_", "QWEN_HOME",
                                    "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update({
            "HOME": str(self.home),
            "OPENCLAW_STATE_DIR": str(self.state),
            "XDG_STATE_HOME": str(self.root / "xdg-state"),
            "XDG_CONFIG_HOME": str(self.root / "xdg-config"),
            "QWEN_REFRESHER_STATE_DIR": str(self.our_state),
            "QWEN_REFRESHER_LOG_FORMAT": "json",
            "QWEN_REFRESHER_LISTEN": "",
            "QWEN_REFRESHER_ON_ROTATE": "none",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env


class DaemonProcess:
    """The real ``qwen-refresher run`` in a subprocess, its output gathered as it comes."""

    def __init__(self, home: OpenClawHome, fake: Any, *args: str,
                 env: dict[str, str] | None = None, margin: str = "3",
                 jitter: str = "0") -> None:
        self.home = home
        argv = [sys.executable, "-m", "qwen_refresher", "run",
                "--token-url", fake.token_url, "--device-code-url", fake.device_code_url,
                "--margin", margin, "--jitter", jitter, *args]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env or home.env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        wait_for(lambda: self.has_event(name) or self.proc.poll() is not None, timeout,
                 f"event {name!r}", self)
        for e in self.events():
            if e.get("event") == name:
                return e
        raise AssertionError(f"daemon exited ({self.proc.returncode}) before {name!r}:\n"
                             + self.output[-4000:])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._reader.join(5)
        return rc

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             daemon: DaemonProcess | None = None, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    detail = ("\n--- daemon output ---\n" + daemon.output[-4000:]) if daemon else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def assert_no_secrets(texts: Iterable[str], secrets: Iterable[str]) -> None:
    """Fail naming where a secret leaked, without printing the secret itself."""
    bag = list(texts)
    for n, secret in enumerate(s for s in secrets if s):
        for i, text in enumerate(bag):
            if secret in text:
                raise AssertionError(f"token #{n} (len {len(secret)}) leaked into output #{i} "
                                     f"at offset {text.index(secret)}")


def all_tokens(fake: Any) -> list[str]:
    out: list[str] = []
    for issued in fake.issued:
        out += [issued.access_token, issued.refresh_token]
    return out


# -- shared by the adversarial and review-fix suites: one store, one stop -----------------------

QWEN_PROFILE = "qwen-portal:default"


def qwen_store_doc(fake: Any, lifetime: float) -> dict[str, Any]:
    """An OpenClaw store holding one fresh qwen-portal profile issued by ``fake``."""
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    return {"version": 1, "profiles": {QWEN_PROFILE: qwen_profile(access, refresh, expires)}}


def seed_qwen_store(oc: OpenClawHome, fake: Any, lifetime: float, agent: str = "main") -> Path:
    """Write ``qwen_store_doc`` as ``agent``'s store (0600, its directory 0700)."""
    return oc.write_store(qwen_store_doc(fake, lifetime), agent=agent)


def refresh_of(path: Path, profile: str = QWEN_PROFILE) -> str:
    """The refresh token ``profile`` holds in an OpenClaw store right now."""
    return str(json.loads(path.read_bytes())["profiles"][profile]["refresh"])


def stop_within(daemon: DaemonProcess, seconds: float = 10.0) -> float:
    """SIGTERM the daemon; it must exit 0 within ``seconds``. Returns how long it took."""
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    try:
        rc = daemon.proc.wait(seconds + 5)
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        raise AssertionError(f"SIGTERM ignored for {seconds + 5}s\n{daemon.output[-3000:]}"
                             ) from None
    took = time.monotonic() - started
    assert rc == 0 and took < seconds, f"exit {rc} after {took:.1f}s\n{daemon.output[-3000:]}"
    return took
