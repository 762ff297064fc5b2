"""Driving a fake from outside: over its HTTP control API (``FakeQwenControl``), or as a
subprocess (``FakeQwenProcess``), so one test body reads the same in both modes.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import urlsplit

from .config import CONTROL_PREFIX, Endpoints

# --------------------------------------------------------------------------- remote control


class FakeQwenControl(Endpoints):
    """Drives a fake over its HTTP control API (``/_fake/...``); stdlib only.

    Mirrors FakeQwen's control methods so a test reads the same in both modes. Errors map back:
    an unknown user code raises KeyError, a bad argument ValueError.
    """

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._base_url = base_url.rstrip("/")
        self.timeout = timeout
        # A developer's HTTP(S)_PROXY must not swallow requests meant for 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def base_url(self) -> str:
        return self._base_url

    def _call(self, name: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 (scheme checked in __init__)
            self.base_url + CONTROL_PREFIX + name, data=data,
            method="GET" if payload is None else "POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            if exc.code == 404:
                raise KeyError(detail or name) from None
            raise ValueError(f"/_fake/{name}: HTTP {exc.code}: {detail}") from None

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("state")
        return result

    def inject(self, kind: str, count: int = 1, retry_after: float | str | None = None,
               delay: float | None = None, *, target: str | None = None,
               body: Any = None) -> None:
        payload: dict[str, Any] = {"kind": kind, "count": count}
        for key, value in (("retry_after", retry_after), ("delay", delay), ("target", target),
                           ("body", body)):
            if value is not None:
                payload[key] = value
        self._call("inject", payload)

    def clear_faults(self) -> None:
        self._call("clear_faults", {})

    def set_failure_rate(self, p: float, kinds: Sequence[str] | None = None,
                         seed: int | None = None) -> None:
        self._call("failure_rate", {"p": p, "kinds": list(kinds) if kinds else None,
                                    "seed": seed})

    def reject_token(self, refresh_token: str) -> None:
        self._call("reject", {"refresh_token": refresh_token})

    def issue_tokens(self, lifetime: float | None = None) -> tuple[str, str, int]:
        result = self._call("issue", {} if lifetime is None else {"lifetime": lifetime})
        return result["access_token"], result["refresh_token"], int(result["expires_ms"])

    def approve(self, user_code: str) -> None:
        self._call("approve", {"user_code": user_code})

    def deny(self, user_code: str) -> None:
        self._call("deny", {"user_code": user_code})

    def configure(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("config", changes)
        return result

    def reset(self) -> None:
        self._call("reset", {})

    def refresh_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.state()["requests"] if r["grant_type"] == "refresh_token"]

    @property
    def issued(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state()["issued"]
        return result

    @property
    def reuse_count(self) -> int:
        return int(self.state()["reuse_count"])

    def pending_device_codes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state()["pending_device_codes"]
        return result


# --------------------------------------------------------------------------- subprocess mode


_READY = re.compile(r"^READY (http://[^\s]+)$")


class FakeQwenProcess(Endpoints):
    """Runs the fake as ``python -m qwen_refresher.testing.fake_qwen`` and controls it over HTTP.

    For tests that need the server in another process: killing it, or keeping its threads out of
    the process under test. ``args`` are extra command-line flags; keyword settings are applied
    through ``/_fake/config`` once it is up.
    """

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 10.0,
                 env: dict[str, str] | None = None, **config: Any) -> None:
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.env = env
        self.config = config
        self.process: subprocess.Popen[str] | None = None
        self._base_url = ""
        self._stderr: IO[bytes] | None = None

    def start(self) -> Self:
        if self.process is not None:
            raise RuntimeError("already started")
        env = dict(os.environ if self.env is None else self.env)
        # Importable even when the package is not installed: put its parent on the path.
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        port_given = any(a == "--port" or a.startswith("--port=") for a in self.args)
        cmd = [sys.executable, "-m", "qwen_refresher.testing.fake_qwen",
               *([] if port_given else ["--port", "0"]), *self.args]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=self._stderr, env=env, text=True)
        line = self._first_line(self.process)
        match = _READY.match(line.strip()) if line else None
        if match is None:
            self.stop(timeout=1)
            raise RuntimeError(f"fake qwen did not start (got {line!r}): {self.stderr_text()}")
        self._base_url = match.group(1)
        if self.config:
            self.control.configure(**self.config)
        return self

    def _first_line(self, process: subprocess.Popen[str]) -> str | None:
        lines: queue.Queue[str] = queue.Queue()
        stdout = process.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True)
        reader.start()
        try:
            return lines.get(timeout=self.startup_timeout)
        except queue.Empty:
            return None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-4000:]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._stderr is not None:
            self._stderr.close()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    @property
    def control(self) -> FakeQwenControl:
        return FakeQwenControl(self.base_url)

    @property
    def base_url(self) -> str:
        return self._base_url


