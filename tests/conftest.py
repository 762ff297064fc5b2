from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_refresher.testing.daemon_proc import ensure_bytecode
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.harness import OpenClawHome


def pytest_sessionstart(session: pytest.Session) -> None:
    """Bytecode for the daemon and CLI subprocesses the suite starts by the hundred
    (``ensure_bytecode``: ~0.17 s of CPU each otherwise, where the environment says not to
    write it)."""
    ensure_bytecode()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long reliability versions (500 kills, 200 profiles...)")


@pytest.fixture
def fake() -> Iterator[FakeQwen]:
    with FakeQwen(FakeQwenConfig(lifetime=3600)) as server:
        yield server


@pytest.fixture
def oc(tmp_path: Path) -> OpenClawHome:
    return OpenClawHome(tmp_path)
