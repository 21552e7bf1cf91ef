"""The authentication and authorization interceptor every Conveyor server runs.

For each call (health and reflection excepted, so probes and tooling work
without credentials) :class:`AuthInterceptor`:

1. authenticates the caller: ``authorization: Bearer <jwt>`` verified by the
   :class:`~conveyor.shared.auth.tokens.TokenVerifier`, else, where the server
   requires client certificates, the verified certificate's common name as
   ``service:{cn}``; neither gives UNAUTHENTICATED;
2. names what the call acts on through the service's resolver (the registry,
   for example, adds the model's owner team), and asks the authorizer whether
   the principal may perform ``{service}.{Method}`` on it; a deny gives
   PERMISSION_DENIED with the policies' reasons and the decision id;
3. runs the handler with :data:`~conveyor.shared.auth.principal.current_principal`
   (and ``current_decision_id``) set, so the service records who acted and
   under which decision.

A method that reads a request stream is authorized on its first message (where
Conveyor's uploads carry their metadata). It runs inside the error-mapping
interceptor, so the errors it raises reach the caller as proper statuses.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from conveyor.shared.auth.authorizer import Authorizer
from conveyor.shared.auth.principal import (
    Principal,
    Resource,
    certificate_common_name,
    current_decision_id,
    current_principal,
    service_principal,
)
from conveyor.shared.auth.tokens import TokenVerifier
from conveyor.shared.errors import PermissionDeniedError, UnauthenticatedError

logger = logging.getLogger(__name__)

ResourceResolver = Callable[[str, Message], Awaitable[Resource]]
"""Names the resource of a call from its method name (``SetAlias``) and request.

It should not raise for a resource that does not exist: it returns it with an
empty ``owner_team`` so that the policies decide, and the handler then reports
NOT_FOUND only to callers allowed to learn it. Start from
:func:`default_resource`.
"""

OPEN_METHOD_PREFIXES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
"""Methods served without credentials: health probes (gRPC's and the Open
Inference Protocol's, which load balancers and Triton clients poll) and server
reflection."""

_ALIAS_NAME = re.compile(r"^models/[^/]+/aliases/([^/]+)\Z")

if TYPE_CHECKING:  # grpc-stubs makes these generic; at run time they are not
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_ServerInterceptor):
    """Authenticates and authorizes each call to the server of ``service``.

    ``service`` is the short name in actions (``registry`` in
    ``registry.SetAlias``) and the audience tokens must name.
    ``trust_client_certificates``: accept a client certificate's common name as
    the principal when no token is sent; only for servers that require and
    verify client certificates (mTLS).
    """

    def __init__(
        self,
        service: str,
        verifier: TokenVerifier,
        authorizer: Authorizer,
        resolver: ResourceResolver,
        *,
        trust_client_certificates: bool = False,
    ) -> None:
        self.service = service
        self.verifier = verifier
        self.authorizer = authorizer
        self.resolver = resolver
        self.trust_client_certificates = trust_client_certificates

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or full_method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        call = _Call(
            self,
            method=full_method.rpartition("/")[2],
            metadata=handler_call_details.invocation_metadata or (),
        )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                call.unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                call.unary_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        empty = _empty_request(handler)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                call.stream(handler.stream_unary, empty),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                call.stream_stream(handler.stream_stream, empty),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def close(self) -> None:
        """Release what the authorizer holds (its channel to the policy service)."""
        close = getattr(self.authorizer, "close", None)
        if close is not None:
            await close()

    async def authenticate(self, metadata: Sequence[Any], context: Any) -> tuple[Principal, str]:
        """The caller and how it proved who it is (``jwt`` or ``mtls``)."""
        values = [str(item[1]) for item in metadata if str(item[0]).lower() == "authorization"]
        if values:
            scheme, _, token = values[0].strip().partition(" ")
            if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
                raise UnauthenticatedError(
                    "send exactly one 'authorization: Bearer <token>' metadata entry",
                    reason="BAD_AUTHORIZATION_METADATA",
                )
            return await self.verifier.verify_async(token.strip()), "jwt"
        if self.trust_client_certificates:
            common_name = certificate_common_name(context)
            if common_name:
                return service_principal(common_name), "mtls"
        raise UnauthenticatedError(
            "this call needs credentials: a bearer token in the 'authorization' metadata"
            + (" or a client certificate" if self.trust_client_certificates else ""),
            reason="CREDENTIALS_MISSING",
        )

    async def authorize(
        self, principal: Principal, authn_method: str, method: str, request: Any
    ) -> str:
        """The id of the decision that allows the call; PermissionDeniedError unless
        the policies allow it."""
        action = f"{self.service}.{method}"
        resource = await self.resolver(method, request)
        facts = {"authn_method": authn_method}
        alias = request_alias(request)
        if alias:
            facts["alias"] = alias
        result = await self.authorizer.authorize(principal, action, resource, facts)
        if result.allowed:
            return result.decision_id
        logger.info(
            "call refused by policy",
            extra={
                "principal": principal.text,
                "action": action,
                "resource": resource.name,
                "decision_id": result.decision_id,
            },
        )
        message = "; ".join(result.reasons) or (
            f"{principal.text} may not {action} on {resource.name or resource.type}"
        )
        raise PermissionDeniedError(
            message,
            reason="POLICY_DENIED",
            metadata={
                "action": action,
                "principal": principal.text,
                "decision_id": result.decision_id,
                "policy_ids": ",".join(result.policy_ids),
            },
        )


class _Call:
    """The wrappers of one method's behaviour (one per call of the method)."""

    def __init__(
        self, interceptor: AuthInterceptor, *, method: str, metadata: Sequence[Any]
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._metadata = metadata

    async def _admit(self, request: Any, context: Any) -> _Admission:
        principal, authn_method = await self._interceptor.authenticate(self._metadata, context)
        decision_id = await self._interceptor.authorize(
            principal, authn_method, self._method, request
        )
        return _Admission(principal, decision_id)

    def unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def admitted(request: Any, context: Any) -> Any:
            admission = (await self._admit(request, context)).enter()
            try:
                return await behavior(request, context)
            finally:
                admission.exit()

        return admitted

    def unary_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            return self.unary(behavior)  # writes with context.write(): a coroutine

        async def admitted(request: Any, context: Any) -> AsyncIterator[Any]:
            admission = (await self._admit(request, context)).enter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                admission.exit()

        return admitted

    async def _admit_stream(
        self, requests: AsyncIterator[Any], empty: Any, context: Any
    ) -> tuple[_Admission, AsyncIterator[Any]]:
        """Authenticate before reading anything, authorize on the first message,
        and give the handler the whole stream, first message included."""
        principal, authn_method = await self._interceptor.authenticate(self._metadata, context)
        iterator = aiter(requests)
        first = await anext(iterator, None)
        request = empty if first is None else first
        decision_id = await self._interceptor.authorize(
            principal, authn_method, self._method, request
        )
        return _Admission(principal, decision_id), _prepend(first, iterator)

    def stream(self, behavior: Callable[..., Any], empty: Any) -> Callable[..., Any]:
        async def admitted(requests: AsyncIterator[Any], context: Any) -> Any:
            admission, stream = await self._admit_stream(requests, empty, context)
            admission.enter()
            try:
                return await behavior(stream, context)
            finally:
                admission.exit()

        return admitted

    def stream_stream(self, behavior: Callable[..., Any], empty: Any) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            return self.stream(behavior, empty)

        async def admitted(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            admission, stream = await self._admit_stream(requests, empty, context)
            admission.enter()
            try:
                async for response in behavior(stream, context):
                    yield response
            finally:
                admission.exit()

        return admitted


class _Admission:
    """An admitted call's principal and decision, set in the context while the
    handler runs."""

    def __init__(self, principal: Principal, decision_id: str) -> None:
        self.principal = principal
        self.decision_id = decision_id
        self._tokens: tuple[Token[Principal | None], Token[str | None]] | None = None

    def enter(self) -> _Admission:
        self._tokens = (
            current_principal.set(self.principal),
            current_decision_id.set(self.decision_id or None),
        )
        return self

    def exit(self) -> None:
        if self._tokens is None:
            return
        principal_token, decision_token = self._tokens
        # A streaming handler abandoned mid-way may be finalised outside the call's
        # context, where a reset does not apply (and the call's context is gone).
        with contextlib.suppress(ValueError):
            current_decision_id.reset(decision_token)
            current_principal.reset(principal_token)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


def _empty_request(handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    """The method's request type, empty: what an empty request stream is judged on."""
    deserializer = handler.request_deserializer
    return deserializer(b"") if deserializer is not None else b""


# Resources -----------------------------------------------------------------------

RESOURCE_COLLECTIONS: Final[Mapping[str, Mapping[str, str]]] = {
    "registry": {"models": "Model", "versions": "ModelVersion", "attachments": "Attachment"},
    "trainer": {"datasets": "Dataset", "trainingJobs": "TrainingJob", "sweepJobs": "SweepJob"},
    "optimizer": {"optimizationJobs": "OptimizationJob"},
    "inference": {"deployments": "Deployment", "models": "Model"},
    "monitor": {
        "models": "Model",
        "serviceLevelObjectives": "ServiceLevelObjective",
        "alertRules": "AlertRule",
        "alerts": "Alert",
    },
    "explainer": {"models": "Model", "globalImportance": "GlobalImportance"},
    "policy": {"decisions": "Decision", "approvals": "Approval", "policySets": "PolicySet"},
}
"""Per service, the resource kind of each collection (or singleton) in a name."""

_DEFAULT_KINDS: Final = {
    "registry": "Model",
    "trainer": "TrainingJob",
    "optimizer": "OptimizationJob",
    "inference": "Model",
    "monitor": "Model",
    "explainer": "Model",
    "policy": "Decision",
}
_EXTRA_KINDS: Final = {"policy": ("AuditLog",)}
_NAME_FIELDS: Final = ("name", "parent", "model_version", "model", "model_name")
_VERB = re.compile(
    r"^(Create|Get|List|Update|Delete|Archive|Unarchive|Cancel|Watch|Set|Compute|Verify|"
    r"Export|Acknowledge|Erase|Log|Batch|Revoke|Evaluate)+"
)


def default_resource(service: str, method: str, request: Any) -> Resource:
    """The resource a request names, without its owner team.

    The name is the request's ``name``, ``parent`` or ``model_version`` (for an
    upload, its metadata's ``parent``), for a create or list the parent (empty
    for a top-level collection). The type follows the name's last known
    collection: ``models/x`` is ``registry.conveyor.dev/Model``,
    ``models/x/versions/y`` (or ``models/x@alias``) ``ModelVersion``,
    ``.../attachments/z`` ``Attachment``, ``models/x/aliases/a`` the ``Model``;
    ``decisions/..`` is ``policy.conveyor.dev/Decision``, ``.../approvals/..``
    a policy ``Approval``. Names of another service's resources (the policy
    service's ``models/x/versions/y``) take that service's type. With no name,
    the kind comes from the method (``ListModels``: ``Model``).
    """
    name = request_resource_name(request)
    namespace, kind = _kind_of_name(service, name) if name else ("", "")
    if not kind:
        namespace, kind = service, _kind_of_method(service, method)
    return Resource(type=f"{namespace}.conveyor.dev/{kind}", name=name)


def request_resource_name(request: Any) -> str:
    """The first non-empty of the request's name fields (see :func:`default_resource`)."""
    if not isinstance(request, Message):
        return ""
    fields = request.DESCRIPTOR.fields_by_name
    for field_name in _NAME_FIELDS:
        field = fields.get(field_name)
        if field is not None and _is_single_string(field):
            value = getattr(request, field_name)
            if value:
                return str(value)
    # A streamed upload names its parent in the first message's metadata.
    metadata = fields.get("metadata")
    if metadata is not None and metadata.message_type is not None and request.HasField("metadata"):
        return request_resource_name(request.metadata)  # type: ignore[attr-defined]
    return ""


def request_alias(request: Any) -> str:
    """The alias a request is about: a ``models/m/aliases/a`` name's ``a``, an
    ``alias`` field, or an approval's ``approval.alias``; empty for none."""
    if not isinstance(request, Message):
        return ""
    fields = request.DESCRIPTOR.fields_by_name
    name = fields.get("name")
    if name is not None and _is_single_string(name):
        match = _ALIAS_NAME.match(request.name)  # type: ignore[attr-defined]
        if match:
            return match.group(1)
    alias = fields.get("alias")
    if alias is not None and _is_single_string(alias):
        return str(request.alias)  # type: ignore[attr-defined]
    approval = fields.get("approval")
    if approval is not None and approval.message_type is not None and request.HasField("approval"):
        return request_alias(request.approval)  # type: ignore[attr-defined]
    return ""


def _is_single_string(field: Any) -> bool:  # python and upb descriptors differ in the stubs
    return bool(field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated)


def _kind_of_name(service: str, name: str) -> tuple[str, str]:
    segments = name.split("/")
    for namespace in dict.fromkeys((service, "registry")):
        collections = RESOURCE_COLLECTIONS.get(namespace, {})
        kind = ""
        for segment in segments[::2]:  # collections and singletons sit at even positions
            kind = collections.get(segment, kind)
        if namespace == "registry" and kind == "Model" and "@" in segments[-1]:
            kind = "ModelVersion"  # models/{model}@{alias}: the version it points at
        if kind:
            return namespace, kind
    return "", ""


def _kind_of_method(service: str, method: str) -> str:
    known = {*RESOURCE_COLLECTIONS.get(service, {}).values(), *_EXTRA_KINDS.get(service, ())}
    noun = _VERB.sub("", method)
    for candidate in (noun, noun.removesuffix("s")):
        if candidate in known:
            return candidate
    return _DEFAULT_KINDS.get(service, "Model")
