"""The secret store interface every Conveyor service codes against.

A store holds three kinds of things, each behind a *name*:

- **KV secrets** (``read_secret("registry/database")``): small string maps such as
  passwords and API tokens.
- **Named keys** for encryption (``aes256-gcm96``) and for signing (``ed25519``,
  or ``ecdsa-p256`` / ``rsa-*`` in Vault). Keys are versioned: :meth:`rotate_key`
  adds a version, new work uses the latest one, and everything made with an older
  version still decrypts or verifies, because ciphertexts carry their version
  (``vault:v2:…`` / ``local:v2:…``) and signatures carry a ``key_id`` naming it.
- **Data keys** for envelope encryption of artifacts at rest: a fresh AES-256 key
  used once in process, kept only in its wrapped form (decrypt it with
  :meth:`SecretStore.unwrap_data_key`).

The public half of every signing key version is available as PEM
(:meth:`SecretStore.public_key_pem`, :meth:`SecretStore.public_keys_pem`), so a
signature can be checked offline, with nothing but ``cryptography`` and the PEM
named by its ``key_id``.

Every method blocks (file or network I/O): async code calls it through a worker
thread (``WorkerThreads.run`` or ``asyncio.to_thread``).

Nothing here ever puts a secret, token or key into an exception message, a log
line or a ``repr``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from conveyor.shared.errors import InvalidArgumentError, NotFoundError

DIGEST_BYTES = 32
"""Length of what :meth:`SecretStore.sign` signs: the raw bytes of a SHA-256 digest."""

KeyType = Literal["aes256-gcm96", "ed25519", "ecdsa-p256"]
"""Key types :meth:`SecretStore.ensure_key` creates (Vault Transit's names)."""

_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
_SECRET_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")


class SignatureAlgorithm(StrEnum):
    """Signature schemes; each value is the suffix of the proto enum
    ``conveyor.registry.v1.SignatureAlgorithm`` (``SIGNATURE_ALGORITHM_ED25519``)."""

    ED25519 = "ED25519"
    ECDSA_P256_SHA256 = "ECDSA_P256_SHA256"
    RSA_PSS_SHA256 = "RSA_PSS_SHA256"

    @property
    def proto_name(self) -> str:
        """The proto enum value's name (``SIGNATURE_ALGORITHM_ED25519``)."""
        return f"SIGNATURE_ALGORITHM_{self.value}"


class DecryptionFailedError(InvalidArgumentError):
    """A ciphertext did not decrypt: wrong key, wrong context, or altered bytes."""

    default_reason = "DECRYPTION_FAILED"


@dataclass(frozen=True)
class ArtifactSignatureValue:
    """A signature over a SHA-256 digest, as ``ArtifactSignature`` carries it.

    ``key_id`` names the exact key version: ``local/{fingerprint}`` (SHA-256 of the
    raw Ed25519 public key, hex) or ``vault-transit/{key_name}/{version}``.
    """

    algorithm: SignatureAlgorithm
    key_id: str
    signature: bytes


@dataclass(frozen=True)
class DataKey:
    """A fresh data key for envelope encryption.

    Use ``plaintext`` (32 bytes, AES-256) in memory only, store ``wrapped`` next to
    the data it protects. Unpacks as ``plaintext, wrapped = data_key``. The
    plaintext never appears in the ``repr``.
    """

    plaintext: bytes = field(repr=False)
    wrapped: bytes
    key_version: int

    def __iter__(self) -> Iterator[bytes]:
        return iter((self.plaintext, self.wrapped))


class SecretStore(ABC):
    """KV secrets, versioned encryption and signing keys, and envelope data keys."""

    backend: str = ""
    """Short backend name (``local``, ``vault``) for logs and error metadata."""

    # KV secrets ---------------------------------------------------------------

    @abstractmethod
    def read_secret(self, path: str) -> dict[str, str]:
        """The latest version of the KV secret at ``path`` (``registry/database``).

        Raises NotFoundError when there is none.
        """

    @abstractmethod
    def write_secret(self, path: str, data: Mapping[str, str]) -> None:
        """Store ``data`` as the new version of the KV secret at ``path``."""

    # Keys ---------------------------------------------------------------------

    @abstractmethod
    def ensure_key(self, key_name: str, key_type: KeyType) -> None:
        """Create the named key if it does not exist (encryption keys are created
        with per-context derivation in Vault). Raises FailedPreconditionError when
        a key of that name exists with another type."""

    @abstractmethod
    def rotate_key(self, key_name: str) -> int:
        """Add a new version of the key and return its number. Older versions
        still decrypt and verify what they made."""

    # Encryption ---------------------------------------------------------------

    @abstractmethod
    def encrypt(self, key_name: str, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt a small secret with the latest key version.

        ``context`` (non-empty) binds the ciphertext to its use, e.g. the resource
        name it belongs to: decryption with any other context fails. The result is
        ASCII (``vault:v1:…`` / ``local:v1:…``) and names the key version.
        """

    @abstractmethod
    def decrypt(self, key_name: str, ciphertext: bytes, context: bytes) -> bytes:
        """The plaintext of :meth:`encrypt`'s ciphertext; DecryptionFailedError if
        the key, the context or the bytes do not match."""

    @abstractmethod
    def generate_data_key(self, key_name: str, context: bytes) -> DataKey:
        """A fresh AES-256 data key, also returned wrapped by ``key_name``."""

    def unwrap_data_key(self, key_name: str, wrapped: bytes, context: bytes) -> bytes:
        """The plaintext of a wrapped data key from :meth:`generate_data_key`."""
        return self.decrypt(key_name, wrapped, context)

    # Signing ------------------------------------------------------------------

    @abstractmethod
    def sign(self, key_name: str, message: bytes) -> ArtifactSignatureValue:
        """Sign ``message``, the 32 raw bytes of a SHA-256 digest, with the latest
        version of a signing key."""

    @abstractmethod
    def verify(self, key_name: str, message: bytes, signature: ArtifactSignatureValue) -> bool:
        """Whether ``signature`` is a valid signature of ``message`` by some version
        of ``key_name`` (the version named in ``signature.key_id``). A signature
        by another key, an unknown version or altered bytes gives False."""

    # Public keys --------------------------------------------------------------

    @abstractmethod
    def public_keys_pem(self, key_name: str) -> dict[str, str]:
        """The public key of every version of the signing key ``key_name`` that
        :meth:`verify` accepts signatures from, oldest first: ``key_id`` (as
        :meth:`sign` puts it in a signature) → PEM SubjectPublicKeyInfo.

        Raises NotFoundError when there is no such key and FailedPreconditionError
        when it is not a signing key.
        """

    def public_key_pem(self, key_name: str, key_id: str) -> str:
        """The PEM (SubjectPublicKeyInfo) public key of the version of the signing
        key ``key_name`` that ``key_id`` names (``ArtifactSignatureValue.key_id``).

        With it, ``cryptography`` alone verifies what that version signed: Ed25519
        over the 32 digest bytes, ECDSA P-256 and RSA-PSS over them as a prehashed
        SHA-256 digest. Raises InvalidArgumentError when ``key_id`` is not one of
        this backend's ids for ``key_name``, NotFoundError when the key or that
        version does not exist (or no longer verifies), FailedPreconditionError
        when ``key_name`` is not a signing key.
        """
        check_key_name(key_name)
        self._check_key_id(key_name, key_id)
        pem = self.public_keys_pem(key_name).get(key_id)
        if pem is None:
            raise NotFoundError(
                f"signing key {key_name!r} has no version {key_id!r}",
                reason="KEY_VERSION_NOT_FOUND",
            )
        return pem

    @abstractmethod
    def _check_key_id(self, key_name: str, key_id: str) -> None:
        """Raise InvalidArgumentError (reason ``BAD_KEY_ID``) unless ``key_id`` has
        the form of this backend's ids for versions of ``key_name``."""


def check_key_name(key_name: str) -> str:
    """``key_name`` if it is a safe key name (letters, digits, ``_``, ``-``)."""
    if not _KEY_NAME.match(key_name):
        raise InvalidArgumentError(
            "a key name is 1-128 letters, digits, '_' or '-', starting with a letter or digit",
            reason="BAD_KEY_NAME",
        )
    return key_name


def check_secret_path(path: str) -> str:
    """``path`` if it is a safe KV path (``a/b-c/d.e``, no ``..`` segments)."""
    if not _SECRET_PATH.match(path) or any(part in {".", ".."} for part in path.split("/")):
        raise InvalidArgumentError(
            "a secret path is '/'-separated segments of letters, digits, '_', '-' or '.'",
            reason="BAD_SECRET_PATH",
        )
    return path


def check_digest(message: bytes) -> bytes:
    """``message`` if it is the size of a SHA-256 digest."""
    if len(message) != DIGEST_BYTES:
        raise InvalidArgumentError(
            f"the signed message is a raw SHA-256 digest ({DIGEST_BYTES} bytes), "
            f"got {len(message)} bytes",
            reason="BAD_DIGEST",
        )
    return message


def check_context(context: bytes) -> bytes:
    """``context`` if it is non-empty."""
    if not context:
        raise InvalidArgumentError(
            "an encryption context is required (e.g. the name of what the secret protects)",
            reason="MISSING_CONTEXT",
        )
    return context
