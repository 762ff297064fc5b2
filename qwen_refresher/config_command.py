"""``qwen-refresher config`` moved to ``commands/config.py`` (commands are parse + render only,
one module each); this name keeps working for anyone who imported it."""

from __future__ import annotations

from .commands.config import add_parser, config_command, effective

__all__ = ["add_parser", "config_command", "effective"]
