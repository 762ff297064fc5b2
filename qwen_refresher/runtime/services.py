"""The daemon's HTTP side: metrics and the health endpoint, built from the settings.

Metrics exist only to be scraped: without a listen address there is no HTTP server and no
prometheus-client import. A reload that changes ``listen`` moves the server (the new one is
bound before the old one stops, so a bad address keeps the old server); the counters stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Settings, is_loopback_host
from ..errors import ConfigError
from ..state import ProfileStatus

if TYPE_CHECKING:
    from ..health import HealthServer
    from ..metrics import Metrics
    from ..protocols import Logger


class Services:
    def __init__(self, log: Logger) -> None:
        self.log = log
        self.metrics: Metrics | None = None
        self.health: HealthServer | None = None
        self._address: tuple[str, int] | None = None

    def configure(self, settings: Settings, *, alive: Callable[[], bool],
                  statuses: Callable[[], list[ProfileStatus]],
                  not_ready: Callable[[], list[str]] | None = None) -> None:
        """Listen where ``settings`` say (nowhere: none); raises ``ConfigError`` if the
        address cannot be bound."""
        address = settings.listen_address
        if address == self._address and (address is None or self.health is not None):
            return
        old = self.health
        if address is None:
            self.health, self._address = None, None
        else:
            from ..health import HealthServer
            from ..metrics import Metrics

            if self.metrics is None:
                self.metrics = Metrics(statuses)
            health = HealthServer(address[0], address[1], live_fn=alive, profiles_fn=statuses,
                                  metrics=self.metrics, not_ready_fn=not_ready)
            try:
                health.start()
            except OSError as exc:
                raise ConfigError("listen (QWEN_REFRESHER_LISTEN)",
                                  f"cannot listen on {settings.listen}: {exc.strerror}"
                                  ) from None
            self.health, self._address = health, address
            self.log.info("health_listening", address=f"{address[0]}:{health.port}")
            if not is_loopback_host(address[0]):
                self.log.warning("health_exposed", address=settings.listen,
                                 message="health and metrics are reachable from other hosts "
                                         "(no token is ever served there)")
        if old is not None:
            old.stop()

    def stop(self) -> None:
        if self.health is not None:
            self.health.stop()
