"""Bearer tokens: issued and verified with keys from the secret store."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import jwt
import pytest

from conveyor.shared.auth import (
    TOKEN_KEYS_SECRET,
    Principal,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    ensure_token_keys,
    rotate_token_key,
)
from conveyor.shared.auth.tokens import newest_kid, read_token_keys
from conveyor.shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnauthenticatedError,
    UnavailableError,
)
from conveyor.shared.secrets import LocalSecretStore
from tests.auth.support import ALICE, ManualClock

TTL = timedelta(minutes=5)
HOUR = 3600.0


def refused(
    verifier: TokenVerifier, token: str, reason: str, caplog: pytest.LogCaptureFixture
) -> TokenError:
    """The error ``token`` is refused with, after checking that the token itself
    is nowhere in it, nor in anything logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG), pytest.raises(TokenError) as raised:
        verifier.verify(token)
    error = raised.value
    assert isinstance(error, UnauthenticatedError)
    assert error.reason == reason, error.message
    if len(token) > 8:  # a fragment that short could match by chance
        exposed = [error.message, str(error), *error.metadata.values()]
        exposed += [record.getMessage() for record in caplog.records]
        exposed += [str(vars(record)) for record in caplog.records]
        signature = token.split(".")[-1]
        assert not any(token in text for text in exposed)
        assert len(signature) < 16 or not any(signature in text for text in exposed)
    return error


def shifted_clock(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


def test_a_token_names_its_principal_at_every_audience(
    issuer: TokenIssuer, secret_store: LocalSecretStore
) -> None:
    token = issuer.issue(ALICE, ["registry", "policy"], TTL)

    assert TokenVerifier(secret_store, "registry").verify(token) == ALICE
    assert TokenVerifier(secret_store, "policy").verify(token) == ALICE
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "conveyor"
    assert claims["sub"] == "alice"
    assert claims["aud"] == ["registry", "policy"]
    assert claims["exp"] - claims["iat"] == 300
    assert claims["nbf"] == claims["iat"]
    assert claims["jti"]
    assert (claims["kind"], claims["roles"], claims["team"]) == (
        "user",
        ["data_scientist"],
        "team-a",
    )


async def test_the_event_loop_variant_verifies_alike(
    issuer: TokenIssuer, secret_store: LocalSecretStore
) -> None:
    verifier = TokenVerifier(secret_store, "registry")
    token = issuer.issue(ALICE, ["registry"], TTL)
    assert await verifier.verify_async(token) == ALICE
    assert await verifier.verify_async(token) == ALICE  # from the cached keys
    with pytest.raises(TokenError):
        await verifier.verify_async(token + "x")


def test_an_expired_token_is_refused(
    secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    token = TokenIssuer(secret_store, clock=shifted_clock(-HOUR)).issue(ALICE, ["registry"], TTL)
    error = refused(TokenVerifier(secret_store, "registry"), token, "TOKEN_EXPIRED", caplog)
    assert "expired" in error.message


def test_a_token_not_valid_yet_is_refused_beyond_the_leeway(
    secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = TokenVerifier(secret_store, "registry", leeway=timedelta(seconds=30))
    early = TokenIssuer(secret_store, clock=shifted_clock(HOUR)).issue(ALICE, ["registry"], TTL)
    error = refused(verifier, early, "TOKEN_INVALID", caplog)
    assert "not valid yet" in error.message
    skewed = TokenIssuer(secret_store, clock=shifted_clock(10)).issue(ALICE, ["registry"], TTL)
    assert verifier.verify(skewed) == ALICE


def test_a_token_for_another_service_is_refused(
    issuer: TokenIssuer, secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.issue(ALICE, ["trainer"], TTL)
    error = refused(TokenVerifier(secret_store, "registry"), token, "TOKEN_WRONG_AUDIENCE", caplog)
    assert error.metadata == {"audience": "registry"}


def test_a_token_from_another_issuer_is_refused(
    secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    token = TokenIssuer(secret_store, issuer="elsewhere").issue(ALICE, ["registry"], TTL)
    error = refused(TokenVerifier(secret_store, "registry"), token, "TOKEN_INVALID", caplog)
    assert "issued by someone else" in error.message


def test_a_tampered_token_is_refused(
    issuer: TokenIssuer, secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = TokenVerifier(secret_store, "registry")
    token = issuer.issue(ALICE, ["registry"], TTL)
    header, payload, signature = token.split(".")

    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    refused(verifier, f"{header}.{payload}.{flipped}", "TOKEN_INVALID", caplog)

    # Promote oneself to security auditor of another team, keeping the signature.
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(roles=["security_auditor"], team="team-b")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    error = refused(verifier, f"{header}.{forged}.{signature}", "TOKEN_INVALID", caplog)
    assert "signature" in error.message


def test_a_token_signed_with_an_unknown_key_is_refused(
    secret_store: LocalSecretStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = LocalSecretStore(tmp_path / "other-deployment")
    token = TokenIssuer(elsewhere).issue(ALICE, ["registry"], TTL)
    ensure_token_keys(secret_store)
    error = refused(TokenVerifier(secret_store, "registry"), token, "TOKEN_INVALID", caplog)
    assert "unknown key" in error.message


def test_an_unsigned_token_is_refused(
    issuer: TokenIssuer, secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    genuine = issuer.issue(ALICE, ["registry"], TTL)
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": header["kid"]})
    error = refused(TokenVerifier(secret_store, "registry"), unsigned, "TOKEN_INVALID", caplog)
    assert "HS256" in error.message


@pytest.mark.parametrize(
    "garbage",
    ["", "not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.", "x" * 9000, "Bearer abc.def.ghi"],
)
def test_garbage_is_refused(
    secret_store: LocalSecretStore, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    refused(TokenVerifier(secret_store, "registry"), garbage, "TOKEN_INVALID", caplog)


def test_malformed_principal_claims_are_refused(
    secret_store: LocalSecretStore, caplog: pytest.LogCaptureFixture
) -> None:
    keys = ensure_token_keys(secret_store)
    kid = newest_kid(keys)
    now = int(time.time())
    claims = {
        "iss": "conveyor",
        "sub": "alice",
        "aud": ["registry"],
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": "1",
        "kind": "robot",
    }
    token = jwt.encode(claims, keys[kid], algorithm="HS256", headers={"kid": kid})
    error = refused(TokenVerifier(secret_store, "registry"), token, "TOKEN_INVALID", caplog)
    assert "principal claims" in error.message
    del claims["jti"]
    claims["kind"] = "user"
    token = jwt.encode(claims, keys[kid], algorithm="HS256", headers={"kid": kid})
    error = refused(TokenVerifier(secret_store, "registry"), token, "TOKEN_INVALID", caplog)
    assert "'jti'" in error.message


def test_rotation_keeps_old_tokens_valid_and_verifiers_learn_the_new_key(
    secret_store: LocalSecretStore,
) -> None:
    old_issuer = TokenIssuer(secret_store)
    before = old_issuer.issue(ALICE, ["registry"], TTL)
    verifier = TokenVerifier(secret_store, "registry")
    assert verifier.verify(before) == ALICE  # the verifier has read (and cached) the keys

    kid = rotate_token_key(secret_store)

    after = TokenIssuer(secret_store).issue(ALICE, ["registry"], TTL)
    assert jwt.get_unverified_header(after)["kid"] == kid
    assert jwt.get_unverified_header(before)["kid"] != kid
    assert verifier.verify(after) == ALICE  # unknown kid: keys re-read
    assert verifier.verify(before) == ALICE
    assert sorted(read_token_keys(secret_store)) == sorted(
        [jwt.get_unverified_header(before)["kid"], kid]
    )


def test_issuers_pick_up_a_rotation_once_their_keys_are_old(
    secret_store: LocalSecretStore,
) -> None:
    clock = ManualClock(time.time())
    issuer = TokenIssuer(secret_store, keys_max_age=timedelta(minutes=1), clock=clock)
    first = jwt.get_unverified_header(issuer.issue(ALICE, ["registry"], TTL))["kid"]
    rotated = rotate_token_key(secret_store)
    assert jwt.get_unverified_header(issuer.issue(ALICE, ["registry"], TTL))["kid"] == first
    clock.advance(61)
    assert jwt.get_unverified_header(issuer.issue(ALICE, ["registry"], TTL))["kid"] == rotated


class CountingStore(LocalSecretStore):
    """A local store that counts reads of the token keys."""

    reads = 0

    def read_secret(self, path: str) -> dict[str, str]:
        if path == TOKEN_KEYS_SECRET:
            self.reads += 1
        return super().read_secret(path)


def test_unknown_key_ids_re_read_the_store_at_a_bounded_rate(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "secrets")
    ensure_token_keys(store)
    verifier = TokenVerifier(store, "registry", refresh_burst=2)
    elsewhere = TokenIssuer(LocalSecretStore(tmp_path / "other"))
    foreign = [
        TokenIssuer(LocalSecretStore(tmp_path / f"other-{n}")).issue(ALICE, ["registry"], TTL)
        for n in range(5)
    ]
    store.reads = 0
    for token in [elsewhere.issue(ALICE, ["registry"], TTL), *foreign]:
        with pytest.raises(TokenError):
            verifier.verify(token)
    assert store.reads == 1 + 2  # the first read, then two refreshes at most


class FlakyStore(LocalSecretStore):
    """A local store that can be taken down."""

    down = False

    def read_secret(self, path: str) -> dict[str, str]:
        if self.down:
            raise UnavailableError("the secret store is down", reason="SECRET_STORE_UNAVAILABLE")
        return super().read_secret(path)


def test_known_keys_keep_working_while_the_store_is_down(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "secrets")
    clock = ManualClock()
    issuer = TokenIssuer(store, keys_max_age=timedelta(0))
    verifier = TokenVerifier(store, "registry", keys_max_age=timedelta(seconds=1), clock=clock)
    assert verifier.verify(issuer.issue(ALICE, ["registry"], TTL)) == ALICE

    store.down = True
    clock.advance(5)  # the verifier's keys are stale: it tries the store, and keeps them
    assert verifier.verify(issuer.issue(ALICE, ["registry"], TTL)) == ALICE
    with pytest.raises(UnavailableError):  # nothing known yet: no way to verify
        TokenVerifier(store, "registry").verify(issuer.issue(ALICE, ["registry"], TTL))
    with pytest.raises(UnavailableError):
        TokenIssuer(store).issue(ALICE, ["registry"], TTL)


def test_corrupt_keys_are_reported_without_their_value(secret_store: LocalSecretStore) -> None:
    secret_store.write_secret(TOKEN_KEYS_SECRET, {"v1-0000000a": "c2VjcmV0LXZhbHVl"})
    with pytest.raises(FailedPreconditionError) as raised:
        read_token_keys(secret_store)
    assert raised.value.reason == "CORRUPT_TOKEN_KEYS"
    assert "c2VjcmV0LXZhbHVl" not in raised.value.message


class RacingStore(LocalSecretStore):
    """A local store whose first read of the token keys waits for a rival's first
    read, so that both find no key and both create one (the worst interleaving)."""

    def __init__(self, directory: Path, barrier: threading.Barrier) -> None:
        super().__init__(directory)
        self._barrier = barrier
        self._first = True

    def read_secret(self, path: str) -> dict[str, str]:
        result = super().read_secret(path)
        if self._first:
            self._first = False
            self._barrier.wait(timeout=10)
        return result


def test_racing_first_starts_agree_on_one_signing_key(tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    stores = [RacingStore(tmp_path / "shared", barrier) for _ in range(2)]
    results: list[dict[str, bytes]] = []

    def start(store: LocalSecretStore) -> None:
        results.append(ensure_token_keys(store, settle=timedelta(milliseconds=200)))

    threads = [threading.Thread(target=start, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert len(results) == 2
    assert newest_kid(results[0]) == newest_kid(results[1])
    verifier = TokenVerifier(LocalSecretStore(tmp_path / "shared"), "registry")
    for store in stores:
        assert verifier.verify(TokenIssuer(store).issue(ALICE, ["registry"], TTL)) == ALICE


def test_issuing_needs_an_audience_a_lifetime_and_a_principal(issuer: TokenIssuer) -> None:
    with pytest.raises(InvalidArgumentError, match="audience"):
        issuer.issue(ALICE, [], TTL)
    with pytest.raises(InvalidArgumentError, match="audience"):
        issuer.issue(ALICE, "registry", TTL)
    with pytest.raises(InvalidArgumentError, match="lifetime"):
        issuer.issue(ALICE, ["registry"], timedelta(0))
    with pytest.raises(InvalidArgumentError, match="principal"):
        issuer.issue(Principal(kind="robot", id="r2"), ["registry"], TTL)
