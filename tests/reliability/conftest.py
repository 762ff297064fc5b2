"""Fixtures of the reliability suites: CI size by default, long size with ``--long``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import invocation_command, record_figures

HERE = Path(__file__).resolve().parent
#: pytest-timeout's limit for a long run of one suite (the CI limits are on the tests).
LONG_TIMEOUT = 6 * 3600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--long"):
        return
    for item in items:
        if HERE in Path(str(item.path)).parents:
            # Prepended, so it wins over the test's own (CI-sized) timeout marker.
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT), append=False)


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--long"))


Figures = Callable[[str, dict[str, Any]], None]


@pytest.fixture
def figures(request: pytest.FixtureRequest, long_run: bool) -> Figures:
    """``figures(suite, {...})``: print and merge into ``tests/reliability/last-run.json``."""
    command = invocation_command(request.config.invocation_params.args)

    def record(suite: str, values: dict[str, Any]) -> None:
        record_figures(suite, values, long_run=long_run, command=command)

    return record
