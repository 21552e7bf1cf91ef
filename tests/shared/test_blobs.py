"""The content-addressed blob store: atomic, deduplicated, verified."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from conveyor.shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from conveyor.shared.secrets import DataKey, LocalSecretStore
from conveyor.shared.storage import (
    BlobCorruptError,
    BlobStore,
    DigestMismatchError,
    SecretStoreBlobKeys,
    encryption,
)
from conveyor.shared.storage.blobs import ENCRYPTED_SUFFIX
from conveyor.shared.storage.encryption import ChunkSealer, EncryptionHeader


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_stores_by_digest_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = store.put(b"weights")
    again = store.put(b"weights")
    assert first.sha256 == again.sha256 == sha256(b"weights")
    assert first.size_bytes == 7
    assert store.read(first.sha256) == b"weights"
    assert len(list((tmp_path / "sha256").rglob("*"))) == 2  # one prefix dir, one blob
    assert list((tmp_path / "tmp").iterdir()) == []


def test_streamed_write_checks_declared_digest_and_size(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(3 * 1024 * 1024 + 17)
    with store.writer() as writer:
        for start in range(0, len(data), 1024 * 1024):
            writer.write(data[start : start + 1024 * 1024])
        info = writer.commit(expected_sha256=sha256(data), expected_size=len(data))
    assert b"".join(store.iter_chunks(info.sha256, offset=1000)) == data[1000:]
    assert store.size(info.sha256) == len(data)


@pytest.mark.parametrize(
    ("declared_sha", "declared_size"), [("0" * 64, None), (None, 5)], ids=["digest", "size"]
)
def test_mismatch_leaves_nothing_behind(
    tmp_path: Path, declared_sha: str | None, declared_size: int | None
) -> None:
    store = BlobStore(tmp_path)
    writer = store.writer()
    writer.write(b"abc")
    with pytest.raises(DigestMismatchError) as raised:
        writer.commit(expected_sha256=declared_sha, expected_size=declared_size)
    assert raised.value.reason == "DIGEST_MISMATCH"
    assert not store.exists(sha256(b"abc"))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_abandoned_writer_discards_its_bytes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def cancelled_upload() -> None:
        with store.writer() as writer:
            writer.write(b"half")
            raise RuntimeError("upload cancelled")

    with pytest.raises(RuntimeError):
        cancelled_upload()
    assert not store.exists(sha256(b"half"))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_bad_digests_and_offsets_are_invalid_arguments(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    info = store.put(b"xyz")
    with pytest.raises(InvalidArgumentError):
        store.exists("../../etc/passwd")
    with pytest.raises(InvalidArgumentError):
        list(store.iter_chunks(info.sha256, offset=4))
    with pytest.raises(NotFoundError):
        store.path(sha256(b"missing"))


def test_writer_killed_mid_write_never_leaves_a_visible_blob(tmp_path: Path) -> None:
    data = b"x" * (8 * 1024 * 1024)
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from conveyor.shared.storage import BlobStore
        writer = BlobStore(Path({str(tmp_path)!r})).writer()
        writer.write(b"x" * (4 * 1024 * 1024))
        writer._file.flush()
        print("half-written", flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"half-written"
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    leftovers = list((tmp_path / "tmp").iterdir())
    assert len(leftovers) == 1  # the partial file exists, but only under tmp/
    assert leftovers[0].stat().st_size == 4 * 1024 * 1024
    assert list((tmp_path / "sha256").rglob("*")) == []

    reopened = BlobStore(tmp_path)  # a restarted service sweeps the partial file
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not reopened.exists(sha256(data[: 4 * 1024 * 1024]))
    assert not reopened.exists(sha256(data))


# -- encryption at rest -------------------------------------------------------

CHUNK = 1024  # small chunks: many of them, and every edge, in little data
TAG = encryption.TAG_BYTES
MARKER = b"CONVEYOR-PLAINTEXT-MARKER-7f3a"


@pytest.fixture
def secret_store(tmp_path: Path) -> LocalSecretStore:
    return LocalSecretStore(tmp_path / "secrets")


@pytest.fixture
def keys(secret_store: LocalSecretStore) -> SecretStoreBlobKeys:
    keys = SecretStoreBlobKeys(secret_store, "artifact-encryption")
    keys.ensure_key()
    return keys


@pytest.fixture
def sealed_store(tmp_path: Path, keys: SecretStoreBlobKeys) -> BlobStore:
    return BlobStore(tmp_path / "blobs", keys=keys, encrypt=True, chunk_bytes=CHUNK)


def header_bytes(path: Path) -> int:
    with path.open("rb") as file:
        return len(encryption.read_header(file, path.name.removesuffix(ENCRYPTED_SUFFIX))[1])


def chunk_span(path: Path, index: int) -> tuple[int, int]:
    """Where chunk ``index`` (ciphertext and tag) lies in the file."""
    start = header_bytes(path) + index * (CHUNK + TAG)
    return start, min(start + CHUNK + TAG, path.stat().st_size)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
def test_encrypted_blobs_round_trip_from_every_offset(sealed_store: BlobStore, size: int) -> None:
    data = (MARKER * (size // len(MARKER) + 1))[:size]
    info = sealed_store.put(data)
    path = sealed_store.path(info.sha256)

    assert path.name == f"{info.sha256}{ENCRYPTED_SUFFIX}"  # named by the plaintext digest
    stored = path.read_bytes()
    if size >= len(MARKER):
        assert MARKER not in stored
    # Header, then a 16-byte tag per full chunk and one for the short last chunk.
    assert len(stored) == header_bytes(path) + size + (size // CHUNK + 1) * TAG
    assert len(stored) == header_bytes(path) + encryption.sealed_size(size, CHUNK)
    assert sealed_store.read(info.sha256) == data
    assert sealed_store.size(info.sha256) == size
    offsets = {0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK, size - 1, size}
    for offset in sorted(o for o in offsets if 0 <= o <= size):
        pieces = list(sealed_store.iter_chunks(info.sha256, offset=offset, chunk_bytes=300))
        assert b"".join(pieces) == data[offset:], offset
        assert all(0 < len(piece) <= 300 for piece in pieces)
    with pytest.raises(InvalidArgumentError):
        list(sealed_store.iter_chunks(info.sha256, offset=size + 1))


def test_streamed_encrypted_writes_in_odd_pieces_read_back(sealed_store: BlobStore) -> None:
    data = os.urandom(10 * CHUNK + 5)
    with sealed_store.writer(sha256=sha256(data)) as writer:
        for start, length in zip(range(0, len(data), 700), [700] * 100, strict=False):
            writer.write(data[start : start + length])
        info = writer.commit(expected_size=len(data))
    assert sealed_store.read(info.sha256) == data


def test_each_write_has_its_own_data_key(tmp_path: Path, keys: SecretStoreBlobKeys) -> None:
    data = MARKER * 100
    first = BlobStore(tmp_path / "a", keys=keys, encrypt=True, chunk_bytes=CHUNK)
    second = BlobStore(tmp_path / "b", keys=keys, encrypt=True, chunk_bytes=CHUNK)
    one, two = first.put(data), second.put(data)
    a, b = first.path(one.sha256).read_bytes(), second.path(two.sha256).read_bytes()
    assert len(a) == len(b)
    assert a[header_bytes(first.path(one.sha256)) :] != b[header_bytes(second.path(two.sha256)) :]


def test_encrypted_content_is_stored_once(sealed_store: BlobStore, tmp_path: Path) -> None:
    first = sealed_store.put(MARKER)
    path = sealed_store.path(first.sha256)
    before = path.read_bytes()
    assert sealed_store.put(MARKER) == first
    assert path.read_bytes() == before  # the second copy was discarded
    assert len(list((tmp_path / "blobs" / "sha256").rglob("*.enc"))) == 1
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert list(sealed_store.digests()) == [first.sha256]
    sealed_store.delete(first.sha256)
    assert not sealed_store.exists(first.sha256)


def test_an_encrypting_store_needs_the_digest_up_front(sealed_store: BlobStore) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        sealed_store.writer()
    assert refused.value.reason == "SHA256_REQUIRED"
    writer = sealed_store.writer(sha256=sha256(b"declared"))
    writer.write(b"other bytes")
    with pytest.raises(DigestMismatchError):  # checked even when commit is not told
        writer.commit()
    assert not sealed_store.exists(sha256(b"other bytes"))


def tamper_flip(path: Path) -> None:
    start, _ = chunk_span(path, 1)
    data = bytearray(path.read_bytes())
    data[start + 10] ^= 0x01
    path.write_bytes(bytes(data))


def tamper_swap(path: Path) -> None:
    data = path.read_bytes()
    (a, b), (c, d) = chunk_span(path, 0), chunk_span(path, 1)
    path.write_bytes(data[:a] + data[c:d] + data[a:b] + data[d:])


def tamper_drop_last(path: Path) -> None:
    start, _ = chunk_span(path, 3)
    path.write_bytes(path.read_bytes()[:start])


def tamper_cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def tamper_append(path: Path) -> None:
    data = path.read_bytes()
    start, end = chunk_span(path, 1)
    path.write_bytes(data + data[start:end])


@pytest.mark.parametrize(
    "tamper",
    [tamper_flip, tamper_swap, tamper_drop_last, tamper_cut, tamper_append],
    ids=["flipped-bit", "swapped-chunks", "last-chunk-dropped", "cut", "chunk-appended"],
)
def test_altered_ciphertext_is_data_loss(
    sealed_store: BlobStore, tamper: object, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * CHUNK + 100)  # chunks 0-2 full, chunk 3 short
    info = sealed_store.put(data)
    tamper(sealed_store.path(info.sha256))  # type: ignore[operator]

    with pytest.raises(BlobCorruptError) as refused:
        sealed_store.read(info.sha256)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert refused.value.metadata["sha256"] == info.sha256
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_a_truncated_blob_is_refused_before_any_byte(sealed_store: BlobStore) -> None:
    info = sealed_store.put(os.urandom(3 * CHUNK + 100))
    tamper_drop_last(sealed_store.path(info.sha256))
    # The layout without its short last chunk is refused at open...
    with pytest.raises(BlobCorruptError) as refused:
        sealed_store.open(info.sha256)
    assert refused.value.reason == "BLOB_TRUNCATED"
    # ...and a size other than the stored one, too.
    other = sealed_store.put(b"x" * 100)
    with pytest.raises(BlobCorruptError) as mismatch:
        sealed_store.open(other.sha256, expected_size=101)
    assert mismatch.value.reason == "BLOB_SIZE_MISMATCH"


def test_chunks_before_the_damage_still_read(sealed_store: BlobStore) -> None:
    data = os.urandom(3 * CHUNK + 100)
    info = sealed_store.put(data)
    tamper_flip(sealed_store.path(info.sha256))  # chunk 1
    with sealed_store.open(info.sha256) as reader:
        assert reader.read(CHUNK) == data[:CHUNK]
        with pytest.raises(BlobCorruptError) as refused:
            reader.read(CHUNK)
    assert refused.value.reason == "BLOB_AUTHENTICATION_FAILED"
    assert refused.value.metadata["chunk"] == "1"
    # Resuming past the damaged chunk works: each chunk stands alone.
    assert b"".join(sealed_store.iter_chunks(info.sha256, offset=2 * CHUNK)) == data[2 * CHUNK :]


def test_a_header_from_another_blob_is_refused(sealed_store: BlobStore) -> None:
    one, two = sealed_store.put(os.urandom(2 * CHUNK)), sealed_store.put(os.urandom(2 * CHUNK))
    first, second = sealed_store.path(one.sha256), sealed_store.path(two.sha256)
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()

    # Blob two's whole file under blob one's name: the header names another blob.
    first.write_bytes(second_bytes)
    with pytest.raises(BlobCorruptError):
        sealed_store.read(one.sha256)

    # Blob two's wrapped key in blob one's header: it does not unwrap for blob one
    # (the digest is the key's context).
    with second.open("rb") as file:
        other_header, _ = encryption.read_header(file, two.sha256)
    forged = EncryptionHeader(
        sha256=one.sha256,
        chunk_bytes=CHUNK,
        key_name=other_header.key_name,
        key_version=other_header.key_version,
        wrapped_key=other_header.wrapped_key,
    )
    first.write_bytes(forged.encode() + first_bytes[header_bytes_of(first_bytes) :])
    with pytest.raises(BlobCorruptError) as refused:
        sealed_store.read(one.sha256)
    assert refused.value.reason == "BLOB_KEY_UNWRAP_FAILED"
    assert other_header.wrapped_key.decode() not in refused.value.message


def header_bytes_of(stored: bytes) -> int:
    return 12 + int.from_bytes(stored[8:12], "big")


def test_a_store_of_another_secret_store_cannot_read(
    tmp_path: Path, sealed_store: BlobStore
) -> None:
    info = sealed_store.put(MARKER)
    stranger = SecretStoreBlobKeys(LocalSecretStore(tmp_path / "other"), "artifact-encryption")
    stranger.ensure_key()
    with pytest.raises(BlobCorruptError) as refused:
        BlobStore(tmp_path / "blobs", keys=stranger).read(info.sha256)
    assert refused.value.reason == "BLOB_KEY_UNWRAP_FAILED"
    with pytest.raises(FailedPreconditionError) as keyless:
        BlobStore(tmp_path / "blobs").read(info.sha256)
    assert keyless.value.reason == "BLOB_KEYS_MISSING"
    assert BlobStore(tmp_path / "blobs").size(info.sha256) == len(MARKER)  # no key needed


def test_plaintext_blobs_stay_readable_and_are_replaced_when_written_encrypted(
    tmp_path: Path, keys: SecretStoreBlobKeys
) -> None:
    plain = BlobStore(tmp_path / "blobs")
    old = plain.put(MARKER)
    assert plain.path(old.sha256).name == old.sha256

    sealed = BlobStore(tmp_path / "blobs", keys=keys, encrypt=True, chunk_bytes=CHUNK)
    assert sealed.read(old.sha256) == MARKER  # no migration needed
    assert list(sealed.iter_chunks(old.sha256, offset=3)) == [MARKER[3:]]

    assert sealed.put(MARKER) == old  # the same content, written with encryption on
    assert [p.name for p in (tmp_path / "blobs" / "sha256").rglob("*") if p.is_file()] == [
        f"{old.sha256}{ENCRYPTED_SUFFIX}"
    ]
    assert sealed.read(old.sha256) == MARKER
    # Turning encryption off again never goes back to plaintext.
    again = BlobStore(tmp_path / "blobs", keys=keys)
    assert again.put(MARKER) == old
    assert again.path(old.sha256).name.endswith(ENCRYPTED_SUFFIX)


def test_rotation_keeps_older_blobs_readable(
    sealed_store: BlobStore, secret_store: LocalSecretStore
) -> None:
    old = sealed_store.put(b"before rotation" * 100)
    assert secret_store.rotate_key("artifact-encryption") == 2
    new = sealed_store.put(b"after rotation" * 100)
    versions = []
    for info in (old, new):
        with sealed_store.path(info.sha256).open("rb") as file:
            versions.append(encryption.read_header(file, info.sha256)[0].key_version)
    assert versions == [1, 2]
    assert sealed_store.read(old.sha256) == b"before rotation" * 100
    assert sealed_store.read(new.sha256) == b"after rotation" * 100


def test_no_data_key_no_file(tmp_path: Path) -> None:
    class Down:
        key_name = "artifact-encryption"

        def new_data_key(self, sha256: str) -> DataKey:
            raise UnavailableError("the secret store is down", reason="BLOB_ENCRYPTION_UNAVAILABLE")

        def unwrap(self, key_name: str, wrapped: bytes, sha256: str) -> bytes:
            raise UnavailableError("the secret store is down")

    store = BlobStore(tmp_path / "blobs", keys=Down(), encrypt=True)
    with pytest.raises(UnavailableError):
        store.put(b"weights")
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []


def test_an_encrypting_writer_killed_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import hashlib, time
        from pathlib import Path
        from conveyor.shared.secrets import LocalSecretStore
        from conveyor.shared.storage import BlobStore, SecretStoreBlobKeys
        root = Path({str(tmp_path)!r})
        keys = SecretStoreBlobKeys(LocalSecretStore(root / "secrets"), "artifact-encryption")
        store = BlobStore(root / "blobs", keys=keys, encrypt=True)
        data = b"x" * (8 * 1024 * 1024)
        writer = store.writer(sha256=hashlib.sha256(data).hexdigest())
        writer.write(data[: 4 * 1024 * 1024])
        print("half-written", flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"half-written"
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    [leftover] = list((tmp_path / "blobs" / "tmp").iterdir())
    assert leftover.stat().st_size >= 4 * 1024 * 1024  # sealed as it arrived, but hidden
    assert list((tmp_path / "blobs" / "sha256").rglob("*")) == []
    BlobStore(tmp_path / "blobs")  # a restarted service sweeps the partial file
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_a_chunk_sealed_for_one_position_fails_at_any_other() -> None:
    key = os.urandom(32)
    header = EncryptionHeader(sha256=sha256(b"a"), chunk_bytes=4, key_name="k", key_version=1)
    raw = header.encode()
    sealer = ChunkSealer(key, header, raw)
    sealed = [*sealer.update(b"abcdefgh"), sealer.finish()]
    assert [len(chunk) for chunk in sealed] == [4 + TAG, 4 + TAG, TAG]  # the last is empty
    other = EncryptionHeader(sha256=sha256(b"b"), chunk_bytes=4, key_name="k", key_version=1)
    again = ChunkSealer(key, other, other.encode())
    assert again.update(b"abcdefgh")[0] != sealed[0]  # bound to the blob's digest
