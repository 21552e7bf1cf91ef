"""A canary secret never shows in exception messages, reprs or log records."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from conveyor.shared.errors import ConveyorError
from conveyor.shared.secrets import (
    LocalSecretStore,
    SecretStore,
    SecretStoreSettings,
    VaultSecretStore,
)
from tests.secrets.conftest import ROLE_ID, ManualClock
from tests.support.fake_vault import FakeVault

CANARY = "canary-7f3a9c1e5b"
CONTEXT = b"models/churn"


def _exercise(store: SecretStore, seen: list[str]) -> None:
    """Every operation, successes and failures, recording what a caller could see."""
    store.ensure_key("artifacts", "ed25519")
    store.ensure_key("envelope", "aes256-gcm96")
    store.write_secret("canary/path", {"password": CANARY})
    assert store.read_secret("canary/path") == {"password": CANARY}
    ciphertext = store.encrypt("envelope", CANARY.encode(), CONTEXT)
    data_key = store.generate_data_key("envelope", CONTEXT)
    signature = store.sign("artifacts", hashlib.sha256(CANARY.encode()).digest())
    store.rotate_key("artifacts")
    seen += [repr(store), repr(data_key), repr(signature), ciphertext.decode()]
    failures = [
        lambda: store.decrypt("envelope", ciphertext, b"wrong context"),
        lambda: store.decrypt("envelope", ciphertext[:-8], CONTEXT),
        lambda: store.read_secret("canary/absent"),
        lambda: store.sign("envelope", b"\0" * 32),
        lambda: store.sign("artifacts", CANARY.encode()),
        lambda: store.encrypt("envelope", CANARY.encode(), b""),
    ]
    for failure in failures:
        with pytest.raises(ConveyorError) as caught:
            failure()
        seen += [str(caught.value), repr(caught.value), repr(caught.value.metadata)]


def _assert_clean(seen: list[str], caplog: pytest.LogCaptureFixture, *canaries: str) -> None:
    formatter = logging.Formatter("%(name)s %(message)s")
    logged = [formatter.format(record) for record in caplog.records]  # tracebacks included
    assert logged, "expected some log records"
    for canary in canaries:
        assert not [text for text in seen + logged if canary in text], canary


def test_local_store_never_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    _exercise(LocalSecretStore(tmp_path), seen)

    _assert_clean(seen, caplog, CANARY)


def test_vault_store_never_leaks(
    vault: FakeVault, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 and hvac included
    secret_id = "canary-secret-id-" + CANARY
    vault.add_approle(ROLE_ID, secret_id, ttl=60, max_ttl=90)
    store = VaultSecretStore(vault.url, role_id=ROLE_ID, secret_id=secret_id, clock=clock)
    seen: list[str] = []

    _exercise(store, seen)
    clock.advance(100)  # renewals and a new login happen along the way
    _exercise(store, seen)
    tokens = list(vault.tokens)
    bad = VaultSecretStore(vault.url, token=tokens[-1] + "x")
    with pytest.raises(ConveyorError) as caught:
        bad.read_secret("canary/path")
    seen += [str(caught.value), repr(bad)]
    url = vault.url
    vault.stop()
    with pytest.raises(ConveyorError) as caught:
        store.read_secret("canary/path")
    seen += [str(caught.value)]
    settings = SecretStoreSettings(
        backend="vault", vault_addr=url, vault_role_id=ROLE_ID, vault_secret_id=secret_id
    )
    seen += [repr(settings), str(settings)]

    _assert_clean(seen, caplog, CANARY, *tokens)
