"""VaultSecretStore through hvac against the fake Vault: auth, renewal, Vault's
formats, and how Vault's failures reach callers."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from conveyor.shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from conveyor.shared.secrets import SignatureAlgorithm
from conveyor.shared.secrets.vault import (
    VaultSecretStore,
    format_vault_signature,
    parse_vault_signature,
)
from tests.secrets.conftest import ROLE_ID, SECRET_ID, TOKEN_TTL, ManualClock
from tests.support.fake_vault import FakeVault

DIGEST = hashlib.sha256(b"model.onnx bytes").digest()


def _logins(vault: FakeVault) -> int:
    return vault.requests.count(("POST", "auth/approle/login"))


def _renewals(vault: FakeVault) -> int:
    return vault.requests.count(("POST", "auth/token/renew-self"))


def test_token_auth_reads_kv(vault: FakeVault) -> None:
    vault.kv["secret"]["registry/database"] = [
        {"data": {"password": "pw"}, "metadata": {"version": 1}}
    ]
    store = VaultSecretStore(vault.url, token=vault.issue_token())

    assert store.read_secret("registry/database") == {"password": "pw"}
    assert ("GET", "auth/token/lookup-self") in vault.requests


def test_approle_login_happens_once(vault: FakeVault, approle_store: VaultSecretStore) -> None:
    approle_store.write_secret("a", {"k": "v"})
    approle_store.read_secret("a")

    assert _logins(vault) == 1


def test_token_is_renewed_before_expiry(
    vault: FakeVault, approle_store: VaultSecretStore, clock: ManualClock
) -> None:
    approle_store.write_secret("a", {"k": "v"})
    clock.advance(TOKEN_TTL * 0.5)
    approle_store.read_secret("a")
    assert _renewals(vault) == 0

    clock.advance(TOKEN_TTL * 0.3)  # past two thirds of the lease
    approle_store.read_secret("a")
    assert _renewals(vault) == 1
    clock.advance(TOKEN_TTL * 0.5)  # beyond the original expiry: the renewal counted
    assert approle_store.read_secret("a") == {"k": "v"}
    assert _logins(vault) == 1


def test_logs_in_again_when_the_token_reaches_its_max_ttl(
    vault: FakeVault, approle_store: VaultSecretStore, clock: ManualClock
) -> None:
    approle_store.write_secret("a", {"k": "v"})
    for _ in range(8):  # 8 x 45 s: well past the 150 s max TTL
        clock.advance(45)
        assert approle_store.read_secret("a") == {"k": "v"}

    assert _logins(vault) >= 2
    assert _renewals(vault) >= 1


def test_logs_in_again_when_renewal_is_refused(
    vault: FakeVault, approle_store: VaultSecretStore, clock: ManualClock
) -> None:
    approle_store.write_secret("a", {"k": "v"})
    vault.tokens.clear()  # every token revoked
    clock.advance(TOKEN_TTL * 0.7)

    assert approle_store.read_secret("a") == {"k": "v"}
    assert _renewals(vault) == 1
    assert _logins(vault) == 2


def test_logs_in_again_when_a_call_is_refused(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    approle_store.write_secret("a", {"k": "v"})
    vault.tokens.clear()  # revoked, well before any renewal is due

    assert approle_store.read_secret("a") == {"k": "v"}
    assert _logins(vault) == 2


def test_bad_approle_credentials_are_unauthenticated(vault: FakeVault) -> None:
    store = VaultSecretStore(vault.url, role_id=ROLE_ID, secret_id="wrong")

    with pytest.raises(UnauthenticatedError) as caught:
        store.read_secret("a")
    assert "wrong" not in str(caught.value)


def test_bad_token_is_permission_denied(vault: FakeVault) -> None:
    store = VaultSecretStore(vault.url, token="hvs.not-a-token")

    with pytest.raises(PermissionDeniedError) as caught:
        store.read_secret("a")
    assert caught.value.metadata == {"backend": "vault", "operation": "read secret"}
    assert "hvs.not-a-token" not in str(caught.value)


def test_expired_token_is_permission_denied(vault: FakeVault, clock: ManualClock) -> None:
    token = vault.issue_token(ttl=30, max_ttl=30, renewable=False)
    store = VaultSecretStore(vault.url, token=token, clock=clock)
    store.write_secret("a", {"k": "v"})
    clock.advance(31)

    with pytest.raises(PermissionDeniedError):
        store.read_secret("a")


def test_server_down_is_unavailable(vault: FakeVault) -> None:
    url = vault.url
    vault.stop()
    store = VaultSecretStore(url, token="t", timeout=2.0)

    with pytest.raises(UnavailableError, match="cannot reach Vault"):
        store.read_secret("a")


def test_sealed_vault_is_unavailable(vault: FakeVault, approle_store: VaultSecretStore) -> None:
    approle_store.write_secret("a", {"k": "v"})
    original = vault.handle

    def sealed(*args: object) -> object:
        from tests.support.fake_vault import VaultHTTPError

        raise VaultHTTPError(503, "Vault is sealed")

    vault.handle = sealed  # type: ignore[assignment,method-assign]
    try:
        with pytest.raises(UnavailableError, match="sealed"):
            approle_store.read_secret("a")
    finally:
        vault.handle = original  # type: ignore[method-assign]


def test_signature_uses_vault_key_versions(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    approle_store.ensure_key("artifacts", "ed25519")
    first = approle_store.sign("artifacts", DIGEST)
    approle_store.rotate_key("artifacts")
    second = approle_store.sign("artifacts", DIGEST)

    assert first.key_id == "vault-transit/artifacts/1"
    assert second.key_id == "vault-transit/artifacts/2"
    # The raw bytes are Vault's signature: the fake's v1 public key verifies them.
    vault.transit["transit"]["artifacts"].versions[1].public_key().verify(first.signature, DIGEST)


def test_ecdsa_keys_sign_the_digest_prehashed(approle_store: VaultSecretStore) -> None:
    approle_store.ensure_key("ecdsa", "ecdsa-p256")
    signature = approle_store.sign("ecdsa", DIGEST)

    assert signature.algorithm == SignatureAlgorithm.ECDSA_P256_SHA256
    assert approle_store.verify("ecdsa", DIGEST, signature)
    assert not approle_store.verify("ecdsa", hashlib.sha256(b"x").digest(), signature)


def test_unknown_signature_version_does_not_verify(approle_store: VaultSecretStore) -> None:
    approle_store.ensure_key("artifacts", "ed25519")
    signature = approle_store.sign("artifacts", DIGEST)
    forged = type(signature)(signature.algorithm, "vault-transit/artifacts/9", signature.signature)

    assert not approle_store.verify("artifacts", DIGEST, forged)


def test_non_derived_encryption_key_is_refused(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    vault.create_key("plain", "aes256-gcm96", derived=False)

    with pytest.raises(FailedPreconditionError, match="derived"):
        approle_store.encrypt("plain", b"x", b"ctx")


def test_signing_with_a_missing_key_fails_clearly(approle_store: VaultSecretStore) -> None:
    with pytest.raises(NotFoundError, match="no Transit key named 'absent'"):
        approle_store.sign("absent", DIGEST)


def test_namespace_header_is_sent(vault: FakeVault) -> None:
    store = VaultSecretStore(vault.url, token=vault.root_token, namespace="ml/conveyor")
    store.write_secret("a", {"k": "v"})

    assert set(vault.namespaces) == {"ml/conveyor"}


def test_vault_signature_strings_parse() -> None:
    raw = bytes(range(64))
    text = format_vault_signature(3, raw)

    assert text == "vault:v3:" + base64.b64encode(raw).decode()
    assert parse_vault_signature(text) == (3, raw)
    for bad in ("vault:3:AAAA", "vault:v0:AAAA", "local:v1:AAAA", "vault:v1:***"):
        with pytest.raises(InvalidArgumentError):
            parse_vault_signature(bad)


def test_repr_shows_no_credentials(vault: FakeVault) -> None:
    store = VaultSecretStore(vault.url, role_id=ROLE_ID, secret_id=SECRET_ID)

    assert SECRET_ID not in repr(store)
    assert repr(store) == f"VaultSecretStore(addr='{vault.url}', auth='approle')"


def test_ecdsa_signature_verifies_offline_with_the_public_key_pem(
    approle_store: VaultSecretStore,
) -> None:
    approle_store.ensure_key("ecdsa", "ecdsa-p256")
    signature = approle_store.sign("ecdsa", DIGEST)

    public = load_pem_public_key(approle_store.public_key_pem("ecdsa", signature.key_id).encode())

    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    public.verify(signature.signature, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_public_keys_come_from_reading_the_key(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    approle_store.ensure_key("artifacts", "ed25519")
    approle_store.rotate_key("artifacts")
    vault.requests.clear()

    keys = approle_store.public_keys_pem("artifacts")

    assert vault.requests == [("GET", "transit/keys/artifacts")]
    assert list(keys) == ["vault-transit/artifacts/1", "vault-transit/artifacts/2"]
    for version in (1, 2):
        held = vault.transit["transit"]["artifacts"].versions[version].public_key()
        expected = held.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        assert keys[f"vault-transit/artifacts/{version}"] == expected


def test_key_id_of_another_vault_key_is_invalid(approle_store: VaultSecretStore) -> None:
    approle_store.ensure_key("artifacts", "ed25519")
    approle_store.ensure_key("other", "ed25519")
    signature = approle_store.sign("other", DIGEST)

    with pytest.raises(InvalidArgumentError, match="vault-transit/artifacts/<version>"):
        approle_store.public_key_pem("artifacts", signature.key_id)
    with pytest.raises(InvalidArgumentError):
        approle_store.public_key_pem("artifacts", "vault-transit/artifacts/0")


def test_versions_vault_no_longer_verifies_have_no_public_key(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    approle_store.ensure_key("artifacts", "ed25519")
    retired = approle_store.sign("artifacts", DIGEST)
    approle_store.rotate_key("artifacts")
    vault.transit["transit"]["artifacts"].min_decryption_version = 2

    assert not approle_store.verify("artifacts", DIGEST, retired)
    assert list(approle_store.public_keys_pem("artifacts")) == ["vault-transit/artifacts/2"]
    with pytest.raises(NotFoundError):
        approle_store.public_key_pem("artifacts", retired.key_id)


def test_derived_signing_key_has_no_public_key_per_version(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    vault.create_key("derived-signer", "ed25519", derived=True)

    with pytest.raises(FailedPreconditionError, match="derived"):
        approle_store.public_keys_pem("derived-signer")


def test_unusable_public_key_from_vault_is_refused(
    vault: FakeVault, approle_store: VaultSecretStore
) -> None:
    approle_store.ensure_key("artifacts", "ed25519")
    original = vault.handle

    def mangled(
        method: str, path: str, token: str | None, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        status, payload = original(method, path, token, body)
        payload["data"]["keys"]["1"]["public_key"] = "not base64 *"
        return status, payload

    vault.handle = mangled  # type: ignore[method-assign]
    try:
        with pytest.raises(FailedPreconditionError) as caught:
            approle_store.public_keys_pem("artifacts")
    finally:
        vault.handle = original  # type: ignore[method-assign]
    assert caught.value.reason == "BAD_PUBLIC_KEY"
