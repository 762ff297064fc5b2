"""HTTP plumbing: the threaded server (tracks connections so ``stop`` can cut them, as a crash
would) and the request handler that routes each path to the fake and applies faults.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .config import (
    _DELAY_DEFAULT,
    _MAX_BODY,
    _TIMEOUT_DEFAULT_DELAY,
    AUTHORIZE_PATH,
    CHAT_PATHS,
    CONTROL_PREFIX,
    DEVICE_CODE_PATH,
    DEVICE_GRANT_TYPE,
    TOKEN_PATH,
)
from .records import (
    RequestRecord,
    _json_reply,
    _oauth_error,
    _Reply,
)

if TYPE_CHECKING:
    from .fake import FakeQwen

log = logging.getLogger("qwen_refresher.testing.fake_qwen")


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeQwen) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError) or self.fake._stopping.is_set():
            return  # clients hanging up on a slow or faulty answer is the point of this server
        log.exception("fake qwen: error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real service and httpx use it
    server_version = "FakeQwen/1.0"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection must not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    @property
    def fake(self) -> FakeQwen:
        server = self.server
        assert isinstance(server, _Server)
        return server.fake

    def setup(self) -> None:
        super().setup()
        assert isinstance(self.server, _Server)
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            assert isinstance(self.server, _Server)
            self.server.track(self.connection, alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake qwen: %s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---- dispatch

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            if body is None:
                return
            url = urlsplit(self.path)  # also handles absolute-form targets; Host is ignored
            path = url.path.rstrip("/") or "/"
            if path.startswith(CONTROL_PREFIX):
                self._control(method, path.removeprefix(CONTROL_PREFIX), body)
            elif path == TOKEN_PATH:
                self._token(method, body)
            elif path == DEVICE_CODE_PATH:
                self._protocol(method, body, "device_code", "device_code",
                               self.fake._device_authorize)
            elif path in CHAT_PATHS:
                self._chat(method, body)
            elif path == AUTHORIZE_PATH:
                self._authorize(method, url.query, body)
            else:
                self._send(_json_reply(404, {"error": "not_found"}, "not_found"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("fake qwen: bug while handling %s %s", method, self.path)
            self._send(_json_reply(500, {"error": "fake_internal_error"}, "bug"))

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._send(_json_reply(411, {"error": "length_required"}, "chunked"), close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._send(_json_reply(400, {"error": "bad_content_length"}, "bad_length"),
                       close=True)
            return None
        return self.rfile.read(length) if length else b""

    def _form(self, body: bytes) -> dict[str, str] | None:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return None
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return None
        return {key: values[0] for key, values in parsed.items()}

    def _base_record(self, endpoint: str, grant_type: str | None,
                     refresh_token: str | None) -> dict[str, Any]:
        return {
            "generation": self.fake._generation,
            "endpoint": endpoint, "grant_type": grant_type, "refresh_token": refresh_token,
            "user_agent": self.headers.get("User-Agent"), "accept": self.headers.get("Accept"),
            "content_type": self.headers.get("Content-Type"),
        }

    def _token(self, method: str, body: bytes) -> None:
        form = self._form(body) if method == "POST" else None
        if form is None:
            reply = (_oauth_error(400, "invalid_request",
                                  "Content-Type must be application/x-www-form-urlencoded",
                                  "not_form")
                     if method == "POST" else
                     _json_reply(405, {"error": "method_not_allowed"}, "bad_method"))
            self._finish(reply, self._base_record("token", None, None))
            return
        grant = form.get("grant_type")
        if grant == "refresh_token":
            self._protocol(method, body, "token", "refresh", self.fake._refresh_grant, form,
                           grant, form.get("refresh_token"))
        elif grant == DEVICE_GRANT_TYPE:
            self._protocol(method, body, "token", "device_token", self.fake._device_grant, form,
                           grant)
        else:
            reply = _oauth_error(400, "unsupported_grant_type", None, "unsupported_grant")
            self._finish(reply, self._base_record("token", grant, None))

    def _protocol(self, method: str, body: bytes, endpoint: str, target: str,
                  produce: Callable[[dict[str, str]], _Reply],
                  form: dict[str, str] | None = None, grant_type: str | None = None,
                  refresh_token: str | None = None) -> None:
        record = self._base_record(endpoint, grant_type, refresh_token)
        if form is None:
            form = self._form(body) if method == "POST" else None
            if form is None:
                self._finish(_oauth_error(400, "invalid_request",
                                          "expected a form-encoded POST", "not_form"), record)
                return
        self._with_faults(target, lambda: produce(form), record)

    def _with_faults(self, target: str, produce: Callable[[], _Reply],
                     record: dict[str, Any]) -> None:
        fake = self.fake
        fault = fake._next_fault(target)
        if fault is not None:
            record["fault"] = fault.kind
            if fault.kind == "delay":
                fake._sleep(_DELAY_DEFAULT if fault.delay is None else fault.delay)
            elif fault.kind == "timeout":
                fake._sleep(_TIMEOUT_DEFAULT_DELAY if fault.delay is None else fault.delay)
                self._finish(None, record, outcome="fault:timeout")
                return
            elif fault.kind != "lost":
                reply = fake._fault_reply(fault)
                self._finish(reply, record, outcome=f"fault:{fault.kind}")
                return
        reply = produce()
        if fault is not None and fault.kind == "lost":
            self._finish(None, record, outcome=reply.outcome)  # processed, answer never sent
            return
        if fake._stopping.is_set():
            self._finish(None, record, outcome=reply.outcome)
            return
        self._finish(reply, record)

    def _finish(self, reply: _Reply | None, record: dict[str, Any],
                outcome: str | None = None) -> None:
        now = time.time(), time.monotonic()
        fields_ = dict(record)
        generation = fields_.pop("generation")
        self.fake._record(RequestRecord(
            at=now[0], monotonic=now[1],
            outcome=outcome or (reply.outcome if reply is not None else "dropped"),
            status=reply.status if reply is not None else None, **fields_), generation)
        if reply is None:
            self.close_connection = True  # the socket is shut after this handler returns
            return
        self._send(reply)

    def _send(self, reply: _Reply, *, close: bool = False) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply.body)

    def _chat(self, method: str, body: bytes) -> None:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        access = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        record = self._base_record("chat", None, None)
        record["access_token"] = access
        if method != "POST":
            self._finish(_json_reply(405, {"error": "method_not_allowed"}, "bad_method"), record)
            return
        self._with_faults("chat", lambda: self.fake._chat(access, body), record)

    def _authorize(self, method: str, query: str, body: bytes) -> None:
        """A one-button stand-in for Qwen's login page, for people running the demo by hand."""
        params = {k: v[0] for k, v in parse_qs(query).items()}
        message = ""
        if method == "POST":
            form = self._form(body) or {}
            params["user_code"] = form.get("user_code", "")
            try:
                if form.get("action") == "deny":
                    self.fake.deny(params["user_code"])
                    message = "Denied. You can close this page."
                else:
                    self.fake.approve(params["user_code"])
                    message = "Approved. You can close this page."
            except (KeyError, ValueError) as exc:
                message = str(exc.args[0])
        code = html.escape(params.get("user_code", ""))
        page = (
            "<!DOCTYPE html><html><head><title>Fake Qwen login</title></head><body>"
            f"<h1>Fake Qwen login</h1><p>{html.escape(message)}</p>"
            f'<form method="post" action="{AUTHORIZE_PATH}">'
            f'<label>User code <input name="user_code" value="{code}"></label> '
            '<button name="action" value="approve">Approve</button> '
            '<button name="action" value="deny">Deny</button></form></body></html>'
        )
        self._send(_Reply(200, page.encode(), "ok", content_type="text/html; charset=utf-8"))

    def _control(self, method: str, name: str, body: bytes) -> None:
        fake = self.fake
        if name == "state":
            self._send(_json_reply(200, fake.state(), "ok"))
            return
        if method != "POST":
            self._send(_json_reply(405, {"error": "use POST"}, "bad_method"))
            return
        try:
            args = json.loads(body) if body.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            self._send(_json_reply(400, {"error": "body must be a JSON object"}, "bad_body"))
            return
        try:
            result = fake._control_call(name, args)
        except KeyError as exc:
            self._send(_json_reply(404, {"error": str(exc.args[0])}, "not_found"))
        except (ValueError, TypeError) as exc:
            self._send(_json_reply(400, {"error": str(exc)}, "bad_request"))
        else:
            self._send(_json_reply(200, result, "ok"))


