from __future__ import annotations

from collections.abc import Iterator

import pytest

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import OpenClawHome
from tests.interop.openclaw import Gateway, Install, OpenClaw, install, timing_summary

#: user_properties key under which each test reports its OpenClaw runs (works under xdist).
RUNS = "openclaw_runs"


@pytest.fixture(scope="session")
def openclaw_install() -> Install:
    found = install()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture
def openclaw(request: pytest.FixtureRequest, openclaw_install: Install, oc: OpenClawHome,
             fake: FakeQwen) -> Iterator[OpenClaw]:
    """OpenClaw in this test's home, its Qwen traffic sent to ``fake``.

    After the test: OpenClaw must not have tried to reach any other host (the preload refused
    and logged it; a new attempt means OpenClaw changed in a way this suite does not model).
    """
    claw = OpenClaw(openclaw_install, oc, fake.base_url)
    yield claw
    request.node.user_properties.append((RUNS, list(claw.timings)))
    assert claw.refused() == [], f"OpenClaw tried to leave loopback: {claw.refused()}"


@pytest.fixture
def gateway(openclaw: OpenClaw) -> Iterator[Gateway]:
    """``openclaw gateway run`` for this test's home, not yet started (``gateway.start()``).

    After the test it is stopped, and must not have tried to leave loopback other than by its
    pricing bootstrap (``GATEWAY_ALLOWED_REFUSALS``).
    """
    server = Gateway(openclaw)
    try:
        yield server
    finally:
        server.stop()
    assert server.refused() == [], f"the gateway tried to leave loopback: {server.refused()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    runs: list[tuple[str, float]] = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "teardown":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if key == RUNS:
                    runs.extend((str(label), float(seconds)) for label, seconds in value)
    if runs:
        terminalreporter.write_sep("-", "OpenClaw 2026.3.24 run times (wall clock)")
        for line in timing_summary(runs):
            terminalreporter.write_line(line)
