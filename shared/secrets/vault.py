"""HashiCorp Vault as the secret store, through ``hvac``.

- **Auth**: a token, or AppRole (``role_id`` + ``secret_id``), kept alive by
  :class:`~conveyor.shared.secrets.vault_auth.VaultTokenKeeper` (renewal before
  expiry, re-login). A call refused with 403 is retried once after a fresh
  AppRole login.
- **KV v2** (``kv_mount``, default ``secret``) holds KV secrets.
- **Transit** (``transit_mount``, default ``transit``) holds the keys. Encryption keys
  are *derived* (``derived=true``), so the per-call context selects the key and a
  ciphertext only decrypts with the context it was made with; a non-derived key is
  refused rather than silently ignoring the context. Signatures are over a SHA-256
  digest: Ed25519 keys sign the 32 raw bytes, ECDSA and RSA keys sign them as
  ``prehashed`` with ``hash_algorithm=sha2-256`` (RSA with PSS). The public key
  of each version comes from reading the key (``GET {transit}/keys/{name}``):
  ``data.keys`` maps each version to its ``public_key``, base64 of the raw key for
  Ed25519 and PEM for ECDSA and RSA; the store hands out PEM for all of them.

Every hvac and requests exception is mapped to a :class:`ConveyorError` in one
place, :func:`_vault_errors`. Tokens and secret ids live only inside the hvac
client; no message, log line or ``repr`` shows them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from conveyor.shared.errors import (
    ConveyorError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
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
from conveyor.shared.secrets.vault_auth import VaultTokenKeeper

logger = logging.getLogger(__name__)

T = TypeVar("T")

KEY_ID_PREFIX = "vault-transit"
_VAULT_VALUE = re.compile(r"^vault:v(?P<version>[1-9][0-9]*):(?P<body>[A-Za-z0-9+/=]+)\Z")


@dataclass(frozen=True)
class _KeyInfo:
    key_type: str
    derived: bool


def parse_vault_signature(value: str) -> tuple[int, bytes]:
    """Vault's ``vault:v{n}:{base64}`` signature string → (n, raw signature bytes)."""
    match = _VAULT_VALUE.match(value)
    if match is None:
        raise InvalidArgumentError(
            "not a Vault signature (expected 'vault:v<n>:<base64>')", reason="BAD_SIGNATURE"
        )
    try:
        raw = base64.b64decode(match["body"], validate=True)
    except binascii.Error:
        raise InvalidArgumentError(
            "Vault signature is not base64", reason="BAD_SIGNATURE"
        ) from None
    return int(match["version"]), raw


def format_vault_signature(version: int, raw: bytes) -> str:
    """(n, raw signature bytes) → ``vault:v{n}:{base64}``."""
    return f"vault:v{version}:{base64.b64encode(raw).decode()}"


class VaultSecretStore(SecretStore):
    """KV v2 secrets and Transit keys in Vault (see the module docstring)."""

    backend = "vault"

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        approle_mount: str = "approle",
        kv_mount: str = "secret",
        transit_mount: str = "transit",
        namespace: str | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if role_id is None and token is None:
            raise InvalidArgumentError(
                "Vault needs a token or an AppRole role_id and secret_id", reason="NO_VAULT_AUTH"
            )
        if role_id is not None and secret_id is None:
            raise InvalidArgumentError("AppRole login needs a secret_id", reason="NO_VAULT_AUTH")
        self.addr = addr
        self.kv_mount = kv_mount
        self.transit_mount = transit_mount
        self.namespace = namespace
        # Nothing from the environment: hvac would read VAULT_TOKEN when token is None
        # and VAULT_CLIENT_CERT when cert is None, requests its proxy and CA variables.
        session = requests.Session()
        session.trust_env = False
        self._client = hvac.Client(  # type: ignore[no-untyped-call]  # hvac is untyped
            url=addr,
            token=token or "",
            cert=False,
            namespace=namespace,
            timeout=timeout,
            verify=verify,
            session=session,
        )
        self._token = VaultTokenKeeper(
            self._client,
            approle=(role_id, secret_id) if role_id is not None and secret_id is not None else None,
            approle_mount=approle_mount,
            clock=clock,
        )
        self._keys: dict[str, _KeyInfo] = {}

    def __repr__(self) -> str:
        return f"VaultSecretStore(addr={self.addr!r}, auth={self._token.method!r})"

    # KV secrets ---------------------------------------------------------------

    def read_secret(self, path: str) -> dict[str, str]:
        check_secret_path(path)
        response = self._call(
            "read secret",
            lambda: self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self.kv_mount, raise_on_deleted_version=True
            ),
            missing=f"no secret at {path!r}",
        )
        data = response["data"]["data"] or {}
        return {str(key): str(value) for key, value in data.items()}

    def write_secret(self, path: str, data: Mapping[str, str]) -> None:
        check_secret_path(path)
        self._call(
            "write secret",
            lambda: self._client.secrets.kv.v2.create_or_update_secret(
                path=path, secret=dict(data), mount_point=self.kv_mount
            ),
        )

    # Keys ---------------------------------------------------------------------

    def ensure_key(self, key_name: str, key_type: KeyType) -> None:
        check_key_name(key_name)
        derived = key_type == "aes256-gcm96"
        self._call(
            "create key",
            lambda: self._client.secrets.transit.create_key(
                name=key_name, key_type=key_type, derived=derived or None,
                mount_point=self.transit_mount,
            ),
        )  # fmt: skip
        self._keys.pop(key_name, None)
        info = self._key_info(key_name)
        if info.key_type != key_type:
            raise FailedPreconditionError(
                f"key {key_name!r} is a {info.key_type} key, not {key_type}",
                reason="WRONG_KEY_TYPE",
            )

    def rotate_key(self, key_name: str) -> int:
        check_key_name(key_name)
        response = self._call(
            "rotate key",
            lambda: self._client.secrets.transit.rotate_key(
                name=key_name, mount_point=self.transit_mount
            ),
            missing=f"no key named {key_name!r}",
        )
        # Vault 1.12+ answers with the key (200); older versions with 204 and no body.
        if isinstance(response, dict) and "latest_version" in (response.get("data") or {}):
            version = int(response["data"]["latest_version"])
        else:
            version = int(self._read_key(key_name)["latest_version"])
        logger.info("rotated Vault Transit key %s to version %d", key_name, version)
        return version

    # Encryption ---------------------------------------------------------------

    def encrypt(self, key_name: str, plaintext: bytes, context: bytes) -> bytes:
        self._require_derived(key_name, context)
        response = self._call(
            "encrypt",
            lambda: self._client.secrets.transit.encrypt_data(
                name=key_name, plaintext=_b64(plaintext), context=_b64(context),
                mount_point=self.transit_mount,
            ),
        )  # fmt: skip
        return str(response["data"]["ciphertext"]).encode("ascii")

    def decrypt(self, key_name: str, ciphertext: bytes, context: bytes) -> bytes:
        self._require_derived(key_name, context)
        try:
            text = ciphertext.decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionFailedError("not a Vault ciphertext") from None
        try:
            response = self._call(
                "decrypt",
                lambda: self._client.secrets.transit.decrypt_data(
                    name=key_name, ciphertext=text, context=_b64(context),
                    mount_point=self.transit_mount,
                ),
            )  # fmt: skip
        except InvalidArgumentError as error:  # Vault answers 400 for a bad tag or version
            raise DecryptionFailedError(
                f"ciphertext does not decrypt with key {key_name!r} and this context"
            ) from error
        return base64.b64decode(response["data"]["plaintext"])

    def generate_data_key(self, key_name: str, context: bytes) -> DataKey:
        # transit/datakey/plaintext: one call returns the key and its wrapped form
        # (datakey/wrapped would need a second call, a decrypt, to use the key).
        self._require_derived(key_name, context)
        response = self._call(
            "generate data key",
            lambda: self._client.secrets.transit.generate_data_key(
                name=key_name, key_type="plaintext", context=_b64(context),
                mount_point=self.transit_mount,
            ),
        )  # fmt: skip
        data = response["data"]
        return DataKey(
            plaintext=base64.b64decode(data["plaintext"]),
            wrapped=str(data["ciphertext"]).encode("ascii"),
            key_version=int(data["key_version"]),
        )

    # Signing ------------------------------------------------------------------

    def sign(self, key_name: str, message: bytes) -> ArtifactSignatureValue:
        check_digest(message)
        algorithm = _algorithm_of(key_name, self._key_info(key_name).key_type)
        response = self._call(
            "sign",
            lambda: self._client.secrets.transit.sign_data(
                name=key_name, hash_input=_b64(message), mount_point=self.transit_mount,
                **_signing_options(algorithm),
            ),
        )  # fmt: skip
        version, raw = parse_vault_signature(str(response["data"]["signature"]))
        return ArtifactSignatureValue(
            algorithm=algorithm,
            key_id=f"{KEY_ID_PREFIX}/{key_name}/{version}",
            signature=raw,
        )

    def verify(self, key_name: str, message: bytes, signature: ArtifactSignatureValue) -> bool:
        check_key_name(key_name)
        prefix, _, rest = signature.key_id.partition("/")
        signer, _, version = rest.rpartition("/")
        if prefix != KEY_ID_PREFIX or signer != key_name or not version.isdigit():
            return False
        try:
            response = self._call(
                "verify",
                lambda: self._client.secrets.transit.verify_signed_data(
                    name=key_name, hash_input=_b64(message),
                    signature=format_vault_signature(int(version), signature.signature),
                    mount_point=self.transit_mount, **_signing_options(signature.algorithm),
                ),
            )  # fmt: skip
        except InvalidArgumentError:
            # 400: a version Vault no longer has (or never had), or a mangled signature.
            return False
        return bool(response["data"]["valid"])

    # Public keys --------------------------------------------------------------

    def public_keys_pem(self, key_name: str) -> dict[str, str]:
        check_key_name(key_name)
        data = self._read_key(key_name)
        algorithm = _algorithm_of(key_name, str(data.get("type")))
        if data.get("derived"):
            raise FailedPreconditionError(
                f"Transit key {key_name!r} is derived: it has a public key per context, "
                "not one per version",
                reason="KEY_DERIVED",
            )
        # Versions below min_decryption_version no longer verify in Vault; leaving
        # them out keeps offline verification in step with verify().
        oldest = int(data.get("min_decryption_version") or 1)
        entries = {int(v): e for v, e in (data.get("keys") or {}).items() if str(v).isdigit()}
        keys: dict[str, str] = {}
        for version, entry in sorted(entries.items()):
            if version < oldest:
                continue
            public_key = entry.get("public_key") if isinstance(entry, dict) else None
            keys[f"{KEY_ID_PREFIX}/{key_name}/{version}"] = _public_key_pem(
                key_name, version, algorithm, public_key
            )
        return keys

    def _check_key_id(self, key_name: str, key_id: str) -> None:
        prefix, _, rest = key_id.partition("/")
        signer, _, version = rest.rpartition("/")
        if (
            prefix != KEY_ID_PREFIX
            or signer != key_name
            or not version.isascii()
            or not version.isdigit()
            or int(version) < 1
        ):
            raise InvalidArgumentError(
                f"not a key id of Transit key {key_name!r} (expected "
                f"'{KEY_ID_PREFIX}/{key_name}/<version>')",
                reason="BAD_KEY_ID",
                metadata={"backend": self.backend},
            )

    # Helpers ------------------------------------------------------------------

    def _require_derived(self, key_name: str, context: bytes) -> None:
        check_key_name(key_name)
        check_context(context)
        info = self._key_info(key_name)
        if not info.derived:
            raise FailedPreconditionError(
                f"Transit key {key_name!r} is not derived, so it would ignore the encryption "
                "context; create it with derived=true (ensure_key does)",
                reason="KEY_NOT_DERIVED",
            )

    def _key_info(self, key_name: str) -> _KeyInfo:
        """Type and derivation of a Transit key; these never change, so cached."""
        info = self._keys.get(key_name)
        if info is None:
            data = self._read_key(key_name)
            info = _KeyInfo(key_type=str(data["type"]), derived=bool(data.get("derived")))
            self._keys[key_name] = info
        return info

    def _read_key(self, key_name: str) -> dict[str, Any]:
        response = self._call(
            "read key",
            lambda: self._client.secrets.transit.read_key(
                name=key_name, mount_point=self.transit_mount
            ),
            missing=f"no Transit key named {key_name!r}",
        )
        data: dict[str, Any] = response["data"]
        return data

    def _call(self, operation: str, request: Callable[[], T], *, missing: str = "") -> T:
        """``request()`` with a live token, errors mapped; retried once after a
        fresh AppRole login when Vault answers 403."""
        with _vault_errors(operation, missing=missing):
            self._token.ensure()
            try:
                return request()
            except hvac.exceptions.Forbidden:
                logger.info("Vault refused the token during %s", operation)
                if not self._token.login_again():
                    raise
                return request()


def _algorithm_of(key_name: str, key_type: str) -> SignatureAlgorithm:
    if key_type == "ed25519":
        return SignatureAlgorithm.ED25519
    if key_type == "ecdsa-p256":
        return SignatureAlgorithm.ECDSA_P256_SHA256
    if key_type.startswith("rsa-"):
        return SignatureAlgorithm.RSA_PSS_SHA256
    raise FailedPreconditionError(
        f"Transit key {key_name!r} is a {key_type} key, which cannot sign artifacts",
        reason="WRONG_KEY_TYPE",
    )


_PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def _public_key_pem(
    key_name: str, version: int, algorithm: SignatureAlgorithm, public_key: object
) -> str:
    """PEM SubjectPublicKeyInfo of one version's ``public_key`` from a key read,
    re-encoded so every PEM handed out has the same form."""
    try:
        public = _load_public_key(algorithm, public_key)
    except (ValueError, TypeError):
        raise FailedPreconditionError(
            f"Vault returned no usable {algorithm.value} public key for version {version} "
            f"of Transit key {key_name!r}",
            reason="BAD_PUBLIC_KEY",
        ) from None
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def _load_public_key(algorithm: SignatureAlgorithm, public_key: object) -> _PublicKey:
    """Vault's ``public_key``: base64 of the 32 raw bytes for Ed25519, PEM for
    ECDSA and RSA; ValueError unless it is a key of ``algorithm``'s type."""
    if not isinstance(public_key, str) or not public_key:
        raise ValueError("no public key")
    if algorithm == SignatureAlgorithm.ED25519:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
    loaded = load_pem_public_key(public_key.encode("ascii"))
    if (
        algorithm == SignatureAlgorithm.ECDSA_P256_SHA256
        and isinstance(loaded, ec.EllipticCurvePublicKey)
        and isinstance(loaded.curve, ec.SECP256R1)
    ):
        return loaded
    if algorithm == SignatureAlgorithm.RSA_PSS_SHA256 and isinstance(loaded, rsa.RSAPublicKey):
        return loaded
    raise ValueError("the public key is not of the key's type")


def _signing_options(algorithm: SignatureAlgorithm) -> dict[str, Any]:
    """sign/verify parameters for a SHA-256 digest as input."""
    if algorithm == SignatureAlgorithm.ED25519:
        return {}  # Ed25519 signs the 32 bytes themselves
    options: dict[str, Any] = {"hash_algorithm": "sha2-256", "prehashed": True}
    if algorithm == SignatureAlgorithm.RSA_PSS_SHA256:
        options["signature_algorithm"] = "pss"
    return options


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_BY_VAULT_ERROR: tuple[tuple[type[Exception], type[ConveyorError], str], ...] = (
    (hvac.exceptions.Forbidden, PermissionDeniedError, "Vault denied permission"),
    (hvac.exceptions.Unauthorized, UnauthenticatedError, "Vault did not accept the credentials"),
    (hvac.exceptions.InvalidPath, NotFoundError, "Vault has nothing at that path"),
    (hvac.exceptions.InvalidRequest, InvalidArgumentError, "Vault rejected the request"),
    (hvac.exceptions.ParamValidationError, InvalidArgumentError, "invalid Vault request"),
    (hvac.exceptions.RateLimitExceeded, ResourceExhaustedError, "Vault rate limit exceeded"),
    (hvac.exceptions.VaultDown, UnavailableError, "Vault is sealed or down"),
    (hvac.exceptions.VaultError, UnavailableError, "Vault failed"),
    (requests.exceptions.RequestException, UnavailableError, "cannot reach Vault"),
)


@contextlib.contextmanager
def _vault_errors(operation: str, *, missing: str = "") -> Iterator[None]:
    """Map hvac and requests failures to the most specific ConveyorError.

    Vault's own error strings (``errors``) are kept: they name what failed, never
    a secret. Tokens travel in headers, which no exception here includes.
    """
    try:
        yield
    except ConveyorError:
        raise
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as error:
        target, summary = next((t, s) for c, t, s in _BY_VAULT_ERROR if isinstance(error, c))
        detail = ""
        if isinstance(error, hvac.exceptions.VaultError) and error.errors:
            detail = ": " + "; ".join(str(e) for e in error.errors)[:300]
        if target is NotFoundError and missing:
            summary = missing
        raise target(
            f"{operation}: {summary}{detail}",
            metadata={"backend": "vault", "operation": operation},
        ) from error
