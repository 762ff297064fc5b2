"""The fleet secret: keyed family ids and authenticated encryption of what etcd holds.

One secret file, the same on every host, yields two independent keys (HKDF-SHA256, each with
its own ``info`` that includes the namespace, so two fleets sharing one etcd with one secret
still never share an id or a ciphertext):

- the *id key*: HMAC-SHA256 of a refresh token names the family across hosts. Without the
  key, an etcd reader cannot confirm a guessed token, and the id reveals nothing about it.
- the *encryption key*: AES-256-GCM over the family record, with the etcd key name as
  associated data, so a record copied under another family's key (or an old one replayed
  under the index) fails authentication instead of being adopted.

An etcd backup or a curious etcd admin therefore holds ciphertext, HMACs and host names, and
nothing that spends a token.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import FleetRecordUnreadable, FleetSecretError

#: Bytes of randomness in a new secret file.
SECRET_BYTES = 32
#: Shortest secret we accept: anything less is not a key.
MIN_SECRET_BYTES = 32
#: Largest secret file we read.
MAX_SECRET_FILE = 4096
#: First bytes of every sealed value: the format version, so a later format can coexist.
SEALED_PREFIX = b"QRF1"
NONCE_BYTES = 12
#: Largest plaintext we seal or accept back (a token record is well under 8 KiB).
MAX_PLAINTEXT = 64 * 1024
SECRET_HEADER = "qwen-refresher-fleet-secret-v1"


def new_secret_text() -> str:
    """The content of a new secret file: a header line and 32 random bytes, base64."""
    raw = secrets.token_bytes(SECRET_BYTES)
    return f"{SECRET_HEADER}\n{base64.b64encode(raw).decode()}\n"


def write_secret_file(path: Path, *, force: bool = False) -> None:
    """Create ``path`` (0600) with a new secret; never overwrite one unless ``force``.

    Overwriting the secret of a running fleet would make every host compute other family ids:
    that is a new fleet, so it takes ``--force``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    if force:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FleetSecretError(
            f"{path} exists already; it is the fleet's key on every host "
            "(pass --force to replace it, which starts a new fleet)") from None
    except OSError as exc:
        raise FleetSecretError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, new_secret_text().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret_file(path: Path) -> bytes:
    """The secret's bytes. Refused: missing, not a regular file, readable by group or others
    (the key is as sensitive as the tokens it protects), too large, or too short."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError as exc:
        raise FleetSecretError(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FleetSecretError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise FleetSecretError(
                f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others "
                "read it; chmod 600 it")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise FleetSecretError(f"{path}: larger than {MAX_SECRET_FILE} bytes")
    lines = [ln.strip() for ln in data.decode("ascii", "replace").splitlines() if ln.strip()]
    if lines and lines[0] == SECRET_HEADER:
        lines = lines[1:]
    try:
        raw = base64.b64decode("".join(lines), validate=True)
    except ValueError:
        raise FleetSecretError(f"{path}: not a secret written by "
                               "'qwen-refresher fleet init' (bad base64)") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise FleetSecretError(f"{path}: holds {len(raw)} bytes of key; "
                               f"at least {MIN_SECRET_BYTES} are needed")
    return raw


def _derive(secret: bytes, namespace: str, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"qwen-refresher fleet v1 {purpose} {namespace}".encode()).derive(secret)


class FleetKeys:
    """The two keys derived from the fleet secret. Holds no token; ``repr`` shows no key."""

    def __init__(self, secret: bytes, namespace: str) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise FleetSecretError("the fleet secret is shorter than 32 bytes")
        self._id_key = _derive(secret, namespace, "family-id")
        self._aead = AESGCM(_derive(secret, namespace, "record-encryption"))
        #: A short public name of the key, for status and logs: hosts with different secret
        #: files show different names, which explains "every host started its own family".
        self.key_id = hashlib.sha256(self._id_key).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"FleetKeys(key_id={self.key_id})"

    @classmethod
    def from_file(cls, path: Path, namespace: str) -> FleetKeys:
        return cls(read_secret_file(path), namespace)

    def token_id(self, refresh_token: str) -> str:
        """The keyed name of one refresh token: 32 hex chars (128 bits of HMAC-SHA256)."""
        return hmac.new(self._id_key, refresh_token.encode("utf-8"),
                        hashlib.sha256).hexdigest()[:32]

    def seal(self, key_name: bytes, plaintext: bytes) -> bytes:
        """AES-GCM with a random nonce, bound to ``key_name`` (the etcd key) as AAD."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError("record too large to seal")
        nonce = secrets.token_bytes(NONCE_BYTES)
        return SEALED_PREFIX + nonce + self._aead.encrypt(nonce, plaintext, key_name)

    def open(self, key_name: bytes, sealed: bytes) -> bytes:
        """The plaintext, or ``FleetRecordUnreadable`` (wrong key, other etcd key, altered)."""
        head = len(SEALED_PREFIX)
        if (not sealed.startswith(SEALED_PREFIX) or len(sealed) < head + NONCE_BYTES + 16
                or len(sealed) > MAX_PLAINTEXT + head + NONCE_BYTES + 16):
            raise FleetRecordUnreadable("a fleet record has an unknown format")
        nonce = sealed[head:head + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[head + NONCE_BYTES:], key_name)
        except InvalidTag:
            raise FleetRecordUnreadable(
                "a fleet record failed authentication (another fleet secret, or altered)"
            ) from None
