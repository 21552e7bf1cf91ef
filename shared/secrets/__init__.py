"""Secrets and keys for every Conveyor service: KV secrets, envelope encryption,
artifact signing, key rotation.

Open the configured store with :func:`open_secret_store`; code against
:class:`SecretStore`. :class:`LocalSecretStore` is the embedded default (key files,
0600), :class:`VaultSecretStore` the production one (HashiCorp Vault: KV v2 and
Transit); ``conveyor.shared.secrets.vault`` imports ``hvac`` only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conveyor.shared.secrets.base import (
    DIGEST_BYTES,
    ArtifactSignatureValue,
    DataKey,
    DecryptionFailedError,
    KeyType,
    SecretStore,
    SignatureAlgorithm,
)
from conveyor.shared.secrets.local import InsecureSecretFileError, LocalSecretStore
from conveyor.shared.secrets.settings import SecretStoreSettings, open_secret_store

if TYPE_CHECKING:
    from conveyor.shared.secrets.vault import VaultSecretStore


def __getattr__(name: str) -> Any:
    if name == "VaultSecretStore":
        from conveyor.shared.secrets.vault import VaultSecretStore

        return VaultSecretStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DIGEST_BYTES",
    "ArtifactSignatureValue",
    "DataKey",
    "DecryptionFailedError",
    "InsecureSecretFileError",
    "KeyType",
    "LocalSecretStore",
    "SecretStore",
    "SecretStoreSettings",
    "SignatureAlgorithm",
    "VaultSecretStore",
    "open_secret_store",
]
