"""Bearer tokens: short-lived JWTs signed with keys from the secret store.

Tokens are HS256 JWTs. The signing keys live in the secret store's KV secret
:data:`TOKEN_KEYS_SECRET` as ``{kid: urlsafe-base64 32-byte key}``, so every
service of a deployment (sharing one store) can issue and verify them without
a key server. The newest key signs; every key verifies, so a rotation
(:func:`rotate_token_key`) never invalidates tokens already handed out, and a
verifier that meets a key id it does not know re-reads the keys (at a bounded
rate, so random key ids cannot hammer the store).

Claims: ``iss``, ``sub`` (the principal id), ``aud`` (a list of service short
names: a token for the registry is no good at the policy service), ``iat``,
``nbf``, ``exp``, ``jti``, and Conveyor's ``kind``, ``roles`` and ``team``.

A token is a credential: it never appears in an exception message, a log line
or a ``repr`` here; errors say what is wrong with it, never what it is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final

import jwt

from conveyor.shared.auth.principal import MAX_PRINCIPAL_ID_CHARS, PRINCIPAL_KINDS, Principal
from conveyor.shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from conveyor.shared.secrets.base import SecretStore

logger = logging.getLogger(__name__)

TOKEN_KEYS_SECRET: Final = "conveyor/auth/token-keys"
"""KV path of the token signing keys in the secret store."""

DEFAULT_ISSUER: Final = "conveyor"
"""The ``iss`` of tokens Conveyor issues."""

ALGORITHM: Final = "HS256"
"""The only signature algorithm issued and accepted (``none`` never is)."""

KEY_BYTES: Final = 32
"""Length of each raw HMAC key."""

MAX_TOKEN_CHARS: Final = 8192
"""Longer bearer values are refused before any parsing."""

REQUIRED_CLAIMS: Final = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti")
"""Claims a token must carry to be accepted."""

_KID = re.compile(r"^v(\d{1,12})-([0-9a-f]{8})\Z")
_SETTLE = timedelta(milliseconds=100)


class TokenError(UnauthenticatedError):
    """A bearer token was refused; ``reason`` says why (never what it was)."""

    default_reason = "TOKEN_INVALID"


# Keys ----------------------------------------------------------------------------


def read_token_keys(store: SecretStore) -> dict[str, bytes]:
    """The stored token keys, ``{kid: raw key}``; empty when there are none yet.

    Blocks (store I/O). FailedPreconditionError when the stored value is not a
    key map (without quoting it).
    """
    try:
        stored = store.read_secret(TOKEN_KEYS_SECRET)
    except NotFoundError:
        return {}
    keys: dict[str, bytes] = {}
    for kid, encoded in stored.items():
        try:
            raw = base64.urlsafe_b64decode(encoded.encode("ascii"))
        except (ValueError, binascii.Error):
            raw = b""
        if not _KID.match(kid) or len(raw) != KEY_BYTES:
            raise FailedPreconditionError(
                f"the token keys at {TOKEN_KEYS_SECRET!r} hold an entry that is not a "
                f"{KEY_BYTES}-byte key under a Conveyor key id",
                reason="CORRUPT_TOKEN_KEYS",
            )
        keys[kid] = raw
    return keys


def ensure_token_keys(store: SecretStore, *, settle: timedelta = _SETTLE) -> dict[str, bytes]:
    """The token keys, creating the first one when the store has none.

    Two processes starting at once on an empty store may both create a key and
    the store keeps one map (the KV interface has no compare-and-set). So after
    writing, this waits ``settle`` for a racing writer to land and re-reads:
    every racer then signs with the newest stored key, and none keeps using a
    key that lost the race. Blocks (store I/O).
    """
    keys = read_token_keys(store)
    if keys:
        return keys
    kid = _next_kid({})
    _write_token_keys(store, {**read_token_keys(store), kid: secrets.token_bytes(KEY_BYTES)})
    logger.info("created the first token signing key", extra={"kid": kid})
    if settle > timedelta(0):
        time.sleep(settle.total_seconds())
    return read_token_keys(store)


def rotate_token_key(store: SecretStore) -> str:
    """Add a new signing key and return its key id.

    New tokens are signed with it; tokens signed with older keys keep verifying
    until they expire. Blocks (store I/O).
    """
    keys = read_token_keys(store)
    kid = _next_kid(keys)
    keys[kid] = secrets.token_bytes(KEY_BYTES)
    _write_token_keys(store, keys)
    logger.info("rotated the token signing key", extra={"kid": kid, "keys": len(keys)})
    return kid


def newest_kid(keys: Mapping[str, bytes]) -> str:
    """The key id that signs: the highest version (ties, from a creation race,
    broken by the random suffix so that every process picks the same one)."""
    return max(keys, key=_kid_order)


def _next_kid(keys: Mapping[str, bytes]) -> str:
    version = _kid_order(newest_kid(keys))[0] + 1 if keys else 1
    return f"v{version}-{secrets.token_hex(4)}"


def _kid_order(kid: str) -> tuple[int, str]:
    match = _KID.match(kid)
    return (int(match.group(1)), match.group(2)) if match else (0, kid)


def _write_token_keys(store: SecretStore, keys: Mapping[str, bytes]) -> None:
    store.write_secret(
        TOKEN_KEYS_SECRET,
        {kid: base64.urlsafe_b64encode(raw).decode("ascii") for kid, raw in keys.items()},
    )


# Issuing -------------------------------------------------------------------------


class TokenIssuer:
    """Issues tokens signed with the newest key of the store.

    The keys are read on first use (creating the first key if needed) and
    re-read once they are older than ``keys_max_age``, so a rotation made by
    another process is picked up; while the store cannot be reached, the key
    already read keeps signing. ``clock`` (seconds since the epoch) sets
    ``iat``/``nbf``/``exp``; tests move it.
    """

    def __init__(
        self,
        store: SecretStore,
        issuer: str = DEFAULT_ISSUER,
        *,
        keys_max_age: timedelta = timedelta(minutes=1),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.issuer = issuer
        self._keys_max_age = keys_max_age.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        self._signing: tuple[str, bytes] | None = None
        self._read_at = 0.0

    def __repr__(self) -> str:
        return f"TokenIssuer(issuer={self.issuer!r}, store={self.store!r})"

    def issue(self, principal: Principal, audiences: Sequence[str], ttl: timedelta) -> str:
        """A token for ``principal``, valid at the services ``audiences`` for ``ttl``.

        Blocks when the keys need reading (first use, or older than
        ``keys_max_age``).
        """
        if isinstance(audiences, str) or not audiences or not all(audiences):
            raise InvalidArgumentError(
                "a token needs one or more audiences (service short names)",
                reason="BAD_TOKEN_AUDIENCE",
            )
        if ttl <= timedelta(0):
            raise InvalidArgumentError("a token's lifetime must be positive", reason="BAD_TTL")
        if principal.kind not in PRINCIPAL_KINDS or not principal.id:
            raise InvalidArgumentError(
                "a token is issued to a user or service principal with an id",
                reason="BAD_PRINCIPAL",
            )
        kid, key = self._signing_key()
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": principal.id,
            "aud": list(audiences),
            "iat": now,
            "nbf": now,
            "exp": now + max(1, int(ttl.total_seconds())),
            "jti": uuid.uuid4().hex,
            "kind": principal.kind,
            "roles": list(principal.roles),
            "team": principal.team,
        }
        return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})

    def _signing_key(self) -> tuple[str, bytes]:
        with self._lock:
            now = self._clock()
            if self._signing is None or now - self._read_at >= self._keys_max_age:
                try:
                    keys = ensure_token_keys(self.store)
                    kid = newest_kid(keys)
                    self._signing = (kid, keys[kid])
                except UnavailableError:
                    if self._signing is None:
                        raise
                    # A store outage must not stop a running service: keep signing
                    # with the key already known, and try again later.
                    logger.warning(
                        "token keys could not be re-read; signing with the cached key",
                        extra={"backend": self.store.backend},
                    )
                self._read_at = now
            return self._signing


# Verifying -----------------------------------------------------------------------


class TokenVerifier:
    """Verifies tokens meant for one service (``audience``, its short name).

    Raises :class:`TokenError` (an UnauthenticatedError) with reason
    ``TOKEN_EXPIRED``, ``TOKEN_WRONG_AUDIENCE`` or ``TOKEN_INVALID`` (malformed,
    tampered, not yet valid, wrong issuer, unknown key, any algorithm but
    HS256). ``leeway`` absorbs clock skew between hosts.

    Keys are cached; they are re-read when older than ``keys_max_age`` and when
    a token names an unknown key id (a rotation by another process), at most
    ``refresh_burst`` times per ``refresh_window`` for the latter. While the
    store cannot be reached, the keys already read keep verifying (with none
    read yet, UnavailableError). ``clock`` is monotonic seconds, for those
    timings only.
    """

    def __init__(
        self,
        store: SecretStore,
        audience: str,
        issuer: str = DEFAULT_ISSUER,
        leeway: timedelta = timedelta(seconds=30),
        *,
        keys_max_age: timedelta = timedelta(minutes=5),
        refresh_burst: int = 3,
        refresh_window: timedelta = timedelta(seconds=10),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not audience:
            raise ValueError("a verifier needs its service's audience")
        self.store = store
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._keys_max_age = keys_max_age.total_seconds()
        self._refresh_burst = refresh_burst
        self._refresh_window = refresh_window.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        self._read_at: float | None = None
        self._refreshes: deque[float] = deque()

    def __repr__(self) -> str:
        return f"TokenVerifier(audience={self.audience!r}, issuer={self.issuer!r})"

    def verify(self, token: str) -> Principal:
        """The principal ``token`` was issued to. Blocks when keys need reading."""
        kid = self._key_id(token)
        key = self._cached_key(kid)
        if key is None:
            key = self._load_key(kid)
        return self._decode(token, key)

    async def verify_async(self, token: str) -> Principal:
        """:meth:`verify` for the event loop: store reads happen in a thread."""
        kid = self._key_id(token)
        key = self._cached_key(kid)
        if key is None:
            key = await asyncio.to_thread(self._load_key, kid)
        return self._decode(token, key)

    def _key_id(self, token: str) -> str:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise _invalid("the bearer token is empty or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("the bearer token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise _invalid(f"the bearer token is not signed with {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.match(kid):
            raise _invalid("the bearer token names no valid signing key id")
        return kid

    def _cached_key(self, kid: str) -> bytes | None:
        """The key for ``kid`` without any I/O, or None when the store must be read."""
        if self._read_at is None or self._clock() - self._read_at >= self._keys_max_age:
            return None
        return self._keys.get(kid)

    def _load_key(self, kid: str) -> bytes:
        """The key for ``kid``, reading the store when the cache is stale or (rate
        limited) does not know ``kid``. Blocks."""
        with self._lock:
            now = self._clock()
            stale = self._read_at is None or now - self._read_at >= self._keys_max_age
            if stale or (kid not in self._keys and self._may_refresh(now)):
                try:
                    self._keys = read_token_keys(self.store)
                except UnavailableError:
                    if not self._keys:
                        raise
                    # Keep verifying with the keys already known while the store is
                    # down; they are re-read once it is back.
                    logger.warning(
                        "token keys could not be re-read; verifying with the cached keys",
                        extra={"backend": self.store.backend},
                    )
                self._read_at = now
            key = self._keys.get(kid)
        if key is None:
            raise _invalid("the bearer token is signed with an unknown key")
        return key

    def _may_refresh(self, now: float) -> bool:
        while self._refreshes and now - self._refreshes[0] >= self._refresh_window:
            self._refreshes.popleft()
        if len(self._refreshes) >= self._refresh_burst:
            return False
        self._refreshes.append(now)
        return True

    def _decode(self, token: str, key: bytes) -> Principal:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the bearer token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise TokenError(
                f"the bearer token is not meant for the {self.audience} service",
                reason="TOKEN_WRONG_AUDIENCE",
                metadata={"audience": self.audience},
            ) from None
        except jwt.InvalidSignatureError:
            raise _invalid("the bearer token's signature does not verify") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("the bearer token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise _invalid("the bearer token was issued by someone else") from None
        except jwt.MissingRequiredClaimError as error:
            raise _invalid(f"the bearer token lacks the {error.claim!r} claim") from None
        except jwt.PyJWTError:
            raise _invalid("the bearer token is not valid") from None
        return _principal(claims)


def _principal(claims: Mapping[str, Any]) -> Principal:
    subject, kind = claims.get("sub"), claims.get("kind")
    roles, team = claims.get("roles", []), claims.get("team", "")
    if (
        not isinstance(subject, str)
        or not 0 < len(subject) <= MAX_PRINCIPAL_ID_CHARS
        or kind not in PRINCIPAL_KINDS
        or not isinstance(roles, list)
        or not all(isinstance(role, str) for role in roles)
        or not isinstance(team, str)
    ):
        raise _invalid("the bearer token's principal claims are malformed")
    return Principal(kind=str(kind), id=subject, roles=tuple(roles), team=team)


def _invalid(message: str) -> TokenError:
    return TokenError(message, reason="TOKEN_INVALID")
