"""A fork server for the signal stress test: the real daemon, started in milliseconds.

Starting ``python -m qwen_refresher run`` costs most of a second of CPU, nearly all of it
imports; two hundred start/stop cycles on a busy two-core CI machine would take minutes. This
process imports the daemon's modules once, then for each request forks a child that runs
exactly what ``python -m qwen_refresher run ...`` runs (``cli.main``) with its own
environment, working directory and output file, and exits the way that process exits
(``sys.exit``: atexit handlers and the join of non-daemon threads included). Only the
interpreter's start-up and the imports are shared; signals, handlers, threads and the exit
are the child's own.

Protocol (one line each way): a request is JSON ``{"id", "argv", "env", "cwd", "log"}`` on
stdin; the answers on stdout are ``pid ID PID`` when the child is forked and
``exit PID CODE MONOTONIC`` when it is reaped (CODE as ``Popen.returncode``: negative for a
signal). EOF on stdin ends the server. It stays single-threaded, so forking is safe.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
import traceback
from typing import Any, NoReturn


def _warm() -> None:
    """Import what ``run`` imports, lazily included, so that a child imports nothing."""
    import qwen_refresher.cli
    import qwen_refresher.config
    import qwen_refresher.daemon
    import qwen_refresher.logsetup
    import qwen_refresher.notify  # noqa: F401


def _child(request: dict[str, Any]) -> NoReturn:
    """Become ``qwen-refresher <argv>``; never returns."""
    code: object = 1
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["qwen-refresher", *request["argv"]]
        from qwen_refresher.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)  # a normal interpreter exit, as the real process has


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    _warm()
    assert threading.active_count() == 1, "a fork server must stay single-threaded"
    _say("READY")
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.005)
        if readable:
            data = os.read(0, 65536)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                _say(f"pid {request['id']} {pid}")
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _say(f"exit {pid} {os.waitstatus_to_exitcode(status)} {time.monotonic()}")


if __name__ == "__main__":
    main()
