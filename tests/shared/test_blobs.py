"""The content-addressed blob store: atomic, deduplicated, verified."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor.shared.errors import InvalidArgumentError, NotFoundError
from conveyor.shared.storage import BlobStore, DigestMismatchError


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
