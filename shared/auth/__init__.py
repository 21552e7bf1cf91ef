"""Who is calling, and whether they may: authentication and authorization for
every Conveyor server.

- :mod:`~conveyor.shared.auth.principal`: :class:`Principal`, :class:`Resource`,
  and :func:`caller` / :func:`caller_principal` for the call being served.
- :mod:`~conveyor.shared.auth.tokens`: JWT bearer tokens signed with keys from
  the secret store (:class:`TokenIssuer`, :class:`TokenVerifier`).
- :mod:`~conveyor.shared.auth.authorizer`: the :class:`Authorizer` protocol,
  :class:`PolicyServiceAuthorizer` and its :class:`DecisionCache`.
- :mod:`~conveyor.shared.auth.interceptor`: :class:`AuthInterceptor`.
- :mod:`~conveyor.shared.auth.credentials`: a service's own tokens, the
  interceptors a server needs (:func:`server_auth_interceptors`), developer
  tokens for ``conveyor up``.
- :mod:`~conveyor.shared.auth.settings`: :class:`AuthSettings`
  (``CONVEYOR_AUTH_*``).

Server-side only: the light client (``conveyor.shared.channel`` and
``conveyor.shared.client``) never imports this package.
"""

from __future__ import annotations

from conveyor.shared.auth.authorizer import (
    AuthorizationResult,
    Authorizer,
    DecisionCache,
    PolicyServiceAuthorizer,
    decision_cache_key,
)
from conveyor.shared.auth.credentials import (
    DEV_USERS,
    ServiceCredentials,
    default_resolver,
    server_auth_interceptors,
    service_channel,
    write_dev_credentials,
)
from conveyor.shared.auth.interceptor import (
    AuthInterceptor,
    ResourceResolver,
    default_resource,
    request_alias,
)
from conveyor.shared.auth.principal import (
    ANONYMOUS,
    ANONYMOUS_PRINCIPAL,
    Principal,
    Resource,
    caller,
    caller_principal,
    current_decision_id,
    current_principal,
    service_principal,
)
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.auth.tokens import (
    TOKEN_KEYS_SECRET,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    ensure_token_keys,
    rotate_token_key,
)

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_PRINCIPAL",
    "DEV_USERS",
    "TOKEN_KEYS_SECRET",
    "AuthInterceptor",
    "AuthSettings",
    "AuthorizationResult",
    "Authorizer",
    "DecisionCache",
    "PolicyServiceAuthorizer",
    "Principal",
    "Resource",
    "ResourceResolver",
    "ServiceCredentials",
    "TokenError",
    "TokenIssuer",
    "TokenVerifier",
    "caller",
    "caller_principal",
    "current_decision_id",
    "current_principal",
    "decision_cache_key",
    "default_resolver",
    "default_resource",
    "ensure_token_keys",
    "request_alias",
    "rotate_token_key",
    "server_auth_interceptors",
    "service_channel",
    "service_principal",
    "write_dev_credentials",
]
