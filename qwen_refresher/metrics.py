"""Prometheus metrics, on a registry of our own.

Counters and the histogram are events, so the daemon reports them as they happen. Everything
that is a *state* (expiry, next refresh, last success, needs login) is read from the daemon's
own profile list at scrape time by a custom collector, so there is no second copy of that state
to keep in sync or to leave stale when a profile disappears.

Labels come from closed sets (results, reasons) or are store paths and profile ids; a token
value can never become a label or a sample value. Paths and ids are names we do not choose (a
lone surrogate in a JSON key, an agent directory that is not UTF-8, escape codes): they pass
through ``escape.printable`` first, because one label value that is not UTF-8 makes
``generate_latest`` raise and ``/metrics`` fail for every profile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from . import errors
from .escape import printable
from .state import ProfileStatus

PREFIX = "qwen_refresher"
#: How a counted refresh attempt can end: the runs that changed something, then every
#: ``result`` a failure kind in ``errors`` can produce. ``not_due`` runs are not attempts and are
#: not counted; anything else counts as "other".
RESULTS = ("rotated", "adopted", "synced", *errors.refresh_results())
#: Why an attempt failed: the ``metric_label`` of every failure kind that can end a refresh
#: (``errors.refresh_failure_labels``), so the labels come from the types and each one is
#: produced by some kind. ``Metrics`` reads the tree again when it is made, so that kinds
#: defined in modules imported after this one (``fleet.errors``) are counted too.
REASONS = errors.refresh_failure_labels()
STATES = ("ok", "due", "refreshing", "retrying", "needs_login", "expired", "invalid_store")
#: A token request takes well under a second; a lock wait or a slow server takes tens.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0)


def failure_label(failure: errors.QwenRefresherError | None) -> str | None:
    """The ``reason`` label of a failed run's kind; None for a run that did not fail."""
    return None if failure is None else failure.metric_label


def _closed(value: str | None, allowed: tuple[str, ...]) -> str:
    """Keep label values to a known set: bounded cardinality, and nothing unexpected leaks."""
    return value if value in allowed else "other"


class ProfileCollector(Collector):
    """Gauges built from ``profiles_fn()`` at each scrape."""

    def __init__(self, profiles_fn: Callable[[], list[ProfileStatus]]) -> None:
        self._profiles_fn = profiles_fn

    def describe(self) -> list[Metric]:
        # Describing without calling profiles_fn keeps registration free of side effects.
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        (expiry, next_refresh, last_success, needs_login, state, reload_failing,
         reload_since) = self._families()
        for p in self._profiles_fn():
            labels = [printable(p["store"]), printable(p["profile"])]
            if p["expires_at"] is not None:
                expiry.add_metric(labels, p["expires_at"])
            if p["next_refresh_at"] is not None:
                next_refresh.add_metric(labels, p["next_refresh_at"])
            if p["last_refresh_at"] is not None:
                last_success.add_metric(labels, p["last_refresh_at"])
            needs_login.add_metric(labels, 1.0 if p["state"] == "needs_login" else 0.0)
            for name in STATES:
                state.add_metric([*labels, name], 1.0 if p["state"] == name else 0.0)
            hook = p.get("hook")
            since = hook["failing_since"] if hook is not None and not hook["ok"] else None
            reload_failing.add_metric(labels, 0.0 if since is None else 1.0)
            if since is not None:
                reload_since.add_metric(labels, since)
        yield from (expiry, next_refresh, last_success, needs_login, state, reload_failing,
                    reload_since)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        labels = ["store", "profile"]
        return (
            GaugeMetricFamily(f"{PREFIX}_token_expiry_timestamp_seconds",
                              "When the profile's access token expires (unix time).",
                              labels=labels),
            GaugeMetricFamily(f"{PREFIX}_next_refresh_timestamp_seconds",
                              "When the next refresh is planned (unix time).", labels=labels),
            GaugeMetricFamily(f"{PREFIX}_last_success_timestamp_seconds",
                              "When the profile was last refreshed successfully (unix time).",
                              labels=labels),
            GaugeMetricFamily(f"{PREFIX}_needs_login",
                              "1 when only a new login can fix the profile.", labels=labels),
            GaugeMetricFamily(f"{PREFIX}_profile_state",
                              "1 for the profile's current state, 0 for the others.",
                              labels=[*labels, "state"]),
            GaugeMetricFamily(f"{PREFIX}_reload_failing",
                              "1 while on_rotate (the gateway reload) for the profile's newest "
                              "tokens has failed and is being retried.", labels=labels),
            GaugeMetricFamily(f"{PREFIX}_reload_failing_since_timestamp_seconds",
                              "When on_rotate started failing (unix time), while it fails.",
                              labels=labels),
        )


class Metrics:
    """Everything ``/metrics`` serves; the daemon owns one."""

    def __init__(self, profiles_fn: Callable[[], list[ProfileStatus]]) -> None:
        # Our own registry: the global one carries process/platform collectors and would make
        # two daemons in one test process collide on registration.
        self.registry = CollectorRegistry(auto_describe=True)
        self.refresh_total = Counter(
            f"{PREFIX}_refresh", "Refresh attempts by how they ended.", ["result"],
            registry=self.registry)
        self.refresh_failures_total = Counter(
            f"{PREFIX}_refresh_failures", "Failed refresh attempts by reason.", ["reason"],
            registry=self.registry)
        self.store_errors_total = Counter(
            f"{PREFIX}_store_errors", "Times a store could not be read or written.", ["store"],
            registry=self.registry)
        self.refresh_duration = Histogram(
            f"{PREFIX}_refresh_duration_seconds", "Time one refresh attempt took.",
            buckets=DURATION_BUCKETS, registry=self.registry)
        self.results = ("rotated", "adopted", "synced", *errors.refresh_results())
        self.reasons = errors.refresh_failure_labels()
        for result in self.results:  # present from the start, so rate() sees the first increment
            self.refresh_total.labels(result=result)
        for reason in self.reasons:
            self.refresh_failures_total.labels(reason=reason)
        self.registry.register(ProfileCollector(profiles_fn))

    def refresh_finished(self, result: str, duration: float, reason: str | None = None) -> None:
        """Count one attempt; ``reason`` (failures only) is one of ``REASONS``: the failure
        kind's ``metric_label`` (``failure_label(outcome.failure)``)."""
        self.refresh_total.labels(result=_closed(result, self.results)).inc()
        self.refresh_duration.observe(max(0.0, duration))
        if reason is not None:
            self.refresh_failures_total.labels(reason=_closed(reason, self.reasons)).inc()

    def store_error(self, store: str) -> None:
        self.store_errors_total.labels(store=printable(store)).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
