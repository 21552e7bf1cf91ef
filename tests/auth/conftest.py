"""Fixtures for the auth tests: a local secret store, an issuer, the real policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.services.policy.engine import PolicyEngine
from conveyor.shared.auth import TokenIssuer
from conveyor.shared.secrets import LocalSecretStore
from tests.auth.support import POLICY_DIR, EngineAuthorizer


@pytest.fixture(scope="session")
def policy_engine() -> PolicyEngine:
    return PolicyEngine.load(POLICY_DIR)


@pytest.fixture
def engine_authorizer(policy_engine: PolicyEngine) -> EngineAuthorizer:
    return EngineAuthorizer(policy_engine)


@pytest.fixture
def secret_store(tmp_path: Path) -> LocalSecretStore:
    return LocalSecretStore(tmp_path / "secrets")


@pytest.fixture
def issuer(secret_store: LocalSecretStore) -> TokenIssuer:
    return TokenIssuer(secret_store)
