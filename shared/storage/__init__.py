"""Storage building blocks: a SQL engine factory and a content-addressed blob store."""

from conveyor.shared.storage.blobs import BlobStore, BlobWriter, DigestMismatchError
from conveyor.shared.storage.database import (
    create_engine,
    read_transaction,
    write_transaction,
)

__all__ = [
    "BlobStore",
    "BlobWriter",
    "DigestMismatchError",
    "create_engine",
    "read_transaction",
    "write_transaction",
]
