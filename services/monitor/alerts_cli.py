"""``conveyor alerts …``: the monitor's alerts and alert rules, for people and scripts.

``conveyor alerts list`` prints the alerts, newest first (``--model``,
``--state``, ``--rule`` narrow it); ``show ALERT`` one alert with its actions'
outcomes; ``ack ALERT`` acknowledges one; ``watch`` prints each alert event as
one line until Ctrl-C (exit 130), and with ``--until-firing`` exits 0 as soon
as an alert of the model is firing (1 when ``--timeout`` passes first), which
is what scripts wait on. ``conveyor alerts rules create|list|show|delete``
manage the rules that open alerts: a drift, outlier-rate, performance or SLO
condition over consecutive windows, with a rollback or retraining action.

Names take short forms: ``fraud`` for ``models/fraud``, ``alert-3f2a…`` for
``alerts/alert-3f2a…``, ``drift`` for ``alertRules/drift``. The commands run as
``conveyor drift`` does (:func:`conveyor.services.monitor.cli.run`: the client
settings' channel, a deadline on each call, ``--json`` for the API's own
messages, usage errors exit 2); a failed call prints ``conveyor: <CODE>:
<message>``, the fields at fault with the flags behind them, and a hint about
alerts, and exits 1. ``watch --json`` prints one ``WatchAlertsResponse`` per
line (JSON Lines), so a script can read events as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from functools import partial
from typing import Final

import grpc

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import cli as monitor_cli
from conveyor.services.monitor.alerts_output import (
    action_cells,
    alert_cells,
    alert_fields,
    event_line,
    print_rule,
    rule_cells,
    short_name,
)
from conveyor.services.monitor.cli import Command, Session
from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import CommandError, pages_up_to
from conveyor.services.trainer.cli import LIST_PAGE_SIZE, named_flags, positive, whole_number
from conveyor.shared import names
from conveyor.shared.errors import ConveyorError, from_rpc_error

STATES: Final = {
    "firing": "state = FIRING",
    "acknowledged": "state = ACKNOWLEDGED",
    "resolved": "state = RESOLVED",
    "open": "(state = FIRING OR state = ACKNOWLEDGED)",
}
SEVERITIES: Final = {
    "info": pb.ALERT_SEVERITY_INFO,
    "warning": pb.ALERT_SEVERITY_WARNING,
    "critical": pb.ALERT_SEVERITY_CRITICAL,
}
METRICS: Final = {
    # The registry's metric keys, as the proto names them.
    "accuracy": pb.PERFORMANCE_METRIC_ACCURACY,
    "f1": pb.PERFORMANCE_METRIC_F1,
    "roc_auc": pb.PERFORMANCE_METRIC_ROC_AUC,
    "ece": pb.PERFORMANCE_METRIC_EXPECTED_CALIBRATION_ERROR,
}
FLAGS: Final = (
    # The flag behind each field CreateAlertRule may refuse, most specific first.
    ("alert_rule_id", "RULE_ID"),
    ("alert_rule.model_version", "--version"),
    ("alert_rule.model", "--model"),
    ("alert_rule.drift", "--drift"),
    ("alert_rule.outliers", "--outlier-rate"),
    ("alert_rule.performance.max_degradation", "--max-degradation"),
    ("alert_rule.performance", "--performance"),
    ("alert_rule.slo.burn_rate_threshold", "--burn-rate"),
    ("alert_rule.slo", "--slo"),
    ("alert_rule.trigger_windows", "--trigger-windows"),
    ("alert_rule.resolve_windows", "--resolve-windows"),
    ("alert_rule.severity", "--severity"),
    ("alert_rule.actions", "--rollback/--retrain"),
    ("alert_rule.display_name", "--display-name"),
)
ALERT_COLUMNS: Final = (
    *("alert", "state", "severity", "version", "rule"),
    *("value", "threshold", "opened", "summary"),
)
RULE_COLUMNS: Final = (
    *("rule", "model", "version", "condition"),
    *("windows", "severity", "actions", "enabled"),
)
MAX_INT32: Final = 2**31 - 1
EXIT_NOTHING_FIRED: Final = 1

_Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it


def add_alerts_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    """Adds ``conveyor alerts …`` to ``conveyor``'s subcommands."""
    client = argparse.ArgumentParser(add_help=False)
    monitor_cli.add_client_arguments(client)
    alerts = commands.add_parser(
        "alerts", help="list, show, acknowledge and watch alerts; manage alert rules"
    )
    alerts.set_defaults(handler=_usage(alerts))
    sub = alerts.add_subparsers(metavar="COMMAND")

    listing = _command(sub, client, "list", alerts_list, "alerts, open and resolved, newest first")
    _add_model_flag(listing, "only this model's alerts")
    listing.add_argument("--state", type=str.lower, choices=STATES, help="open: firing or acked")
    listing.add_argument("--rule", type=rule_name, metavar="RULE", help="only this rule's alerts")
    listing.add_argument(
        "--limit", type=positive, default=50, metavar="N", help="at most this many (default: 50)"
    )
    show = _command(
        sub, client, "show", alerts_show, "one alert: its numbers, window, acknowledgement, actions"
    )
    ack = _command(
        sub, client, "ack", alerts_ack, "acknowledge a firing alert (it stays open until it clears)"
    )
    for parser in (show, ack):
        parser.add_argument("alert", type=alert_name, metavar="ALERT", help="alert-… or alerts/…")
    ack.add_argument("--comment", default="", help="a note for the alert's history")

    watch = _command(
        sub,
        client,
        "watch",
        alerts_watch,
        "print alert events as they happen, until Ctrl-C (open alerts first)",
        description="Print each alert event as one line (--json: one WatchAlertsResponse "
        "per line), starting with the alerts already open, until Ctrl-C (exit 130). "
        "--until-firing exits 0 as soon as an alert is firing; --timeout SECONDS bounds "
        "the whole watch (exit 1 with --until-firing when nothing fired, else 0).",
    )
    _add_model_flag(watch, "only this model's alerts")
    watch.add_argument("--rule", type=rule_name, metavar="RULE", help="only this rule's alerts")
    watch.add_argument("--until-firing", action="store_true", help="exit 0 once an alert is firing")

    rules = sub.add_parser("rules", help="create, list, show and delete alert rules")
    rules.set_defaults(handler=_usage(rules))
    rule_commands = rules.add_subparsers(metavar="COMMAND")
    create = _command(
        rule_commands, client, "create", rules_create, "create a rule that opens alerts"
    )
    add_rule_arguments(create)
    rule_list = _command(rule_commands, client, "list", rules_list, "alert rules, by name")
    _add_model_flag(rule_list, "only this model's rules")
    rule_list.add_argument(
        "--limit", type=positive, default=50, metavar="N", help="at most this many (default: 50)"
    )
    for name, command, help in (
        ("show", rules_show, "one rule"),
        ("delete", rules_delete, "delete a rule (its open alerts resolve; history stays)"),
    ):
        parser = _command(rule_commands, client, name, command, help)
        parser.add_argument("rule", type=rule_name, metavar="RULE", help="drift or alertRules/…")


def add_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``conveyor alerts rules create``."""
    parser.add_argument("rule_id", metavar="RULE_ID", help="the rule's id, e.g. fraud-drift")
    parser.add_argument("--model", type=model_name, required=True, help="fraud or models/fraud")
    parser.add_argument(
        "--version", type=version_ref, help="only this version (3 or models/M/versions/3)"
    )
    condition = parser.add_argument_group("condition (one)").add_mutually_exclusive_group(
        required=True
    )
    condition.add_argument(
        "--drift",
        metavar="SCOPE",
        help="dataset, prediction, or a feature's name (feature:NAME for one named so)",
    )
    condition.add_argument(
        "--outlier-rate", type=float, metavar="RATE", help="fire above this share, in (0, 1)"
    )
    condition.add_argument(
        "--performance", type=str.lower, choices=METRICS, help="fire when it degrades"
    )
    condition.add_argument("--slo", metavar="SLO", help="fire when this SLO is not met")
    parser.add_argument(
        "--max-degradation",
        type=float,
        metavar="AMOUNT",
        help="with --performance: the drop allowed (default: the model's monitoring config)",
    )
    parser.add_argument(
        "--burn-rate",
        type=float,
        metavar="RATE",
        help="with --slo: fire at this error-budget burn rate, not when the SLO is missed",
    )
    windows = whole_number(0, MAX_INT32)
    parser.add_argument(
        "--trigger-windows",
        type=windows,
        default=0,
        metavar="N",
        help="breaching windows in a row before an alert opens (default: 1)",
    )
    parser.add_argument(
        "--resolve-windows",
        type=windows,
        default=0,
        metavar="N",
        help="clear windows in a row before it resolves (default: as --trigger-windows)",
    )
    parser.add_argument(
        "--severity", type=str.lower, choices=SEVERITIES, default="warning", help="default: warning"
    )
    parser.add_argument(
        "--rollback", metavar="ALIAS", help="when an alert opens, move ALIAS back a version"
    )
    parser.add_argument(
        "--retrain", action="store_true", help="when an alert opens, start a retraining job"
    )
    parser.add_argument("--display-name", default="", metavar="TEXT", help="a human-readable name")


def model_name(text: str) -> str:
    """``models/fraud`` from ``fraud`` or ``models/fraud``."""
    model = text.removeprefix("models/")
    try:
        names.check_id(model, field="model")
    except ConveyorError:
        raise argparse.ArgumentTypeError(
            f"expected MODEL or models/MODEL (fraud, models/fraud), got {text!r}"
        ) from None
    return f"models/{model}"


def version_ref(text: str) -> str:
    """A version number (``3``) or a version's full name, as given."""
    if text.isdigit() or (text.startswith("models/") and "/versions/" in text):
        return text
    raise argparse.ArgumentTypeError(
        f"expected a version number (3) or models/MODEL/versions/N, got {text!r}"
    )


def alert_name(text: str) -> str:
    """``alerts/alert-3f2a`` from ``alert-3f2a`` or the full name."""
    return text if text.startswith("alerts/") else f"alerts/{text}"


def rule_name(text: str) -> str:
    """``alertRules/drift`` from ``drift`` or the full name."""
    return text if text.startswith("alertRules/") else f"alertRules/{text}"


def alert_rule(args: argparse.Namespace) -> pb.AlertRule:
    """The rule ``rules create``'s arguments describe."""
    for flag, value, needs in (
        ("--max-degradation", args.max_degradation, args.performance),
        ("--burn-rate", args.burn_rate, args.slo),
    ):
        if value is not None and needs is None:
            condition = "--performance" if flag == "--max-degradation" else "--slo"
            raise CommandError(
                "INVALID_ARGUMENT",
                f"{flag} applies to a {condition} condition only",
                hint=f"add {condition} or leave {flag} out",
            )
    rule = pb.AlertRule(
        model=args.model,
        display_name=args.display_name,
        trigger_windows=args.trigger_windows,
        resolve_windows=args.resolve_windows,
        severity=SEVERITIES[args.severity],
    )
    if args.version is not None:
        rule.model_version = (
            f"{args.model}/versions/{int(args.version)}" if args.version.isdigit() else args.version
        )
    if args.drift is not None:
        scopes = {"dataset": pb.DRIFT_SCOPE_DATASET, "prediction": pb.DRIFT_SCOPE_PREDICTION}
        if args.drift in scopes:
            rule.drift.scope = scopes[args.drift]
        else:
            rule.drift.scope = pb.DRIFT_SCOPE_FEATURE
            rule.drift.feature = args.drift.removeprefix("feature:")
    elif args.outlier_rate is not None:
        rule.outliers.max_outlier_rate = args.outlier_rate
    elif args.performance is not None:
        rule.performance.metric = METRICS[args.performance]
        if args.max_degradation is not None:
            rule.performance.max_degradation = args.max_degradation
    else:
        slo = args.slo
        prefix = "serviceLevelObjectives/"
        rule.slo.service_level_objective = slo if slo.startswith(prefix) else prefix + slo
        if args.burn_rate is not None:
            rule.slo.burn_rate_threshold = args.burn_rate
    if args.rollback is not None:
        rule.actions.add(rollback=pb.RollbackAction(alias=args.rollback))
    if args.retrain:
        rule.actions.add(retrain=pb.RetrainAction())
    return rule


def alerts_filter(args: argparse.Namespace) -> str:
    """The AIP-160 filter of ``list`` and ``watch``: ``model = "models/fraud" AND …``."""
    terms = []
    if args.model:
        terms.append(f'model = "{args.model}"')
    if getattr(args, "state", None):
        terms.append(STATES[args.state])
    if args.rule:
        terms.append(f'alert_rule = "{args.rule}"')
    return " AND ".join(terms)


# -- running a command --------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """:func:`conveyor.services.monitor.cli.run`, with hints about alerts."""
    return monitor_cli.run(partial(_hinted, command), args)


async def _hinted(command: Command, session: Session, args: argparse.Namespace) -> int:
    try:
        return await command(session, args)
    except grpc.RpcError as error:
        failure = from_rpc_error(error)
    return out.report(failure, hint(failure, args, target=session.target))


def hint(error: ConveyorError, args: argparse.Namespace, *, target: str) -> str:
    """What to do next after a failed call about alerts."""
    code = error.code
    alert = getattr(args, "alert", None)
    rule = getattr(args, "rule", None) or getattr(args, "rule_id", None)
    creating = getattr(args, "rule_id", None) is not None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        flags = named_flags(error, FLAGS)
        if creating and flags:
            return f"fix {', '.join(flags)} and run the command again"
    if code == grpc.StatusCode.NOT_FOUND and not creating:
        if alert:
            return "check the id: `conveyor alerts list` shows the alerts, newest first"
        return "check the id: `conveyor alerts rules list` shows the rules"
    if code == grpc.StatusCode.FAILED_PRECONDITION and alert:
        return (
            "the alert has resolved, so there is nothing to acknowledge: "
            f"`conveyor alerts show {short_name(alert)}` says when and why"
        )
    hints = {
        grpc.StatusCode.ALREADY_EXISTS: (
            f"the id is taken: `conveyor alerts rules show {short_name(rule or '')}` shows that "
            "rule; choose another RULE_ID or delete it first"
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (
            "the monitor has too many watches open: stop some and run the command again"
        ),
        grpc.StatusCode.PERMISSION_DENIED: (
            "your role does not allow this on the model's alerts: ask its owner team"
        ),
    }
    if code in hints:
        return hints[code]
    # The rest (unreachable, deadline, credentials, an unknown model) as `drift` says it.
    about = argparse.Namespace(model=getattr(args, "model", None) or "models/MODEL", window=None)
    return monitor_cli.hint(error, about, target=target)


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def print_usage(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return print_usage


def _command(
    sub: _Subparsers[argparse.ArgumentParser],
    client: argparse.ArgumentParser,
    name: str,
    command: Command,
    help: str,
    *,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description or help, parents=[client])
    parser.set_defaults(handler=partial(run, command))
    return parser


def _add_model_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--model", type=model_name, metavar="MODEL", help=help)


# -- commands ---------------------------------------------------------------------


async def alerts_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts list``: alerts newest first, as a table or JSON."""
    restriction = alerts_filter(args)

    async def page(token: str, size: int) -> tuple[list[pb.Alert], str]:
        request = rpc.ListAlertsRequest(page_size=size, page_token=token, filter=restriction)
        reply = await session.monitor.ListAlerts(request, timeout=session.timeout)
        return list(reply.alerts), reply.next_page_token

    found, more = await pages_up_to(page, args.limit, LIST_PAGE_SIZE)
    if args.json:
        out.print_json({"alerts": [out.message_dict(alert) for alert in found]})
    elif found:
        out.print_table(ALERT_COLUMNS, [alert_cells(alert) for alert in found])
        if more:
            print(f"(more: raise --limit above {args.limit})", file=sys.stderr)
    else:
        print("no alerts" + (" match" if restriction else ""), file=sys.stderr)
    return 0


async def alerts_show(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts show ALERT``: every field, then the actions' outcomes."""
    reply = await session.monitor.GetAlert(
        rpc.GetAlertRequest(name=args.alert), timeout=session.timeout
    )
    alert = reply.alert
    if args.json:
        out.print_json({"alert": out.message_dict(alert)})
        return 0
    out.print_fields(alert_fields(alert))
    if alert.actions:
        print()
        out.print_table(
            ("action", "state", "resources", "decision", "started", "ended", "message"),
            [action_cells(action) for action in alert.actions],
        )
    return 0


async def alerts_ack(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts ack ALERT``: someone is on it; it stays open until it clears."""
    request = rpc.AcknowledgeAlertRequest(name=args.alert, comment=args.comment)
    alert = (await session.monitor.AcknowledgeAlert(request, timeout=session.timeout)).alert
    if args.json:
        out.print_json({"alert": out.message_dict(alert)})
    else:
        print(
            f"{alert.name} acknowledged by {alert.acknowledged_by or '?'} at "
            f"{out.timestamp(alert.acknowledge_time)}; it stays open until its condition clears"
        )
    return 0


async def alerts_watch(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts watch``: one line per event until Ctrl-C, the timeout,
    or with ``--until-firing`` a firing alert."""
    acknowledged = False
    try:
        async with (
            asyncio.timeout(args.timeout),
            aclosing(watch_events(session, alerts_filter(args))) as events,
        ):
            async for event in events:
                if args.json:
                    print(json.dumps(out.message_dict(event), sort_keys=True), flush=True)
                else:
                    print(event_line(event), flush=True)
                state = event.alert.state
                if args.until_firing and state == pb.ALERT_STATE_FIRING:
                    return 0
                acknowledged |= state == pb.ALERT_STATE_ACKNOWLEDGED
    except TimeoutError:
        if not args.until_firing:
            return 0
        what = f"alert of {args.model}" if args.model else "alert"
        note = " (acknowledged alerts do not count)" if acknowledged else ""
        print(f"conveyor: no {what} fired in {args.timeout:g} s{note}", file=sys.stderr)
        print(
            "hint: `conveyor alerts rules list` shows the rules that would open one; "
            f"`conveyor drift {out.model_id(args.model or 'MODEL')}` the latest window's drift",
            file=sys.stderr,
        )
        return EXIT_NOTHING_FIRED
    return 0


async def watch_events(
    session: Session, restriction: str
) -> AsyncGenerator[rpc.WatchAlertsResponse]:
    """``WatchAlerts``'s events. When the monitor shuts down it says where to
    resume; the watch then waits for it to come back and picks up there."""
    after, resuming = 0, False
    while True:
        request = rpc.WatchAlertsRequest(filter=restriction, resume_after_sequence=after)
        try:
            async for event in session.monitor.WatchAlerts(
                request, timeout=None, wait_for_ready=resuming
            ):
                after = max(after, event.sequence)
                yield event
            return  # the monitor ended the stream (it only does on shutdown, with a status)
        except grpc.RpcError as error:
            failure = from_rpc_error(error)
            if failure.code == grpc.StatusCode.UNAVAILABLE and (
                sequence := failure.metadata.get("resume_after_sequence")
            ):
                after, resuming = max(after, int(sequence)), True
                print("conveyor: the monitor went away; waiting for it…", file=sys.stderr)
            elif resuming and failure.reason == "EVENTS_PURGED":
                after = 0  # the events missed are gone: start again from the open alerts
            else:
                raise


async def rules_create(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts rules create RULE_ID …``: the created rule."""
    request = rpc.CreateAlertRuleRequest(
        alert_rule=alert_rule(args), alert_rule_id=args.rule_id.removeprefix("alertRules/")
    )
    reply = await session.monitor.CreateAlertRule(request, timeout=session.timeout)
    print_rule(reply.alert_rule, as_json=args.json)
    return 0


async def rules_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts rules list``: the rules by name, as a table or JSON."""
    restriction = f'model = "{args.model}"' if args.model else ""

    async def page(token: str, size: int) -> tuple[list[pb.AlertRule], str]:
        request = rpc.ListAlertRulesRequest(page_size=size, page_token=token, filter=restriction)
        reply = await session.monitor.ListAlertRules(request, timeout=session.timeout)
        return list(reply.alert_rules), reply.next_page_token

    found, more = await pages_up_to(page, args.limit, LIST_PAGE_SIZE)
    if args.json:
        out.print_json({"alert_rules": [out.message_dict(rule) for rule in found]})
    elif found:
        out.print_table(RULE_COLUMNS, [rule_cells(rule) for rule in found])
        if more:
            print(f"(more: raise --limit above {args.limit})", file=sys.stderr)
    else:
        print("no alert rules" + (" match" if restriction else ""), file=sys.stderr)
    return 0


async def rules_show(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts rules show RULE``."""
    request = rpc.GetAlertRuleRequest(name=args.rule)
    reply = await session.monitor.GetAlertRule(request, timeout=session.timeout)
    print_rule(reply.alert_rule, as_json=args.json)
    return 0


async def rules_delete(session: Session, args: argparse.Namespace) -> int:
    """``conveyor alerts rules delete RULE``: its open alerts resolve."""
    request = rpc.DeleteAlertRuleRequest(name=args.rule)
    await session.monitor.DeleteAlertRule(request, timeout=session.timeout)
    if args.json:
        out.print_json({})
    else:
        print(f"deleted {args.rule}; its open alerts are resolved, its history kept")
    return 0
