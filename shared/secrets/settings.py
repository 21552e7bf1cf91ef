"""Which secret store a process uses (``CONVEYOR_SECRETS_*``), and opening it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal, Self

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.shared.secrets.base import SecretStore


class SecretStoreSettings(BaseSettings):
    """The secret store of this process: the local key directory or Vault."""

    # hide_input_in_errors: a validation error must not echo a token or secret id.
    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_SECRETS_",
        extra="forbid",
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
    )

    backend: Literal["local", "vault"] = "local"
    """``local``: key files under ``local_dir`` (the embedded default); ``vault``:
    HashiCorp Vault at ``vault_addr`` (KV v2 and Transit)."""

    local_dir: Path | None = None
    """Directory of the local store's key files (0700, files 0600). Unset: the
    ``secrets`` folder of the suite's data directory, shared by its services so
    that what the registry signs, inference can verify."""

    vault_addr: str | None = None
    """Vault's address (``https://vault.internal:8200``). Required for ``vault``."""

    vault_token: SecretStr | None = None
    """A Vault token (renewed while it is renewable). Use AppRole in production."""

    vault_role_id: str | None = None
    """AppRole ``role_id``; with ``vault_secret_id`` it replaces ``vault_token``."""

    vault_secret_id: SecretStr | None = None
    """AppRole ``secret_id``."""

    vault_approle_mount: str = "approle"
    """Path the AppRole auth method is mounted at."""

    vault_kv_mount: str = "secret"
    """Path of the KV version 2 secrets engine holding Conveyor's secrets."""

    vault_transit_mount: str = "transit"
    """Path of the Transit secrets engine holding Conveyor's keys."""

    vault_namespace: str | None = None
    """Vault Enterprise namespace (sent as ``X-Vault-Namespace``); unset for none."""

    vault_ca_file: Path | None = None
    """PEM CA bundle that signs Vault's certificate; unset: the system's CAs."""

    vault_timeout: timedelta = timedelta(seconds=10)
    """Timeout of each HTTP request to Vault."""

    @model_validator(mode="after")
    def _check_vault(self) -> Self:
        if self.backend != "vault":
            return self
        if not self.vault_addr:
            raise ValueError("backend 'vault' needs CONVEYOR_SECRETS_VAULT_ADDR")
        approle = self.vault_role_id is not None or self.vault_secret_id is not None
        if approle and (self.vault_role_id is None or self.vault_secret_id is None):
            raise ValueError("AppRole needs both vault_role_id and vault_secret_id")
        if not approle and self.vault_token is None:
            raise ValueError(
                "backend 'vault' needs vault_token, or vault_role_id and vault_secret_id"
            )
        return self


def open_secret_store(settings: SecretStoreSettings, data_dir: Path) -> SecretStore:
    """The store ``settings`` describe; ``data_dir`` is the suite's data directory
    (the local store defaults to ``<data_dir>/secrets``)."""
    if settings.backend == "vault":
        from conveyor.shared.secrets.vault import VaultSecretStore  # hvac only when used

        assert settings.vault_addr is not None  # checked by the validator
        return VaultSecretStore(
            settings.vault_addr,
            token=_reveal(settings.vault_token),
            role_id=settings.vault_role_id,
            secret_id=_reveal(settings.vault_secret_id),
            approle_mount=settings.vault_approle_mount,
            kv_mount=settings.vault_kv_mount,
            transit_mount=settings.vault_transit_mount,
            namespace=settings.vault_namespace,
            timeout=settings.vault_timeout.total_seconds(),
            verify=str(settings.vault_ca_file) if settings.vault_ca_file else True,
        )
    from conveyor.shared.secrets.local import LocalSecretStore

    return LocalSecretStore(settings.local_dir or data_dir / "secrets")


def _reveal(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
