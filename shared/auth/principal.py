"""Who is calling, and what they act on.

:class:`Principal` and :class:`Resource` are the two sides of every policy
question: the authentication interceptor establishes the principal (from a
verified bearer token or mTLS client certificate), a service's resolver names
the resource, and the policy engine decides. The same types travel over the
wire as ``conveyor.policy.v1.Principal`` and ``Resource``.

While a call is served, :data:`current_principal` holds the principal the
interceptor authenticated; :func:`caller` reads it (for example to record
``created_by``), falling back to a verified client certificate and then to
``user:anonymous`` when authentication is off.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from conveyor.policy.v1 import resources_pb2
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import FieldViolation, InvalidArgumentError
from conveyor.shared.wellknown import struct_to_dict

MAX_PRINCIPAL_ID_CHARS: Final = 256
"""Longest principal id accepted (the contract's limit)."""

PRINCIPAL_KINDS: Final = ("user", "service")
"""The kinds of principal: a person or a service identity."""

SERVICE_ROLE: Final = "service"
"""The role every Conveyor service identity holds (the policies grant by it)."""

_KIND_TO_PROTO: Final = {
    "user": resources_pb2.PRINCIPAL_KIND_USER,
    "service": resources_pb2.PRINCIPAL_KIND_SERVICE,
}
_PROTO_TO_KIND: Final = {value: key for key, value in _KIND_TO_PROTO.items()}


@dataclass(frozen=True)
class Principal:
    """Who asks: a person (``user``) or a service identity (``service``)."""

    kind: str
    """``user`` or ``service``."""
    id: str
    """Stable identifier within its kind (a token's ``sub``, a certificate's CN)."""
    roles: tuple[str, ...] = ()
    """Roles as the policies name them (``data_scientist``, ``service``, ...)."""
    team: str = ""
    """The team the principal belongs to; empty for none."""

    @property
    def text(self) -> str:
        """The text form, ``{kind}:{id}``, for example ``user:alice``."""
        return f"{self.kind}:{self.id}"

    def to_proto(self) -> resources_pb2.Principal:
        """The wire form; a kind other than ``user``/``service`` becomes UNSPECIFIED."""
        return resources_pb2.Principal(
            id=self.id,
            kind=_KIND_TO_PROTO.get(self.kind, resources_pb2.PRINCIPAL_KIND_UNSPECIFIED),
            roles=list(self.roles),
            team=self.team,
        )

    @classmethod
    def from_proto(cls, message: resources_pb2.Principal, *, field: str = "principal") -> Principal:
        """The principal ``message`` describes; INVALID_ARGUMENT (naming ``field``)
        for an unspecified kind or an empty or over-long id."""
        violations = []
        kind = _PROTO_TO_KIND.get(message.kind)
        if kind is None:
            violations.append(FieldViolation(f"{field}.kind", "must be USER or SERVICE"))
        if not message.id:
            violations.append(FieldViolation(f"{field}.id", "is required"))
        elif len(message.id) > MAX_PRINCIPAL_ID_CHARS:
            violations.append(
                FieldViolation(f"{field}.id", f"is at most {MAX_PRINCIPAL_ID_CHARS} characters")
            )
        if violations or kind is None:
            raise InvalidArgumentError(
                "the principal is malformed", violations=violations, reason="BAD_PRINCIPAL"
            )
        return cls(kind=kind, id=message.id, roles=tuple(message.roles), team=message.team)


@dataclass(frozen=True)
class Resource:
    """What is acted on; ``type`` is ``{service}.conveyor.dev/{Kind}``."""

    type: str
    """For example ``registry.conveyor.dev/Model``."""
    name: str = ""
    """The resource name (``models/fraud``); for a create or list, the parent
    (empty for a top-level collection)."""
    owner_team: str = ""
    """The owning team as the serving service knows it; empty: unknown (policies
    that require ownership deny)."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Further facts the policies may use (``risk_tier``, ``compliance_tags``, ...);
    JSON-like values only, as they travel in a ``google.protobuf.Struct``."""

    def to_proto(self) -> resources_pb2.Resource:
        """The wire form (attributes as a ``Struct``)."""
        message = resources_pb2.Resource(name=self.name, type=self.type, owner_team=self.owner_team)
        if self.attributes:
            message.attributes.update(dict(self.attributes))
        return message

    @classmethod
    def from_proto(cls, message: resources_pb2.Resource, *, field: str = "resource") -> Resource:
        """The resource ``message`` describes (Struct numbers come back as floats);
        INVALID_ARGUMENT (naming ``field``) for an attribute that is NaN or infinite."""
        attributes: dict[str, Any] = {}
        if message.HasField("attributes"):
            attributes = struct_to_dict(message.attributes, field=f"{field}.attributes")
        return cls(
            type=message.type,
            name=message.name,
            owner_team=message.owner_team,
            attributes=attributes,
        )


ANONYMOUS_PRINCIPAL: Final = Principal(kind="user", id="anonymous")
"""Who a call is attributed to when nothing authenticated it (auth mode ``off``)."""

ANONYMOUS: Final = ANONYMOUS_PRINCIPAL.text
"""``user:anonymous``, the text form of :data:`ANONYMOUS_PRINCIPAL`."""

current_principal: ContextVar[Principal | None] = ContextVar(
    "conveyor_current_principal", default=None
)
"""The principal the authentication interceptor established for the call being
served; None outside a call or when authentication is off."""

current_decision_id: ContextVar[str | None] = ContextVar(
    "conveyor_current_decision_id", default=None
)
"""The id of the policy decision that allowed the call being served (recorded
with what the call creates, for example an approval); None outside a call, when
authentication is off, or when the authorizer recorded no decision."""


def caller(context: Any) -> Principal:
    """The principal behind the call being served.

    The interceptor's principal if it set one; else the verified client
    certificate's common name as ``service:{cn}`` (mTLS, where the server
    requires client certificates, so every certificate it sees is verified);
    else :data:`ANONYMOUS_PRINCIPAL`.
    """
    principal = current_principal.get()
    if principal is not None:
        return principal
    common_name = certificate_common_name(context)
    if common_name:
        return service_principal(common_name)
    return ANONYMOUS_PRINCIPAL


def caller_principal(context: Any) -> str:
    """The text form (``user:alice``) of :func:`caller`, as services record it."""
    return caller(context).text


def service_principal(name: str) -> Principal:
    """The principal of the Conveyor service (or backend) identity ``name``."""
    return Principal(kind="service", id=name, roles=(SERVICE_ROLE,))


def certificate_common_name(context: Any) -> str:
    """The common name of the client certificate of the call, or empty.

    gRPC puts a peer's certificate identity in the auth context only after the
    TLS handshake verified it against the server's client CA bundle.
    """
    auth_context = context.auth_context() or {}
    names = auth_context.get("x509_common_name") or []
    if not names:
        return ""
    value = names[0]
    name = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    if len(name) > MAX_PRINCIPAL_ID_CHARS:
        return ""
    return name


def model_attributes(model: registry_pb.Model) -> dict[str, Any]:
    """A registry model's governance facts as resource attributes for the
    policies (``risk_tier``, ``compliance_tags``)."""
    return {
        "risk_tier": registry_pb.RiskTier.Name(model.risk_tier),
        "compliance_tags": list(model.compliance_tags),
    }
