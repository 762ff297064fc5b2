"""The few value types every layer shares: credentials, where a profile lives, fingerprints.

Stdlib only: ``status`` imports this on every health check.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

QWEN_PROVIDER = "qwen-portal"


@dataclass(frozen=True)
class Credentials:
    """One OAuth token set as a store holds it.

    The token fields are excluded from ``repr`` so that a stray ``log.info(creds=...)`` or a
    failing assertion can never print them.
    """

    access: str = field(repr=False)
    refresh: str = field(repr=False)
    expires_ms: int
    resource_url: str | None = None
    token_type: str = "Bearer"

    @property
    def expires_at(self) -> float:
        """Expiry as a POSIX timestamp in seconds (stores keep milliseconds)."""
        return self.expires_ms / 1000.0


@dataclass(frozen=True, order=True, slots=True)
class ProfileKey:
    """Where one profile lives: a store file (as configured, absolute) and the id inside it.

    Ordered so that families can take their locks in one fixed order. Hashed once: every
    table of the daemon is keyed by it (a start-up over 2,000 profiles hashed keys 24,000
    times, each a tuple of a Path and a string).
    """

    store: Path
    profile: str
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.store, self.profile)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ProfileKey], tuple[Path, str]]:
        """Rebuilt, never restored: a string's hash differs from one process to the next."""
        return ProfileKey, (self.store, self.profile)

    def __str__(self) -> str:
        return f"{self.store}#{self.profile}"


def fingerprint(token: str, salt: bytes) -> str:
    """A salted, non-reversible name for a token.

    Families are found and consumed tokens remembered by comparing these, so the daemon's state
    and logs can talk about tokens without ever holding them. The salt is per installation,
    which stops anyone with the state file from confirming a guessed token offline.
    """
    # ``hmac.digest``: the same HMAC in one C call (``hmac.new(...).hexdigest()`` copies the
    # context first); two per profile on every read of a store.
    return hmac.digest(salt, token.encode("utf-8"), "sha256").hex()[:24]
