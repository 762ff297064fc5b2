"""Compatibility: the daemon now lives in ``qwen_refresher.runtime`` (see its modules and
docs/architecture.md). The names other code imported from here keep working."""

from __future__ import annotations

from .runtime.daemon import CLOCK_JUMP, RELOAD_JOIN, Daemon
from .runtime.events import QUIET_REPUBLISH
from .runtime.families import IDLE_RETRY_BASE, IDLE_RETRY_CAP, REVERT_FREE_RETRIES
from .runtime.inventory import LOCKED_REREAD_TIMEOUT, RACY_WINDOW, REDACT_GRACE, stat_key
from .runtime.jobs import JOB_INSTANCES
from .runtime.memory import Family, Runtime, View
from .runtime.onrotate import HOOK_RETRY_CAP, hook_retry_delay
from .runtime.outcomes import IDLE_WARN_AFTER, ONCE_SUCCESS
from .runtime.publisher import PUBLISH_DELAY
from .runtime.refresh import RETRY_EARLY_SLACK
from .runtime.signals import HANDLED_SIGNALS, STOP_SIGNALS

__all__ = [
    "CLOCK_JUMP", "HANDLED_SIGNALS", "HOOK_RETRY_CAP", "IDLE_RETRY_BASE", "IDLE_RETRY_CAP",
    "IDLE_WARN_AFTER", "JOB_INSTANCES", "LOCKED_REREAD_TIMEOUT", "ONCE_SUCCESS",
    "PUBLISH_DELAY", "QUIET_REPUBLISH", "RACY_WINDOW", "REDACT_GRACE", "RELOAD_JOIN",
    "RETRY_EARLY_SLACK", "REVERT_FREE_RETRIES", "STOP_SIGNALS", "Daemon", "Family", "Runtime",
    "View", "hook_retry_delay", "stat_key",
]
