"""The registry's signatures over artifact digests.

Every artifact is signed when its version is registered, before the version's
row exists, so no client ever sees a version the registry has not vouched for.
The signed message is the raw 32-byte SHA-256 digest; the key is a named
Ed25519 key of the secret store (``RegistrySettings.artifact_signing_key``),
whose rotation leaves older signatures verifiable (their ``key_id`` names the
key version). Consumers check them with
:func:`conveyor.shared.artifacts.verify_artifact_signature`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from conveyor.shared.errors import ConveyorError, UnavailableError
from conveyor.shared.secrets import ArtifactSignatureValue, SecretStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignedDigest:
    """A signature over an artifact's digest, and when it was made."""

    value: ArtifactSignatureValue
    sign_time: datetime


class ArtifactSigner:
    """Signs digests with one signing key of a secret store. Blocking: the
    servicer calls it from its worker threads."""

    def __init__(self, store: SecretStore, key_name: str) -> None:
        self.store = store
        self.key_name = key_name
        self._key_ready = False

    def ensure_key(self) -> None:
        """Create the Ed25519 signing key if the store lacks it. Raises the
        store's error: FailedPreconditionError when a key of that name has
        another type, UnavailableError when the store cannot be reached."""
        self.store.ensure_key(self.key_name, "ed25519")
        self._key_ready = True

    def sign(self, sha256: str) -> SignedDigest:
        """Sign the digest (64 hex characters) with the key's latest version.

        Any failure of the secret store is an :class:`UnavailableError`: the
        upload is refused rather than registered unsigned, and can be retried
        once the store is back. The cause's reason goes to the log and the
        error's metadata; the store's errors name no secret, and nothing else
        of the cause is passed on.
        """
        try:
            if not self._key_ready:  # the store was down when the server started
                self.ensure_key()
            value = self.store.sign(self.key_name, bytes.fromhex(sha256))
        except (ConveyorError, OSError) as error:
            cause = error.reason if isinstance(error, ConveyorError) else type(error).__name__
            logger.warning(
                "cannot sign an artifact digest",
                extra={"backend": self.store.backend, "key_name": self.key_name, "cause": cause},
            )
            raise UnavailableError(
                "the secret store cannot sign the artifact now; the version was not "
                "created, retry the upload later",
                reason="ARTIFACT_SIGNING_UNAVAILABLE",
                metadata={"backend": self.store.backend, "cause": cause},
            ) from error
        return SignedDigest(value=value, sign_time=datetime.now(UTC))
