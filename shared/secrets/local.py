"""The embedded secret store: key files in a private directory.

Layout under ``directory`` (created 0700; every file 0600)::

    keys/<key_name>.json   a versioned key ring: type, latest version, raw key per version
    secrets.json           KV secrets: {"path": {"field": "value"}}
    .lock                  serialises writers across processes (flock)

Encryption is AES-256-GCM with the context as associated data; ciphertexts read
``local:v{version}:{base64(nonce || ciphertext || tag)}``. Signing is Ed25519;
``key_id`` is ``local/{fingerprint}``, the SHA-256 (hex) of the raw public key of
the version that signed. Rotation appends a version and keeps the old ones;
:meth:`~LocalSecretStore.public_keys_pem` gives the public key of each.

A key file or secrets file that group or others may read is refused: the store
raises :class:`InsecureSecretFileError` instead of using it. Files are replaced
atomically (temporary file, fsync, rename, directory fsync), and created with a
no-replace link, so two processes racing to create a key agree on one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from conveyor.shared.secrets.base import (
    ArtifactSignatureValue,
    DataKey,
    DecryptionFailedError,
    KeyType,
    SecretStore,
    SignatureAlgorithm,
    check_context,
    check_digest,
    check_key_name,
    check_secret_path,
)
from conveyor.shared.storage.files import fsync_directory

logger = logging.getLogger(__name__)

_PREFIX = "local"
_NONCE_BYTES = 12
_AES_KEY_BYTES = 32
_LOCAL_TYPES: tuple[KeyType, ...] = ("aes256-gcm96", "ed25519")
_KEY_ID = re.compile(rf"^{_PREFIX}/[0-9a-f]{{64}}\Z")


class InsecureSecretFileError(FailedPreconditionError):
    """A key or secrets file is readable or writable by group or others."""

    default_reason = "INSECURE_SECRET_FILE"


@dataclass
class _KeyRing:
    """One named key: its type and the raw material of every version."""

    key_type: KeyType
    versions: dict[int, bytes] = field(repr=False)
    created: dict[int, str]

    @property
    def latest(self) -> int:
        return max(self.versions)

    def to_json(self) -> bytes:
        document = {
            "type": self.key_type,
            "latest_version": self.latest,
            "versions": {
                str(number): {
                    "key": base64.b64encode(material).decode(),
                    "created": self.created[number],
                }
                for number, material in sorted(self.versions.items())
            },
        }
        return json.dumps(document, indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, source: Path) -> _KeyRing:
        try:
            document = json.loads(raw)
            versions = {int(n): base64.b64decode(v["key"]) for n, v in document["versions"].items()}
            created = {int(n): str(v.get("created", "")) for n, v in document["versions"].items()}
            key_type = document["type"]
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise FailedPreconditionError(
                f"key file {source} is not a valid key ring", reason="CORRUPT_KEY_FILE"
            ) from error
        if key_type not in _LOCAL_TYPES or not versions:
            raise FailedPreconditionError(
                f"key file {source} holds no usable key", reason="CORRUPT_KEY_FILE"
            )
        return cls(key_type=key_type, versions=versions, created=created)

    def add_version(self) -> int:
        number = self.latest + 1 if self.versions else 1
        self.versions[number] = _new_material(self.key_type)
        self.created[number] = datetime.now(UTC).isoformat()
        return number


class LocalSecretStore(SecretStore):
    """Keys and KV secrets in files under ``directory`` (see the module docstring)."""

    backend = "local"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys_dir = directory / "keys"
        self._secrets_file = directory / "secrets.json"
        self._lock_file = directory / ".lock"
        self._thread_lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], _KeyRing]] = {}
        for folder in (directory, self._keys_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalSecretStore(directory={str(self.directory)!r})"

    # KV secrets ---------------------------------------------------------------

    def read_secret(self, path: str) -> dict[str, str]:
        check_secret_path(path)
        secrets = self._read_secrets()
        if path not in secrets:
            raise NotFoundError(f"no secret at {path!r}", reason="SECRET_NOT_FOUND")
        return dict(secrets[path])

    def write_secret(self, path: str, data: Mapping[str, str]) -> None:
        check_secret_path(path)
        with self._writer():
            secrets = self._read_secrets()
            secrets[path] = {str(k): str(v) for k, v in data.items()}
            _write_private_file(self._secrets_file, json.dumps(secrets, indent=2).encode())

    # Keys ---------------------------------------------------------------------

    def ensure_key(self, key_name: str, key_type: KeyType) -> None:
        if key_type not in _LOCAL_TYPES:
            raise FailedPreconditionError(
                f"the local secret store has no {key_type} keys (only {', '.join(_LOCAL_TYPES)})",
                reason="UNSUPPORTED_KEY_TYPE",
            )
        self._ring_for_use(key_name, key_type)

    def rotate_key(self, key_name: str) -> int:
        check_key_name(key_name)
        with self._writer():
            ring = self._load(key_name)
            if ring is None:
                raise NotFoundError(f"no key named {key_name!r}", reason="KEY_NOT_FOUND")
            version = ring.add_version()
            _write_private_file(self._key_path(key_name), ring.to_json())
        logger.info("rotated key %s to version %d", key_name, version)
        return version

    # Encryption ---------------------------------------------------------------

    def encrypt(self, key_name: str, plaintext: bytes, context: bytes) -> bytes:
        check_context(context)
        ring = self._ring_for_use(key_name, "aes256-gcm96")
        version = ring.latest
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(ring.versions[version]).encrypt(nonce, plaintext, context)
        return f"{_PREFIX}:v{version}:".encode() + base64.b64encode(nonce + sealed)

    def decrypt(self, key_name: str, ciphertext: bytes, context: bytes) -> bytes:
        check_context(context)
        version, blob = _parse_ciphertext(ciphertext)
        ring = self._existing_ring(key_name, "aes256-gcm96")
        if ring is not None and version not in ring.versions:  # rotated by another process?
            ring = self._existing_ring(key_name, "aes256-gcm96", refresh=True)
        material = ring.versions.get(version) if ring else None
        if material is None or len(blob) <= _NONCE_BYTES:
            raise DecryptionFailedError(f"ciphertext does not match key {key_name!r}")
        try:
            return AESGCM(material).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], context)
        except InvalidTag:
            raise DecryptionFailedError(
                f"ciphertext does not decrypt with key {key_name!r} and this context"
            ) from None

    def generate_data_key(self, key_name: str, context: bytes) -> DataKey:
        plaintext = AESGCM.generate_key(bit_length=256)
        wrapped = self.encrypt(key_name, plaintext, context)
        version, _ = _parse_ciphertext(wrapped)
        return DataKey(plaintext=plaintext, wrapped=wrapped, key_version=version)

    # Signing ------------------------------------------------------------------

    def sign(self, key_name: str, message: bytes) -> ArtifactSignatureValue:
        check_digest(message)
        ring = self._ring_for_use(key_name, "ed25519")
        private = Ed25519PrivateKey.from_private_bytes(ring.versions[ring.latest])
        return ArtifactSignatureValue(
            algorithm=SignatureAlgorithm.ED25519,
            key_id=f"{_PREFIX}/{_fingerprint(private.public_key())}",
            signature=private.sign(message),
        )

    def verify(self, key_name: str, message: bytes, signature: ArtifactSignatureValue) -> bool:
        prefix, _, fingerprint = signature.key_id.partition("/")
        if prefix != _PREFIX or signature.algorithm != SignatureAlgorithm.ED25519:
            return False
        public = self._public_key(key_name, fingerprint)
        if public is None:
            return False
        try:
            public.verify(signature.signature, message)
        except InvalidSignature:
            return False
        return True

    # Public keys --------------------------------------------------------------

    def public_keys_pem(self, key_name: str) -> dict[str, str]:
        # Re-read: another process sharing the directory may have rotated the key.
        ring = self._existing_ring(key_name, "ed25519", refresh=True)
        if ring is None:
            raise NotFoundError(f"no key named {key_name!r}", reason="KEY_NOT_FOUND")
        keys: dict[str, str] = {}
        for number in sorted(ring.versions):
            public = Ed25519PrivateKey.from_private_bytes(ring.versions[number]).public_key()
            pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            keys[f"{_PREFIX}/{_fingerprint(public)}"] = pem.decode("ascii")
        return keys

    def _check_key_id(self, key_name: str, key_id: str) -> None:
        # A local key id names a public key, not the key it belongs to: an id of
        # another local key has the right form and is simply not found.
        if not _KEY_ID.match(key_id):
            raise InvalidArgumentError(
                f"not a local secret store key id (expected '{_PREFIX}/<SHA-256 hex of the "
                "public key>')",
                reason="BAD_KEY_ID",
                metadata={"backend": self.backend},
            )

    # Helpers ------------------------------------------------------------------

    def _public_key(self, key_name: str, fingerprint: str) -> Ed25519PublicKey | None:
        """The public key of the version of ``key_name`` with this fingerprint; the
        ring is re-read once, as another process may have rotated it."""
        for attempt in range(2):
            ring = self._existing_ring(key_name, "ed25519", refresh=attempt > 0)
            if ring is None:
                return None
            for material in ring.versions.values():
                public = Ed25519PrivateKey.from_private_bytes(material).public_key()
                if _fingerprint(public) == fingerprint:
                    return public
        return None

    def _ring_for_use(self, key_name: str, key_type: KeyType) -> _KeyRing:
        """The key ring of ``key_name``, created with ``key_type`` if missing."""
        ring = self._existing_ring(key_name, key_type)
        if ring is not None:
            return ring
        with self._writer():
            ring = self._load(key_name, force=True)
            if ring is None:
                fresh = _KeyRing(key_type=key_type, versions={}, created={})
                fresh.add_version()
                _write_private_file(self._key_path(key_name), fresh.to_json(), replace=False)
                ring = self._load(key_name, force=True)  # the winner of a create race
                logger.info("created %s key %s", key_type, key_name)
        if ring is None:  # pragma: no cover - the file was just written
            raise NotFoundError(f"no key named {key_name!r}", reason="KEY_NOT_FOUND")
        return _checked_type(key_name, ring, key_type)

    def _existing_ring(
        self, key_name: str, key_type: KeyType, *, refresh: bool = False
    ) -> _KeyRing | None:
        """The key ring of ``key_name`` if it exists; FailedPreconditionError if it
        is not a ``key_type`` key."""
        check_key_name(key_name)
        ring = self._load(key_name, force=refresh)
        return None if ring is None else _checked_type(key_name, ring, key_type)

    def _load(self, key_name: str, *, force: bool = False) -> _KeyRing | None:
        path = self._key_path(key_name)
        try:
            raw, identity = _read_private_file(path)
        except FileNotFoundError:
            return None
        cached = self._cache.get(key_name)
        if cached is not None and cached[0] == identity and not force:
            return cached[1]
        ring = _KeyRing.from_json(raw, source=path)
        self._cache[key_name] = (identity, ring)
        return ring

    def _read_secrets(self) -> dict[str, dict[str, str]]:
        try:
            raw, _ = _read_private_file(self._secrets_file)
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(raw)
        except ValueError as error:
            raise FailedPreconditionError(
                f"{self._secrets_file} is not valid JSON", reason="CORRUPT_SECRETS_FILE"
            ) from error
        if not isinstance(document, dict):
            raise FailedPreconditionError(
                f"{self._secrets_file} must hold a JSON object", reason="CORRUPT_SECRETS_FILE"
            )
        return {str(path): dict(fields) for path, fields in document.items()}

    def _key_path(self, key_name: str) -> Path:
        return self._keys_dir / f"{key_name}.json"

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """Exclusive across threads and processes sharing ``directory``."""
        with self._thread_lock:
            descriptor = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)  # closing releases the lock


def _checked_type(key_name: str, ring: _KeyRing, key_type: KeyType) -> _KeyRing:
    if ring.key_type != key_type:
        raise FailedPreconditionError(
            f"key {key_name!r} is a {ring.key_type} key, not {key_type}",
            reason="WRONG_KEY_TYPE",
        )
    return ring


def _new_material(key_type: KeyType) -> bytes:
    if key_type == "ed25519":
        return Ed25519PrivateKey.generate().private_bytes_raw()
    return AESGCM.generate_key(bit_length=_AES_KEY_BYTES * 8)


def _fingerprint(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def _parse_ciphertext(ciphertext: bytes) -> tuple[int, bytes]:
    """``local:v{n}:{base64}`` → (n, raw bytes)."""
    try:
        prefix, version, body = ciphertext.decode("ascii").split(":", 2)
        if prefix != _PREFIX or not version.startswith("v"):
            raise ValueError(prefix)
        return int(version[1:]), base64.b64decode(body, validate=True)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise DecryptionFailedError(
            "not a local secret store ciphertext (expected 'local:v<n>:<base64>')"
        ) from None


def _read_private_file(path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """The bytes of ``path`` and its (device, inode, mtime) identity, refusing a
    file that group or others can access."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
            raise InsecureSecretFileError(
                f"refusing to use {path}: mode {stat.S_IMODE(info.st_mode):04o} lets group or "
                f"others access it; run `chmod 600 {path}` (and check who read it)",
                metadata={"path": str(path)},
            )
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            return handle.read(), (info.st_dev, info.st_ino, info.st_mtime_ns)
    finally:
        os.close(descriptor)


def _write_private_file(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` (mode 0600) atomically. With ``replace=False`` an
    existing file is kept (the caller re-reads it)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)  # atomic create-if-absent
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
