"""Qwen's OAuth endpoints and protocol constants: their one home.

``config`` (the defaults a user may override), the client and the fake server in
``testing/fake_qwen/`` all read them from here. Stdlib only and import-free, so that the fake
server (which must run without httpx) and the settings can use them for nothing. Protocol facts
are in ``shared/reference/qwen-oauth.md``.
"""

from __future__ import annotations

TOKEN_URL = "https://chat.qwen.ai/api/v1/oauth2/token"
DEVICE_CODE_URL = "https://chat.qwen.ai/api/v1/oauth2/device/code"
#: Qwen Code's public client id (no secret): the one Qwen issues qwen-portal tokens to.
CLIENT_ID = "f0304373b74a44d2b584a3fb70ca9e56"
SCOPE = "openid profile email model.completion"
DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
#: OAuth error codes that mean the refresh token itself was refused.
REJECTION_ERRORS = frozenset(
    {"invalid_grant", "invalid_request", "invalid_token", "unauthorized_client"})
#: Device-code polling: the interval when the server names none, and the most we slow down to.
DEFAULT_POLL_INTERVAL = 2.0
MAX_POLL_INTERVAL = 10.0

# The names the client module has always exported.
DEFAULT_TOKEN_URL = TOKEN_URL
DEFAULT_DEVICE_CODE_URL = DEVICE_CODE_URL
QWEN_CLIENT_ID = CLIENT_ID
#: Whole-request ceiling (connect, send, headers, body), whatever ``http_timeout`` says: a
#: refresh runs under the store lock and OpenClaw breaks a lock older than 30 s.
MAX_REQUEST_SECONDS = 20.0
