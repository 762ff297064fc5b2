"""``arenas.cap_malloc_arenas``: a real process, real threads, glibc's own count of arenas."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="malloc arenas are glibc's")

#: Eight threads allocate and hold memory at once; glibc prints one "Arena N:" per arena.
PROBE = """
import ctypes, sys, threading
from qwen_refresher.arenas import cap_malloc_arenas
print(cap_malloc_arenas() if sys.argv[1] == "cap" else None)
hold, go = [], threading.Event()
def work():
    hold.append([bytes(2000) for _ in range(200)])
    go.wait(10)
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
while len(hold) < 8: pass
ctypes.CDLL(None).malloc_stats()
go.set()
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=60, check=True, env={**os.environ, **env})
    return done.stdout.strip(), done.stderr.count("Arena ")


def test_eight_threads_share_two_arenas_once_capped() -> None:
    set_, capped = _arenas("cap")
    _, free = _arenas("none")
    assert set_ == "True" and capped <= 2 < free, (capped, free)


def test_the_users_malloc_arena_max_wins() -> None:
    set_, arenas = _arenas("cap", MALLOC_ARENA_MAX="3")
    assert set_ == "False" and arenas <= 3
