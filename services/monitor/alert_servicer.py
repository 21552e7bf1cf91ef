"""The alerting RPCs of ``MonitorService``: SLOs, alert rules, alerts and the
``WatchAlerts`` stream. Rules are evaluated by :class:`~.alerts.AlertEngine`
at each window close; this module only stores and reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from google.protobuf.field_mask_pb2 import FieldMask

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.alert_store import AlertStore
from conveyor.services.monitor.alerting import acknowledge, check_alert_rule
from conveyor.services.monitor.alerts import AlertEngine
from conveyor.services.monitor.slo import check_slo
from conveyor.shared import names, pagination
from conveyor.shared.auth.principal import caller_principal
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.filtering import FieldKind, FilterField, matches, parse_filter
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.workers import WorkerThreads

MAX_COMMENT: Final = 1_024
SLO_UPDATABLE: Final = frozenset(
    {"display_name", "indicator", "latency_threshold", "goal", "rolling_period"}
)
RULE_UPDATABLE: Final = frozenset(
    {
        "display_name",
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
CONDITIONS: Final = frozenset({"drift", "performance", "slo", "outliers"})
_STATES: Final = tuple(n.removeprefix("ALERT_STATE_") for n in pb.AlertState.keys()[1:])
_SEVERITIES: Final = tuple(n.removeprefix("ALERT_SEVERITY_") for n in pb.AlertSeverity.keys()[1:])
SLO_FILTERS: Final = {
    "model": FilterField(FieldKind.STRING),
    "model_version": FilterField(FieldKind.STRING),
}
RULE_FILTERS: Final = {
    **SLO_FILTERS,
    "disabled": FilterField(FieldKind.ENUM, enum_values=("true", "false")),
}
ALERT_FILTERS: Final = {
    "model_version": FilterField(FieldKind.STRING),
    "alert_rule": FilterField(FieldKind.STRING),
    "state": FilterField(FieldKind.ENUM, enum_values=_STATES),
    "severity": FilterField(FieldKind.ENUM, enum_values=_SEVERITIES),
    "open_time": FilterField(FieldKind.TIMESTAMP),
}
WATCH_POLL_S: Final = 0.2


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
        violations = _id_violations(
            request.service_level_objective_id, "service_level_objective_id"
        )
        violations.extend(_request_id_violations(request.request_id))
        raise_if_any(violations, "invalid service level objective")
        check_slo(slo)
        await self._known(slo.model, slo.model_version)
        slo.name = f"serviceLevelObjectives/{request.service_level_objective_id}"
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
        found, token = await self._page(request, SLO_FILTERS, self._alerts.all_slos, _slo_field)
        return rpc.ListServiceLevelObjectivesResponse(
            service_level_objectives=[await self._engine.with_status(s) for s in found],
            next_page_token=token,
        )

    async def UpdateServiceLevelObjective(
        self, request: rpc.UpdateServiceLevelObjectiveRequest, context: Any
    ) -> rpc.UpdateServiceLevelObjectiveResponse:
        given = request.service_level_objective
        name = _name(given.name, "serviceLevelObjectives", field="service_level_objective.name")
        paths = _mask(request.update_mask.paths, SLO_UPDATABLE)
        current = await self._threads.run(self._alerts.slo, name)
        updated = pb.ServiceLevelObjective()
        updated.CopyFrom(current)
        _merge(given, updated, paths)
        check_slo(updated)
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
        violations = _id_violations(request.alert_rule_id, "alert_rule_id")
        violations.extend(_request_id_violations(request.request_id))
        raise_if_any(violations, "invalid alert rule")
        check_alert_rule(rule)
        await self._known(rule.model, rule.model_version)
        await self._engine.check_references(rule)
        rule.name = f"alertRules/{request.alert_rule_id}"
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
        found, token = await self._page(request, RULE_FILTERS, self._alerts.all_rules, _rule_field)
        return rpc.ListAlertRulesResponse(alert_rules=found, next_page_token=token)

    async def UpdateAlertRule(
        self, request: rpc.UpdateAlertRuleRequest, context: Any
    ) -> rpc.UpdateAlertRuleResponse:
        given = request.alert_rule
        name = _name(given.name, "alertRules", field="alert_rule.name")
        paths = _mask(request.update_mask.paths, RULE_UPDATABLE)
        current = await self._threads.run(self._alerts.rule, name)
        updated = pb.AlertRule()
        updated.CopyFrom(current)
        if CONDITIONS & set(paths):
            for condition in CONDITIONS:  # one condition: the new one replaces the old
                updated.ClearField(condition)  # type: ignore[arg-type]
        _merge(given, updated, paths)
        check_alert_rule(updated)
        await self._engine.check_references(updated)
        updated.update_time.GetCurrentTime()
        changed = _condition(updated) != _condition(current)
        await self._threads.run(self._alerts.replace_rule, updated, reset_state=changed)
        if updated.disabled and not current.disabled:
            await self._engine.resolve_rule(updated.name, reason="the rule was disabled")
        return rpc.UpdateAlertRuleResponse(alert_rule=updated)

    async def DeleteAlertRule(
        self, request: rpc.DeleteAlertRuleRequest, context: Any
    ) -> rpc.DeleteAlertRuleResponse:
        name = _name(request.name, "alertRules")
        await self._threads.run(self._alerts.delete_rule, name)
        await self._engine.resolve_rule(name, reason="the rule was deleted")
        return rpc.DeleteAlertRuleResponse()

    # -- alerts -------------------------------------------------------------------------------

    async def GetAlert(self, request: rpc.GetAlertRequest, context: Any) -> rpc.GetAlertResponse:
        alert = await self._threads.run(self._alerts.alert, _name(request.name, "alerts"))
        return rpc.GetAlertResponse(alert=alert)

    async def ListAlerts(
        self, request: rpc.ListAlertsRequest, context: Any
    ) -> rpc.ListAlertsResponse:
        newest = _newest_first(request.order_by)
        found, token = await self._page(
            request,
            ALERT_FILTERS,
            self._alerts.all_alerts,
            _alert_field,
            reverse=newest,
            extra=request.order_by,
        )
        return rpc.ListAlertsResponse(alerts=found, next_page_token=token)

    async def AcknowledgeAlert(
        self, request: rpc.AcknowledgeAlertRequest, context: Any
    ) -> rpc.AcknowledgeAlertResponse:
        name = _name(request.name, "alerts")
        if len(request.comment) > MAX_COMMENT:
            raise invalid_field("comment", "at most 1,024 characters")
        current = await self._threads.run(self._alerts.alert, name)
        updated = acknowledge(
            current,
            principal=caller_principal(context),
            comment=request.comment,
            now=datetime.now(UTC),
        )
        if updated.state != current.state:
            await self._engine.record([(pb.ALERT_EVENT_TYPE_ACKNOWLEDGED, updated)])
        return rpc.AcknowledgeAlertResponse(alert=updated)

    async def WatchAlerts(
        self, request: rpc.WatchAlertsRequest, context: Any
    ) -> AsyncIterator[rpc.WatchAlertsResponse]:
        restrictions = parse_filter(request.filter, ALERT_FILTERS)
        if request.resume_after_sequence < 0:
            raise invalid_field("resume_after_sequence", "must not be negative")
        wanted: Callable[[pb.Alert], bool] = lambda alert: matches(  # noqa: E731
            restrictions, partial(_alert_field, alert)
        )
        sequence = request.resume_after_sequence
        if sequence:
            first = await self._threads.run(self._alerts.first_sequence)
            if first is not None and first > sequence + 1:
                raise FailedPreconditionError(
                    f"events after {sequence} were purged; watch again from 0",
                    reason="EVENTS_PURGED",
                )
        else:
            sequence = await self._threads.run(self._alerts.last_sequence)
            for alert in await self._threads.run(self._alerts.open_alerts):
                if wanted(alert):
                    yield rpc.WatchAlertsResponse(
                        type=pb.ALERT_EVENT_TYPE_EXISTING, alert=alert, sequence=sequence
                    )
        async with self._engine.watching() as changed:
            while True:
                for event in await self._threads.run(self._alerts.events_after, sequence):
                    sequence = event.sequence
                    if wanted(event.alert):
                        yield rpc.WatchAlertsResponse(
                            type=event.type,
                            alert=event.alert,
                            sequence=event.sequence,
                        )
                if await changed.wait_or_stop(WATCH_POLL_S):
                    return

    # -- helpers ----------------------------------------------------------------------------

    async def _known(self, model: str, model_version: str) -> None:
        """NOT_FOUND for a model or version the registry lacks."""
        await self._registry.model(model)
        if model_version:
            await self._registry.version(model_version)

    async def _page(
        self,
        request: Any,
        fields: dict[str, FilterField],
        load: Callable[[], list[Any]],
        field_of: Callable[[Any, str], object],
        *,
        reverse: bool = False,
        extra: str = "",
    ) -> tuple[list[Any], str]:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, fields)
        fingerprint = pagination.fingerprint(request.filter, extra)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        everything = await self._threads.run(load)
        if reverse:
            everything.reverse()
        found = [m for m in everything if matches(restrictions, partial(field_of, m))]
        page = found[cursor.offset : cursor.offset + size]
        has_more = len(found) > cursor.offset + size
        return page, pagination.next_page_token(has_more, cursor, size, fingerprint)


def _name(name: str, collection: str, *, field: str = "name") -> str:
    return f"{collection}/{names.parse_resource_name(name, collection, field=field)}"


def _id_violations(resource_id: str, field: str) -> list[FieldViolation]:
    try:
        names.check_id(resource_id, field=field)
    except InvalidArgumentError as error:
        return list(error.violations)
    return []


def _request_id_violations(request_id: str) -> list[FieldViolation]:
    if len(request_id) > 64:
        return [FieldViolation("request_id", "at most 64 characters")]
    return []


def _mask(paths: Any, updatable: frozenset[str]) -> list[str]:
    given = list(paths)
    violations = []
    if not given:
        violations.append(FieldViolation("update_mask", "required: name the fields to change"))
    for index, path in enumerate(given):
        if path.split(".")[0] not in updatable:
            violations.append(
                FieldViolation(
                    f"update_mask.paths[{index}]",
                    f"{path!r} cannot be updated; updatable: {', '.join(sorted(updatable))}",
                )
            )
    raise_if_any(violations, "invalid update mask")
    return given


def _merge(given: Any, target: Any, paths: list[str]) -> None:
    FieldMask(paths=paths).MergeMessage(
        given, target, replace_message_field=True, replace_repeated_field=True
    )


def _newest_first(order_by: str) -> bool:
    text = " ".join(order_by.split())
    if text in ("", "open_time desc"):
        return True
    if text in ("open_time", "open_time asc"):
        return False
    raise invalid_field("order_by", "'open_time desc' (the default) or 'open_time asc'")


def _condition(rule: pb.AlertRule) -> tuple[str | None, bytes]:
    """The rule's condition, comparable: a change restarts the window counts."""
    which = rule.WhichOneof("condition")
    body = getattr(rule, which).SerializeToString(deterministic=True) if which else b""
    return which, body


def _slo_field(slo: pb.ServiceLevelObjective, field: str) -> object:
    value: object = getattr(slo, field)
    return value


def _rule_field(rule: pb.AlertRule, field: str) -> object:
    if field == "disabled":
        return "true" if rule.disabled else "false"
    value: object = getattr(rule, field)
    return value


def _alert_field(alert: pb.Alert, field: str) -> object:
    if field == "state":
        return pb.AlertState.Name(alert.state).removeprefix("ALERT_STATE_")
    if field == "severity":
        return pb.AlertSeverity.Name(alert.severity).removeprefix("ALERT_SEVERITY_")
    if field == "open_time":
        return alert.open_time.ToDatetime(tzinfo=UTC)
    value: object = getattr(alert, field)
    return value
