"""Fixtures: a fake Vault with a clock the test moves, and a store of each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.shared.secrets import LocalSecretStore, SecretStore
from conveyor.shared.secrets.vault import VaultSecretStore
from tests.support.fake_vault import FakeVault

ROLE_ID = "conveyor-registry"
SECRET_ID = "approle-secret-id-0f3c"
TOKEN_TTL = 60.0
TOKEN_MAX_TTL = 150.0


class ManualClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def vault(clock: ManualClock) -> Iterator[FakeVault]:
    with FakeVault(clock=clock) as server:
        server.add_approle(ROLE_ID, SECRET_ID, ttl=TOKEN_TTL, max_ttl=TOKEN_MAX_TTL)
        yield server


@pytest.fixture
def approle_store(vault: FakeVault, clock: ManualClock) -> VaultSecretStore:
    return VaultSecretStore(
        vault.url, role_id=ROLE_ID, secret_id=SECRET_ID, timeout=5.0, clock=clock
    )


@pytest.fixture(params=["local", "vault"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, approle_store: VaultSecretStore
) -> SecretStore:
    """A store of each backend with a signing key ``artifacts`` and an encryption
    key ``envelope``, as an operator (or ``conveyor up``) would set them up."""
    chosen: SecretStore = (
        LocalSecretStore(tmp_path / "secrets") if request.param == "local" else approle_store
    )
    chosen.ensure_key("artifacts", "ed25519")
    chosen.ensure_key("envelope", "aes256-gcm96")
    return chosen
