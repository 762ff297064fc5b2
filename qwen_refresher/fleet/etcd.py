"""A small etcd v3 client over etcd's official JSON gateway (``/v3/...``), with httpx.

Only what the fleet needs: range, txn, lease grant/keepalive/revoke, watch, status, and
authentication. No consensus of our own: every decision is an etcd transaction.

Rules every call follows:

- **A deadline.** Each attempt has ``timeout`` seconds (connect, send, wait, read), and a call
  tries each member at most once, so a call never takes longer than ``timeout`` x members.
  A linearizable read without a quorum hangs in etcd; our deadline turns that into
  ``FleetUnavailable``.
- **A size cap.** An answer larger than ``max_answer`` bytes is refused unread beyond the cap.
- **Validation.** An answer must be a JSON object of the expected shape; etcd's int64s arrive
  as strings and are parsed strictly; keys and values are base64. Anything else is
  ``FleetAnswerInvalid`` (treated as no answer: never act on a half-understood reply).
- **Failover.** The client URLs are tried in order, starting with the last one that answered.
- **Ambiguity is the caller's.** A write whose answer never came may or may not have applied;
  the coordinator re-reads and decides, so nothing here retries a write on its own behalf
  beyond trying the next member after a connection failure that happened before sending.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .errors import FleetAnswerInvalid, FleetUnavailable

#: Largest answer we read from etcd. A family record is a few hundred bytes; a range over one
#: family's keys a few KiB.
DEFAULT_MAX_ANSWER = 1024 * 1024
#: Largest single watch message.
MAX_WATCH_LINE = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for "every key starting with prefix"."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Compare:
    """One comparison of a transaction: ``target`` is CREATE, MOD, VALUE or VERSION."""

    key: bytes
    target: str
    value: int | bytes

    def to_json(self) -> dict[str, Any]:
        field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
                 "VALUE": "value"}[self.target]
        value = b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": b64(self.key), "target": self.target, "result": "EQUAL", field: value}


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": b64(self.key), "value": b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@dataclass(frozen=True)
class Delete:
    key: bytes

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": {"key": b64(self.key)}}


@dataclass(frozen=True)
class Get:
    key: bytes

    def to_json(self) -> dict[str, Any]:
        return {"request_range": {"key": b64(self.key)}}


Op = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    #: For each ``Get`` of the branch that ran, the key-values it found.
    ranges: list[list[KeyValue]]


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


# -- validation of answers ---------------------------------------------------------------------
def _int(value: Any, what: str) -> int:
    if value is None:
        return 0  # protobuf's JSON leaves zero values out
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FleetAnswerInvalid(f"etcd answer: {what} is not an integer")
    try:
        number = int(value)
    except ValueError:
        raise FleetAnswerInvalid(f"etcd answer: {what} is not an integer") from None
    if not -(2**63) <= number < 2**63:
        raise FleetAnswerInvalid(f"etcd answer: {what} is out of range")
    return number


def _bytes(value: Any, what: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise FleetAnswerInvalid(f"etcd answer: {what} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FleetAnswerInvalid(f"etcd answer: {what} is not base64") from None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FleetAnswerInvalid(f"etcd answer: {what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FleetAnswerInvalid(f"etcd answer: {what} is not a list")
    return value


def _kv(raw: Any) -> KeyValue:
    kv = _obj(raw, "kv")
    return KeyValue(key=_bytes(kv.get("key"), "key"), value=_bytes(kv.get("value"), "value"),
                    create_revision=_int(kv.get("create_revision"), "create_revision"),
                    mod_revision=_int(kv.get("mod_revision"), "mod_revision"),
                    version=_int(kv.get("version"), "version"),
                    lease=_int(kv.get("lease"), "lease"))


def _revision(answer: dict[str, Any]) -> int:
    return _int(_obj(answer.get("header"), "header").get("revision"), "revision")


def _check_error(answer: dict[str, Any]) -> None:
    """The gateway reports a gRPC failure as ``{"error": ..., "code": N}`` (or "message")."""
    if "error" in answer or ("code" in answer and "message" in answer):
        message = answer.get("error") or answer.get("message")
        text = message if isinstance(message, str) else "error"
        raise FleetUnavailable(f"etcd said: {text[:200]}")


class EtcdClient:
    """Thread-safe; one ``httpx.Client`` per client, shared by every thread."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 3.0,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        user: str | None = None,
        password: str | None = None,
        max_answer: int = DEFAULT_MAX_ANSWER,
    ) -> None:
        if not urls:
            raise ValueError("at least one etcd client URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.max_answer = max_answer
        self._user = user
        self._password = password
        self._token: str | None = None
        self._good = 0
        self._lock = threading.Lock()
        #: Requests sent (every attempt), for the benchmark's "requests per host per hour".
        self.requests = 0
        #: Per thread: the monotonic time by which a call must be done (``deadline``).
        self._local = threading.local()
        verify: ssl.SSLContext | bool = True
        if ca is not None or cert is not None:
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None:
                context.load_cert_chain(str(cert), str(key) if key else None)
            verify = context
        self._http = httpx.Client(verify=verify, trust_env=False,
                                  headers={"Content-Type": "application/json"},
                                  limits=httpx.Limits(max_connections=32,
                                                      max_keepalive_connections=8))

    def close(self) -> None:
        self._http.close()

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Every call this thread makes inside the block ends within ``seconds`` from now,
        over all members together (each attempt gets what is left, at most ``timeout``).
        Nested blocks keep the earlier deadline."""
        outer: float | None = getattr(self._local, "deadline", None)
        at = time.monotonic() + seconds
        self._local.deadline = at if outer is None else min(outer, at)
        try:
            yield
        finally:
            self._local.deadline = outer

    def _order(self) -> list[int]:
        with self._lock:
            start = self._good
        return [(start + i) % len(self.urls) for i in range(len(self.urls))]

    def _headers(self, url: str) -> dict[str, str]:
        if self._user is None:
            return {}
        if self._token is None:
            self._authenticate(url)
        return {"Authorization": self._token or ""}

    def _authenticate(self, url: str) -> None:
        answer = self._send(url, "/v3/auth/authenticate",
                            {"name": self._user, "password": self._password}, {})
        token = answer.get("token")
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise FleetAnswerInvalid("etcd answer: authenticate gave no token")
        self._token = token

    def _send(self, url: str, path: str, body: dict[str, Any],
              headers: dict[str, str], limit: float | None = None) -> dict[str, Any]:
        self.requests += 1
        seconds = self.timeout if limit is None else max(0.05, min(self.timeout, limit))
        timeout = httpx.Timeout(seconds)
        deadline = time.monotonic() + seconds
        with self._http.stream("POST", url + path, json=body, headers=headers,
                               timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_raw():
                size += len(chunk)
                if size > self.max_answer:
                    raise FleetAnswerInvalid(f"{url}: answer larger than {self.max_answer} "
                                             "bytes")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the answer took longer than the deadline")
                chunks.append(chunk)
            status = response.status_code
        try:
            answer = json.loads(b"".join(chunks))
        except ValueError:
            raise FleetAnswerInvalid(f"{url}: HTTP {status}, answer is not JSON") from None
        if not isinstance(answer, dict):
            raise FleetAnswerInvalid(f"{url}: HTTP {status}, answer is not an object")
        if status == 401 or (status != 200 and "auth" in str(answer.get("error", ""))):
            self._token = None
            raise FleetUnavailable(f"{url}: authentication refused (HTTP {status})")
        if status != 200:
            _check_error(answer)
            raise FleetUnavailable(f"{url}: HTTP {status}")
        _check_error(answer)
        return answer

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first member that gives a valid answer."""
        problems: list[str] = []
        until: float | None = getattr(self._local, "deadline", None)
        for index in self._order():
            url = self.urls[index]
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                problems.append("the step's deadline passed")
                break
            try:
                answer = self._send(url, path, body, self._headers(url), left)
            except httpx.TimeoutException:
                problems.append(f"{url}: no answer within the deadline")
                self._skip(index)
                continue
            except httpx.HTTPError as exc:
                problems.append(f"{url}: {type(exc).__name__}")
                self._skip(index)
                continue
            except FleetUnavailable as exc:
                problems.append(str(exc))
                self._skip(index)
                continue
            with self._lock:
                self._good = index
            return answer
        raise FleetUnavailable("no etcd member answered: " + "; ".join(problems))

    def _skip(self, index: int) -> None:
        """A member failed: the next call starts at the one after it (a deadline may leave
        no time to reach it in this call)."""
        with self._lock:
            if self._good == index:
                self._good = (index + 1) % len(self.urls)

    # -- KV -----------------------------------------------------------------------------------
    def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """The key's value (or None) and the store revision the read saw."""
        kvs, revision = self.range(key)
        return (kvs[0] if kvs else None), revision

    def range(self, key: bytes, range_end: bytes | None = None, *,
              limit: int = 0) -> tuple[list[KeyValue], int]:
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if limit:
            body["limit"] = str(limit)
        answer = self.call("/v3/kv/range", body)
        kvs = [_kv(raw) for raw in _list(answer.get("kvs"), "kvs")]
        return kvs, _revision(answer)

    def txn(self, compare: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        answer = self.call("/v3/kv/txn", {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        })
        succeeded = answer.get("succeeded", False)
        if not isinstance(succeeded, bool):
            raise FleetAnswerInvalid("etcd answer: succeeded is not a boolean")
        ranges: list[list[KeyValue]] = []
        for raw in _list(answer.get("responses"), "responses"):
            item = _obj(raw, "response")
            if "response_range" in item:
                found = _obj(item["response_range"], "response_range")
                ranges.append([_kv(kv) for kv in _list(found.get("kvs"), "kvs")])
        return TxnResult(succeeded, _revision(answer), ranges)

    # -- leases ---------------------------------------------------------------------------
    def grant(self, ttl: int) -> int:
        answer = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        lease = _int(answer.get("ID"), "ID")
        if lease <= 0:
            raise FleetAnswerInvalid("etcd answer: lease grant gave no ID")
        return lease

    def keepalive(self, lease: int) -> int:
        """The lease's renewed TTL; 0 when it has expired (etcd leaves TTL out then)."""
        answer = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return _int(_obj(answer.get("result"), "result").get("TTL"), "TTL")

    def revoke(self, lease: int) -> None:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except FleetUnavailable as exc:
            if "not found" not in str(exc):
                raise

    # -- cluster ----------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str | None]]:
        """Per member: (url, problem or None). A member without a leader is a problem."""
        out: list[tuple[str, str | None]] = []
        for url in self.urls:
            try:
                answer = self._send(url, "/v3/maintenance/status", {}, self._headers(url))
            except (httpx.HTTPError, FleetUnavailable) as exc:
                out.append((url, type(exc).__name__ if isinstance(exc, httpx.HTTPError)
                            else str(exc)))
                continue
            errors = _list(answer.get("errors"), "errors")
            out.append((url, str(errors[0])[:100] if errors else None))
        return out

    # -- watch ----------------------------------------------------------------------------
    def watch(self, key: bytes, range_end: bytes, start_revision: int, *,
              idle: float, stop: threading.Event,
              ) -> Iterator[tuple[int, list[WatchEvent]]]:
        """Yield (header revision, events) from one watch stream until it ends.

        Raises ``FleetUnavailable`` when no member accepts the watch, ``WatchCompacted`` when
        ``start_revision`` is gone. The stream ends (and the caller reconnects from the last
        revision) when nothing arrives for ``idle`` seconds, so a silently dead connection is
        noticed and no wait is unbounded.
        """
        body = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                   "start_revision": str(start_revision),
                                   "progress_notify": True}}
        problems: list[str] = []
        for index in self._order():
            url = self.urls[index]
            try:
                self.requests += 1
                with self._http.stream(
                        "POST", url + "/v3/watch", json=body, headers=self._headers(url),
                        timeout=httpx.Timeout(self.timeout, read=idle)) as response:
                    if response.status_code != 200:
                        problems.append(f"{url}: HTTP {response.status_code}")
                        continue
                    yield from self._watch_lines(response, stop)
                    return
            except httpx.ReadTimeout:
                return  # idle: the caller reconnects
            except httpx.HTTPError as exc:
                problems.append(f"{url}: {type(exc).__name__}")
                continue
        raise FleetUnavailable("no etcd member accepted a watch: " + "; ".join(problems))

    def _watch_lines(self, response: httpx.Response, stop: threading.Event,
                     ) -> Iterator[tuple[int, list[WatchEvent]]]:
        buffer = b""
        for chunk in response.iter_raw():
            if stop.is_set():
                return
            buffer += chunk
            if len(buffer) > MAX_WATCH_LINE:
                raise FleetAnswerInvalid("etcd watch: message larger than the cap")
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield self._watch_message(line)

    def _watch_message(self, line: bytes) -> tuple[int, list[WatchEvent]]:
        try:
            message = json.loads(line)
        except ValueError:
            raise FleetAnswerInvalid("etcd watch: a message is not JSON") from None
        message = _obj(message, "watch message")
        _check_error(message)
        result = _obj(message.get("result"), "result")
        compacted = _int(result.get("compact_revision"), "compact_revision")
        if compacted:
            raise WatchCompacted(compacted)
        if result.get("canceled"):
            raise FleetUnavailable("etcd cancelled the watch")
        events = []
        for raw in _list(result.get("events"), "events"):
            event = _obj(raw, "event")
            kind = event.get("type", "PUT")
            if kind not in ("PUT", "DELETE"):
                raise FleetAnswerInvalid("etcd watch: unknown event type")
            events.append(WatchEvent(str(kind), _kv(event.get("kv"))))
        return _revision(result), events


class WatchCompacted(FleetUnavailable):
    """The watch's start revision was compacted away: re-read everything, then watch again."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        super().__init__(f"etcd compacted history up to revision {revision}")


def retry_until(deadline: float, step: Callable[[], bool], *, every: float = 0.1) -> bool:
    """Call ``step`` until it returns True or ``deadline`` (monotonic) passes."""
    while True:
        if step():
            return True
        if time.monotonic() + every > deadline:
            return False
        time.sleep(every)
