"""Run many ``qwen-refresher run --once ...`` command lines cheaply: import once, fork per case.

Each config case must be its own process (exit code, stderr, environment), but most of a bare
``python -m qwen_refresher`` start is importing pydantic and friends, 30 times over. This
runner imports the CLI once, then forks one child per case; the child sets the case's
environment and working directory, points stdout/stderr at files and runs ``cli.main`` exactly
as ``python -m qwen_refresher`` would (an uncaught exception prints its traceback and exits 1).

    python -m tests.reliability.settings_runner < cases.json > results.json

Input: a JSON list of {"argv": [...], "env": {...}, "cwd": "...", "out": "...", "err": "..."}.
Output: a JSON list of exit codes (None when a child had to be killed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Any

from qwen_refresher import cli

#: Import what ``run`` imports before forking, so no child pays for it.
import qwen_refresher.config  # noqa: F401  isort: skip

CHILD_TIMEOUT = 30.0


def _child(case: dict[str, Any]) -> None:
    os.chdir(case["cwd"])
    os.environ.clear()
    os.environ.update(case["env"])
    for fd, name in ((1, case["out"]), (2, case["err"])):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = os.fdopen(1, "w", closefd=False)
    sys.stderr = os.fdopen(2, "w", closefd=False)
    signal.alarm(int(CHILD_TIMEOUT))
    try:
        code = cli.main(case["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid: int) -> int | None:
    deadline = time.monotonic() + CHILD_TIMEOUT + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def main() -> int:
    cases: list[dict[str, Any]] = json.load(sys.stdin)
    codes: list[int | None] = []
    for case in cases:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(case)
        codes.append(_wait(pid))
    json.dump(codes, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
