"""The seams between the daemon's parts, as Protocols: what each part needs of another, not
which class provides it.

Modelled on ``structlog.typing``: small structural types, checked by mypy, satisfied by the
real classes without inheriting from anything, and by a test's own small fake just as well.
A seam typed ``Any`` checks nothing: a renamed method or a wrong argument would only show up at
run time, in the one code path that calls it. These are what ``Daemon``/``runtime`` attributes,
``Store.lock(stop=...)``, ``AssistedLogin(log=...)`` and ``LoginEpisodes(log=...)`` are typed with.

Who satisfies what (checked in ``tests/test_errors.py``):

====================  ===============================================================
``Logger``            structlog's bound loggers (``logsetup.get_logger()``), and ``bind``
                      returns another ``Logger``
``StopSignal``        ``threading.Event`` (the daemon's stop event)
``MetricsSink``       ``metrics.Metrics``
``HealthEndpoint``    ``health.HealthServer``
``NotifierLike``      ``runtime.relogin.LoginEpisodes``
====================  ===============================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .state import ProfileStatus

__all__ = ["HealthEndpoint", "Logger", "MetricsSink", "NotifierLike", "StopSignal"]


@runtime_checkable
class Logger(Protocol):
    """A structlog-style bound logger: an event name, then key-value context.

    The methods return whatever the processor chain returns (structlog: None once rendered),
    which no caller uses, hence ``Any``.
    """

    def bind(self, **new_values: Any) -> Logger: ...

    def debug(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def info(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def warning(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def error(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def exception(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def critical(self, event: str, *args: Any, **kw: Any) -> Any: ...


@runtime_checkable
class StopSignal(Protocol):
    """What a long wait needs of "we are stopping": a look, and a wait that ends early.

    ``threading.Event`` is one; a lock wait, a hook or a request polls ``is_set`` and sleeps
    with ``wait`` so that shutdown never waits out their timeouts.
    """

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@runtime_checkable
class MetricsSink(Protocol):
    """Where refresh events are counted (``/metrics``)."""

    def refresh_finished(self, result: str, duration: float,
                         reason: str | None = None) -> None:
        """One attempt ended as ``result``; ``reason`` is its failure kind's metric label."""

    def store_error(self, store: str) -> None:
        """A store could not be read or written."""


@runtime_checkable
class HealthEndpoint(Protocol):
    """The ``/healthz``, ``/readyz``, ``/metrics`` listener the daemon starts and stops."""

    @property
    def port(self) -> int:
        """The bound port (the configured one may be 0: any free port)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@runtime_checkable
class NotifierLike(Protocol):
    """Needs-login notifications: fed the profile rows after each change, closed at exit."""

    def update(self, profiles: list[ProfileStatus]) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...
