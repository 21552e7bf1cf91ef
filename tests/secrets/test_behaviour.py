"""What every service relies on, for each backend (local files and Vault)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conveyor.shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from conveyor.shared.secrets import (
    ArtifactSignatureValue,
    DecryptionFailedError,
    SecretStore,
    SignatureAlgorithm,
)

DIGEST = hashlib.sha256(b"model.onnx bytes").digest()
CONTEXT = b"models/churn/versions/3"


def test_kv_secret_round_trip(store: SecretStore) -> None:
    store.write_secret("registry/database", {"username": "conveyor", "password": "s3cr3t"})
    store.write_secret("registry/database", {"username": "conveyor", "password": "rotated"})

    assert store.read_secret("registry/database") == {
        "username": "conveyor",
        "password": "rotated",
    }


def test_missing_secret_is_not_found(store: SecretStore) -> None:
    with pytest.raises(NotFoundError):
        store.read_secret("registry/absent")


@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "a//b", "a b"])
def test_bad_secret_path_is_invalid(store: SecretStore, path: str) -> None:
    with pytest.raises(InvalidArgumentError):
        store.read_secret(path)


def test_encrypt_decrypt_round_trip(store: SecretStore) -> None:
    ciphertext = store.encrypt("envelope", b"api-key-123", CONTEXT)

    assert b"api-key-123" not in ciphertext
    assert ciphertext.decode("ascii").split(":")[1] == "v1"
    assert store.decrypt("envelope", ciphertext, CONTEXT) == b"api-key-123"


def test_decrypt_with_wrong_context_fails(store: SecretStore) -> None:
    ciphertext = store.encrypt("envelope", b"api-key-123", CONTEXT)

    with pytest.raises(DecryptionFailedError):
        store.decrypt("envelope", ciphertext, b"models/other/versions/1")


def test_tampered_ciphertext_fails(store: SecretStore) -> None:
    ciphertext = bytearray(store.encrypt("envelope", b"api-key-123", CONTEXT))
    ciphertext[-6] = ord("A") if ciphertext[-6] != ord("A") else ord("B")

    with pytest.raises(DecryptionFailedError):
        store.decrypt("envelope", bytes(ciphertext), CONTEXT)


def test_empty_context_is_refused(store: SecretStore) -> None:
    with pytest.raises(InvalidArgumentError, match="context"):
        store.encrypt("envelope", b"x", b"")


def test_data_key_unwraps_to_the_same_key(store: SecretStore) -> None:
    data_key = store.generate_data_key("envelope", CONTEXT)
    plaintext, wrapped = data_key

    assert len(plaintext) == 32
    assert plaintext not in wrapped
    assert data_key.key_version == 1
    assert store.unwrap_data_key("envelope", wrapped, CONTEXT) == plaintext
    assert plaintext.hex() not in repr(data_key)


def test_sign_and_verify_a_digest(store: SecretStore) -> None:
    signature = store.sign("artifacts", DIGEST)

    assert signature.algorithm == SignatureAlgorithm.ED25519
    assert signature.algorithm.proto_name == "SIGNATURE_ALGORITHM_ED25519"
    assert len(signature.signature) == 64
    assert store.verify("artifacts", DIGEST, signature)


def test_tampered_digest_or_signature_fails(store: SecretStore) -> None:
    signature = store.sign("artifacts", DIGEST)
    other_digest = hashlib.sha256(b"tampered model").digest()
    flipped = bytes([signature.signature[0] ^ 1]) + signature.signature[1:]

    assert not store.verify("artifacts", other_digest, signature)
    assert not store.verify(
        "artifacts",
        DIGEST,
        ArtifactSignatureValue(signature.algorithm, signature.key_id, flipped),
    )


def test_signature_from_another_key_does_not_verify(store: SecretStore) -> None:
    store.ensure_key("other", "ed25519")
    signature = store.sign("other", DIGEST)

    assert not store.verify("artifacts", DIGEST, signature)


def test_sign_refuses_anything_but_a_digest(store: SecretStore) -> None:
    with pytest.raises(InvalidArgumentError, match="SHA-256"):
        store.sign("artifacts", b"model.onnx bytes")


def test_rotation_keeps_old_signatures_and_ciphertexts_valid(store: SecretStore) -> None:
    old_signature = store.sign("artifacts", DIGEST)
    old_ciphertext = store.encrypt("envelope", b"kept", CONTEXT)

    assert store.rotate_key("artifacts") == 2
    assert store.rotate_key("envelope") == 2
    new_signature = store.sign("artifacts", DIGEST)

    assert new_signature.key_id != old_signature.key_id
    assert store.verify("artifacts", DIGEST, old_signature)
    assert store.verify("artifacts", DIGEST, new_signature)
    assert store.decrypt("envelope", old_ciphertext, CONTEXT) == b"kept"
    assert store.encrypt("envelope", b"new", CONTEXT).startswith((b"vault:v2:", b"local:v2:"))


def test_key_types_are_not_mixed(store: SecretStore) -> None:
    with pytest.raises(FailedPreconditionError):
        store.ensure_key("artifacts", "aes256-gcm96")
    with pytest.raises(FailedPreconditionError):
        store.sign("envelope", DIGEST)


def _load_ed25519(pem: str) -> Ed25519PublicKey:
    public = load_pem_public_key(pem.encode("ascii"))
    assert isinstance(public, Ed25519PublicKey)
    return public


def _absent_key_id(store: SecretStore, key_name: str) -> str:
    """A well-formed key id of this backend that names no version of ``key_name``."""
    return f"vault-transit/{key_name}/99" if store.backend == "vault" else "local/" + "ab" * 32


def _foreign_key_id(store: SecretStore, key_name: str) -> str:
    """A well-formed key id of the other backend."""
    return "local/" + "ab" * 32 if store.backend == "vault" else f"vault-transit/{key_name}/1"


def test_signature_verifies_offline_with_the_public_key_pem(store: SecretStore) -> None:
    signature = store.sign("artifacts", DIGEST)

    pem = store.public_key_pem("artifacts", signature.key_id)

    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert pem.endswith("-----END PUBLIC KEY-----\n")
    public = _load_ed25519(pem)
    public.verify(signature.signature, DIGEST)  # raises InvalidSignature if not
    with pytest.raises(InvalidSignature):
        public.verify(signature.signature, hashlib.sha256(b"tampered model").digest())


def test_public_keys_cover_every_version_after_rotation(store: SecretStore) -> None:
    old_signature = store.sign("artifacts", DIGEST)
    assert list(store.public_keys_pem("artifacts")) == [old_signature.key_id]

    store.rotate_key("artifacts")
    new_signature = store.sign("artifacts", DIGEST)
    keys = store.public_keys_pem("artifacts")

    assert list(keys) == [old_signature.key_id, new_signature.key_id]  # oldest first
    assert keys[old_signature.key_id] != keys[new_signature.key_id]
    assert store.public_key_pem("artifacts", old_signature.key_id) == keys[old_signature.key_id]
    old_public = _load_ed25519(keys[old_signature.key_id])
    old_public.verify(old_signature.signature, DIGEST)
    with pytest.raises(InvalidSignature):
        old_public.verify(new_signature.signature, DIGEST)
    _load_ed25519(keys[new_signature.key_id]).verify(new_signature.signature, DIGEST)


def test_public_key_of_an_unknown_key_or_version_is_not_found(store: SecretStore) -> None:
    with pytest.raises(NotFoundError) as caught:
        store.public_key_pem("artifacts", _absent_key_id(store, "artifacts"))
    assert caught.value.reason == "KEY_VERSION_NOT_FOUND"
    with pytest.raises(NotFoundError):
        store.public_key_pem("absent", _absent_key_id(store, "absent"))
    with pytest.raises(NotFoundError):
        store.public_keys_pem("absent")


@pytest.mark.parametrize("kind", ["foreign", "empty", "bare", "garbled"])
def test_key_id_of_another_backend_is_invalid(store: SecretStore, kind: str) -> None:
    key_id = {
        "foreign": _foreign_key_id(store, "artifacts"),
        "empty": "",
        "bare": "artifacts",
        "garbled": f"{store.sign('artifacts', DIGEST).key_id}/x",
    }[kind]

    with pytest.raises(InvalidArgumentError) as caught:
        store.public_key_pem("artifacts", key_id)
    assert caught.value.reason == "BAD_KEY_ID"


def test_public_key_of_an_encryption_key_is_refused(store: SecretStore) -> None:
    with pytest.raises(FailedPreconditionError):
        store.public_keys_pem("envelope")
    with pytest.raises(FailedPreconditionError):
        store.public_key_pem("envelope", _absent_key_id(store, "envelope"))


def test_public_key_refuses_a_bad_key_name(store: SecretStore) -> None:
    with pytest.raises(InvalidArgumentError):
        store.public_keys_pem("../artifacts")
    with pytest.raises(InvalidArgumentError):
        store.public_key_pem("../artifacts", _absent_key_id(store, "artifacts"))
