"""Reliability suites: kill -9, a concurrent OpenClaw-like writer, a chaos server, a bad-input
corpus, and secret-leak checks across all of them.

Every suite has a CI size (the default) and a long size (``pytest --long``). Each test prints its
figures (``pytest -s`` shows them) and merges them into ``tests/reliability/last-run.json``.
"""
