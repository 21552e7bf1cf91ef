"""The alerting RPCs of ``MonitorService``: SLOs, alert rules, alerts and the
``WatchAlerts`` stream. Rules are evaluated by :class:`~.alerts.AlertEngine`
at each window close; this module checks requests, stores and reads, and
leaves every change to alerts (and to rules, which resolves alerts) to the
engine, which serialises them with window evaluation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC
from functools import partial
from typing import Any, Final, TypeVar, cast

from google.protobuf.descriptor import Descriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import alert_filter
from conveyor.services.monitor.alert_store import AlertStore
from conveyor.services.monitor.alerting import check_alert_rule
from conveyor.services.monitor.alerts import AlertEngine
from conveyor.services.monitor.slo import check_slo
from conveyor.shared import names, pagination
from conveyor.shared.auth.principal import caller_principal
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    UnavailableError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.filtering import FieldKind, FilterField, matches, parse_filter
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.workers import WorkerThreads

MAX_COMMENT: Final = 1_024
MAX_REQUEST_ID: Final = 64
SLO_MUTABLE: Final = frozenset(
    {"display_name", "model_version", "latency_threshold", "goal", "rolling_period"}
)
SLO_IMMUTABLE: Final = frozenset({"model", "indicator"})
RULE_MUTABLE: Final = frozenset(
    {
        "display_name",
        "model_version",
        "drift",
        "performance",
        "slo",
        "outliers",
        "trigger_windows",
        "resolve_windows",
        "severity",
        "actions",
        "disabled",
    }
)
RULE_IMMUTABLE: Final = frozenset({"model"})
_BOOLEANS: Final = ("TRUE", "FALSE")
_STATES: Final = tuple(n.removeprefix("ALERT_STATE_") for n in pb.AlertState.keys()[1:])
_SEVERITIES: Final = tuple(n.removeprefix("ALERT_SEVERITY_") for n in pb.AlertSeverity.keys()[1:])
_INDICATORS: Final = tuple(
    n.removeprefix("SERVICE_LEVEL_INDICATOR_") for n in pb.ServiceLevelIndicator.keys()[1:]
)
SLO_FILTERS: Final = {
    "model": FilterField(FieldKind.STRING),
    "model_version": FilterField(FieldKind.STRING),
    "indicator": FilterField(FieldKind.ENUM, enum_values=_INDICATORS),
    "status.met": FilterField(FieldKind.ENUM, enum_values=_BOOLEANS),
}
RULE_FILTERS: Final = {
    "model": FilterField(FieldKind.STRING),
    "model_version": FilterField(FieldKind.STRING),
    "severity": FilterField(FieldKind.ENUM, enum_values=_SEVERITIES),
    "disabled": FilterField(FieldKind.ENUM, enum_values=_BOOLEANS),
}
WATCH_FILTERS: Final = {
    "state": FilterField(FieldKind.ENUM, enum_values=_STATES),
    "severity": FilterField(FieldKind.ENUM, enum_values=_SEVERITIES),
    "alert_rule": FilterField(FieldKind.STRING),
    "model": FilterField(FieldKind.STRING),
    "model_version": FilterField(FieldKind.STRING),
}
ALERT_FILTERS: Final = {**WATCH_FILTERS, "open_time": FilterField(FieldKind.TIMESTAMP)}
WATCH_POLL_S: Final = 2.0
"""How often a watch looks for stored events nobody told it about (another
monitor process on the same database); changes made here wake it at once."""

M = TypeVar("M", bound=Message)


class AlertServicer:
    """SLO, alert-rule and alert RPCs."""

    def __init__(
        self,
        store: AlertStore,
        engine: AlertEngine,
        registry: RegistryClient,
        workers: WorkerThreads,
    ) -> None:
        self._alerts = store
        self._engine = engine
        self._registry = registry
        self._threads = workers

    # -- SLOs -------------------------------------------------------------------------

    async def CreateServiceLevelObjective(
        self, request: rpc.CreateServiceLevelObjectiveRequest, context: Any
    ) -> rpc.CreateServiceLevelObjectiveResponse:
        slo = pb.ServiceLevelObjective()
        slo.CopyFrom(request.service_level_objective)
        for output in ("name", "status", "create_time", "update_time"):
            slo.ClearField(output)
        violations = _create_violations(
            request.service_level_objective_id, "service_level_objective_id", request.request_id
        )
        violations += _violations(lambda: check_slo(slo))
        raise_if_any(violations, "invalid service level objective")
        await self._known(slo.model, slo.model_version)
        slo_id = request.service_level_objective_id or f"slo-{uuid.uuid4().hex[:12]}"
        slo.name = f"serviceLevelObjectives/{slo_id}"
        slo.create_time.GetCurrentTime()
        slo.update_time.CopyFrom(slo.create_time)
        stored = await self._threads.run(
            self._alerts.create_slo,
            slo,
            request_id=request.request_id,
            request_hash=pagination.fingerprint(
                request.service_level_objective.SerializeToString(deterministic=True),
                request.service_level_objective_id,
            ),
        )
        return rpc.CreateServiceLevelObjectiveResponse(
            service_level_objective=await self._engine.with_status(stored)
        )

    async def GetServiceLevelObjective(
        self, request: rpc.GetServiceLevelObjectiveRequest, context: Any
    ) -> rpc.GetServiceLevelObjectiveResponse:
        name = _name(request.name, "serviceLevelObjectives")
        slo = await self._threads.run(self._alerts.slo, name)
        return rpc.GetServiceLevelObjectiveResponse(
            service_level_objective=await self._engine.with_status(slo)
        )

    async def ListServiceLevelObjectives(
        self, request: rpc.ListServiceLevelObjectivesRequest, context: Any
    ) -> rpc.ListServiceLevelObjectivesResponse:
        restrictions = parse_filter(request.filter, SLO_FILTERS)
        everything = await self._threads.run(self._alerts.all_slos)
        by_status = any(r.field == "status.met" for r in restrictions)
        if by_status:  # the filter needs every SLO's compliance
            everything = [await self._engine.with_status(s) for s in everything]
        found = [s for s in everything if matches(restrictions, partial(_slo_field, s))]
        page, token = _page(request, found)
        if not by_status:
            page = [await self._engine.with_status(s) for s in page]
        return rpc.ListServiceLevelObjectivesResponse(
            service_level_objectives=page, next_page_token=token
        )

    async def UpdateServiceLevelObjective(
        self, request: rpc.UpdateServiceLevelObjectiveRequest, context: Any
    ) -> rpc.UpdateServiceLevelObjectiveResponse:
        given = request.service_level_objective
        name = _name(given.name, "serviceLevelObjectives", field="service_level_objective.name")
        current = await self._threads.run(self._alerts.slo, name)
        paths = _mask(
            request.update_mask.paths,
            given,
            current,
            mutable=SLO_MUTABLE,
            immutable=SLO_IMMUTABLE,
            prefix="service_level_objective",
        )
        updated = _merged(given, current, paths)
        check_slo(updated)
        if updated.model_version and updated.model_version != current.model_version:
            await self._known(updated.model, updated.model_version)
        updated.update_time.GetCurrentTime()
        updated.ClearField("status")
        await self._threads.run(self._alerts.replace_slo, updated)
        return rpc.UpdateServiceLevelObjectiveResponse(
            service_level_objective=await self._engine.with_status(updated)
        )

    async def DeleteServiceLevelObjective(
        self, request: rpc.DeleteServiceLevelObjectiveRequest, context: Any
    ) -> rpc.DeleteServiceLevelObjectiveResponse:
        name = _name(request.name, "serviceLevelObjectives")
        await self._threads.run(self._alerts.delete_slo, name)
        self._engine.forget_slo(name)
        return rpc.DeleteServiceLevelObjectiveResponse()

    # -- alert rules ----------------------------------------------------------------------

    async def CreateAlertRule(
        self, request: rpc.CreateAlertRuleRequest, context: Any
    ) -> rpc.CreateAlertRuleResponse:
        rule = pb.AlertRule()
        rule.CopyFrom(request.alert_rule)
        for output in ("name", "create_time", "update_time"):
            rule.ClearField(output)
        violations = _create_violations(request.alert_rule_id, "alert_rule_id", request.request_id)
        violations += _violations(lambda: check_alert_rule(rule))
        raise_if_any(violations, "invalid alert rule")
        await self._known(rule.model, rule.model_version)
        await self._engine.check_references(rule)
        rule_id = request.alert_rule_id or f"rule-{uuid.uuid4().hex[:12]}"
        rule.name = f"alertRules/{rule_id}"
        rule.create_time.GetCurrentTime()
        rule.update_time.CopyFrom(rule.create_time)
        stored = await self._threads.run(
            self._alerts.create_rule,
            rule,
            request_id=request.request_id,
            request_hash=pagination.fingerprint(
                request.alert_rule.SerializeToString(deterministic=True), request.alert_rule_id
            ),
        )
        return rpc.CreateAlertRuleResponse(alert_rule=stored)

    async def GetAlertRule(
        self, request: rpc.GetAlertRuleRequest, context: Any
    ) -> rpc.GetAlertRuleResponse:
        rule = await self._threads.run(self._alerts.rule, _name(request.name, "alertRules"))
        return rpc.GetAlertRuleResponse(alert_rule=rule)

    async def ListAlertRules(
        self, request: rpc.ListAlertRulesRequest, context: Any
    ) -> rpc.ListAlertRulesResponse:
        restrictions = parse_filter(request.filter, RULE_FILTERS)
        everything = await self._threads.run(self._alerts.all_rules)
        found = [r for r in everything if matches(restrictions, partial(_rule_field, r))]
        page, token = _page(request, found)
        return rpc.ListAlertRulesResponse(alert_rules=page, next_page_token=token)

    async def UpdateAlertRule(
        self, request: rpc.UpdateAlertRuleRequest, context: Any
    ) -> rpc.UpdateAlertRuleResponse:
        given = request.alert_rule
        name = _name(given.name, "alertRules", field="alert_rule.name")
        current = await self._threads.run(self._alerts.rule, name)
        paths = _mask(
            request.update_mask.paths,
            given,
            current,
            mutable=RULE_MUTABLE,
            immutable=RULE_IMMUTABLE,
            prefix="alert_rule",
        )

        def change(stored: pb.AlertRule) -> pb.AlertRule:
            updated = _merged(given, stored, paths)
            check_alert_rule(updated)
            updated.update_time.GetCurrentTime()
            return updated

        candidate = change(current)  # checked before anything is stored
        if candidate.model_version and candidate.model_version != current.model_version:
            await self._known(candidate.model, candidate.model_version)
        await self._engine.check_references(candidate)
        updated = await self._engine.update_rule(name, change)
        return rpc.UpdateAlertRuleResponse(alert_rule=updated)

    async def DeleteAlertRule(
        self, request: rpc.DeleteAlertRuleRequest, context: Any
    ) -> rpc.DeleteAlertRuleResponse:
        await self._engine.delete_rule(_name(request.name, "alertRules"))
        return rpc.DeleteAlertRuleResponse()

    # -- alerts -------------------------------------------------------------------------------

    async def GetAlert(self, request: rpc.GetAlertRequest, context: Any) -> rpc.GetAlertResponse:
        alert = await self._threads.run(self._alerts.alert, _name(request.name, "alerts"))
        return rpc.GetAlertResponse(alert=alert)

    async def ListAlerts(
        self, request: rpc.ListAlertsRequest, context: Any
    ) -> rpc.ListAlertsResponse:
        newest = _newest_first(request.order_by)
        selected = alert_filter.parse(request.filter, ALERT_FILTERS)
        pagination.page_size(request.page_size)  # a bad size before any reading
        everything = await self._threads.run(self._alerts.all_alerts, newest_first=newest)
        found = [a for a in everything if selected.matches(partial(_alert_field, a))]
        page, token = _page(request, found, " ".join(request.order_by.split()))
        return rpc.ListAlertsResponse(alerts=page, next_page_token=token)

    async def AcknowledgeAlert(
        self, request: rpc.AcknowledgeAlertRequest, context: Any
    ) -> rpc.AcknowledgeAlertResponse:
        name = _name(request.name, "alerts")
        if len(request.comment) > MAX_COMMENT:
            raise invalid_field(
                "comment", f"at most {MAX_COMMENT:,} characters, got {len(request.comment):,}"
            )
        alert = await self._engine.acknowledge(
            name, principal=caller_principal(context), comment=request.comment
        )
        return rpc.AcknowledgeAlertResponse(alert=alert)

    async def WatchAlerts(
        self, request: rpc.WatchAlertsRequest, context: Any
    ) -> AsyncIterator[rpc.WatchAlertsResponse]:
        if request.resume_after_sequence < 0:
            raise invalid_field("resume_after_sequence", "must not be negative; 0 to start anew")
        selected = alert_filter.parse(request.filter, WATCH_FILTERS)

        def wanted(alert: pb.Alert) -> bool:
            return selected.matches(partial(_alert_field, alert))

        async with self._engine.watching() as changed:
            sequence = request.resume_after_sequence
            if sequence:
                first = await self._threads.run(self._alerts.first_sequence)
                if first is not None and first > sequence + 1:
                    raise FailedPreconditionError(
                        f"the events after {sequence} were purged; watch again from 0",
                        reason="EVENTS_PURGED",
                    )
            else:
                snapshot = await self._threads.run(self._alerts.snapshot)
                sequence = snapshot.last_sequence
                for latest, alert in snapshot.open_alerts:
                    if wanted(alert):
                        yield rpc.WatchAlertsResponse(
                            type=pb.ALERT_EVENT_TYPE_EXISTING, alert=alert, sequence=latest
                        )
            while True:
                while batch := await self._threads.run(self._alerts.events_after, sequence):
                    for event in batch:
                        sequence = event.sequence
                        if wanted(event.alert):
                            yield rpc.WatchAlertsResponse(
                                type=event.type, alert=event.alert, sequence=event.sequence
                            )
                if await changed.wait_or_stop(WATCH_POLL_S):
                    raise UnavailableError(
                        "the monitor is shutting down; watch again with "
                        f"resume_after_sequence={sequence}",
                        reason="SHUTTING_DOWN",
                        metadata={"resume_after_sequence": str(sequence)},
                    )

    # -- helpers ----------------------------------------------------------------------------

    async def _known(self, model: str, model_version: str) -> None:
        """NOT_FOUND for a model or version the registry lacks."""
        await self._registry.model(model)
        if model_version:
            await self._registry.version(model_version)


def _name(name: str, collection: str, *, field: str = "name") -> str:
    return f"{collection}/{names.parse_resource_name(name, collection, field=field)}"


def _violations(check: Callable[[], object]) -> list[FieldViolation]:
    try:
        check()
    except InvalidArgumentError as error:
        return list(error.violations)
    return []


def _create_violations(resource_id: str, field: str, request_id: str) -> list[FieldViolation]:
    """The id (optional: generated when empty) and the request id."""
    violations = []
    if resource_id:
        violations += _violations(lambda: names.check_id(resource_id, field=field))
    if len(request_id) > MAX_REQUEST_ID:
        violations.append(
            FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters (a UUID)")
        )
    return violations


def _page(request: Any, found: Sequence[M], *extra: str) -> tuple[list[M], str]:
    """The page of ``found`` the request asks for, and the next page's token."""
    size = pagination.page_size(request.page_size)
    fingerprint = pagination.fingerprint(request.filter, *extra)
    cursor = pagination.decode_page_token(request.page_token, fingerprint)
    page = list(found[cursor.offset : cursor.offset + size])
    has_more = len(found) > cursor.offset + size
    return page, pagination.next_page_token(has_more, cursor, size, fingerprint)


def _mask(
    paths: Sequence[str],
    given: Message,
    current: Message,
    *,
    mutable: frozenset[str],
    immutable: frozenset[str],
    prefix: str,
) -> list[str]:
    """The paths to replace: the mask's, or every mutable field when it is
    empty (then an immutable field may only repeat its stored value)."""
    descriptor = cast(Descriptor, given.DESCRIPTOR)
    violations = []
    if not paths:
        for field in sorted(immutable):
            value = getattr(given, field)
            if value and value != getattr(current, field):
                violations.append(
                    FieldViolation(f"{prefix}.{field}", "immutable: it cannot be changed")
                )
        raise_if_any(violations, "invalid update")
        return sorted(mutable)
    for index, path in enumerate(paths):
        head = path.split(".")[0]
        if head in immutable:
            problem = f"{path!r} is immutable"
        elif head not in mutable or not FieldMask(paths=[path]).IsValidForDescriptor(descriptor):
            problem = f"{path!r} cannot be updated; updatable: {', '.join(sorted(mutable))}"
        else:
            continue
        violations.append(FieldViolation(f"update_mask.paths[{index}]", problem))
    raise_if_any(violations, "invalid update mask")
    return list(paths)


def _merged(given: M, current: M, paths: list[str]) -> M:
    """``current`` with the fields of ``paths`` taken from ``given`` (a
    condition or message replaced whole; naming another condition replaces
    the rule's condition, as they are one ``oneof``)."""
    updated = type(current)()
    updated.CopyFrom(current)
    FieldMask(paths=paths).MergeMessage(
        given, updated, replace_message_field=True, replace_repeated_field=True
    )
    return updated


def _newest_first(order_by: str) -> bool:
    text = " ".join(order_by.split())
    if text in ("", "open_time desc"):
        return True
    if text in ("open_time", "open_time asc"):
        return False
    raise invalid_field("order_by", "'open_time desc' (the default) or 'open_time asc'")


def _boolean(value: bool) -> str:
    return "TRUE" if value else "FALSE"


def _slo_field(slo: pb.ServiceLevelObjective, field: str) -> object:
    if field == "indicator":
        return pb.ServiceLevelIndicator.Name(slo.indicator).removeprefix("SERVICE_LEVEL_INDICATOR_")
    if field == "status.met":
        return _boolean(slo.status.met) if slo.HasField("status") else None
    value: object = getattr(slo, field)
    return value


def _rule_field(rule: pb.AlertRule, field: str) -> object:
    if field == "disabled":
        return _boolean(rule.disabled)
    if field == "severity":
        severity = rule.severity or pb.ALERT_SEVERITY_WARNING
        return pb.AlertSeverity.Name(severity).removeprefix("ALERT_SEVERITY_")
    value: object = getattr(rule, field)
    return value


def _alert_field(alert: pb.Alert, field: str) -> object:
    if field == "state":
        return pb.AlertState.Name(alert.state).removeprefix("ALERT_STATE_")
    if field == "severity":
        return pb.AlertSeverity.Name(alert.severity).removeprefix("ALERT_SEVERITY_")
    if field == "open_time":
        return alert.open_time.ToDatetime(tzinfo=UTC)
    if field == "model":
        return alert.model_version.split("/versions/")[0]
    value: object = getattr(alert, field)
    return value
