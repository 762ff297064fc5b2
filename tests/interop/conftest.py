from __future__ import annotations

from collections.abc import Iterator

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import OpenClawHome
from tests.interop.openclaw import TIMINGS, Install, OpenClaw, install, timing_summary


@pytest.fixture(scope="session")
def openclaw_install() -> Install:
    found = install()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture
def openclaw(openclaw_install: Install, oc: OpenClawHome, fake: FakeQwen) -> Iterator[OpenClaw]:
    """OpenClaw in this test's home, its Qwen traffic sent to ``fake``.

    After the test: OpenClaw must not have tried to reach any other host (the preload refused
    and logged it; a new attempt means OpenClaw changed in a way this suite does not model).
    """
    claw = OpenClaw(openclaw_install, oc, fake.base_url)
    yield claw
    assert claw.refused() == [], f"OpenClaw tried to leave loopback: {claw.refused()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "OpenClaw 2026.3.24 run times (wall clock)")
        for line in timing_summary():
            terminalreporter.write_line(line)
