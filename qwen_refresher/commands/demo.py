"""``qwen-refresher demo``: the whole lifecycle in about a minute, with no account and no network.

Everything is real except Qwen itself: the package's fake Qwen server on a loopback port, an
OpenClaw-layout state dir with two agents and a Qwen Code file sharing one token family, and
the real daemon started as a subprocess with short lifetimes. The demo only *drives* the
scenario (injecting a failure, revoking a token, running ``login``) and *checks* each step;
it exits 0 only if every step behaved, so CI runs it as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..durations import format_duration
from ..report import EX_FAILURE, EX_INTERRUPTED, EX_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="watch the whole lifecycle against a fake Qwen server",
                       description="Runs a fake Qwen server, a throw-away OpenClaw state dir and "
                                   "the real daemon, and walks through rotation, a transient "
                                   "failure, a rejected token and a re-login. No account, no "
                                   "network. Exits 0 only if every step behaved.")
    p.add_argument("--duration", type=float, default=60.0,
                   help="roughly how long the scenario takes, in seconds (default 60)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory and print its path")
    p.add_argument("--plain", action="store_true",
                   help="plain lines even on a terminal (no in-place redraw)")
    p.set_defaults(handler=run)


@dataclass
class Paths:
    root: Path
    home: Path
    state: Path
    our_state: Path
    stores: list[Path]


class StepFailed(Exception):
    pass


class Screen:
    """A status block redrawn in place on a terminal, or plain narrated lines elsewhere."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self._drawn = 0
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            self._erase()
            self.out.write(text + "\n")
            self.out.flush()

    def _erase(self) -> None:
        if self.live and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def draw(self, lines: list[str]) -> None:
        if not self.live:
            return
        with self._lock:
            self._erase()
            for line in lines:
                self.out.write(line + "\n")
            self._drawn = len(lines)
            self.out.flush()


def _layout(root: Path) -> Paths:
    home = root / "home"
    state = home / ".openclaw"
    return Paths(root, home, state, root / "refresher-state", [
        state / "agents" / "main" / "agent" / "auth-profiles.json",
        state / "agents" / "work" / "agent" / "auth-profiles.json",
        home / ".qwen" / "oauth_creds.json",
    ])


def _write_private(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    os.chmod(path, 0o600)


def _seed(paths: Paths, access: str, refresh: str, expires: int) -> None:
    profile = {"type": "oauth", "provider": "qwen-portal", "access": access,
               "refresh": refresh, "expires": expires}
    for store in paths.stores[:2]:
        _write_private(store, {"version": 1, "profiles": {
            "qwen-portal:default": profile,
            "anthropic:default": {"type": "api_key", "provider": "anthropic",
                                  "key": "sk-ant-demo"}}})
    _write_private(paths.stores[2], {"access_token": access, "token_type": "Bearer",
                                     "refresh_token": refresh, "resource_url": "127.0.0.1",
                                     "expiry_date": expires})


def _refresh_of(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if "profiles" in doc:
        return doc["profiles"].get("qwen-portal:default", {}).get("refresh")  # type: ignore[no-any-return]
    return doc.get("refresh_token")  # type: ignore[no-any-return]


def _expires_of(path: Path) -> float | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    raw = (doc.get("profiles", {}).get("qwen-portal:default", {}).get("expires")
           if "profiles" in doc else doc.get("expiry_date"))
    return raw / 1000.0 if isinstance(raw, int | float) else None


def _env(paths: Paths) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QWEN_REFRESHER_", "OPENCLAW_", "QWEN_HOME", "NOTIFY_SOCKET"))}
    env.update(HOME=str(paths.home), OPENCLAW_STATE_DIR=str(paths.state),
               XDG_CONFIG_HOME=str(paths.root / "config"),
               XDG_STATE_HOME=str(paths.root / "xdg-state"),
               QWEN_REFRESHER_STATE_DIR=str(paths.our_state),
               QWEN_REFRESHER_LOG_FORMAT="json", QWEN_REFRESHER_LISTEN="",
               QWEN_REFRESHER_ON_ROTATE="none", PYTHONUNBUFFERED="1")
    return env


class Scenario:
    def __init__(self, screen: Screen, paths: Paths, duration: float) -> None:
        from ..testing.fake_qwen import FakeQwen

        self.screen = screen
        self.paths = paths
        self.lifetime = max(6.0, duration / 3)
        self.margin = self.lifetime * 0.4
        self.fake = FakeQwen(lifetime=self.lifetime, device_interval=0.5)
        self.daemon: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []
        self._stop_view = threading.Event()

    # -- plumbing -----------------------------------------------------------------------------
    def _read_daemon(self) -> None:
        assert self.daemon is not None and self.daemon.stdout is not None
        for line in self.daemon.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)

    def _event_count(self, name: str) -> int:
        return sum(1 for e in list(self.events) if e.get("event") == name)

    def _wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.daemon is not None and self.daemon.poll() is not None:
                raise StepFailed(f"the daemon exited ({self.daemon.returncode}) "
                                 f"while waiting for {what}")
            time.sleep(0.1)
        raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}")

    def _family_on(self, refresh: str) -> bool:
        return all(_refresh_of(p) == refresh for p in self.paths.stores)

    def _states(self) -> dict[str, str]:
        try:
            doc = json.loads((self.paths.our_state / "state.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return {f"{Path(p['store']).parent.parent.name if 'agents' in p['store'] else 'qwen'}:"
                f"{p['profile']}": p["state"] for p in doc.get("profiles", [])}

    @contextlib.contextmanager
    def _live_view(self) -> Iterator[None]:
        def loop() -> None:
            while not self._stop_view.wait(0.25):
                self.screen.draw(self._view_lines())

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop_view.set()
            thread.join(1)
            self.screen.draw([])

    def _view_lines(self) -> list[str]:
        now = time.time()
        states = self._states()
        names = ["main", "work", "qwen"]
        lines = ["  ┌─ live status " + "─" * 44]
        for name, path in zip(names, self.paths.stores, strict=True):
            expires = _expires_of(path)
            state = next((v for k, v in states.items() if k.startswith(name + ":")), "…")
            left = format_duration(expires - now) if expires else "-"
            label = "Qwen Code" if name == "qwen" else f"agent {name}"
            lines.append(f"  │ {label:<11} {state:<12} expires in {left:>7}")
        requests = self.fake.refresh_requests()
        ok = sum(1 for r in requests if r.status == 200)
        lines.append(f"  └─ refresh requests: {len(requests)} ({ok} succeeded)")
        return lines

    # -- the story ----------------------------------------------------------------------------
    def run(self) -> None:
        say = self.screen.say
        with self.fake:
            access, refresh, expires = self.fake.issue_tokens(lifetime=self.lifetime)
            _seed(self.paths, access, refresh, expires)
            say(f"1. A fake Qwen server listens on {self.fake.base_url}; two OpenClaw agents "
                "and Qwen Code share one token family")
            say(f"   tokens live {self.lifetime:.0f}s; qwen-refresher refreshes "
                f"{self.margin:.0f}s before expiry")
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "qwen_refresher", "run", "--token-url",
                 self.fake.token_url, "--device-code-url", self.fake.device_code_url,
                 "--margin", str(self.margin), "--jitter", "0"],
                env=_env(self.paths), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
            threading.Thread(target=self._read_daemon, daemon=True).start()
            with self._live_view():
                self._story(say)

    def _story(self, say: Callable[[str], None]) -> None:
        step = self.lifetime * 2
        self._wait("the daemon to start", lambda: self._event_count("started") > 0, 20)
        say("2. The daemon is running; waiting for the first rotation...")
        self._wait("the first rotation", lambda: self._event_count("rotated") >= 1, step)
        newest = self.fake.issued[-1].refresh_token
        self._wait("all three stores to hold the new token", lambda: self._family_on(newest), 5)
        if len(self.fake.refresh_requests()) != 1:
            raise StepFailed("the family should need exactly one refresh request")
        say("   ✓ rotated: ONE refresh request, all three stores updated atomically")

        self.fake.inject("503", count=2)
        say("3. The server will now fail twice with HTTP 503 (a transient outage)...")
        self._wait("the retries", lambda: self._event_count("refresh_failed") >= 2, step)
        say("   … retrying with exponential back-off")
        self._wait("the rotation after the outage", lambda: self._event_count("rotated") >= 2,
                   step)
        newest = self.fake.issued[-1].refresh_token
        self._wait("the stores after the outage", lambda: self._family_on(newest), 5)
        say("   ✓ recovered on its own after two 503s")

        current = _refresh_of(self.paths.stores[0])
        assert current is not None
        self.fake.reject_token(current)
        say("4. The server now revokes the refresh token (as Qwen does when a login is lost)...")
        self._wait("needs_login", lambda: self._event_count("needs_login") >= 1, step)
        event = next(e for e in self.events if e.get("event") == "needs_login")
        say(f"   ! needs login — {event.get('message', '')}")
        sent = len(self.fake.refresh_requests())
        time.sleep(min(3.0, self.lifetime / 3))
        if len(self.fake.refresh_requests()) != sent:
            raise StepFailed("a rejected token must not be sent again")
        say("   ✓ no retry loop: the rejected token is never sent again")

        say("5. Simulating `qwen-refresher login` (the fake approves the device code at once)")
        self.fake.configure(auto_approve_after=0)
        login = subprocess.run(
            [sys.executable, "-m", "qwen_refresher", "login", "--store",
             str(self.paths.stores[0]), "--token-url", self.fake.token_url,
             "--device-code-url", self.fake.device_code_url, "--no-qr"],
            env=_env(self.paths), capture_output=True, text=True, timeout=60)
        if login.returncode != 0:
            raise StepFailed(f"login failed: {login.stderr.strip()[-300:]}")
        self._wait("the new login in all three stores",
                   lambda: len({_refresh_of(p) for p in self.paths.stores}) == 1
                   and _refresh_of(self.paths.stores[2]) != current, step)
        self._wait("the daemon to resume",
                   lambda: bool(self._states()) and all(
                       s in ("ok", "due", "refreshing") for s in self._states().values()),
                   step)
        say("   ✓ login written to the whole family; the daemon resumed without a restart")

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def check_no_leaks(self) -> None:
        """No token may reach the daemon's output; name how many did, never which."""
        tokens = {t for issued in self.fake.issued
                  for t in (issued.access_token, issued.refresh_token)}
        text = json.dumps(self.events)
        leaked = sum(1 for t in tokens if t in text)
        if leaked:
            raise StepFailed(f"{leaked} token(s) leaked into the daemon's output")


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="qwen-refresher-demo-"))
    out = sys.stdout
    screen = Screen(out, live=out.isatty() and not args.plain)
    scenario = Scenario(screen, _layout(root), args.duration)
    ok = False
    interrupted = False
    try:
        scenario.run()
        scenario.check_no_leaks()
        ok = True
    except StepFailed as exc:
        screen.say(f"✗ {exc}")
    except KeyboardInterrupt:
        interrupted = True
        screen.say("interrupted; cleaning up")
    finally:
        scenario.close()
        if args.keep:
            screen.say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if ok:
        screen.say("demo passed: rotation, back-off, needs-login and re-login all behaved")
        return EX_OK
    return EX_INTERRUPTED if interrupted else EX_FAILURE
