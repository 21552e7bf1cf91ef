"""A content-addressed blob store on a local filesystem, optionally encrypted at rest.

Blobs are keyed by the SHA-256 of their bytes (lowercase hex) and stored once,
however often they are written. A write goes to a temporary file in the same
filesystem, is fsynced, then renamed into place and the directory fsynced: a
reader sees a whole blob or none, even when the writer is killed mid-write.
Leftover temporary files of a killed writer are removed when the store opens.

With ``encrypt=True`` every new blob is sealed with its own data key
(:mod:`conveyor.shared.storage.encryption`) and stored as
``sha256/<ab>/<digest>.enc``; plaintext blobs are ``sha256/<ab>/<digest>``. The
name tells a reader which it has (a plaintext blob may begin with any bytes, so
no header could), both kinds are read alike, and turning encryption on needs no
migration. The header holding the wrapped key is inside the blob file, so one
rename publishes the blob and its key together. Names stay the *plaintext*
digest: deduplication and the digests callers sign are the same either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, cast

from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from conveyor.shared.storage import encryption
from conveyor.shared.storage.encryption import (
    BlobCorruptError,
    BlobKeys,
    ChunkSealer,
    EncryptedBlobReader,
    EncryptionHeader,
)
from conveyor.shared.storage.files import fsync_directory, process_alive

SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
"""A SHA-256 digest as the store names blobs: 64 lowercase hex characters."""
DEFAULT_CHUNK_BYTES = 1024 * 1024
ENCRYPTED_SUFFIX = ".enc"
"""Suffix of an encrypted blob's file name (``<digest>.enc``)."""

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ENCRYPTED_SUFFIX",
    "SHA256_HEX",
    "BlobCorruptError",
    "BlobInfo",
    "BlobReader",
    "BlobStore",
    "BlobWriter",
    "DigestMismatchError",
    "PlainBlobReader",
    "StoredBlob",
]


class DigestMismatchError(InvalidArgumentError):
    """The bytes written do not hash to the digest (or size) the writer declared."""

    default_reason = "DIGEST_MISMATCH"


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its SHA-256 (hex) and size in bytes."""

    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class StoredBlob:
    """The file that holds a blob, and whether it is encrypted."""

    sha256: str
    path: Path
    encrypted: bool


class _Source(Protocol):
    """What reads one kind of blob file (plaintext or encrypted)."""

    sha256: str
    size_bytes: int
    encrypted: bool

    def seek(self, offset: int) -> None:
        """Continue from plaintext byte ``offset`` (0 to the size, inclusive)."""
        ...

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of plaintext; empty at the end."""
        ...

    def close(self) -> None: ...


class BlobStore:
    """Content-addressed blobs under ``root`` (``root/sha256/ab/abcdef…[.enc]``).

    ``keys`` unwraps the data keys of encrypted blobs (and makes new ones);
    ``encrypt`` says whether new blobs are encrypted, in chunks of
    ``chunk_bytes``. A store without ``keys`` reads plaintext blobs only.
    """

    def __init__(
        self,
        root: Path,
        *,
        keys: BlobKeys | None = None,
        encrypt: bool = False,
        chunk_bytes: int = encryption.DEFAULT_CHUNK_BYTES,
    ) -> None:
        if encrypt and keys is None:
            raise ValueError("an encrypting blob store needs keys")
        if not 1 <= chunk_bytes <= encryption.MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {encryption.MAX_CHUNK_BYTES}]")
        self.root = root
        self.keys = keys
        self.encrypt = encrypt
        self.chunk_bytes = chunk_bytes
        self._blobs = root / "sha256"
        self._tmp = root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self.sweep_abandoned_writes()

    def writer(self, *, sha256: str | None = None) -> BlobWriter:
        """Start writing a blob; commit it with :meth:`BlobWriter.commit`.

        ``sha256`` declares the digest the bytes must have (checked at commit).
        An encrypting store needs it before the first byte: it is the data key's
        context. Getting the data key may block on the secret store (raises
        UnavailableError, before any file exists, when it cannot answer).
        """
        if sha256 is not None:
            self._path_for(sha256)  # a malformed digest is refused here
        # The writer's process id in the name tells a later sweep whether its
        # owner still lives (another replica or a draining process may share the store).
        temporary = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}.partial"
        if not self.encrypt:
            return BlobWriter(self, temporary, sha256=sha256)
        if sha256 is None:
            raise InvalidArgumentError(
                "an encrypting blob store needs the content's sha256 before the first byte",
                reason="SHA256_REQUIRED",
            )
        assert self.keys is not None  # checked in __init__
        data_key = self.keys.new_data_key(sha256)
        header = EncryptionHeader(
            sha256=sha256,
            chunk_bytes=self.chunk_bytes,
            key_name=self.keys.key_name,
            key_version=data_key.key_version,
            wrapped_key=data_key.wrapped,
        )
        raw_header = header.encode()
        sealer = ChunkSealer(data_key.plaintext, header, raw_header)
        return BlobWriter(self, temporary, sha256=sha256, sealer=sealer, preamble=raw_header)

    def sweep_abandoned_writes(self) -> int:
        """Remove temporary files whose writing process is gone; returns how many."""
        removed = 0
        for leftover in self._tmp.iterdir():
            owner = leftover.name.split("-", 1)[0]
            if owner.isdigit() and process_alive(int(owner)):
                continue
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def put(self, data: bytes) -> BlobInfo:
        """Store ``data`` in one go."""
        with self.writer(sha256=hashlib.sha256(data).hexdigest()) as writer:
            writer.write(data)
            return writer.commit()

    def stored(self, sha256: str) -> StoredBlob:
        """The file that holds the blob; raises NotFoundError when there is none."""
        for path, encrypted in self._candidates(sha256):
            if path.exists():
                return StoredBlob(sha256, path, encrypted)
        raise NotFoundError(f"blob {sha256} not found", reason="BLOB_NOT_FOUND")

    def path(self, sha256: str) -> Path:
        """The file that holds the blob (``<digest>`` or ``<digest>.enc``); raises
        NotFoundError when it is absent."""
        return self.stored(sha256).path

    def exists(self, sha256: str) -> bool:
        return any(path.exists() for path, _ in self._candidates(sha256)[:2])

    def size(self, sha256: str) -> int:
        """The blob's plaintext size (no key needed)."""
        with self.open(sha256, unwrap=False) as reader:
            return reader.size_bytes

    def read(self, sha256: str) -> bytes:
        """The whole blob's plaintext (for small blobs: attachments)."""
        with self.open(sha256) as reader:
            return b"".join(iter(lambda: reader.read(self.chunk_bytes), b""))

    def open(
        self, sha256: str, *, expected_size: int | None = None, unwrap: bool = True
    ) -> BlobReader:
        """A reader of the blob's plaintext. An encrypted blob's layout is checked
        (and ``expected_size``, when given) and its data key unwrapped here: this
        may block on the secret store. ``unwrap=False`` only reads the size."""
        for path, encrypted in self._candidates(sha256):
            try:
                file = path.open("rb")
            except FileNotFoundError:  # not there, or replaced by its encrypted copy
                continue
            return self._reader(file, sha256, encrypted, expected_size, unwrap=unwrap)
        raise NotFoundError(f"blob {sha256} not found", reason="BLOB_NOT_FOUND")

    def open_file(
        self, path: Path, sha256: str, *, encrypted: bool, expected_size: int | None = None
    ) -> BlobReader:
        """A reader of a blob file outside the store (a backup's copy), decrypted
        with this store's keys."""
        return self._reader(path.open("rb"), sha256, encrypted, expected_size, unwrap=True)

    def iter_chunks(
        self, sha256: str, *, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The blob's plaintext from ``offset`` on, in chunks (for resumable downloads)."""
        with self.open(sha256) as reader:
            reader.seek(offset)
            while chunk := reader.read(chunk_bytes):
                yield chunk

    def digests(self, *, older_than: float = 0.0) -> Iterator[str]:
        """Every stored blob's digest; ``older_than`` seconds skips recent writes."""
        now = time.time()
        seen: set[str] = set()
        for path in self._blobs.glob("*/*"):
            name = path.name.removesuffix(ENCRYPTED_SUFFIX)
            if not SHA256_HEX.match(name) or name in seen:
                continue
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:  # deleted, or replaced by its encrypted copy
                continue
            if age >= older_than:
                seen.add(name)
                yield name

    def delete(self, sha256: str) -> None:
        """Remove a blob, in either form (callers ensure nothing references it)."""
        for path, _ in self._candidates(sha256)[:2]:
            path.unlink(missing_ok=True)

    def _candidates(self, sha256: str) -> tuple[tuple[Path, bool], ...]:
        """Where the blob may be, in the order readers look: encrypted first, then
        plaintext, then encrypted again (a write with encryption on may have
        replaced the plaintext copy between the two looks)."""
        plain = self._path_for(sha256)
        sealed = plain.with_name(plain.name + ENCRYPTED_SUFFIX)
        return ((sealed, True), (plain, False), (sealed, True))

    def _reader(
        self,
        file: BinaryIO,
        sha256: str,
        encrypted: bool,
        expected_size: int | None,
        *,
        unwrap: bool,
    ) -> BlobReader:
        if not encrypted:
            return BlobReader(PlainBlobReader(file, sha256))
        if not unwrap:
            return BlobReader(_SizeOnly(file, sha256))
        if self.keys is None:
            file.close()
            raise FailedPreconditionError(
                f"blob {sha256} is encrypted and this blob store has no secret store to decrypt it",
                reason="BLOB_KEYS_MISSING",
                metadata={"sha256": sha256},
            )
        return BlobReader(EncryptedBlobReader(file, sha256, self.keys, expected_size=expected_size))

    def _path_for(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise InvalidArgumentError(
                f"not a lowercase hex SHA-256: {sha256!r}", reason="BAD_DIGEST"
            )
        return self._blobs / sha256[:2] / sha256

    def _install(self, temporary: Path, sha256: str, *, encrypted: bool) -> None:
        sealed, plain, _ = (path for path, _ in self._candidates(sha256))
        if sealed.exists() or (not encrypted and plain.exists()):
            temporary.unlink()  # identical content is stored once
            return
        final = sealed if encrypted else plain
        final.parent.mkdir(exist_ok=True)
        os.replace(temporary, final)
        fsync_directory(final.parent)
        if encrypted and plain.exists():
            # Stored before encryption was turned on: the encrypted copy replaces
            # it (readers look for the encrypted file first and last).
            plain.unlink(missing_ok=True)
            fsync_directory(final.parent)


class PlainBlobReader:
    """Reads an unencrypted blob file. Owns ``file`` and closes it."""

    encrypted = False

    def __init__(self, file: BinaryIO, sha256: str) -> None:
        self._file = file
        self.sha256 = sha256
        self.size_bytes = os.fstat(file.fileno()).st_size

    def seek(self, offset: int) -> None:
        if not 0 <= offset <= self.size_bytes:
            raise InvalidArgumentError(
                f"offset {offset} is outside the blob's {self.size_bytes} bytes",
                reason="BAD_OFFSET",
            )
        self._file.seek(offset)

    def read(self, max_bytes: int) -> bytes:
        return self._file.read(max_bytes)

    def close(self) -> None:
        self._file.close()


class _SizeOnly:
    """An encrypted blob's size, from its header and file size."""

    encrypted = True

    def __init__(self, file: BinaryIO, sha256: str) -> None:
        with file:
            self.sha256 = sha256
            self.size_bytes = encryption.plaintext_size(file, sha256)

    def seek(self, offset: int) -> None:
        raise FailedPreconditionError("this reader only knows the size", reason="NOT_READABLE")

    def read(self, max_bytes: int) -> bytes:
        raise FailedPreconditionError("this reader only knows the size", reason="NOT_READABLE")

    def close(self) -> None:
        return None


class BlobReader:
    """A blob's plaintext from any offset, encrypted or not. Blocking (decrypts
    in the calling thread); a context manager that closes the file."""

    def __init__(self, inner: _Source) -> None:
        self._inner = inner
        self.sha256 = inner.sha256
        self.size_bytes = inner.size_bytes
        self.encrypted = inner.encrypted

    def seek(self, offset: int) -> None:
        self._inner.seek(offset)

    def read(self, max_bytes: int) -> bytes:
        return self._inner.read(max_bytes)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class BlobWriter:
    """Streams bytes into a temporary file, hashing (and, in an encrypting store,
    sealing) as it goes.

    Use as a context manager: leaving the block without :meth:`commit` (an error,
    a cancelled upload) discards everything written.
    """

    def __init__(
        self,
        store: BlobStore,
        temporary: Path,
        *,
        sha256: str | None = None,
        sealer: ChunkSealer | None = None,
        preamble: bytes = b"",
    ) -> None:
        self._store = store
        self._temporary = temporary
        self._declared = sha256
        self._sealer = sealer
        self._file = temporary.open("xb", buffering=0)
        self._hash = hashlib.sha256()
        self.size_bytes = 0
        self._file_bytes = 0
        self._flushed_bytes = 0
        if preamble:
            self._append(preamble)

    @property
    def encrypted(self) -> bool:
        return self._sealer is not None

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size_bytes += len(chunk)
        if self._sealer is None:
            self._append(chunk)
            return
        for sealed in self._sealer.update(chunk):
            self._append(sealed)

    @property
    def sha256(self) -> str:
        """SHA-256 of what has been written so far."""
        return self._hash.hexdigest()

    def commit(
        self, *, expected_sha256: str | None = None, expected_size: int | None = None
    ) -> BlobInfo:
        """Make the blob visible, after checking the declared digest and size."""
        try:
            self.check(expected_sha256=expected_sha256, expected_size=expected_size)
        except DigestMismatchError:
            self.abort()
            raise
        digest = self.sha256
        if self._sealer is not None:
            self._append(self._sealer.finish())
        os.fsync(self._file.fileno())
        self._file.close()
        self._store._install(self._temporary, digest, encrypted=self.encrypted)
        return BlobInfo(sha256=digest, size_bytes=self.size_bytes)

    def check(
        self, *, expected_sha256: str | None = None, expected_size: int | None = None
    ) -> None:
        """Raise DigestMismatchError unless what was written so far has the
        declared size and digest (the one given here and the one the writer was
        started with). Lets a caller act on verified bytes (sign their digest)
        before :meth:`commit` makes them visible."""
        if expected_size is not None and expected_size != self.size_bytes:
            raise DigestMismatchError(
                f"declared {expected_size} bytes but received {self.size_bytes}",
                metadata={"declared_size": str(expected_size), "size": str(self.size_bytes)},
            )
        for declared in (expected_sha256, self._declared):
            if declared is not None and declared != self.sha256:
                raise DigestMismatchError(
                    "content does not match the declared sha256",
                    metadata={"declared_sha256": declared, "sha256": self.sha256},
                )

    def abort(self) -> None:
        """Discard what was written."""
        if not self._file.closed:
            self._file.close()
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._file.closed or self._temporary.exists():
            self.abort()

    def _append(self, data: bytes) -> None:
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += self._file.write(view[written:]) or 0
        self._file_bytes += len(data)
        if self._file_bytes - self._flushed_bytes >= WRITEBACK_BYTES:
            # Start writing back now, so the fsync at commit has little left to do.
            _start_writeback(self._file.fileno(), self._flushed_bytes, self._file_bytes)
            self._flushed_bytes = self._file_bytes


WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _load_sync_file_range()


def _start_writeback(descriptor: int, start: int, end: int) -> None:
    """Ask Linux to start writing ``[start, end)`` to disk without waiting."""
    if _sync_file_range is not None:
        _sync_file_range(descriptor, start, end - start, _SYNC_FILE_RANGE_WRITE)
