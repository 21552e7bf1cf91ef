"""A content-addressed blob store on a local filesystem.

Blobs are keyed by the SHA-256 of their bytes (lowercase hex) and stored once,
however often they are written. A write goes to a temporary file in the same
filesystem, is fsynced, then renamed into place and the directory fsynced: a
reader sees a whole blob or none, even when the writer is killed mid-write.
Leftover temporary files of a killed writer are removed when the store opens.
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
from typing import cast

from conveyor.shared.errors import InvalidArgumentError, NotFoundError
from conveyor.shared.storage.files import fsync_directory, process_alive

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
"""A SHA-256 digest as the store names blobs: 64 lowercase hex characters."""
DEFAULT_CHUNK_BYTES = 1024 * 1024


class DigestMismatchError(InvalidArgumentError):
    """The bytes written do not hash to the digest (or size) the writer declared."""

    default_reason = "DIGEST_MISMATCH"


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its SHA-256 (hex) and size in bytes."""

    sha256: str
    size_bytes: int


class BlobStore:
    """Content-addressed blobs under ``root`` (``root/sha256/ab/abcdef…``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "sha256"
        self._tmp = root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self.sweep_abandoned_writes()

    def writer(self) -> BlobWriter:
        """Start writing a blob; commit it with :meth:`BlobWriter.commit`."""
        # The writer's process id in the name tells a later sweep whether its
        # owner still lives (another replica or a draining process may share the store).
        return BlobWriter(self, self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}.partial")

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
        with self.writer() as writer:
            writer.write(data)
            return writer.commit()

    def path(self, sha256: str) -> Path:
        """Where the blob lives; raises NotFoundError when it is absent."""
        path = self._path_for(sha256)
        if not path.exists():
            raise NotFoundError(f"blob {sha256} not found", reason="BLOB_NOT_FOUND")
        return path

    def exists(self, sha256: str) -> bool:
        return self._path_for(sha256).exists()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def iter_chunks(
        self, sha256: str, *, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The blob's bytes from ``offset`` on, in chunks (for resumable downloads)."""
        path = self.path(sha256)
        size = path.stat().st_size
        if not 0 <= offset <= size:
            raise InvalidArgumentError(
                f"offset {offset} is outside the blob's {size} bytes", reason="BAD_OFFSET"
            )
        with path.open("rb") as blob:
            blob.seek(offset)
            while chunk := blob.read(chunk_bytes):
                yield chunk

    def digests(self, *, older_than: float = 0.0) -> Iterator[str]:
        """Every stored blob's digest; ``older_than`` seconds skips recent writes."""
        now = time.time()
        for path in self._blobs.glob("*/*"):
            if SHA256_HEX.match(path.name) and now - path.stat().st_mtime >= older_than:
                yield path.name

    def delete(self, sha256: str) -> None:
        """Remove a blob (callers ensure nothing references it any more)."""
        self._path_for(sha256).unlink(missing_ok=True)

    def _path_for(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise InvalidArgumentError(
                f"not a lowercase hex SHA-256: {sha256!r}", reason="BAD_DIGEST"
            )
        return self._blobs / sha256[:2] / sha256

    def _install(self, temporary: Path, sha256: str) -> None:
        final = self._path_for(sha256)
        if final.exists():  # identical content is stored once
            temporary.unlink()
            return
        final.parent.mkdir(exist_ok=True)
        os.replace(temporary, final)
        fsync_directory(final.parent)


class BlobWriter:
    """Streams bytes into a temporary file, hashing as it goes.

    Use as a context manager: leaving the block without :meth:`commit` (an error,
    a cancelled upload) discards everything written.
    """

    def __init__(self, store: BlobStore, temporary: Path) -> None:
        self._store = store
        self._temporary = temporary
        self._file = temporary.open("xb", buffering=0)
        self._hash = hashlib.sha256()
        self.size_bytes = 0
        self._flushed_bytes = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size_bytes += len(chunk)
        if self.size_bytes - self._flushed_bytes >= WRITEBACK_BYTES:
            # Start writing back now, so the fsync at commit has little left to do.
            _start_writeback(self._file.fileno(), self._flushed_bytes, self.size_bytes)
            self._flushed_bytes = self.size_bytes

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
        os.fsync(self._file.fileno())
        self._file.close()
        self._store._install(self._temporary, digest)
        return BlobInfo(sha256=digest, size_bytes=self.size_bytes)

    def check(
        self, *, expected_sha256: str | None = None, expected_size: int | None = None
    ) -> None:
        """Raise DigestMismatchError unless what was written so far has the
        declared size and digest. Lets a caller act on verified bytes (sign
        their digest) before :meth:`commit` makes them visible."""
        if expected_size is not None and expected_size != self.size_bytes:
            raise DigestMismatchError(
                f"declared {expected_size} bytes but received {self.size_bytes}",
                metadata={"declared_size": str(expected_size), "size": str(self.size_bytes)},
            )
        if expected_sha256 is not None and expected_sha256 != self.sha256:
            raise DigestMismatchError(
                "content does not match the declared sha256",
                metadata={"declared_sha256": expected_sha256, "sha256": self.sha256},
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
