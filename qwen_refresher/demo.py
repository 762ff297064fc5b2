"""``qwen-refresher demo`` moved to ``commands/demo.py`` (commands live in one package); this
name keeps working for anyone who imported it."""

from __future__ import annotations

from .commands.demo import Scenario, add_parser, run

__all__ = ["Scenario", "add_parser", "run"]
