"""CONVEYOR_SECRETS_* settings and open_secret_store."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from conveyor.shared.secrets import (
    LocalSecretStore,
    SecretStoreSettings,
    VaultSecretStore,
    open_secret_store,
)
from tests.secrets.conftest import ROLE_ID, SECRET_ID
from tests.support.fake_vault import FakeVault


def test_local_is_the_default(tmp_path: Path) -> None:
    store = open_secret_store(SecretStoreSettings(), tmp_path)

    assert isinstance(store, LocalSecretStore)
    assert store.directory == tmp_path / "secrets"


def test_local_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SECRETS_LOCAL_DIR", str(tmp_path / "keys-here"))

    store = open_secret_store(SecretStoreSettings(), tmp_path)

    assert isinstance(store, LocalSecretStore)
    assert store.directory == tmp_path / "keys-here"


def test_vault_with_approle_from_the_environment(
    vault: FakeVault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_SECRETS_BACKEND", "vault")
    monkeypatch.setenv("CONVEYOR_SECRETS_VAULT_ADDR", vault.url)
    monkeypatch.setenv("CONVEYOR_SECRETS_VAULT_ROLE_ID", ROLE_ID)
    monkeypatch.setenv("CONVEYOR_SECRETS_VAULT_SECRET_ID", SECRET_ID)
    settings = SecretStoreSettings()

    store = open_secret_store(settings, tmp_path)
    store.write_secret("a", {"k": "v"})

    assert isinstance(store, VaultSecretStore)
    assert store.read_secret("a") == {"k": "v"}
    assert SECRET_ID not in repr(settings)
    assert SECRET_ID not in str(settings.model_dump())


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"vault_addr": "http://127.0.0.1:8200"},
        {"vault_addr": "http://127.0.0.1:8200", "vault_secret_id": "canary-sid-77"},
    ],
)
def test_incomplete_vault_settings_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as caught:
        SecretStoreSettings(backend="vault", **fields)  # type: ignore[arg-type]

    assert "canary-sid-77" not in str(caught.value)


def test_every_setting_is_documented() -> None:
    for name, info in SecretStoreSettings.model_fields.items():
        assert info.description, name
