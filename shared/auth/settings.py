"""Authentication and authorization settings (``CONVEYOR_AUTH_*``).

Every server's settings carry them as ``settings.auth``
(:class:`conveyor.shared.settings.ServiceSettings`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.shared.ports import default_address


class AuthSettings(BaseSettings):
    """How a server authenticates callers and asks the policy service about them."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_AUTH_",
        extra="forbid",
        use_attribute_docstrings=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    mode: Literal["enforce", "off"] = "enforce"
    """``enforce``: every call but health and reflection needs a valid bearer token
    (or a verified client certificate) and the policies' permission. ``off``: no
    checks, every caller is ``user:anonymous`` (local experiments only)."""

    service_token_ttl: timedelta = Field(default=timedelta(minutes=5), gt=timedelta(0))
    """Lifetime of the tokens a service issues itself to call its peers; they are
    renewed before 80% of it has passed."""

    user_token_ttl: timedelta = Field(default=timedelta(hours=8), gt=timedelta(0))
    """Lifetime of the developer tokens ``conveyor up`` writes."""

    decision_cache_ttl: timedelta = Field(default=timedelta(seconds=5), ge=timedelta(0))
    """Upper bound on how long a policy decision is reused for the same principal,
    action, resource and context (the policy service may ask for less); 0: ask
    every time."""

    decision_cache_size: int = Field(default=10_000, ge=0)
    """Most decisions kept (least recently used go first); 0: no cache."""

    issuer: str = Field(default="conveyor", min_length=1)
    """The ``iss`` claim of tokens issued and required of tokens accepted."""

    clock_leeway: timedelta = Field(default=timedelta(seconds=30), ge=timedelta(0))
    """Clock skew tolerated when checking a token's ``exp``, ``nbf`` and ``iat``."""

    policy_addr: str = Field(
        default_factory=lambda: default_address("policy"),
        validation_alias="CONVEYOR_POLICY_ADDR",
    )
    """The policy service (``host:port``) that decides each call
    (``CONVEYOR_POLICY_ADDR``, shared with the clients' setting)."""
