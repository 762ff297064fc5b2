"""Qwen Code's ``~/.qwen/oauth_creds.json``, locked with Qwen Code's UUID lock file.

Qwen Code treats the file as logged out unless ``access_token``, ``refresh_token``,
``token_type`` (strings) and ``expiry_date`` (number, ms) are all present, so every write keeps
all of them. The file holds one profile; we call it ``qwen-code``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..lockfile import QWEN_CODE, LockStyle
from ..models import Credentials, ProfileKey
from .base import (
    ProfileRecord,
    Store,
    StoreSnapshot,
    check_expires_ms,
    check_token,
    render_json,
)

PROFILE_ID = "qwen-code"
LOCK_NAME = "oauth_creds.lock"


class QwenCodeStore(Store):
    kind: ClassVar[str] = "qwen-code"
    lock_style: ClassVar[LockStyle] = QWEN_CODE

    def lock_path(self) -> Path:
        """Qwen Code locks ``oauth_creds.lock`` in its directory, not ``<file>.lock``."""
        return self.path.parent / LOCK_NAME

    def login_command(self, profile: str) -> str:
        return "qwen  (then /auth and choose Qwen OAuth)"

    def empty_document(self) -> dict[str, Any]:
        return {}

    def extract(self, document: dict[str, Any]) -> dict[str, ProfileRecord]:
        key = ProfileKey(self.path, PROFILE_ID)
        for name in ("access_token", "refresh_token"):
            problem = check_token(document.get(name), name)
            if problem is not None:
                return {PROFILE_ID: ProfileRecord(key, None, problem)}
        token_type = document.get("token_type")
        if not isinstance(token_type, str):
            what = "missing" if token_type is None else f"a {type(token_type).__name__}"
            return {PROFILE_ID: ProfileRecord(key, None, f"token_type is {what}, expected a "
                                                        "string")}
        expires, problem = check_expires_ms(document.get("expiry_date"), "expiry_date")
        if problem is not None or expires is None:
            return {PROFILE_ID: ProfileRecord(key, None, problem)}
        resource = document.get("resource_url")
        creds = Credentials(
            access=document["access_token"],
            refresh=document["refresh_token"].strip(),
            expires_ms=expires,
            resource_url=resource if isinstance(resource, str) else None,
            token_type=document["token_type"],
        )
        return {PROFILE_ID: ProfileRecord(key, creds)}

    def render(self, snapshot: StoreSnapshot, updates: Mapping[str, Credentials]) -> bytes:
        document = copy.deepcopy(snapshot.document)
        creds = updates.get(PROFILE_ID)
        if creds is not None:
            document["access_token"] = creds.access
            document["token_type"] = creds.token_type or document.get("token_type") or "Bearer"
            document["refresh_token"] = creds.refresh
            if creds.resource_url:
                document["resource_url"] = creds.resource_url
            elif not isinstance(document.get("resource_url"), str):
                document["resource_url"] = "portal.qwen.ai"
            document["expiry_date"] = creds.expires_ms
        return render_json(document)
