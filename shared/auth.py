"""Who is calling: the principal recorded as ``created_by`` / ``updated_by``.

A caller that presents a client certificate (mTLS) is ``service:{common name}``.
Bearer-token authentication and policy checks come with the policy service's
interceptor, which sets the principal for the call; until then every other
caller is ``user:anonymous``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

ANONYMOUS = "user:anonymous"

authenticated_principal: ContextVar[str | None] = ContextVar(
    "conveyor_authenticated_principal", default=None
)
"""Set by an authentication interceptor for the duration of a call."""


def caller_principal(context: Any) -> str:
    """The principal behind the call being served."""
    principal = authenticated_principal.get()
    if principal:
        return principal
    auth_context = context.auth_context() or {}
    common_names = auth_context.get("x509_common_name") or []
    if common_names:
        return f"service:{common_names[0].decode()}"
    return ANONYMOUS
