"""The way in for a newcomer: the README stays short and every link and ``docs/`` path named
anywhere in the repository resolves (a renamed or missing page fails here, not for a user)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]+\.md")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".py", ".md", ".toml", ".yaml", ".yml", ".service", ".sh", ""}
    files = [ROOT / name for name in out.splitlines()]
    return [f for f in files if f.is_file() and f.suffix in suffixes]


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    in_code = False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_every_docs_path_named_in_the_repository_exists() -> None:
    missing = {}
    for f in _tracked_text_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for name in DOCS_PATH.findall(text):
            if not (ROOT / name).exists():
                missing.setdefault(name, []).append(str(f.relative_to(ROOT)))
    assert not missing, f"docs paths that do not exist: {missing}"


def test_the_readme_is_short_and_says_who_it_is_for() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    head = "\n".join(text.splitlines()[:20])
    for fact in ("2026.3.28", "2026-04-15", "qwen-portal"):
        assert fact in head, f"the first lines must say {fact}"


def test_the_module_map_names_every_module() -> None:
    """docs/architecture.md's module map is how a newcomer finds a room: a module it does not
    name (by its path in the package, in backticks) is a room nobody can find."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = doc[doc.index("## Modules"):]
    package = ROOT / "qwen_refresher"
    modules = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                     if path.name not in ("__init__.py", "__main__.py"))
    missing = [m for m in modules if f"`{m}`" not in table]
    assert not missing, f"add a row for each to docs/architecture.md ## Modules: {missing}"
