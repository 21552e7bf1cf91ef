"""What ``conveyor alerts …`` prints: table rows, field lists and event lines
for alerts and alert rules (:mod:`conveyor.services.monitor.alerts_cli`)."""

from __future__ import annotations

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import cli as monitor_cli
from conveyor.services.registry import cli_output as out
from conveyor.services.trainer.cli_output import plural


def alert_cells(alert: pb.Alert) -> list[str]:
    """One row of ``alerts list`` (columns: ``alerts_cli.ALERT_COLUMNS``)."""
    return [
        short_name(alert.name),
        out.enum_label(pb.AlertState, alert.state, "ALERT_STATE_"),
        out.enum_label(pb.AlertSeverity, alert.severity, "ALERT_SEVERITY_"),
        version_label(alert.model_version),
        short_name(alert.alert_rule),
        f"{alert.value:.4g}",
        f"{alert.threshold:.4g}",
        out.timestamp(alert.open_time),
        alert.summary,
    ]


def alert_fields(alert: pb.Alert) -> list[tuple[str, str]]:
    """``alerts show``'s fields."""
    acknowledged = "-"
    if alert.HasField("acknowledge_time"):
        acknowledged = f"{out.timestamp(alert.acknowledge_time)} by {alert.acknowledged_by}"
        if alert.acknowledge_comment:
            acknowledged += f": {alert.acknowledge_comment}"
    return [
        ("alert", alert.name),
        ("rule", alert.alert_rule),
        ("version", alert.model_version),
        ("state", out.enum_label(pb.AlertState, alert.state, "ALERT_STATE_")),
        ("severity", out.enum_label(pb.AlertSeverity, alert.severity, "ALERT_SEVERITY_")),
        ("summary", alert.summary),
        ("value", f"{alert.value:.4g} (threshold {alert.threshold:.4g})"),
        ("trigger window", monitor_cli.window_text(alert.trigger_window)),
        ("breached", plural(alert.breached_windows, "window")),
        ("opened", out.timestamp(alert.open_time)),
        ("acknowledged", acknowledged),
        ("resolved", out.timestamp(alert.resolve_time)),
        ("updated", out.timestamp(alert.update_time)),
        ("actions", plural(len(alert.actions), "action") if alert.actions else "none"),
    ]


def action_cells(action: pb.ActionExecution) -> list[str]:
    return [
        out.enum_label(pb.ActionKind, action.kind, "ACTION_KIND_"),
        out.enum_label(pb.ActionState, action.state, "ACTION_STATE_"),
        ", ".join(action.resources) or "-",
        action.decision or "-",
        out.timestamp(action.start_time),
        out.timestamp(action.end_time),
        action.message,
    ]


def event_line(event: rpc.WatchAlertsResponse) -> str:
    """``2026-01-31 12:00:00Z  opened  alert-3f2a  fraud@1  firing/warning  drift: …``."""
    alert = event.alert
    kind = out.enum_label(pb.AlertEventType, event.type, "ALERT_EVENT_TYPE_")
    state = out.enum_label(pb.AlertState, alert.state, "ALERT_STATE_")
    severity = out.enum_label(pb.AlertSeverity, alert.severity, "ALERT_SEVERITY_")
    return (
        f"{out.timestamp(alert.update_time)}  {kind:<12}  {short_name(alert.name)}  "
        f"{version_label(alert.model_version)}  {state}/{severity}  "
        f"{short_name(alert.alert_rule)}: {alert.summary}"
    )


def rule_cells(rule: pb.AlertRule) -> list[str]:
    """One row of ``alerts rules list`` (columns: ``alerts_cli.RULE_COLUMNS``)."""
    return [
        short_name(rule.name),
        out.model_id(rule.model),
        out.version_number(rule.model_version) or "every",
        condition_text(rule),
        f"{rule.trigger_windows or 1}/{rule.resolve_windows or rule.trigger_windows or 1}",
        out.enum_label(
            pb.AlertSeverity, rule.severity or pb.ALERT_SEVERITY_WARNING, "ALERT_SEVERITY_"
        ),
        actions_text(rule) or "-",
        "no" if rule.disabled else "yes",
    ]


def rule_fields(rule: pb.AlertRule) -> list[tuple[str, str]]:
    """``alerts rules show``'s fields."""
    trigger = rule.trigger_windows or 1
    resolve = rule.resolve_windows or trigger
    severity = rule.severity or pb.ALERT_SEVERITY_WARNING
    return [
        ("rule", rule.name),
        ("display name", rule.display_name or "-"),
        ("model", rule.model),
        ("version", rule.model_version or "every version"),
        ("condition", condition_text(rule)),
        (
            "windows",
            f"opens after {plural(trigger, 'breaching window')} in a row, "
            f"resolves after {plural(resolve, 'clear window')}",
        ),
        ("severity", out.enum_label(pb.AlertSeverity, severity, "ALERT_SEVERITY_")),
        ("actions", actions_text(rule) or "none"),
        ("enabled", "no" if rule.disabled else "yes"),
        ("created", out.timestamp(rule.create_time)),
        ("updated", out.timestamp(rule.update_time)),
    ]


def condition_text(rule: pb.AlertRule) -> str:
    """``dataset drift``, ``outlier rate > 0.2``, ``accuracy degraded``, …"""
    kind = rule.WhichOneof("condition")
    if kind == "drift":
        scope = rule.drift.scope
        if scope == pb.DRIFT_SCOPE_FEATURE:
            return f"drift of feature {rule.drift.feature}"
        return f"{out.enum_label(pb.DriftScope, scope, 'DRIFT_SCOPE_')} drift"
    if kind == "outliers":
        return f"outlier rate > {rule.outliers.max_outlier_rate:g}"
    if kind == "performance":
        condition = rule.performance
        text = f"{out.enum_label(pb.PerformanceMetric, condition.metric, 'PERFORMANCE_METRIC_')}"
        if condition.HasField("max_degradation"):
            return f"{text} down by more than {condition.max_degradation:g}"
        return f"{text} degraded"
    if kind == "slo":
        slo = short_name(rule.slo.service_level_objective)
        if rule.slo.HasField("burn_rate_threshold"):
            return f"{slo} burning >= {rule.slo.burn_rate_threshold:g}x"
        return f"{slo} not met"
    return "-"


def actions_text(rule: pb.AlertRule) -> str:
    """``rollback production, retrain``."""
    texts = []
    for action in rule.actions:
        if action.WhichOneof("action") == "rollback":
            texts.append(f"rollback {action.rollback.alias or 'production'}")
        else:
            job = action.retrain.training_job
            texts.append(f"retrain {short_name(job)}" if job else "retrain")
    return ", ".join(texts)


def version_label(name: str) -> str:
    """``fraud@3`` from ``models/fraud/versions/3``."""
    model, _, version = out.model_id(name).partition("/versions/")
    return f"{model}@{version}" if version else model


def print_rule(rule: pb.AlertRule, *, as_json: bool) -> None:
    if as_json:
        out.print_json({"alert_rule": out.message_dict(rule)})
    else:
        out.print_fields(rule_fields(rule))


def short_name(name: str) -> str:
    """The id at the end of a top-level name: ``drift`` from ``alertRules/drift``."""
    return name.partition("/")[2] or name
