"""OpenClaw's ``auth-profiles.json``, locked with OpenClaw's own pid/createdAt lock file."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import StoreMalformed
from ..escape import shell_join
from ..lockfile import OPENCLAW, LockStyle
from ..models import QWEN_PROVIDER, Credentials, ProfileKey
from .base import (
    ProfileRecord,
    Store,
    StoreSnapshot,
    check_expires_ms,
    check_token,
    render_json,
)

LOGIN_COMMAND = "openclaw models auth login --provider qwen-portal"


class OpenClawStore(Store):
    """A profile is ours when ``type == "oauth"`` and ``provider == "qwen-portal"``."""

    kind: ClassVar[str] = "openclaw"
    lock_style: ClassVar[LockStyle] = OPENCLAW

    @property
    def agent(self) -> str | None:
        parts = self.path.parts
        if len(parts) >= 5 and parts[-2] == "agent" and parts[-4] == "agents":
            return parts[-3]
        return None

    def login_command(self, profile: str) -> str:
        """The agent id is a directory name: quoted (``escape.shell_join``), since people paste
        this into a shell and a directory may be called ``ops;curl x|sh;#``."""
        agent = self.agent
        if agent and agent != "main":
            return shell_join(["openclaw", "models", "--agent", agent, "auth", "login",
                               "--provider", "qwen-portal"])
        return LOGIN_COMMAND

    def empty_document(self) -> dict[str, Any]:
        return {"version": 1, "profiles": {}}

    def extract(self, document: dict[str, Any]) -> dict[str, ProfileRecord]:
        profiles = document.get("profiles", {})
        if not isinstance(profiles, dict):
            raise StoreMalformed(self.path, f'"profiles" is a {type(profiles).__name__}, '
                                            "expected an object")
        records: dict[str, ProfileRecord] = {}
        for profile_id, entry in profiles.items():
            if not isinstance(entry, dict):
                if profile_id.startswith(QWEN_PROVIDER + ":"):
                    records[profile_id] = self._bad(profile_id, f"is a {type(entry).__name__}, "
                                                               "expected an object")
                continue
            if entry.get("provider") != QWEN_PROVIDER or entry.get("type") != "oauth":
                continue
            records[profile_id] = self._record(profile_id, entry)
        return records

    def _bad(self, profile_id: str, problem: str) -> ProfileRecord:
        return ProfileRecord(ProfileKey(self.path, profile_id), None, problem)

    def _record(self, profile_id: str, entry: dict[str, Any]) -> ProfileRecord:
        access, refresh = entry.get("access"), entry.get("refresh")
        problem = check_token(refresh, "refresh")
        if problem is not None:
            return self._bad(profile_id, f"{problem}; a new login is needed")
        if access is not None:
            problem = check_token(access, "access") if access != "" else None
            if problem is not None:
                return self._bad(profile_id, problem)
        expires, problem = check_expires_ms(entry.get("expires"), "expires")
        if problem is not None or expires is None:
            return self._bad(profile_id, problem or "expires is missing")
        creds = Credentials(access=str(access or ""), refresh=str(refresh).strip(),
                            expires_ms=expires)
        return ProfileRecord(ProfileKey(self.path, profile_id), creds)

    def render(self, snapshot: StoreSnapshot, updates: Mapping[str, Credentials]) -> bytes:
        document = copy.deepcopy(snapshot.document)
        profiles = document.setdefault("profiles", {})
        for profile_id, creds in updates.items():
            entry = profiles.get(profile_id)
            if not isinstance(entry, dict):
                entry = {"type": "oauth", "provider": QWEN_PROVIDER}
                profiles[profile_id] = entry
            # Assigning to existing keys keeps their position, so the layout diff is 3 lines.
            entry["access"] = creds.access
            entry["refresh"] = creds.refresh
            entry["expires"] = creds.expires_ms
        return render_json(document)
