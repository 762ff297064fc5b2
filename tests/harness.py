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
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qwen_refresher.testing.daemon_proc import (
    ROOT,
    DaemonProc,
    daemon_env,
    redact,
    run_argv,
)

__all__ = ["QWEN_PROFILE", "ROOT", "DaemonProcess", "OpenClawHome", "all_tokens",
           "assert_no_secrets",
           "openclaw_json", "qwen_profile", "qwen_store_doc", "refresh_of", "seed_qwen_store",
           "stop_within", "wait_for"]


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
        """The daemon's environment (``daemon_proc.daemon_env``) for this home."""
        return daemon_env(root=self.root, home=self.home, openclaw_state=self.state,
                          our_state=self.our_state, **extra)


class DaemonProcess(DaemonProc):
    """The real ``qwen-refresher run`` in a subprocess (``qwen_refresher.testing.daemon_proc``,
    the one way tests and benchmarks start it), with this suite's defaults: a 3 s margin, no
    jitter, ``home``'s environment, and failure messages redacted of every token ``fake``
    issued. ``prefix`` (e.g. ``setpriv …``), ``preexec``, ``listen`` and ``entry`` pass through.
    """

    def __init__(self, home: OpenClawHome, fake: Any, *args: str,
                 env: dict[str, str] | None = None, margin: str | None = "3",
                 jitter: str | None = "0", **options: Any) -> None:
        self.home = home
        argv = run_argv(fake, *args, margin=margin, jitter=jitter,
                        **{k: options.pop(k) for k in ("listen", "entry", "prefix")
                           if k in options})
        super().__init__(argv, env=env or home.env(),
                         secrets=lambda: all_tokens(fake) if hasattr(fake, "issued") else [],
                         **options)

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log record so far (a copy: safe to keep while the daemon runs)."""
        with self._cond:
            return list(self.records)

    def stop(self, timeout: float = 15.0) -> int:
        return super().stop(timeout)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             daemon: Any = None, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; AssertionError after ``timeout`` s, quoting the
    daemon's output (redacted) when one is given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    detail = ""
    if daemon is not None:
        text = (daemon.diagnostic() if isinstance(daemon, DaemonProc)
                else redact(daemon.output[-4000:]))
        detail = "\n--- daemon output ---\n" + text
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
