"""Storage building blocks: a SQL engine factory and a content-addressed blob store
(optionally encrypted at rest with data keys from the secret store)."""

from conveyor.shared.storage.blobs import (
    BlobReader,
    BlobStore,
    BlobWriter,
    DigestMismatchError,
)
from conveyor.shared.storage.database import (
    create_engine,
    read_transaction,
    write_transaction,
)
from conveyor.shared.storage.encryption import BlobCorruptError, SecretStoreBlobKeys

__all__ = [
    "BlobCorruptError",
    "BlobReader",
    "BlobStore",
    "BlobWriter",
    "DigestMismatchError",
    "SecretStoreBlobKeys",
    "create_engine",
    "read_transaction",
    "write_transaction",
]
