"""The local store's files: private modes, refusal of readable files, persistence."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from conveyor.shared.errors import NotFoundError
from conveyor.shared.secrets import InsecureSecretFileError, LocalSecretStore

DIGEST = hashlib.sha256(b"artifact").digest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_private(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path / "secrets")
    store.sign("artifacts", DIGEST)
    store.write_secret("a/b", {"k": "v"})

    assert _mode(tmp_path / "secrets") == 0o700
    assert _mode(tmp_path / "secrets" / "keys" / "artifacts.json") == 0o600
    assert _mode(tmp_path / "secrets" / "secrets.json") == 0o600
    assert not [p for p in (tmp_path / "secrets").rglob("*.tmp")]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_key_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    store = LocalSecretStore(tmp_path)
    store.sign("artifacts", DIGEST)
    key_file = tmp_path / "keys" / "artifacts.json"
    key_file.chmod(mode)

    fresh = LocalSecretStore(tmp_path)
    with pytest.raises(InsecureSecretFileError, match="chmod 600") as caught:
        fresh.sign("artifacts", DIGEST)
    assert caught.value.reason == "INSECURE_SECRET_FILE"
    # The running store notices a chmod too: it checks the file on every use.
    with pytest.raises(InsecureSecretFileError):
        store.sign("artifacts", DIGEST)


def test_secrets_file_open_to_others_is_refused(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path)
    store.write_secret("a", {"k": "v"})
    (tmp_path / "secrets.json").chmod(0o644)

    with pytest.raises(InsecureSecretFileError):
        store.read_secret("a")


def test_keys_survive_a_restart_and_a_rotation_elsewhere(tmp_path: Path) -> None:
    signer = LocalSecretStore(tmp_path)
    verifier = LocalSecretStore(tmp_path)  # e.g. inference, sharing the directory
    first = signer.sign("artifacts", DIGEST)
    assert verifier.verify("artifacts", DIGEST, first)

    verifier.rotate_key("artifacts")  # another process rotates
    second = signer.sign("artifacts", DIGEST)

    assert second.key_id != first.key_id
    assert LocalSecretStore(tmp_path).verify("artifacts", DIGEST, first)
    assert LocalSecretStore(tmp_path).verify("artifacts", DIGEST, second)


def test_key_id_is_the_public_key_fingerprint(tmp_path: Path) -> None:
    signature = LocalSecretStore(tmp_path).sign("artifacts", DIGEST)

    prefix, fingerprint = signature.key_id.split("/")
    assert prefix == "local"
    assert len(fingerprint) == 64
    ring = json.loads((tmp_path / "keys" / "artifacts.json").read_text())
    private = Ed25519PrivateKey.from_private_bytes(base64.b64decode(ring["versions"]["1"]["key"]))
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert fingerprint == hashlib.sha256(public).hexdigest()


def test_repr_names_only_the_directory(tmp_path: Path) -> None:
    assert repr(LocalSecretStore(tmp_path)) == f"LocalSecretStore(directory='{tmp_path}')"


def test_public_key_pem_is_the_key_id_fingerprint(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path)
    signature = store.sign("artifacts", DIGEST)

    public = load_pem_public_key(store.public_key_pem("artifacts", signature.key_id).encode())

    assert isinstance(public, Ed25519PublicKey)
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert signature.key_id == f"local/{hashlib.sha256(raw).hexdigest()}"


def test_public_keys_see_a_rotation_by_another_process(tmp_path: Path) -> None:
    reader = LocalSecretStore(tmp_path)
    first = reader.sign("artifacts", DIGEST)
    assert list(reader.public_keys_pem("artifacts")) == [first.key_id]

    LocalSecretStore(tmp_path).rotate_key("artifacts")
    second = LocalSecretStore(tmp_path).sign("artifacts", DIGEST)

    assert list(reader.public_keys_pem("artifacts")) == [first.key_id, second.key_id]
    assert reader.public_key_pem("artifacts", second.key_id)


def test_public_key_of_another_local_key_is_not_found(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path)
    store.ensure_key("artifacts", "ed25519")
    other = store.sign("other", DIGEST)

    with pytest.raises(NotFoundError):
        store.public_key_pem("artifacts", other.key_id)


def test_public_key_of_a_readable_key_file_is_refused(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path)
    signature = store.sign("artifacts", DIGEST)
    (tmp_path / "keys" / "artifacts.json").chmod(0o644)

    with pytest.raises(InsecureSecretFileError):
        store.public_key_pem("artifacts", signature.key_id)
