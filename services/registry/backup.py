"""Backup and restore of a registry: a consistent logical snapshot and its blobs.

A backup is a directory that any registry database can be rebuilt from, SQLite
or PostgreSQL, whichever the source was::

    manifest.json                  format, creation time, schema revision, and the
                                   size and SHA-256 of every file below
    tables/<table>.jsonl           one JSON object per row (bytes as base64,
                                   timestamps as ISO 8601 UTC)
    blobs/sha256/<ab>/<digest>     every artifact and attachment a row refers to,
                                   as the registry stores it: ``<digest>.enc`` for
                                   an encrypted one (header and ciphertext, copied
                                   as they are; no key is in the backup)

:func:`backup_registry` reads every table inside one read transaction
(REPEATABLE READ on PostgreSQL, a WAL snapshot on SQLite), so it sees one
committed state while the registry keeps serving; it does not migrate the
database (the blob store's start-up sweep spares uploads of live processes).
Blobs are immutable and
never deleted while a registry serves, so they are copied after the snapshot
ends, hard-linked when the backup is on the same filesystem. Everything is
written into a hidden sibling directory that is renamed into place at the end:
a directory named like the destination is always a whole backup.

:func:`restore_registry` checks the whole backup (every digest recomputed,
every row parsed) before it touches the target, refuses a target database that
holds any row, stores the blobs first and then inserts every row in one
transaction, so a failed restore leaves no row (stray blobs are swept when the
registry next starts). The target registry must not be running.

Encrypted blobs (``RegistrySettings.encrypt_artifacts``) are backed up as they
are stored, ciphertext and wrapped data key, so a backup holds no key and no
plaintext. Taking a backup decrypts each one once to check it against its
digest; restoring needs **the same secret store** (the same local key directory,
``CONVEYOR_SECRETS_LOCAL_DIR``, or the same Vault and key), because only it
unwraps their data keys: restore unwraps every one of them before it writes
anything, and refuses (``BACKUP_KEYS_UNAVAILABLE``) when it cannot. Restored
blobs are written again through the target's blob store: fresh data keys, and
encrypted or not as the target's settings say.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, Integer, LargeBinary, String, Table, func, insert, select
from sqlalchemy.engine import Connection, Engine

from conveyor.services.registry import schema
from conveyor.services.registry.migrate import alembic_config
from conveyor.services.registry.server import artifact_keys, open_store
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.errors import (
    AlreadyExistsError,
    ConveyorError,
    FailedPreconditionError,
    NotFoundError,
)
from conveyor.shared.secrets import SecretStore
from conveyor.shared.storage import (
    BlobReader,
    BlobStore,
    create_engine,
    read_transaction,
    write_transaction,
)
from conveyor.shared.storage.blobs import ENCRYPTED_SUFFIX, SHA256_HEX
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.storage.encryption import (
    BlobCorruptError,
    BlobKeys,
    EncryptedBlobReader,
    plaintext_size,
)
from conveyor.shared.storage.files import fsync_directory

logger = logging.getLogger(__name__)

FORMAT = "conveyor-registry-backup"
FORMAT_VERSION = 2
"""Version 2 added encrypted blobs (``encrypted``, ``file_sha256``, ``file_size_bytes``);
version 1 backups, all plaintext, still restore."""
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

_BLOB_REFERENCES = ((schema.model_versions, "sha256"), (schema.attachments, "sha256"))
"""The columns that name a blob: a backup holds exactly the blobs they name."""

_COPY_BYTES = 1024 * 1024
_INSERT_BATCH = 500


class CorruptBackupError(FailedPreconditionError):
    """The backup is incomplete, altered or unreadable; nothing was restored."""

    default_reason = "BACKUP_CORRUPT"


@dataclass(frozen=True)
class TableFile:
    """One table's rows in the backup (``tables/<name>.jsonl``)."""

    name: str
    rows: int
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class BlobEntry:
    """One blob in the backup (``blobs/sha256/<ab>/<sha256>[.enc]``)."""

    sha256: str
    """The digest of the blob's content (its name)."""
    size_bytes: int
    """The content's size."""
    encrypted: bool = False
    """Stored encrypted: the file is ``<sha256>.enc`` and holds ciphertext."""
    file_sha256: str = ""
    """SHA-256 of the encrypted file (checked without any key); empty when plaintext."""
    file_size_bytes: int = 0
    """Size of the encrypted file; 0 when plaintext."""

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"sha256": self.sha256, "size_bytes": self.size_bytes}
        if self.encrypted:
            entry.update(
                encrypted=True, file_sha256=self.file_sha256, file_size_bytes=self.file_size_bytes
            )
        return entry

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BlobEntry:
        if not data.get("encrypted", False):
            return cls(str(data["sha256"]), int(data["size_bytes"]))
        return cls(
            str(data["sha256"]),
            int(data["size_bytes"]),
            encrypted=True,
            file_sha256=str(data["file_sha256"]),
            file_size_bytes=int(data["file_size_bytes"]),
        )


@dataclass(frozen=True)
class BackupManifest:
    """What a backup holds; ``manifest.json`` is its JSON form."""

    created_at: datetime
    """When the snapshot was taken (UTC)."""
    alembic_revision: str
    """The schema revision of the rows; a restore needs the same one."""
    source_dialect: str
    """``sqlite`` or ``postgresql``: where the rows came from (informative)."""
    tables: tuple[TableFile, ...]
    """Every table of the schema, parents before children."""
    blobs: tuple[BlobEntry, ...]
    """Every blob a row refers to, by digest."""

    @property
    def row_counts(self) -> dict[str, int]:
        return {table.name: table.rows for table in self.tables}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at.isoformat(),
            "alembic_revision": self.alembic_revision,
            "source_dialect": self.source_dialect,
            "tables": [
                {"name": t.name, "rows": t.rows, "sha256": t.sha256, "size_bytes": t.size_bytes}
                for t in self.tables
            ],
            "blobs": [blob.to_json() for blob in self.blobs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BackupManifest:
        """Parse a manifest; :class:`CorruptBackupError` when it is not one."""
        if data.get("format") != FORMAT or data.get("format_version") not in READABLE_VERSIONS:
            raise CorruptBackupError(
                f"not a {FORMAT} manifest of a version this release reads "
                f"({', '.join(map(str, READABLE_VERSIONS))})",
                reason="BACKUP_FORMAT_UNSUPPORTED",
                metadata={"format_version": str(data.get("format_version"))},
            )
        try:
            manifest = cls(
                created_at=datetime.fromisoformat(data["created_at"]),
                alembic_revision=str(data["alembic_revision"]),
                source_dialect=str(data["source_dialect"]),
                tables=tuple(
                    TableFile(
                        str(t["name"]), int(t["rows"]), str(t["sha256"]), int(t["size_bytes"])
                    )
                    for t in data["tables"]
                ),
                blobs=tuple(BlobEntry.from_json(b) for b in data["blobs"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptBackupError(f"malformed manifest: {error!r}") from error
        if bad := [
            b.sha256
            for b in manifest.blobs
            if not SHA256_HEX.match(b.sha256)
            or (b.encrypted and not SHA256_HEX.match(b.file_sha256))
        ]:
            raise CorruptBackupError(f"malformed blob digest in the manifest: {bad[0]!r}")
        return manifest


def backup_registry(
    settings: RegistrySettings, destination: Path, *, secret_store: SecretStore | None = None
) -> BackupManifest:
    """Write a backup of the registry that ``settings`` describe to ``destination``.

    Safe while the registry serves: the rows come from one read transaction and
    nothing is written to the registry. ``destination`` must not exist (or be an
    empty directory). Raises :class:`AlreadyExistsError` when it holds anything,
    :class:`FailedPreconditionError` when there is no registry database or its
    schema revision is not this code's, or when a referenced blob is missing or
    does not match its digest (DataLossError when an encrypted one fails to
    authenticate). ``secret_store`` (default: the settings') decrypts encrypted
    blobs to check them; they are copied encrypted.
    """
    destination = destination.absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise AlreadyExistsError(f"{destination} already exists", reason="BACKUP_EXISTS")
    url = _database_url(settings)
    if url is None:
        raise FailedPreconditionError(
            f"no registry database under {settings.service_data_dir}", reason="REGISTRY_NOT_FOUND"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    engine = create_engine(url)
    try:
        blobs = BlobStore(
            settings.service_data_dir / "blobs", keys=artifact_keys(settings, secret_store)
        )
        manifest = _write_backup(engine, blobs, staging)
        if destination.exists():
            destination.rmdir()
        os.rename(staging, destination)
        fsync_directory(destination.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        engine.dispose()
    logger.info(
        "registry backed up",
        extra={"destination": str(destination), "blobs": len(manifest.blobs)},
    )
    return manifest


def restore_registry(
    settings: RegistrySettings, source: Path, *, secret_store: SecretStore | None = None
) -> BackupManifest:
    """Rebuild the registry that ``settings`` describe from the backup at ``source``.

    Checks the backup before anything else (:class:`CorruptBackupError` when a
    digest, size, row count or row does not match, and nothing is written);
    refuses, with :class:`FailedPreconditionError`, a backup of another schema
    revision or a target database that already holds rows, or encrypted blobs
    whose data keys ``secret_store`` (default: the settings') cannot unwrap
    (``BACKUP_KEYS_UNAVAILABLE``: restore with the secret store of the registry
    that was backed up). Then migrates the target, stores the blobs (decrypted,
    authenticated and checked against their digests again, and written as the
    target's settings say) and inserts every row in one transaction. Run it
    while the target registry is stopped.
    """
    manifest = verify_backup(source)
    head = _head_revision()
    if manifest.alembic_revision != head:
        raise FailedPreconditionError(
            f"the backup has schema revision {manifest.alembic_revision}, this registry "
            f"{head}: restore with the Conveyor release that took it, then upgrade",
            reason="SCHEMA_REVISION_MISMATCH",
            metadata={"backup_revision": manifest.alembic_revision, "revision": head},
        )
    url = _database_url(settings)
    if url is not None:  # refuse before open_store creates or migrates anything
        engine = create_engine(url)
        try:
            with read_transaction(engine) as db:
                _refuse_rows(db)
        finally:
            engine.dispose()
    keys = artifact_keys(settings, secret_store)
    if any(blob.encrypted for blob in manifest.blobs):
        _check_keys(keys, source, manifest)
    store = open_store(settings, keys=keys)
    try:
        for blob in manifest.blobs:
            _store_blob(store.blobs, source, blob)
        with write_transaction(store.engine) as db:
            _refuse_rows(db)
            # Counters start seeded by the migrations; the backup's values replace them.
            db.execute(schema.counters.delete())
            for table in schema.metadata.sorted_tables:
                for batch in _batches(_read_rows(source, table)):
                    db.execute(insert(table), batch)
            _reset_sequences(db)
    finally:
        store.engine.dispose()
    logger.info("registry restored", extra={"source": str(source), "rows": manifest.row_counts})
    return manifest


def verify_backup(source: Path) -> BackupManifest:
    """Check a backup without changing anything: every table file and blob
    against its size and SHA-256, every row against the schema, every blob a
    row names present. Returns the manifest; raises :class:`CorruptBackupError`."""
    try:
        manifest = BackupManifest.from_json(json.loads((source / MANIFEST).read_bytes()))
    except (OSError, ValueError) as error:
        raise CorruptBackupError(f"cannot read {source / MANIFEST}: {error}") from error
    if [t.name for t in manifest.tables] != [t.name for t in schema.metadata.sorted_tables]:
        raise CorruptBackupError(
            "the backup's tables are not the registry's",
            metadata={"tables": ",".join(t.name for t in manifest.tables)},
        )
    named: set[str] = set()
    for entry in manifest.tables:
        table = schema.metadata.tables[entry.name]
        _check_file(_table_path(source, entry.name), entry.sha256, entry.size_bytes)
        rows = 0
        for row in _read_rows(source, table):
            rows += 1
            named.update(row[c] for t, c in _BLOB_REFERENCES if t is table)
        if rows != entry.rows:
            raise CorruptBackupError(
                f"{entry.name} holds {rows} rows, the manifest says {entry.rows}"
            )
    for blob in manifest.blobs:
        _check_blob_file(source, blob)
    if missing := named - {blob.sha256 for blob in manifest.blobs}:
        raise CorruptBackupError(
            f"{len(missing)} blobs named by rows are not in the backup",
            metadata={"sha256": sorted(missing)[0]},
        )
    return manifest


# -- taking a backup ----------------------------------------------------------


def _write_backup(engine: Engine, blobs: BlobStore, staging: Path) -> BackupManifest:
    created_at = datetime.now(UTC)
    (staging / "tables").mkdir()
    tables: list[TableFile] = []
    named: set[str] = set()
    head = _head_revision()
    with read_transaction(engine) as db:  # one snapshot (REPEATABLE READ on PostgreSQL)
        revision = MigrationContext.configure(db).get_current_revision()
        if revision is None or revision != head:
            raise FailedPreconditionError(
                f"the registry database is at schema revision {revision}, this code at "
                f"{head}: back it up with the release that serves it",
                reason="SCHEMA_REVISION_MISMATCH",
                metadata={"revision": str(revision)},
            )
        for table in schema.metadata.sorted_tables:
            tables.append(_write_table(db, table, _table_path(staging, table.name), named))
    fsync_directory(staging / "tables")
    copied = [_copy_blob(blobs, staging, digest) for digest in sorted(named)]
    if copied:
        for directory in {_blob_path(staging, b.sha256).parent for b in copied}:
            fsync_directory(directory)
        fsync_directory(staging / "blobs" / "sha256")
        fsync_directory(staging / "blobs")
    manifest = BackupManifest(
        created_at=created_at,
        alembic_revision=revision,
        source_dialect=engine.dialect.name,
        tables=tuple(tables),
        blobs=tuple(copied),
    )
    with (staging / MANIFEST).open("x") as file:
        json.dump(manifest.to_json(), file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    fsync_directory(staging)
    return manifest


def _write_table(db: Connection, table: Table, path: Path, named: set[str]) -> TableFile:
    digest, size, rows = hashlib.sha256(), 0, 0
    blob_columns = [c for t, c in _BLOB_REFERENCES if t is table]
    query = select(table).order_by(*table.primary_key.columns)
    with path.open("xb") as file:
        for row in db.execute(query).mappings():
            named.update(row[c] for c in blob_columns)
            line = (
                json.dumps(
                    {c.name: _encode(c.type, row[c.name]) for c in table.columns},
                    sort_keys=True,
                    separators=(",", ":"),
                ).encode()
                + b"\n"
            )
            file.write(line)
            digest.update(line)
            size, rows = size + len(line), rows + 1
        file.flush()
        os.fsync(file.fileno())
    return TableFile(table.name, rows, digest.hexdigest(), size)


def _copy_blob(blobs: BlobStore, staging: Path, sha256: str) -> BlobEntry:
    """Link (or copy) the stored file as it is, then check it: a plaintext blob
    against its digest, an encrypted one by decrypting it (every chunk
    authenticated, the plaintext hashed)."""
    for _ in range(3):  # the file may be replaced by its encrypted copy meanwhile
        try:
            live = blobs.stored(sha256)
        except NotFoundError as error:
            raise FailedPreconditionError(
                f"blob {sha256} is referenced but missing from {blobs.root}",
                reason="BLOB_MISSING",
                metadata={"sha256": sha256},
            ) from error
        target = _blob_path(staging, sha256, encrypted=live.encrypted)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _link_or_copy(live.path, target)
        except FileNotFoundError:
            continue
        break
    else:
        raise FailedPreconditionError(
            f"blob {sha256} kept moving in {blobs.root}; try again",
            reason="BLOB_MISSING",
            metadata={"sha256": sha256},
        )
    file_sha256, file_size = _digest_file(target)
    if not live.encrypted:
        actual, size = file_sha256, file_size
    else:
        with blobs.open_file(target, sha256, encrypted=True) as reader:
            actual, size = _digest_reader(reader)
    if actual != sha256:
        raise FailedPreconditionError(
            f"blob {sha256} in {blobs.root} is corrupt (its bytes hash to {actual})",
            reason="BLOB_CORRUPT",
            metadata={"sha256": sha256},
        )
    if not live.encrypted:
        return BlobEntry(sha256, size)
    return BlobEntry(
        sha256, size, encrypted=True, file_sha256=file_sha256, file_size_bytes=file_size
    )


def _link_or_copy(live: Path, target: Path) -> None:
    try:
        os.link(live, target)  # blobs are immutable: sharing the inode is safe
    except FileNotFoundError:
        raise
    except OSError:  # another filesystem, or links not allowed: copy
        with live.open("rb") as reader, target.open("xb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_BYTES)
            writer.flush()
            os.fsync(writer.fileno())


# -- restoring ----------------------------------------------------------------


def _refuse_rows(db: Connection) -> None:
    present = MigrationContext.configure(db).get_current_revision() is not None
    if not present:
        return  # a new database: not even the schema yet
    for table in schema.metadata.sorted_tables:
        if table is schema.counters:  # seeded by the migrations, not data
            continue
        if db.execute(select(func.count()).select_from(table)).scalar_one():
            raise FailedPreconditionError(
                f"the target registry already holds data ({table.name} is not empty); "
                "restore into a new data directory or database",
                reason="TARGET_NOT_EMPTY",
                metadata={"table": table.name},
            )


def _check_keys(keys: BlobKeys, source: Path, manifest: BackupManifest) -> None:
    """Unwrap the data key of every encrypted blob in the backup, before anything
    is written: a secret store other than the registry's is refused here."""
    for blob in manifest.blobs:
        if not blob.encrypted:
            continue
        path = _blob_path(source, blob.sha256, encrypted=True)
        try:
            EncryptedBlobReader(path.open("rb"), blob.sha256, keys).close()
        except (BlobCorruptError, FailedPreconditionError) as error:
            # The file matches the manifest (verify_backup): the key is what is wrong.
            raise FailedPreconditionError(
                f"the data key of blob {blob.sha256} does not unwrap with this secret store: "
                "restore with the secret store of the registry that was backed up (the same "
                "local key directory, CONVEYOR_SECRETS_LOCAL_DIR, or the same Vault)",
                reason="BACKUP_KEYS_UNAVAILABLE",
                metadata={"sha256": blob.sha256, "cause": error.reason},
            ) from error


def _store_blob(blobs: BlobStore, source: Path, entry: BlobEntry) -> None:
    if blobs.exists(entry.sha256):
        return
    path = _blob_path(source, entry.sha256, encrypted=entry.encrypted)
    with (
        blobs.open_file(
            path, entry.sha256, encrypted=entry.encrypted, expected_size=entry.size_bytes
        ) as reader,
        blobs.writer(sha256=entry.sha256) as writer,
    ):
        while chunk := reader.read(_COPY_BYTES):
            writer.write(chunk)
        writer.commit(expected_sha256=entry.sha256, expected_size=entry.size_bytes)


def _reset_sequences(db: Connection) -> None:
    # Rows came with their ids; PostgreSQL's serial sequences must move past
    # them. SQLite derives the next rowid from the largest one.
    if db.dialect.name != "postgresql":
        return
    for table in schema.metadata.sorted_tables:
        column = table.autoincrement_column
        if column is None:
            continue
        largest = func.max(column)
        db.execute(
            select(
                func.setval(
                    func.pg_get_serial_sequence(table.name, column.name),
                    func.coalesce(largest, 1),
                    largest.is_not(None),
                )
            )
        )


# -- rows, files and digests --------------------------------------------------


def _read_rows(source: Path, table: Table) -> Iterator[dict[str, Any]]:
    """The table's rows from its backup file, decoded and checked against the schema."""
    path = _table_path(source, table.name)
    columns = {column.name: column for column in table.columns}
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                encoded = json.loads(line)
                if not isinstance(encoded, dict) or encoded.keys() != columns.keys():
                    raise ValueError(f"a row must be an object with the columns {sorted(columns)}")
                yield {
                    name: _decode(columns[name].type, value, columns[name].nullable)
                    for name, value in encoded.items()
                }
            except (ValueError, TypeError) as error:
                raise CorruptBackupError(
                    f"{path.name} line {number}: {error}", metadata={"table": table.name}
                ) from error


def _encode(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(kind, LargeBinary):
        return base64.b64encode(value).decode("ascii")
    if isinstance(kind, DateTime):
        # SQLite hands back naive datetimes; everything stored is UTC.
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat()
    return value


def _decode(kind: Any, value: Any, nullable: bool | None) -> Any:
    if value is None:
        if not nullable:
            raise ValueError("null in a NOT NULL column")
        return None
    if isinstance(kind, LargeBinary) and isinstance(value, str):
        return base64.b64decode(value, validate=True)
    if isinstance(kind, DateTime) and isinstance(value, str):
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError(f"timestamp without a time zone: {value}")
        return moment.astimezone(UTC)
    if isinstance(kind, Integer) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(kind, String) and isinstance(value, str):
        return value
    raise ValueError(f"{value!r} does not fit a {kind} column")


def _batches(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == _INSERT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_file(
    path: Path, sha256: str, size_bytes: int, metadata: Mapping[str, str] | None = None
) -> None:
    try:
        actual, size = _digest_file(path)
    except OSError as error:
        raise CorruptBackupError(f"cannot read {path}: {error}") from error
    if (actual, size) != (sha256, size_bytes):
        raise CorruptBackupError(
            f"{path} does not match the manifest ({size} bytes hashing to {actual}, "
            f"expected {size_bytes} bytes hashing to {sha256})",
            metadata={
                "path": str(path),
                "sha256": actual,
                "expected_sha256": sha256,
                **(metadata or {}),
            },
        )


def _check_blob_file(source: Path, blob: BlobEntry) -> None:
    """A blob file against the manifest, without any key: a plaintext one by its
    digest; an encrypted one by the digest of the file, and its header (which
    names the blob) and layout (which gives the content's size)."""
    path = _blob_path(source, blob.sha256, encrypted=blob.encrypted)
    facts = {"blob": blob.sha256}
    if not blob.encrypted:
        _check_file(path, blob.sha256, blob.size_bytes, facts)
        return
    _check_file(path, blob.file_sha256, blob.file_size_bytes, facts)
    try:
        with path.open("rb") as file:
            size = plaintext_size(file, blob.sha256)
    except (OSError, ConveyorError) as error:
        raise CorruptBackupError(
            f"{path} is not an encrypted blob of {blob.sha256}", metadata=facts
        ) from error
    if size != blob.size_bytes:
        raise CorruptBackupError(
            f"{path} holds {size} bytes of content, the manifest says {blob.size_bytes}",
            metadata=facts,
        )


def _digest_reader(reader: BlobReader) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := reader.read(_COPY_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _digest_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(_COPY_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _table_path(root: Path, name: str) -> Path:
    return root / "tables" / f"{name}.jsonl"


def _blob_path(root: Path, sha256: str, *, encrypted: bool = False) -> Path:
    name = sha256 + ENCRYPTED_SUFFIX if encrypted else sha256
    return root / "blobs" / "sha256" / sha256[:2] / name


def _database_url(settings: RegistrySettings) -> str | None:
    """The registry's database URL (as :func:`open_store` builds it); None when
    it is a SQLite file that does not exist yet."""
    if settings.database_url:
        return settings.database_url
    path = settings.service_data_dir / "registry.db"
    return sqlite_url(path) if path.exists() else None


def _head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the registry has migrations"
    return head
