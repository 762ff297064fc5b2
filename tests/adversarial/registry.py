"""The list of adversarial cases, one ``Case`` per hostile input, so that the table in
``docs/bad-input.md`` is generated from the same objects the tests run.

Use ``case(...)`` as a decorator on a test that covers one case, or build ``Case`` objects and
``params(...)`` them into a ``pytest.mark.parametrize`` when one test covers many. Either way
the case lands in ``CASES`` at import time; ``all_cases()`` imports every ``test_*.py`` module
in this folder so the generator sees the whole list without running pytest.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

#: Boundaries, in the order the table lists them.
BOUNDARIES = (
    "token server",
    "redaction",
    "hooks",
    "signals",
    "files",
    "names",
    "health port",
    "clear text",
    "status",
)


@dataclass(frozen=True)
class Case:
    name: str
    boundary: str
    attack: str
    defence: str

    def __post_init__(self) -> None:
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"unknown boundary {self.boundary!r}")
        known = CASES.get(self.name)
        if known is not None and known != self:
            raise ValueError(f"adversarial case {self.name!r} registered twice")
        CASES[self.name] = self


CASES: dict[str, Case] = {}


def case(name: str, boundary: str, attack: str, defence: str) -> Callable[[F], F]:
    """Register one case and tag the test with it (``-m adversarial`` selects the suite)."""
    Case(name, boundary, attack, defence)

    def mark(fn: F) -> F:
        return pytest.mark.adversarial(fn)  # type: ignore[no-any-return]

    return mark


def params(cases: Iterable[Case]) -> list[Any]:
    """``pytest.param`` per case, with the case's name as the test id."""
    return [pytest.param(c, id=c.name) for c in cases]


def all_cases() -> list[Case]:
    """Every registered case, sorted by boundary then name."""
    from tests import adversarial

    for info in pkgutil.iter_modules(adversarial.__path__):
        if info.name.startswith("test_"):
            importlib.import_module(f"tests.adversarial.{info.name}")
    order = {b: i for i, b in enumerate(BOUNDARIES)}
    return sorted(CASES.values(), key=lambda c: (order[c.boundary], c.name))
