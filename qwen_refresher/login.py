"""A new Qwen login, by hand (``qwen-refresher login``) or assisted by the daemon.

Once Qwen has refused a refresh token, nothing but a new device-code login helps. OpenClaw's
own ``openclaw models auth login`` needs an interactive terminal on the gateway's machine and
writes the store without taking its lock; this module makes the same login short and safe:

* ``qwen-refresher login`` (its command line: ``commands/login.py``; this module is what it
  writes) prints the verification URL, the user code and a QR code, polls until
  the person approves on any device, and writes the new tokens into the store under OpenClaw's
  (or Qwen Code's) own lock, atomically, mode 0600, creating the file and its 0700 directories
  when missing, touching no other profile. Every profile that held the same (dead) refresh
  token in any managed store gets the new tokens too, so a whole family recovers at once.
* ``runtime.relogin.AssistedLogin`` lets the daemon do the same without any terminal, with
  ``write_login`` and ``run_on_rotate`` from here: it starts the flow when a profile needs a
  login, hands the URL to the notifier (the person taps "approve" on their phone), polls in
  the background and writes the tokens itself.

No token is ever printed, logged, put in a hook's environment or in an exception message.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import discovery
from .config import Settings
from .engine import lock_order_key
from .errors import (
    EX_INTERRUPTED,
    DeviceFlowError,
    LockTimeout,
    LoginWriteError,
    StoreError,
    StoreWriteError,
)
from .fileio import ensure_private_dir
from .hooks import HookResult, on_rotate_variables, resolve_on_rotate, run_hook
from .logsetup import REDACTOR
from .models import QWEN_PROVIDER, Credentials, ProfileKey, fingerprint
from .qwen import TokenGrant
from .stores import OpenClawStore, Store
from .stores.qwen_code import PROFILE_ID as QWEN_CODE_PROFILE

DEFAULT_PROFILE = f"{QWEN_PROVIDER}:default"

__all__ = [
    "DEFAULT_PROFILE",
    "EX_INTERRUPTED",
    "LoginWriteError",
    "linked_targets",
    "write_login",
]


# --------------------------------------------------------------------------- writing


def check_profile_slot(store: Store, document: dict[str, Any], profile: str) -> None:
    """Refuse to turn someone else's profile into a qwen-portal one.

    OpenClaw's ``render`` updates an existing entry in place; pointed at, say, an
    ``anthropic:default`` API-key profile it would graft our tokens onto it. A login may
    create ``qwen-portal:<name>`` or replace a qwen-portal OAuth profile, nothing else.
    """
    if not isinstance(store, OpenClawStore):
        if profile != QWEN_CODE_PROFILE:
            raise StoreWriteError(store.path, f"Qwen Code's file holds one profile, "
                                              f"{QWEN_CODE_PROFILE!r}, not {profile!r}")
        return
    profiles = document.get("profiles")
    entry = profiles.get(profile) if isinstance(profiles, dict) else None
    if isinstance(entry, dict):
        if entry.get("type") == "oauth" and entry.get("provider") == QWEN_PROVIDER:
            return
        kind = f"{entry.get('type')!s}/{entry.get('provider')!s}"
        raise StoreWriteError(store.path, f"profile {profile!r} is a {kind} profile, not a "
                                          f"{QWEN_PROVIDER} OAuth one; refusing to overwrite it")
    if not profile.startswith(QWEN_PROVIDER + ":"):
        raise StoreWriteError(store.path, f"profile {profile!r} does not exist and a new one "
                                          f"must be named {QWEN_PROVIDER}:<name>")


def write_login(
    targets: Sequence[tuple[Store, str]],
    creds: Credentials,
    *,
    lock_timeout: float,
) -> list[ProfileKey]:
    """Write ``creds`` into every (store, profile) of ``targets``; returns what was written.

    Each store is locked with its own program's lock, re-read under it (a missing file is
    created as ``{"version": 1, "profiles": {...}}`` in a 0700 directory), written atomically
    and unlocked, one store at a time, in sorted lock-path order.

    Failure policy, chosen on purpose: a store that cannot be locked, read or written does not
    stop the others. The new refresh token exists only in our memory, so it should land in as
    many places as possible; each store gets the same tokens, so there is no cross-store
    consistency to protect by writing all or nothing. After trying every store, the first
    failure is raised as ``LoginWriteError`` (a ``StoreError``) whose ``written`` lists what did
    land. Locks are taken one at a time, so no lock is held while waiting for another.
    """
    by_store: dict[Path, tuple[Store, list[str]]] = {}
    for store, profile in targets:
        entry = by_store.setdefault(store.path, (store, []))
        if profile not in entry[1]:
            entry[1].append(profile)
    written: list[ProfileKey] = []
    first_error: StoreError | None = None
    for store, profiles in sorted(by_store.values(), key=lambda item: lock_order_key(item[0])):
        try:
            _write_one(store, profiles, creds, lock_timeout)
        except StoreError as exc:
            first_error = first_error or exc
            continue
        written.extend(ProfileKey(store.path, p) for p in profiles)
    if first_error is not None:
        done = ", ".join(str(k) for k in written) or "nowhere"
        raise LoginWriteError(first_error.path, f"{first_error.problem} (the new login was "
                                                f"written to: {done})", written)
    return written


def _write_one(store: Store, profiles: list[str], creds: Credentials, lock_timeout: float) -> None:
    # The lock file lives in the store's directory, which a first login may have to create.
    ensure_private_dir(store.path.parent)
    try:
        lock = store.lock(timeout=lock_timeout)
        with lock.held():
            snapshot = store.read(allow_missing=True)
            for profile in profiles:
                check_profile_slot(store, snapshot.document, profile)
            store.write(snapshot, {p: creds for p in profiles})
    except LockTimeout as exc:
        raise StoreWriteError(store.path, f"could not take the lock {exc.lock_path} "
                                          f"(held by another process for {exc.waited:.0f}s)"
                              ) from None
    except OSError as exc:
        raise StoreWriteError(store.path, f"cannot lock: {exc.strerror}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a.absolute() == b.absolute()


def linked_targets(store: Store, profile: str, settings: Settings) -> list[tuple[Store, str]]:
    """The target and every managed profile that holds the same refresh token right now.

    Those profiles share one token family: its refresh token was refused for all of them at
    once, and a login for one is a login for all. They are found by fingerprint with a
    throwaway salt, so the comparison needs neither the daemon's state dir nor a token kept
    longer than this call. A target whose file or profile does not exist (a first login), or
    whose profile holds no usable token, links to nothing. A target file that exists but
    cannot be used raises its ``StoreError`` here, before anyone approves a login that could
    not be written.
    """
    targets: list[tuple[Store, str]] = [(store, profile)]
    snapshot = store.read(allow_missing=True)
    check_profile_slot(store, snapshot.document, profile)
    record = snapshot.records.get(profile)
    if record is None or record.creds is None:
        return targets
    salt = secrets.token_bytes(32)
    wanted = fingerprint(record.creds.refresh, salt)
    seen: set[tuple[Path, str]] = {(store.path, profile)}
    candidates: list[Store] = [store]
    for path, kind in discovery.store_paths(explicit=settings.stores, discover=settings.discover,
                                            qwen_code=settings.qwen_code):
        if not _same_file(path, store.path):
            candidates.append(discovery.open_store(path, kind))
    for candidate in candidates:
        try:
            snap = snapshot if candidate is store else candidate.read_settled()
        except StoreError:
            continue  # an unusable other store is the daemon's business, not this login's
        for other_profile, other in snap.records.items():
            key = (candidate.path, other_profile)
            if key in seen or other.creds is None:
                continue
            if fingerprint(other.creds.refresh, salt) == wanted:
                seen.add(key)
                targets.append((candidate, other_profile))
    return targets


def credentials_from(grant: TokenGrant, now_ms: int) -> Credentials:
    """Stored credentials from a login grant; a login without a refresh token is useless."""
    if not grant.refresh_token:
        raise DeviceFlowError("the server approved the login but sent no refresh token; "
                              "nothing was written")
    creds = grant.to_credentials(now_ms, "")
    REDACTOR.add(creds.access, creds.refresh)
    return creds


def run_on_rotate(settings: Settings, targets: Sequence[tuple[Store, str]],
                  written: list[ProfileKey], creds: Credentials) -> HookResult | None:
    """Tell the gateway (``openclaw secrets reload`` by default): it serves tokens from memory,
    so a login it is not told about would not be used until its next restart.

    ``targets`` are the login's (store, profile) pairs, ``written`` those that got the tokens.
    The variables are the daemon's (``hooks.on_rotate_variables``), with ``EVENT=login``.
    None: no hook to run.
    """
    command = resolve_on_rotate(settings.on_rotate)
    stores = {ProfileKey(store.path, profile): store for store, profile in targets}
    landed = [(stores[key], key.profile) for key in written if key in stores]
    if command is None or not landed:
        return None
    variables = on_rotate_variables("login", landed, creds)
    return run_hook(command, variables, timeout=settings.hook_timeout,
                    secrets=(creds.access, creds.refresh), runner=settings.hook_runner_argv)


#: ``qwen-refresher login``'s command line, now ``commands/login.py``, under its old names here.
_COMMAND_NAMES = frozenset({
    "_Countdown",
    "_confirm_new_openclaw_store",
    "_login",
    "_no_interrupt",
    "_say",
    "_show_code",
    "add_parser",
    "resolve_target",
    "run",
})


def __getattr__(name: str) -> Any:
    """``AssistedLogin`` moved to ``runtime.relogin`` (the daemon's login episodes); imported
    from here lazily, since that module builds on this one."""
    if name == "AssistedLogin":
        from .runtime.relogin import AssistedLogin

        return AssistedLogin
    if name in _COMMAND_NAMES:  # the command line moved to commands/login.py
        from .commands import login as command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
