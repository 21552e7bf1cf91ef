"""The life of a Vault token: AppRole login, renewal before expiry, re-login.

The token is renewed (``auth/token/renew-self``) once two thirds of its lease have
passed, as Vault Agent does. With AppRole credentials, a refused renewal, a
renewal capped near the token's max TTL, or a token Vault stopped accepting leads
to a fresh login; a plain token is used until Vault refuses it. The token and the
secret id stay inside the hvac client and this object, never in a message or log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import hvac.exceptions

from conveyor.shared.errors import UnauthenticatedError

logger = logging.getLogger(__name__)

RENEW_AFTER = 2 / 3
"""Renew once this share of the token's lease has passed."""


class VaultTokenKeeper:
    """Keeps ``client``'s token valid; :meth:`ensure` before each request."""

    def __init__(
        self,
        client: Any,
        *,
        approle: tuple[str, str] | None,
        approle_mount: str,
        clock: Callable[[], float],
    ) -> None:
        self._client = client  # hvac.Client (untyped)
        self._approle = approle
        self._approle_mount = approle_mount
        self._clock = clock
        self._lock = threading.Lock()
        self._authenticated = False
        self._lease = 0.0  # seconds granted by the last login or renewal; 0 = no expiry
        self._renew_at: float | None = None

    def __repr__(self) -> str:
        return f"VaultTokenKeeper(auth={self.method!r})"

    @property
    def method(self) -> str:
        """``approle`` or ``token``."""
        return "approle" if self._approle is not None else "token"

    def ensure(self) -> None:
        """Log in, or renew the token when its renewal is due."""
        with self._lock:
            if not self._authenticated:
                if self._approle is not None:
                    self._login()
                else:
                    data = self._client.auth.token.lookup_self()["data"]
                    self._granted(float(data.get("ttl") or 0), bool(data.get("renewable")))
            elif self._renew_at is not None and self._clock() >= self._renew_at:
                self._renew()

    def login_again(self) -> bool:
        """After Vault refused the token: log in again if AppRole allows (True)."""
        if self._approle is None:
            return False
        with self._lock:
            self._login()
        return True

    def _renew(self) -> None:
        try:
            auth = self._client.auth.token.renew_self()["auth"]
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
            if self._approle is None:
                logger.warning("Vault refused to renew the token; it will expire")
                self._renew_at = None
                return
            logger.info("Vault refused to renew the token; logging in again")
            self._login()
            return
        lease = float(auth.get("lease_duration") or 0)
        if self._approle is not None and 0 < lease < self._lease * (1 - RENEW_AFTER):
            logger.info("Vault token is near its max TTL; logging in again")
            self._login()
            return
        self._granted(lease, bool(auth.get("renewable")))

    def _login(self) -> None:
        assert self._approle is not None
        role_id, secret_id = self._approle
        try:
            response = self._client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=self._approle_mount
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as error:
            raise UnauthenticatedError(
                "Vault refused the AppRole login (check role_id and secret_id)",
                reason="VAULT_LOGIN_REFUSED",
                metadata={"backend": "vault"},
            ) from error
        auth = response["auth"]
        self._granted(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))
        logger.info("logged in to Vault with AppRole (lease %ss)", auth.get("lease_duration"))

    def _granted(self, lease: float, renewable: bool) -> None:
        """Record a fresh lease of ``lease`` seconds (0: the token never expires)."""
        self._authenticated = True
        self._lease = lease
        can_refresh = renewable or self._approle is not None
        self._renew_at = self._clock() + lease * RENEW_AFTER if lease and can_refresh else None
