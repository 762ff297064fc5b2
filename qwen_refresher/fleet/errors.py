"""The fleet's failure kinds, in the project's error tree (``qwen_refresher.errors``).

::

    class                         exit  metric_label        result
    FleetError                      1   fleet               -            base
    ├── FleetUnavailable            1   fleet_unavailable   unavailable  no quorum, no answer
    ├── FleetAnswerInvalid          1   fleet_unavailable   unavailable  an answer refused
    ├── FleetSecretError           78   config              -            the secret file is unusable
    ├── FleetBusy                   1   fleet_busy          -            another host is spending
    ├── FleetMoved                  1   fleet_moved         -            the record moved: re-plan
    ├── FleetRecordUnreadable       1   fleet_record        -            authentication failed
    └── FleetNeedsLogin             2   rejected            rejected     the fleet's token is dead
        (also a RefreshTokenRejected)

An etcd answer that is too large, not JSON or not of the expected shape is treated exactly like
no answer (``FleetAnswerInvalid`` is a ``FleetUnavailable``): the fleet's rule is safety over
liveness, so anything short of a clear, valid answer means "do not spend". Messages never
contain a token or a key: they name the member URL and the problem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError, QwenRefresherError, RefreshTokenRejected

if TYPE_CHECKING:
    from ..errors import FailedResult


class FleetError(QwenRefresherError):
    """Base of the fleet's errors."""

    metric_label = "fleet"


class FleetUnavailable(FleetError):
    """No etcd member gave a valid answer within the deadline: no quorum, partitioned, down."""

    metric_label = "fleet_unavailable"
    result: ClassVar[FailedResult | None] = "unavailable"


class FleetAnswerInvalid(FleetUnavailable):
    """A member answered something we refuse to act on (too large, not JSON, wrong shape)."""


class FleetSecretError(FleetError, ConfigError):
    """The fleet secret file is missing, unreadable, too open or holds no usable key. Exit 78:
    a host with the wrong key would compute other family ids and never find its family. A
    ``ConfigError`` (its label and exit code), about the setting ``fleet_secret_file``."""

    def __init__(self, problem: str) -> None:
        ConfigError.__init__(self, "fleet_secret_file", problem)


class FleetRecordUnreadable(FleetError):
    """A family record failed authentication (another secret, or tampering): never used."""

    metric_label = "fleet_record"


class FleetBusy(FleetError):
    """Another host holds the family's lock or has a spend in flight: do not spend now."""

    metric_label = "fleet_busy"

    def __init__(self, fid: str, holder: str, why: str) -> None:
        self.fid, self.holder = fid, holder
        super().__init__(f"fleet: {holder} {why}")


class FleetMoved(FleetError):
    """The family's record moved since it was read: re-plan from the new one."""

    metric_label = "fleet_moved"


class FleetNeedsLogin(FleetError, RefreshTokenRejected):
    """The fleet's record for this family is marked ``needs_login``: a host spent its token
    and the server refused it. Nobody spends it again (a second refusal would tell nothing
    new); a login on any host, or the journal of a host that was answered and died before it
    could publish, replaces it. A ``RefreshTokenRejected``: the family needs a login here too.
    """

    metric_label = "rejected"

    def __init__(self, fid: str) -> None:
        self.fid = fid
        RefreshTokenRejected.__init__(
            self, "fleet: another host's refresh of this token was rejected; "
                  "the family needs a login")
