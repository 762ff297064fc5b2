"""The one way tests and benchmarks start the real daemon as a subprocess.

Three helpers used to start ``qwen-refresher run`` three different ways (``tests/harness.py``,
``tests/reliability/support.py``, ``benchmarks/_common.py``), each with its own environment
scrubbing, argv, reader thread and stop sequence; they had already drifted (one left the
caller's ``XDG_*`` variables in, one never turned desktop notifications off). They are thin
views over this module now:

- ``daemon_env``: a clean environment (every variable that could point the daemon at the
  developer's real stores, state or service manager removed) with its own HOME, XDG dirs,
  OpenClaw state dir and state dir;
- ``run_argv``: the command line (entry point, fake server URLs, margin, jitter, listen);
- ``DaemonProc``: the process, its output read by one thread as it comes (JSON log lines
  parsed once, a condition variable to wait on), a ready wait and a stop that both have a
  deadline, and failure messages that carry the log's tail with every secret redacted.

Stdlib only, so a benchmark run from a bare interpreter can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

__all__ = [
    "ENV_STRIP_PREFIXES",
    "ROOT",
    "DaemonProc",
    "Endpoints",
    "daemon_env",
    "ensure_bytecode",
    "redact",
    "run_argv",
]

#: The project checkout: the daemon runs with it as its working directory.
ROOT = Path(__file__).resolve().parent.parent.parent

#: Variables of the caller's environment never passed on: each could point the daemon at the
#: developer's real stores, state dir or config (``QWEN_REFRESHER_*``, ``OPENCLAW_*``,
#: ``CLAWDBOT_*``, ``QWEN_HOME``, ``XDG_*``) or make it talk to a real service manager
#: (``NOTIFY_SOCKET``, ``WATCHDOG_*``).
ENV_STRIP_PREFIXES = ("QWEN_REFRESHER_", "OPENCLAW_", "QWEN_HOME", "CLAWDBOT_",
                      "NOTIFY_SOCKET", "WATCHDOG_", "XDG_")

#: Token-shaped strings of the fake server (``fakeacc-…``/``fakeref-…``): redacted from any
#: diagnostic even when the caller did not say which tokens exist.
_FAKE_TOKEN = re.compile(r"fake(acc|ref)-[A-Za-z0-9_-]+")

#: How much of the log a failure message quotes.
TAIL_CHARS = 4000


def ensure_bytecode() -> None:
    """Compile the package's modules to ``__pycache__`` (only those out of date).

    An installed daemon has its bytecode (pip and distribution packages compile at install
    time); a checkout run with ``PYTHONDONTWRITEBYTECODE=1`` in the environment (this
    project's CI image sets it) has none, and every daemon or CLI subprocess a test or a
    benchmark starts then compiles ~150 modules from source first: ~0.17 s of CPU per
    process, which inflated every start-up figure and the suite's time alike. ``py_compile``
    writes whatever that variable says, atomically, so two test workers may race harmlessly.
    """
    import compileall

    compileall.compile_dir(ROOT / "qwen_refresher", quiet=1)


class Endpoints(Protocol):
    """What the daemon needs of the fake Qwen server: where to send its requests."""

    @property
    def token_url(self) -> str: ...

    @property
    def device_code_url(self) -> str: ...


def daemon_env(*, root: Path, home: Path, openclaw_state: Path, our_state: Path,
               base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for one daemon: ``base`` (default ``os.environ``) without
    ``ENV_STRIP_PREFIXES``, its own HOME/XDG/state dirs under ``root``, JSON logs, no health
    listener, no hook, no desktop notification; ``extra`` last, so a test can turn any back on.
    """
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith(ENV_STRIP_PREFIXES)}
    env.update({
        "HOME": str(home),
        "OPENCLAW_STATE_DIR": str(openclaw_state),
        "XDG_STATE_HOME": str(root / "xdg-state"),
        "XDG_CONFIG_HOME": str(root / "xdg-config"),
        "QWEN_REFRESHER_STATE_DIR": str(our_state),
        "QWEN_REFRESHER_LOG_FORMAT": "json",
        "QWEN_REFRESHER_LISTEN": "",
        "QWEN_REFRESHER_ON_ROTATE": "none",
        "QWEN_REFRESHER_NOTIFY_DESKTOP": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_argv(fake: Endpoints, *args: str, margin: str | None = None,
             jitter: str | None = None, listen: str | None = None,
             entry: Sequence[str] = ("-m", "qwen_refresher"),
             prefix: Sequence[str] = ()) -> list[str]:
    """``[prefix…] python <entry> run --token-url … [--margin] [--jitter] [--listen] args…``.

    ``None`` leaves a flag out (so a config file or the environment decides it); ``prefix``
    runs the interpreter under another program (``setpriv`` to drop privileges).
    """
    argv = [*prefix, sys.executable, *entry, "run", "--token-url", fake.token_url,
            "--device-code-url", fake.device_code_url]
    for flag, value in (("--margin", margin), ("--jitter", jitter), ("--listen", listen)):
        if value is not None:
            argv += [flag, value]
    return [*argv, *args]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every given secret, and anything shaped like a fake token, replaced by a
    placeholder that says which one it was (by number and length, never by content)."""
    for n, secret in enumerate(sorted({s for s in secrets if s}, key=len, reverse=True)):
        text = text.replace(secret, f"<secret #{n} len {len(secret)}>")
    return _FAKE_TOKEN.sub(lambda m: f"fake{m.group(1)}-<redacted>", text)


class DaemonProc:
    """``qwen-refresher run`` as a subprocess, its output read and parsed as it arrives.

    ``records`` holds every JSON log line (a dict) in arrival order, ``arrivals`` the
    ``time.time()`` each arrived, ``other`` every non-JSON line (tracebacks, warnings of
    libraries), ``lines`` every line (unless ``keep_lines`` is false: a long benchmark run
    would hold hundreds of thousands). Every wait has a deadline; every failure message
    quotes the log redacted by ``redact`` with the tokens ``secrets()`` names.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path = ROOT,
                 preexec: Callable[[], None] | None = None, log_file: Path | None = None,
                 keep_lines: bool = True,
                 secrets: Callable[[], Iterable[str]] | None = None) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.other: list[str] = []
        self.counts: Counter[str] = Counter()
        self.keep_lines = keep_lines
        self._secrets = secrets
        self._cond = threading.Condition()
        self._log: IO[str] | None = (log_file.open("a", encoding="utf-8")
                                     if log_file is not None else None)
        self.started_at = self.spawned_at = time.time()
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            preexec_fn=preexec)
        self._reader = threading.Thread(target=self._read, name="daemon-output", daemon=True)
        self._reader.start()

    # -- reading ------------------------------------------------------------------------------
    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            arrived = time.time()
            line = raw.rstrip("\n")
            if self._log is not None:
                self._log.write(raw)
                self._log.flush()
            event: dict[str, Any] | None = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    parsed = json.loads(line)
                    if isinstance(parsed, dict):
                        event = parsed
            with self._cond:
                if self.keep_lines:
                    self.lines.append(line)
                self.on_line(line, event, arrived)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def on_line(self, line: str, event: dict[str, Any] | None, arrived: float) -> None:
        """One line arrived (called under the lock). Subclasses add their own bookkeeping."""
        if event is None:
            self.other.append(line)
            return
        self.records.append(event)
        self.arrivals.append(arrived)
        self.counts[str(event.get("event"))] += 1

    # -- looking ------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        """Everything the daemon printed so far (stdout and stderr, one string)."""
        with self._cond:
            return "\n".join(self.lines)

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.records if e.get("event") == name]

    def count(self, name: str) -> int:
        with self._cond:
            return self.counts[name]

    def has_event(self, name: str) -> bool:
        return self.count(name) > 0

    def secrets(self) -> list[str]:
        return list(self._secrets()) if self._secrets is not None else []

    def tail(self, n: int = 15) -> str:
        """The last ``n`` log records and ``n`` other lines, redacted: for failure messages."""
        with self._cond:
            lines = [json.dumps(e) for e in self.records[-n:]] + self.other[-n:]
        return redact("\n".join(lines), self.secrets())

    def diagnostic(self, chars: int = TAIL_CHARS) -> str:
        """The end of the output (or of the records, if lines are not kept), redacted."""
        text = self.output[-chars:] if self.keep_lines else self.tail()
        return redact(text, self.secrets())

    # -- waiting ------------------------------------------------------------------------------
    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait for ``predicate`` (called under the output lock, so it may read ``records``
        and ``counts`` directly), for at most ``timeout`` s or until the process ended and
        its output was read. Returns the predicate's last value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return predicate()
                self._cond.wait(min(left, 0.5))
        return True

    def wait_event(self, name: str, timeout: float = 20.0, at_least: int = 1) -> dict[str, Any]:
        """The ``at_least``-th ``name`` record; AssertionError (with the redacted log) if it
        does not come within ``timeout`` s or the daemon exits first."""
        if not self.wait(lambda: self.counts[name] >= at_least, timeout):
            rc = self.proc.poll()
            why = (f"daemon exited ({rc}) before" if rc is not None
                   else f"timed out after {timeout}s waiting for")
            raise AssertionError(f"{why} event {name!r} x{at_least}\n--- daemon output ---\n"
                                 + self.diagnostic())
        return self.named(name)[at_least - 1]

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """The daemon's ``started`` record: it has read its stores and planned every family."""
        return self.wait_event("started", timeout)

    # -- stopping -----------------------------------------------------------------------------
    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM; SIGKILL if still alive after ``timeout`` s. Returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._finish()
        return rc

    def kill(self) -> float:
        """SIGKILL; returns the time the signal was sent (the process is reaped)."""
        at = time.time()
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._finish()
        return at

    def _finish(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- its other outputs ----------------------------------------------------------------------
    def tracebacks(self) -> tuple[int, int]:
        """Tracebacks printed (before, after) the daemon logged ``stopping``.

        After ``stopping``, APScheduler 3.11's ``shutdown(wait=False)`` can race its own job
        processing thread (JobLookupError); that noise is counted apart from real crashes.
        """
        before = after = 0
        stopping = False
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            if '"event": "stopping"' in line:
                stopping = True
            elif line.startswith("Traceback"):
                if stopping:
                    after += 1
                else:
                    before += 1
        return before, after

    @property
    def health_address(self) -> str | None:
        """Where the health endpoint bound (``--listen 127.0.0.1:0`` picks a free port)."""
        for event in self.named("health_listening"):
            return str(event["address"])
        return None

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        address = self.health_address
        assert address is not None, "the daemon does not listen (no health_listening event)"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{address}{path}", timeout=timeout) as response:
                return int(response.status), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode("utf-8", "replace")
