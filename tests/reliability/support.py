"""Shared pieces of the reliability suites: a daemon runner, figures, secret checks, lineage.

``Daemon`` is ``tests.harness.DaemonProcess`` with what these suites need on top: it parses
the JSON log as it arrives (long runs produce tens of thousands of lines), can be killed with
SIGKILL, can start with reduced privileges (``preexec``: the unreadable-file case needs a
daemon that root's file-permission override does not apply to), and knows the address its
health endpoint bound to (``--listen 127.0.0.1:0``, from the ``health_listening`` event).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from qwen_refresher.testing.fake_qwen import FakeQwen, IssuedTokens
from tests.harness import ROOT, OpenClawHome, all_tokens, assert_no_secrets

HERE = Path(__file__).resolve().parent
LAST_RUN = HERE / "last-run.json"
PYTHON = sys.executable


# -- figures ------------------------------------------------------------------------------------


def record_figures(suite: str, figures: dict[str, Any], *, long_run: bool,
                   command: str) -> None:
    """Print the figures of one suite and merge them into ``last-run.json`` (under the
    suite's name, ``<suite>_long`` for a ``--long`` run).

    Several xdist workers may finish at once, so the merge happens under an flock of the file.
    """
    entry: dict[str, Any] = {
        "mode": "long" if long_run else "ci",
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        **figures,
    }
    print(f"\n[{suite}] " + json.dumps(entry, indent=2, sort_keys=True))
    fd = os.open(LAST_RUN, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            doc = json.loads(fh.read() or "{}")
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        doc[suite if not long_run else f"{suite}_long"] = entry
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def invocation_command(args: Sequence[str]) -> str:
    return " ".join([".venv/bin/pytest", *args])


class HasOutput(Protocol):
    @property
    def output(self) -> str: ...


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             daemon: HasOutput | None = None, interval: float = 0.05) -> None:
    """``tests.harness.wait_for`` for any daemon runner (ours or the harness's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    detail = ("\n--- daemon output ---\n" + daemon.output[-4000:]) if daemon else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


# -- the daemon ---------------------------------------------------------------------------------


class Daemon:
    """``python -m qwen_refresher run`` as a subprocess, its JSON log parsed as it comes."""

    def __init__(self, home: OpenClawHome, fake: FakeQwen, *args: str,
                 env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None,
                 listen: bool = True, log_file: Path | None = None) -> None:
        argv = [PYTHON, "-m", "qwen_refresher", "run", "--token-url", fake.token_url,
                "--device-code-url", fake.device_code_url,
                *(["--listen", "127.0.0.1:0"] if listen else []), *args]
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env or home.env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", preexec_fn=preexec)
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._log = log_file.open("a", encoding="utf-8") if log_file is not None else None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # kept whole in memory: the checks read all of it
            line = raw.rstrip("\n")
            self.lines.append(line)
            if self._log is not None:
                self._log.write(raw)
                self._log.flush()
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.events.append(obj)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == name]

    def count(self, name: str) -> int:
        return sum(1 for e in list(self.events) if e.get("event") == name)

    def wait_event(self, name: str, timeout: float = 20.0, at_least: int = 1) -> dict[str, Any]:
        wait_for(lambda: self.count(name) >= at_least or self.proc.poll() is not None,
                 timeout, f"event {name!r} x{at_least}", self)
        found = self.named(name)
        if len(found) < at_least:
            raise AssertionError(f"daemon exited ({self.proc.returncode}) before {name!r}:\n"
                                 + self.output[-4000:])
        return found[at_least - 1]

    def tracebacks(self) -> tuple[int, int]:
        """Tracebacks printed (before, after) the daemon logged ``stopping``.

        After ``stopping``, APScheduler 3.11's ``shutdown(wait=False)`` can race its own job
        processing thread (JobLookupError); that noise is counted apart from real crashes.
        """
        before = after = 0
        stopping = False
        for line in list(self.lines):
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

    def kill(self) -> float:
        """SIGKILL; returns the time the signal was sent (the process is reaped)."""
        at = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)
        self._close_log()
        return at

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._reader.join(5)
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- secrets ------------------------------------------------------------------------------------


def status_outputs(oc: OpenClawHome, env: dict[str, str] | None = None) -> list[str]:
    """``status --json`` and plain ``status``, stdout and stderr, as the user would see them."""
    texts: list[str] = []
    for extra in (["--json"], ["--no-color"]):
        proc = subprocess.run([PYTHON, "-m", "qwen_refresher", "status", *extra], cwd=ROOT,
                              env=env or oc.env(), capture_output=True, text=True, timeout=60)
        texts += [proc.stdout, proc.stderr]
    return texts


#: Length of the token pieces looked for: long enough never to match by chance.
PIECE = 16
_RUN = re.compile(r"[A-Za-z0-9_\-]{" + str(PIECE) + ",}")


def assert_no_leaks(texts: Iterable[str], secrets: Iterable[str]) -> int:
    """No secret, and no 16-character piece of one, in any text; returns how many were checked.

    Whole-token matching (``tests.harness.assert_no_secrets``) misses a token cut short by a
    length limit, and costs tokens x characters; so every 16-character window of every token
    goes into a set, and each text's runs of token characters are looked up window by window
    (one pass over the text, whatever the number of tokens). The harness check runs as well
    on the short texts (status, metrics), where it is cheap.
    """
    bag = [t for t in texts if t]
    tokens = sorted({s for s in secrets if s})
    assert_no_secrets([t for t in bag if len(t) < 200_000], tokens)
    pieces: dict[str, int] = {}
    for n, secret in enumerate(tokens):
        for i in range(len(secret) - PIECE + 1):
            pieces.setdefault(secret[i:i + PIECE], n)
    for i, text in enumerate(bag):
        for run in _RUN.finditer(text):
            word = run.group()
            for j in range(len(word) - PIECE + 1):
                n = pieces.get(word[j:j + PIECE], -1)
                if n >= 0:
                    raise AssertionError(f"part of token #{n} (len {len(tokens[n])}) leaked "
                                         f"into output #{i} at offset {run.start() + j}")
    return len(tokens)


def fake_secrets(fake: FakeQwen) -> list[str]:
    return all_tokens(fake)


# -- token lineage at the fake ------------------------------------------------------------------


def successor_map(issued: Sequence[IssuedTokens]) -> dict[str, IssuedTokens]:
    """refresh token -> the token set the server issued in exchange for it."""
    return {i.replaced: i for i in issued if i.replaced is not None and i.via == "refresh"}


def chain_from(token: str, successors: dict[str, IssuedTokens]) -> list[str]:
    """``token`` and every refresh token the server issued after it in its lineage."""
    chain = [token]
    while chain[-1] in successors:
        chain.append(successors[chain[-1]].refresh_token)
        if len(chain) > 1_000_000:  # pragma: no cover - a cycle would be a fake bug
            raise AssertionError("token lineage cycle")
    return chain


def live_at_fake(fake: FakeQwen, refresh_token: str) -> bool:
    """Issued and not yet traded in: the server would accept it now (no rejections here)."""
    issued = {i.refresh_token for i in fake.issued}
    consumed = {i.replaced for i in fake.issued if i.replaced is not None}
    return refresh_token in issued and refresh_token not in consumed


# -- files --------------------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """What a test writes while a monitor reads: never a half-written file."""
    tmp = path.with_name(f".{path.name}.test.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Entry:
    """One directory entry, described well enough to say it did not change."""

    kind: str
    digest: str | None
    mode: int
    target: str | None


def describe(path: Path) -> Entry:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return Entry("symlink", None, stat.S_IMODE(st.st_mode), os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", None, stat.S_IMODE(st.st_mode), None)
    if stat.S_ISFIFO(st.st_mode):
        return Entry("fifo", None, stat.S_IMODE(st.st_mode), None)
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return Entry("file", digest.hexdigest(), stat.S_IMODE(st.st_mode), None)
    return Entry("other", None, stat.S_IMODE(st.st_mode), None)


def tree(directory: Path) -> dict[str, Entry]:
    """Every entry under ``directory`` (not following symlinks), by relative path."""
    out: dict[str, Entry] = {}
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            out[str(path.relative_to(directory))] = describe(path)
    return out


def temp_leftovers(*directories: Path) -> list[Path]:
    """Temporary files of ``fileio.atomic_write`` (``.<name>.<hex>.tmp``) left lying around."""
    found: list[Path] = []
    for directory in directories:
        with contextlib.suppress(OSError):
            found += [p for p in directory.iterdir()
                      if p.name.startswith(".") and p.name.endswith(".tmp")
                      and ".test." not in p.name]
    return sorted(found)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
