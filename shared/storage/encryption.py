"""Envelope encryption of blobs at rest: chunked AES-256-GCM under one data key per blob.

Every encrypted blob gets a fresh 256-bit data key from the secret store
(:meth:`SecretStore.generate_data_key`, with the blob's raw SHA-256 as the
context, so Vault derives a key per blob and a wrapped key only unwraps for its
own blob). The plaintext key lives in memory only; the wrapped key is stored in
the blob file's header. The blob keeps the name of its *plaintext* digest, so
deduplication and the digests the registry signs do not change.

File format, version 1 (``sha256/<ab>/<digest>.enc``)::

    magic        8 bytes   MAGIC
    header size  4 bytes   big-endian N (at most 64 KiB)
    header       N bytes   UTF-8 JSON: format_version, algorithm ("AES-256-GCM"),
                           sha256 (plaintext, hex), chunk_bytes, key_name,
                           key_version, wrapped_key (the secret store's ciphertext)
    chunks       AES-256-GCM of each full chunk_bytes of plaintext, then of the
                 rest (0 to chunk_bytes - 1 bytes: the last chunk is always
                 short, possibly empty), each followed by its 16-byte tag

The last chunk is always there and always short, so even an empty blob has an
authenticated end, and a writer seals every full chunk as soon as it has it
(the stream's end cannot change what a full chunk is).
Chunk ``i`` is sealed with the nonce ``0x00000000 ‖ i`` (64-bit big-endian);
a data key encrypts exactly one blob, so no nonce ever repeats under a key. Its
associated data is ``DOMAIN ‖ sha256 (32 raw bytes) ‖ SHA-256 of the magic,
size and header ‖ i ‖ final flag``. So a chunk only authenticates in its own
blob, at its own position, under this exact header, and only the real last
chunk authenticates as the last one: flipped bits, reordered, swapped, dropped,
truncated or appended chunks, and a header from another blob, all fail.

Readers derive the plaintext size from the file size (``C`` plaintext bytes
and a 16-byte tag per full chunk, then a short last chunk and its tag); a file
whose layout cannot be one of these is refused before any byte is decrypted.
A chunk that fails authentication raises :class:`BlobCorruptError` (DATA_LOSS),
logged with the blob's digest and the chunk's index, never with key material.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conveyor.shared.errors import (
    ConveyorError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from conveyor.shared.secrets.base import DataKey, SecretStore

logger = logging.getLogger(__name__)

MAGIC = b"\x89CVYENC\n"
"""First bytes of an encrypted blob (a high-bit byte and a newline, like PNG's,
so a file mangled as text is noticed)."""
FORMAT_VERSION = 1
ALGORITHM = "AES-256-GCM"
DOMAIN = b"conveyor.blob.aes256gcm.v1\x00"
"""Prefix of every chunk's associated data: a chunk sealed for another purpose
or format never authenticates as a blob chunk."""
TAG_BYTES = 16
KEY_BYTES = 32
DEFAULT_CHUNK_BYTES = 1024 * 1024
"""Plaintext bytes per chunk: one download message, 16 bytes of overhead per MiB."""
MAX_CHUNK_BYTES = 8 * 1024 * 1024
"""Largest chunk a reader accepts from a header (bounds the memory a read takes)."""
MAX_HEADER_BYTES = 64 * 1024
_PREAMBLE = struct.Struct(">8sI")
_INDEX = struct.Struct(">Q")

T = TypeVar("T")


class BlobCorruptError(DataLossError):
    """A stored blob is damaged: its layout, header or a chunk fails to authenticate."""

    default_reason = "BLOB_CORRUPT"


class BlobKeys(Protocol):
    """Where data keys come from and are unwrapped: the secret store, behind
    :class:`SecretStoreBlobKeys`. Blocking: called from worker threads."""

    @property
    def key_name(self) -> str:
        """The key that wraps new data keys."""
        ...

    def new_data_key(self, sha256: str) -> DataKey:
        """A fresh data key for the blob with this (plaintext) digest."""
        ...

    def unwrap(self, key_name: str, wrapped: bytes, sha256: str) -> bytes:
        """The plaintext data key of the blob with this digest."""
        ...


class SecretStoreBlobKeys:
    """Data keys from one ``aes256-gcm96`` key of a secret store, with the blob's
    raw SHA-256 digest as the context (Vault derives a key per blob from it)."""

    def __init__(self, store: SecretStore, key_name: str) -> None:
        self.store = store
        self._key_name = key_name
        self._key_ready = False

    def __repr__(self) -> str:
        return f"SecretStoreBlobKeys(backend={self.store.backend!r}, key_name={self._key_name!r})"

    @property
    def key_name(self) -> str:
        return self._key_name

    def ensure_key(self) -> None:
        """Create the encryption key if the store lacks it; raises the store's error."""
        self.store.ensure_key(self._key_name, "aes256-gcm96")
        self._key_ready = True

    def new_data_key(self, sha256: str) -> DataKey:
        """A fresh data key; any failure of the store is an :class:`UnavailableError`
        (nothing has been written yet, so the write can be retried)."""
        try:
            if not self._key_ready:  # the store was down when the service started
                self.ensure_key()
            data_key = self.store.generate_data_key(self._key_name, bytes.fromhex(sha256))
        except (ConveyorError, OSError) as error:
            cause = _cause(error)
            logger.warning(
                "cannot get a data key to encrypt a blob",
                extra={"backend": self.store.backend, "key_name": self._key_name, "cause": cause},
            )
            raise UnavailableError(
                "the secret store cannot provide a data key to encrypt the blob now; "
                "nothing was stored, retry later",
                reason="BLOB_ENCRYPTION_UNAVAILABLE",
                metadata={"backend": self.store.backend, "cause": cause},
            ) from error
        if len(data_key.plaintext) != KEY_BYTES:
            raise UnavailableError(
                f"the secret store returned a data key that is not {KEY_BYTES} bytes",
                reason="BLOB_ENCRYPTION_UNAVAILABLE",
                metadata={"backend": self.store.backend},
            )
        return data_key

    def unwrap(self, key_name: str, wrapped: bytes, sha256: str) -> bytes:
        """The data key of blob ``sha256``. A wrapped key that does not unwrap is
        :class:`BlobCorruptError` (an altered header, or a secret store other than
        the one that wrote the blob); a missing key FailedPreconditionError; a
        store that cannot answer UnavailableError."""
        metadata = {"backend": self.store.backend, "key_name": key_name, "sha256": sha256}
        try:
            plaintext = self.store.unwrap_data_key(key_name, wrapped, bytes.fromhex(sha256))
        except InvalidArgumentError as error:  # DecryptionFailedError, a bad key name
            logger.error(
                "the data key of an encrypted blob does not unwrap",
                extra={**metadata, "cause": error.reason},
            )
            raise BlobCorruptError(
                f"the data key of blob {sha256} does not unwrap with key {key_name!r} of this "
                "secret store: the blob was altered, or the store is not the one that wrote it",
                reason="BLOB_KEY_UNWRAP_FAILED",
                metadata=metadata,
            ) from error
        except NotFoundError as error:
            raise FailedPreconditionError(
                f"the secret store has no key {key_name!r}, which encrypted blob {sha256}: "
                "point the service at the secret store that wrote it",
                reason="BLOB_KEY_NOT_FOUND",
                metadata=metadata,
            ) from error
        except (ConveyorError, OSError) as error:
            cause = _cause(error)
            logger.warning(
                "cannot unwrap the data key of an encrypted blob",
                extra={**metadata, "cause": cause},
            )
            raise UnavailableError(
                "the secret store cannot unwrap the blob's data key now; retry later",
                reason="BLOB_DECRYPTION_UNAVAILABLE",
                metadata={**metadata, "cause": cause},
            ) from error
        if len(plaintext) != KEY_BYTES:
            raise BlobCorruptError(
                f"the data key of blob {sha256} is not {KEY_BYTES} bytes",
                reason="BLOB_KEY_UNWRAP_FAILED",
                metadata=metadata,
            )
        return plaintext


@dataclass(frozen=True)
class EncryptionHeader:
    """What an encrypted blob's header says (no secret: the key is wrapped)."""

    sha256: str
    chunk_bytes: int
    key_name: str
    key_version: int
    wrapped_key: bytes = b""

    def encode(self) -> bytes:
        """Magic, size and header: the bytes an encrypted blob file starts with."""
        body = json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "algorithm": ALGORITHM,
                "sha256": self.sha256,
                "chunk_bytes": self.chunk_bytes,
                "key_name": self.key_name,
                "key_version": self.key_version,
                "wrapped_key": self.wrapped_key.decode("ascii"),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        return _PREAMBLE.pack(MAGIC, len(body)) + body


def read_header(file: BinaryIO, sha256: str) -> tuple[EncryptionHeader, bytes]:
    """The header of the encrypted blob ``sha256`` open in ``file`` and its raw
    bytes (magic and size included); leaves ``file`` after them. Raises
    :class:`BlobCorruptError` when it is not a header of this blob, and
    FailedPreconditionError for a format version this code does not know."""
    metadata = {"sha256": sha256}
    preamble = file.read(_PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        raise _corrupt(sha256, "the file is shorter than an encryption header", "BLOB_TRUNCATED")
    magic, size = _PREAMBLE.unpack(preamble)
    if magic != MAGIC or size > MAX_HEADER_BYTES:
        raise _corrupt(sha256, "the file does not start with an encryption header")
    body = file.read(size)
    if len(body) < size:
        raise _corrupt(sha256, "the encryption header is cut short", "BLOB_TRUNCATED")
    try:
        fields = json.loads(body)
        if not isinstance(fields, dict):
            raise TypeError("the header is not an object")
        version = fields.get("format_version")
        if version != FORMAT_VERSION or fields.get("algorithm") != ALGORITHM:
            raise FailedPreconditionError(
                f"blob {sha256} is encrypted in a format this release does not read "
                f"(format version {version!r}, {fields.get('algorithm')!r})",
                reason="BLOB_FORMAT_UNSUPPORTED",
                metadata={**metadata, "format_version": str(version)},
            )
        header = EncryptionHeader(
            sha256=_typed(fields, "sha256", str),
            chunk_bytes=_typed(fields, "chunk_bytes", int),
            key_name=_typed(fields, "key_name", str),
            key_version=_typed(fields, "key_version", int),
            wrapped_key=_typed(fields, "wrapped_key", str).encode("ascii"),
        )
    except (ValueError, TypeError, KeyError, UnicodeError) as error:
        raise _corrupt(sha256, f"unreadable encryption header ({type(error).__name__})") from None
    if header.sha256 != sha256:
        raise _corrupt(sha256, "the encryption header belongs to another blob")
    if not 1 <= header.chunk_bytes <= MAX_CHUNK_BYTES:
        raise _corrupt(sha256, "the encryption header has an impossible chunk size")
    return header, preamble + body


class ChunkSealer:
    """Encrypts a stream into chunks: each full chunk as soon as it is complete,
    the short rest (possibly empty) as the last one when the stream ends."""

    def __init__(self, data_key: bytes, header: EncryptionHeader, raw_header: bytes) -> None:
        self._aead = AESGCM(data_key)
        self._chunk_bytes = header.chunk_bytes
        self._aad = _aad_prefix(header.sha256, raw_header)
        self._index = 0
        self._pending = bytearray()

    def update(self, data: bytes) -> list[bytes]:
        """The sealed chunks ``data`` completes (each chunk and its tag). Whole
        chunks of ``data`` are sealed where they lie, without a copy."""
        size, start = self._chunk_bytes, 0
        sealed: list[bytes] = []
        if self._pending:
            start = min(size - len(self._pending), len(data))
            self._pending += data[:start]
            if len(self._pending) < size:
                return sealed
            sealed.append(self._seal(self._pending, final=False))
            self._pending = bytearray()
        with memoryview(data) as view:
            while len(view) - start >= size:
                with view[start : start + size] as chunk:
                    sealed.append(self._seal(chunk, final=False))
                start += size
        self._pending += data[start:]
        return sealed

    def finish(self) -> bytes:
        """The last chunk: whatever is left (less than a chunk, possibly nothing)."""
        sealed = self._seal(self._pending, final=True)
        self._pending = bytearray()
        return sealed

    def _seal(self, chunk: bytes | bytearray | memoryview, *, final: bool) -> bytes:
        nonce, aad = _nonce(self._index), self._aad + _chunk_aad(self._index, final)
        self._index += 1
        return self._aead.encrypt(nonce, chunk, aad)


class EncryptedBlobReader:
    """Reads an encrypted blob's plaintext from any offset, one authenticated
    chunk at a time. Blocking; owns ``file`` and closes it."""

    encrypted = True

    def __init__(
        self,
        file: BinaryIO,
        sha256: str,
        keys: BlobKeys,
        *,
        expected_size: int | None = None,
    ) -> None:
        self._file = file
        try:
            self.sha256 = sha256
            header, raw_header = read_header(file, sha256)
            self._chunk_bytes = header.chunk_bytes
            self._start = len(raw_header)
            self._chunks, self.size_bytes = _layout(
                os.fstat(file.fileno()).st_size - self._start, header.chunk_bytes, sha256
            )
            if expected_size is not None and expected_size != self.size_bytes:
                raise _corrupt(
                    sha256,
                    f"the blob holds {self.size_bytes} bytes, {expected_size} were stored",
                    "BLOB_SIZE_MISMATCH",
                )
            self._aead = AESGCM(keys.unwrap(header.key_name, header.wrapped_key, sha256))
            self._aad = _aad_prefix(sha256, raw_header)
        except BaseException:
            file.close()
            raise
        self._next = 0
        self._buffer = b""

    def seek(self, offset: int) -> None:
        """Continue from plaintext byte ``offset`` (0 to the size, inclusive)."""
        if not 0 <= offset <= self.size_bytes:
            raise InvalidArgumentError(
                f"offset {offset} is outside the blob's {self.size_bytes} bytes",
                reason="BAD_OFFSET",
            )
        self._next, skip = divmod(offset, self._chunk_bytes)
        self._buffer = b""
        if skip:
            self._buffer = self._open_chunk(self._next)[skip:]
            self._next += 1

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of plaintext (at most one chunk's); empty at the end."""
        while not self._buffer and self._next < self._chunks:
            self._buffer = self._open_chunk(self._next)
            self._next += 1
        data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
        return data

    def close(self) -> None:
        self._file.close()

    def _open_chunk(self, index: int) -> bytes:
        final = index == self._chunks - 1
        step = self._chunk_bytes + TAG_BYTES
        length = self.size_bytes - index * self._chunk_bytes if final else self._chunk_bytes
        sealed = os.pread(self._file.fileno(), length + TAG_BYTES, self._start + index * step)
        try:
            if len(sealed) != length + TAG_BYTES:
                raise InvalidTag
            return self._aead.decrypt(_nonce(index), sealed, self._aad + _chunk_aad(index, final))
        except InvalidTag:
            logger.error(
                "an encrypted blob chunk failed authentication",
                extra={"sha256": self.sha256, "chunk": index, "chunks": self._chunks},
            )
            raise BlobCorruptError(
                f"chunk {index} of blob {self.sha256} failed authentication: the stored "
                "bytes were altered, reordered or cut; restore the blob from a backup",
                reason="BLOB_AUTHENTICATION_FAILED",
                metadata={"sha256": self.sha256, "chunk": str(index)},
            ) from None


def plaintext_size(file: BinaryIO, sha256: str) -> int:
    """The plaintext size of the encrypted blob open in ``file`` (no key needed)."""
    header, raw_header = read_header(file, sha256)
    body = os.fstat(file.fileno()).st_size - len(raw_header)
    return _layout(body, header.chunk_bytes, sha256)[1]


def sealed_size(size_bytes: int, chunk_bytes: int) -> int:
    """Bytes the chunks of ``size_bytes`` of plaintext take (header not included):
    a tag per full chunk and one for the short last chunk."""
    return size_bytes + (size_bytes // chunk_bytes + 1) * TAG_BYTES


def _layout(body_bytes: int, chunk_bytes: int, sha256: str) -> tuple[int, int]:
    """(chunks, plaintext size) of ``body_bytes`` of sealed chunks."""
    full, last = divmod(body_bytes, chunk_bytes + TAG_BYTES)
    if last < TAG_BYTES:  # the short last chunk is missing, or cut
        raise _corrupt(sha256, "the encrypted chunks are cut short", "BLOB_TRUNCATED")
    return full + 1, full * chunk_bytes + last - TAG_BYTES


def _aad_prefix(sha256: str, raw_header: bytes) -> bytes:
    return DOMAIN + bytes.fromhex(sha256) + hashlib.sha256(raw_header).digest()


def _chunk_aad(index: int, final: bool) -> bytes:
    return _INDEX.pack(index) + (b"\x01" if final else b"\x00")


def _nonce(index: int) -> bytes:
    return b"\x00\x00\x00\x00" + _INDEX.pack(index)


def _typed(fields: dict[str, object], name: str, kind: type[T]) -> T:
    value = fields[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(name)
    return value


def _corrupt(sha256: str, description: str, reason: str = "BLOB_CORRUPT") -> BlobCorruptError:
    logger.error("an encrypted blob is damaged", extra={"sha256": sha256, "cause": reason})
    return BlobCorruptError(
        f"blob {sha256} is damaged: {description}", reason=reason, metadata={"sha256": sha256}
    )


def _cause(error: BaseException) -> str:
    return error.reason if isinstance(error, ConveyorError) else type(error).__name__
