"""The adversarial suite: hostile inputs at every boundary the daemon has (issue 12).

Each case is registered in ``registry.py`` with the boundary it attacks, what the attacker
does and what the daemon must do instead; ``docs/bad-input.md`` carries the table, generated
by ``.venv/bin/python -m tests.reliability.corpus``.
"""
