"""Which model a monitor call is about, so that policy can decide by its owner.

Most monitor calls name no model in a top-level ``name``: a rule or an SLO
names it inside the message (``alert_rule.model``), an ingest batch in its
records, an erasure in ``model``; rules, SLOs and alerts are named by their
own ids and belong to the model they were created for. Every call's resource
carries its model's owner team, risk tier and compliance tags from the
registry, so the ownership policies apply to the monitor as they do to the
registry.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Final

from google.protobuf.message import Message

from conveyor.services.monitor.alert_store import AlertStore
from conveyor.shared.auth.interceptor import ResourceResolver, default_resource
from conveyor.shared.auth.principal import Resource, model_attributes
from conveyor.shared.errors import ConveyorError
from conveyor.shared.registry_client import RegistryClient

_NESTED: Final = (
    ("alert_rule", "model"),
    ("service_level_objective", "model"),
    ("monitoring_config", "name"),
    ("reference", "name"),
)
_REPEATED: Final = (("feedback", "model"), ("records", "model_version"))
_OWN_COLLECTIONS: Final = ("alertRules", "serviceLevelObjectives", "alerts")


def model_named_by(request: Any, name: str) -> str:
    """The ``models/{id}`` a request is about, from its name or its body;
    empty when it names none (a listing of every rule, an erasure everywhere)."""
    candidates = [name]
    for field, inner in _NESTED:
        if _has(request, field):
            candidates.append(str(getattr(getattr(request, field), inner)))
    for field, inner in _REPEATED:
        items = getattr(request, field, None) if _has_repeated(request, field) else None
        if items:
            candidates.append(str(getattr(items[0], inner)))
    for candidate in candidates:
        segments = candidate.split("/")
        if len(segments) >= 2 and segments[0] == "models" and segments[1]:
            return f"models/{segments[1].split('@')[0]}"
    return ""


def monitor_resolver(registry: RegistryClient, alerts: AlertStore) -> ResourceResolver:
    """The monitor's resource resolver (see the module docstring)."""

    async def resolve(method: str, request: Message) -> Resource:
        resource = default_resource("monitor", method, request)
        model = model_named_by(request, resource.name)
        if not model and resource.name.split("/")[0] in _OWN_COLLECTIONS:
            model = await asyncio.to_thread(_stored_model, alerts, resource.name)
        if not model:
            return resource
        try:
            found = await registry.model(model)
        except ConveyorError:  # unknown: the method itself answers NOT_FOUND
            return resource
        return replace(resource, owner_team=found.owner_team, attributes=model_attributes(found))

    return resolve


def _stored_model(alerts: AlertStore, name: str) -> str:
    """The model a stored rule, SLO or alert belongs to ("" when there is none)."""
    collection = name.split("/")[0]
    try:
        if collection == "alertRules":
            return alerts.rule(name).model
        if collection == "serviceLevelObjectives":
            return alerts.slo(name).model
        return alerts.alert(name).model_version.split("/versions/")[0]
    except ConveyorError:
        return ""


def _has(request: Any, field: str) -> bool:
    if not isinstance(request, Message) or field not in request.DESCRIPTOR.fields_by_name:
        return False
    try:
        return bool(request.HasField(field))
    except ValueError:  # a oneof member or a scalar
        return False


def _has_repeated(request: Any, field: str) -> bool:
    return isinstance(request, Message) and field in request.DESCRIPTOR.fields_by_name
