"""The README's first command, ``qwen-refresher demo``, run as a user runs it.

It is the newcomer's first five minutes: the installed console script in a subprocess, a
real fake server, a throw-away OpenClaw state dir and the real daemon. The demo checks its
own steps and exits 0 only if all behaved; here we also hold what it prints to the rules
every other output keeps (no token, no traceback) and check its directory is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_refresher.testing.daemon_proc import ENV_STRIP_PREFIXES

#: The fake's token shapes (``fakeacc-…``, ``fakeref-…``, ``fakedev-…``): none may be printed.
TOKEN_SHAPED = re.compile(r"fake(?:acc|ref|dev)-[A-Za-z0-9_-]{8,}")


def _console_script() -> list[str]:
    """The installed ``qwen-refresher`` beside this interpreter (what the README runs), else
    the module (a checkout without the script on PATH)."""
    script = Path(sys.executable).with_name("qwen-refresher")
    if script.exists():
        return [str(script)]
    found = shutil.which("qwen-refresher")
    return [found] if found else [sys.executable, "-m", "qwen_refresher"]


@pytest.mark.timeout(120)
def test_the_demo_walks_every_step_and_prints_no_token(tmp_path: Path) -> None:
    # A user's shell: none of our or OpenClaw's variables, a HOME of its own, and a TMPDIR
    # we can look into afterwards.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_STRIP_PREFIXES)}
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    done = subprocess.run([*_console_script(), "demo", "--duration", "10", "--plain"],
                          env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=100, check=False, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    tail = "\n".join(out.splitlines()[-12:])
    assert done.returncode == 0, \
        f"demo exited {done.returncode}:\n{TOKEN_SHAPED.sub('<token>', tail)}"
    assert "demo passed" in done.stdout
    for step in ("rotated: ONE refresh request", "recovered on its own",
                 "the rejected token is never sent again", "login written to the whole family"):
        assert step in done.stdout, f"missing step {step!r}"
    assert "Traceback" not in out
    leaked = TOKEN_SHAPED.findall(out)
    assert not leaked, f"{len(leaked)} token-shaped strings printed (lengths " \
                       f"{sorted({len(t) for t in leaked})})"
    assert list((tmp_path / "tmp").iterdir()) == [], "the demo left its directory behind"
