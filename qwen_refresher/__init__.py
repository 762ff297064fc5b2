"""qwen-refresher keeps OpenClaw's qwen-portal OAuth tokens fresh.

Kept import-free on purpose: ``qwen-refresher status`` imports this package on every health check,
so nothing heavy may be pulled in here.
"""

__version__ = "0.1.0"
