"""SLOs, alert rules, their per-version state, alerts and the alert event log.

Every alert change is stored with an event in the same transaction, so the
``WatchAlerts`` sequence never skips or repeats a change, and a watcher that
reconnects replays exactly what it missed. Checks that span tables (an SLO
still used by a rule, a rule's SLO still there) run inside the transaction
that writes, so a concurrent call cannot slip between check and write.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import and_, case, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import schema
from conveyor.shared.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PreconditionViolation,
)
from conveyor.shared.storage import read_transaction, write_transaction

OPEN_STATES: Final = (pb.ALERT_STATE_FIRING, pb.ALERT_STATE_ACKNOWLEDGED)

slos = schema.service_level_objectives
rules = schema.alert_rules
alerts = schema.alerts
events = schema.alert_events
states = schema.rule_states

Change = tuple[pb.AlertEventType.ValueType, pb.Alert]
"""An alert event to store: its type and the alert after it."""


@dataclass(frozen=True)
class AlertEvent:
    sequence: int
    type: pb.AlertEventType.ValueType
    alert: pb.Alert


@dataclass(frozen=True)
class AlertSnapshot:
    """The open alerts, each with the sequence of its latest event, and the
    latest sequence of all, read at one instant."""

    last_sequence: int
    open_alerts: list[tuple[int, pb.Alert]]


class AlertStore:
    """The alerting tables on the monitor's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- SLOs ---------------------------------------------------------------------

    def create_slo(
        self, slo: pb.ServiceLevelObjective, *, request_id: str, request_hash: str
    ) -> pb.ServiceLevelObjective:
        stored: pb.ServiceLevelObjective = self._create(
            slos, "slo_id", slo, request_id=request_id, request_hash=request_hash
        )
        return stored

    def slo(self, name: str) -> pb.ServiceLevelObjective:
        return pb.ServiceLevelObjective.FromString(self._get(slos, "slo_id", name, "SLO_NOT_FOUND"))

    def all_slos(self) -> list[pb.ServiceLevelObjective]:
        return [pb.ServiceLevelObjective.FromString(b) for b in self._bodies(slos, "slo_id")]

    def replace_slo(self, slo: pb.ServiceLevelObjective) -> None:
        with write_transaction(self.engine) as connection:
            self._replace_in(connection, slos, "slo_id", slo, "SLO_NOT_FOUND")

    def delete_slo(self, name: str) -> None:
        """Delete the SLO; FAILED_PRECONDITION while a rule refers to it."""
        with write_transaction(self.engine) as connection:
            users = [
                rule.name
                for rule in _rules_in(connection)
                if rule.WhichOneof("condition") == "slo"
                and rule.slo.service_level_objective == name
            ]
            if users:
                raise FailedPreconditionError(
                    f"{name} is used by {', '.join(users)}: delete or change those rules first",
                    reason="SLO_IN_USE",
                    violations=[
                        PreconditionViolation("SLO_IN_USE", rule, f"{rule} refers to {name}")
                        for rule in users
                    ],
                )
            self._delete_in(connection, slos, "slo_id", name, "SLO_NOT_FOUND")

    def slo_counts(
        self,
        slo: pb.ServiceLevelObjective,
        *,
        since_us: int | None = None,
        model_version: str | None = None,
        window_index: int | None = None,
    ) -> tuple[int, int]:
        """(good, total) predictions of the SLO (shadow ones left out), since
        ``since_us`` or in one window of ``model_version``: counted by the
        database, not by reading rows."""
        predictions = schema.predictions
        where = [predictions.c.model == slo.model, predictions.c.shadow.is_(False)]
        version = model_version or slo.model_version
        if version:
            where.append(predictions.c.model_version == version)
        if since_us is not None:
            where.append(predictions.c.time_us >= since_us)
        if window_index is not None:
            where.append(predictions.c.window_index == window_index)
        good = predictions.c.status_code == 0
        if slo.indicator == pb.SERVICE_LEVEL_INDICATOR_LATENCY:
            good = and_(good, predictions.c.latency_us <= slo.latency_threshold.ToMicroseconds())
        query = select(func.count(), func.coalesce(func.sum(case((good, 1), else_=0)), 0)).where(
            *where
        )
        with read_transaction(self.engine) as connection:
            total, good_count = connection.execute(query).one()
        return int(good_count), int(total)

    # -- rules and their state -------------------------------------------------------

    def create_rule(
        self, rule: pb.AlertRule, *, request_id: str, request_hash: str
    ) -> pb.AlertRule:
        """Store a new rule; NOT_FOUND when its SLO was deleted meanwhile."""
        stored: pb.AlertRule = self._create(
            rules,
            "rule_id",
            rule,
            request_id=request_id,
            request_hash=request_hash,
            check=lambda connection: _slo_exists(connection, rule),
        )
        return stored

    def rule(self, name: str) -> pb.AlertRule:
        return pb.AlertRule.FromString(self._get(rules, "rule_id", name, "ALERT_RULE_NOT_FOUND"))

    def all_rules(self) -> list[pb.AlertRule]:
        with read_transaction(self.engine) as connection:
            return _rules_in(connection)

    def replace_rule(
        self, rule: pb.AlertRule, *, reset_state: bool, changes: Sequence[Change] = ()
    ) -> list[AlertEvent]:
        """Store the updated rule, restart its streaks when ``reset_state``
        (a changed condition or scope), and store ``changes`` (alerts the
        update resolved), in one transaction."""
        with write_transaction(self.engine) as connection:
            self._replace_in(connection, rules, "rule_id", rule, "ALERT_RULE_NOT_FOUND")
            _slo_exists(connection, rule)
            if reset_state:
                connection.execute(delete(states).where(states.c.rule_id == _id(rule.name)))
            return _record_in(connection, changes)

    def delete_rule(self, name: str, *, changes: Sequence[Change] = ()) -> list[AlertEvent]:
        """Delete the rule and its state and store ``changes`` (its resolved
        alerts), in one transaction; its alert history stays."""
        with write_transaction(self.engine) as connection:
            self._delete_in(connection, rules, "rule_id", name, "ALERT_RULE_NOT_FOUND")
            connection.execute(delete(states).where(states.c.rule_id == _id(name)))
            return _record_in(connection, changes)

    def rule_state(self, rule_name: str, model_version: str) -> str | None:
        """The rule's stored state on the version (``alerting.RuleState`` JSON)."""
        with read_transaction(self.engine) as connection:
            text: str | None = connection.execute(
                select(states.c.state).where(
                    states.c.rule_id == _id(rule_name), states.c.model_version == model_version
                )
            ).scalar()
        return text

    # -- alerts -------------------------------------------------------------------------

    def alert(self, name: str) -> pb.Alert:
        body = self._get(alerts, "alert_id", name, "ALERT_NOT_FOUND")
        return pb.Alert.FromString(body)

    def all_alerts(self, *, newest_first: bool) -> list[pb.Alert]:
        """Every alert, by opening time (then by id)."""
        order = (alerts.c.open_time_us, alerts.c.alert_id)
        query = select(alerts.c.body).order_by(
            *(column.desc() for column in order) if newest_first else order
        )
        with read_transaction(self.engine) as connection:
            return [pb.Alert.FromString(b) for b in connection.execute(query).scalars()]

    def open_alerts(
        self, rule_name: str | None = None, model_version: str | None = None
    ) -> list[pb.Alert]:
        """The open alerts (of one rule, on one version), oldest first."""
        query = select(alerts.c.body).where(alerts.c.state.in_(OPEN_STATES))
        if rule_name is not None:
            query = query.where(alerts.c.rule_id == _id(rule_name))
        if model_version is not None:
            query = query.where(alerts.c.model_version == model_version)
        query = query.order_by(alerts.c.open_time_us, alerts.c.alert_id)
        with read_transaction(self.engine) as connection:
            return [pb.Alert.FromString(b) for b in connection.execute(query).scalars()]

    def record(
        self,
        changes: Sequence[Change],
        *,
        rule_name: str | None = None,
        model_version: str | None = None,
        state: str | None = None,
    ) -> list[AlertEvent]:
        """Store alert changes with their events, and the rule's state for the
        version (when given), in one transaction."""
        with write_transaction(self.engine) as connection:
            recorded = _record_in(connection, changes)
            if rule_name is not None and model_version is not None and state is not None:
                key = (states.c.rule_id == _id(rule_name), states.c.model_version == model_version)
                connection.execute(delete(states).where(*key))
                connection.execute(
                    insert(states).values(
                        rule_id=_id(rule_name), model_version=model_version, state=state
                    )
                )
        return recorded

    def snapshot(self) -> AlertSnapshot:
        """The open alerts with their latest event's sequence, and the latest
        sequence, from one consistent read."""
        latest = (
            select(func.max(events.c.sequence))
            .where(events.c.alert_id == alerts.c.alert_id)
            .scalar_subquery()
        )
        query = (
            select(latest, alerts.c.body)
            .where(alerts.c.state.in_(OPEN_STATES))
            .order_by(alerts.c.open_time_us, alerts.c.alert_id)
        )
        with read_transaction(self.engine) as connection:
            last = connection.execute(select(func.max(events.c.sequence))).scalar()
            found = [
                (int(seq or 0), pb.Alert.FromString(body))
                for seq, body in connection.execute(query)
            ]
        return AlertSnapshot(int(last or 0), found)

    def events_after(self, sequence: int, *, limit: int = 1_000) -> list[AlertEvent]:
        with read_transaction(self.engine) as connection:
            rows = connection.execute(
                select(events.c.sequence, events.c.event_type, events.c.body)
                .where(events.c.sequence > sequence)
                .order_by(events.c.sequence)
                .limit(limit)
            ).all()
        return [AlertEvent(r.sequence, r.event_type, pb.Alert.FromString(r.body)) for r in rows]

    def first_sequence(self) -> int | None:
        """The oldest event kept (None before any)."""
        with read_transaction(self.engine) as connection:
            first: int | None = connection.execute(select(func.min(events.c.sequence))).scalar()
        return first

    def purge_events(self, cutoff_us: int) -> int:
        """Delete the oldest events, those recorded before ``cutoff_us``, up to
        (not including) the latest event of any open alert: what is kept is
        always every event after the first kept one (``first_sequence`` tells a
        resuming watch whether it missed some) and each open alert's latest
        event (its snapshot's sequence)."""
        open_latest = (
            select(func.max(events.c.sequence))
            .where(events.c.alert_id == alerts.c.alert_id)
            .scalar_subquery()
        )
        with write_transaction(self.engine) as connection:
            old = connection.execute(
                select(func.max(events.c.sequence)).where(events.c.time_us < cutoff_us)
            ).scalar()
            if old is None:
                return 0
            oldest_open = connection.execute(
                select(func.min(open_latest)).where(alerts.c.state.in_(OPEN_STATES))
            ).scalar()
            last = old if oldest_open is None else min(old, oldest_open - 1)
            deleted: int = connection.execute(
                delete(events).where(events.c.sequence <= last)
            ).rowcount
        return deleted

    # -- shared ---------------------------------------------------------------------------

    def _create(
        self,
        table: Any,
        key: str,
        message: Any,
        *,
        request_id: str,
        request_hash: str,
        check: Any = None,
    ) -> Any:
        if request_id:
            found = self._by_request(table, message, request_id, request_hash)
            if found is not None:
                return found
        try:
            with write_transaction(self.engine) as connection:
                if check is not None:
                    check(connection)
                connection.execute(
                    insert(table).values(
                        **{key: _id(message.name)},
                        model=message.model,
                        request_id=request_id or None,
                        request_hash=request_hash or None,
                        body=message.SerializeToString(),
                    )
                )
        except IntegrityError:
            if request_id:
                found = self._by_request(table, message, request_id, request_hash)
                if found is not None:
                    return found
            raise AlreadyExistsError(
                f"{message.name} already exists",
                reason="ALREADY_EXISTS",
                metadata={"name": message.name},
            ) from None
        return message

    def _by_request(self, table: Any, message: Any, request_id: str, request_hash: str) -> Any:
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(table.c.body, table.c.request_hash).where(table.c.request_id == request_id)
            ).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise InvalidArgumentError(
                "request_id was used for a different request; use a new one",
                reason="REQUEST_ID_REUSED",
            )
        return type(message).FromString(row.body)

    def _get(self, table: Any, key: str, name: str, reason: str) -> bytes:
        with read_transaction(self.engine) as connection:
            body: bytes | None = connection.execute(
                select(table.c.body).where(table.c[key] == _id(name))
            ).scalar()
        if body is None:
            raise _not_found(name, reason)
        return body

    def _bodies(self, table: Any, key: str) -> list[bytes]:
        with read_transaction(self.engine) as connection:
            return list(connection.execute(select(table.c.body).order_by(table.c[key])).scalars())

    def _replace_in(
        self, connection: Connection, table: Any, key: str, message: Any, reason: str
    ) -> None:
        updated = connection.execute(
            update(table)
            .where(table.c[key] == _id(message.name))
            .values(body=message.SerializeToString(), model=message.model)
        ).rowcount
        if not updated:
            raise _not_found(message.name, reason)

    def _delete_in(
        self, connection: Connection, table: Any, key: str, name: str, reason: str
    ) -> None:
        if not connection.execute(delete(table).where(table.c[key] == _id(name))).rowcount:
            raise _not_found(name, reason)


def _record_in(connection: Connection, changes: Sequence[Change]) -> list[AlertEvent]:
    recorded: list[AlertEvent] = []
    for event_type, alert in changes:
        _put_alert(connection, alert)
        result = connection.execute(
            insert(events).values(
                event_type=event_type,
                alert_id=_id(alert.name),
                body=alert.SerializeToString(),
                time_us=time.time_ns() // 1000,
            )
        )
        sequence = int(result.inserted_primary_key[0])  # type: ignore[index]
        recorded.append(AlertEvent(sequence, event_type, alert))
    return recorded


def _put_alert(connection: Connection, alert: pb.Alert) -> None:
    alert_id = _id(alert.name)
    values = {
        "rule_id": _id(alert.alert_rule),
        "model_version": alert.model_version,
        "state": alert.state,
        "open_time_us": alert.open_time.ToMicroseconds(),
        "body": alert.SerializeToString(),
    }
    updated = connection.execute(
        update(alerts).where(alerts.c.alert_id == alert_id).values(**values)
    ).rowcount
    if not updated:
        connection.execute(insert(alerts).values(alert_id=alert_id, **values))


def _rules_in(connection: Connection) -> list[pb.AlertRule]:
    bodies = connection.execute(select(rules.c.body).order_by(rules.c.rule_id)).scalars()
    return [pb.AlertRule.FromString(b) for b in bodies]


def _slo_exists(connection: Connection, rule: pb.AlertRule) -> None:
    """NOT_FOUND when ``rule`` watches an SLO that is not stored."""
    if rule.WhichOneof("condition") != "slo":
        return
    name = rule.slo.service_level_objective
    found = connection.execute(select(slos.c.slo_id).where(slos.c.slo_id == _id(name))).scalar()
    if found is None:
        raise _not_found(name, "SLO_NOT_FOUND")


def _not_found(name: str, reason: str) -> NotFoundError:
    return NotFoundError(f"{name} does not exist", reason=reason, metadata={"name": name})


def _id(name: str) -> str:
    """The id of a top-level resource name (``alerts/{id}``)."""
    return name.split("/", 1)[1]
