"""The adversarial suite is as large as issue 12 asks, and ``docs/bad-input.md`` lists it."""

from __future__ import annotations

from tests.adversarial.registry import BOUNDARIES, all_cases
from tests.reliability.corpus import DOC, render_markdown


def test_the_suite_covers_every_boundary_with_at_least_fifty_cases() -> None:
    cases = all_cases()
    assert len(cases) >= 50, f"only {len(cases)} adversarial cases"
    covered = {c.boundary for c in cases}
    assert covered == set(BOUNDARIES), f"no case for {sorted(set(BOUNDARIES) - covered)}"


def test_the_docs_table_lists_every_case() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text == render_markdown(), (
        "docs/bad-input.md is out of date; run: .venv/bin/python -m tests.reliability.corpus")
    for c in all_cases():
        assert f"`{c.name}`" in text
