"""Shared pieces of the reliability suites: a daemon runner, figures, secret checks, lineage.

``Daemon`` is ``qwen_refresher.testing.daemon_proc.DaemonProc`` (the one way tests and
benchmarks start the daemon, which parses the JSON log as it arrives, can SIGKILL, and knows the
health endpoint's address) with these suites' defaults: ``--listen 127.0.0.1:0``, reduced
privileges on request (``preexec``: the unreadable-file case needs a daemon that root's
file-permission override does not apply to) and the log teed to a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qwen_refresher.testing.daemon_proc import DaemonProc, run_argv
from qwen_refresher.testing.fake_qwen import FakeQwen, IssuedTokens
from tests.harness import ROOT, OpenClawHome, all_tokens, assert_no_secrets
from tests.harness import wait_for as wait_for  # re-exported: the suites import it from here

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


# -- the daemon ---------------------------------------------------------------------------------


class Daemon(DaemonProc):
    """``python -m qwen_refresher run`` (``qwen_refresher.testing.daemon_proc``, the one way
    tests and benchmarks start it) with what these suites add: ``--listen 127.0.0.1:0`` by
    default (``health_address``/``http_get`` find the port), reduced privileges (``preexec``),
    the output teed to ``log_file``, ``events`` as the live list of parsed records."""

    def __init__(self, home: OpenClawHome, fake: FakeQwen, *args: str,
                 env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None,
                 listen: bool = True, log_file: Path | None = None) -> None:
        argv = run_argv(fake, *args, listen="127.0.0.1:0" if listen else None)
        super().__init__(argv, env=env or home.env(), preexec=preexec, log_file=log_file,
                         secrets=lambda: all_tokens(fake))

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every JSON log record so far: the live list (append-only while the daemon runs)."""
        return self.records


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
