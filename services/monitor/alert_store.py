"""SLOs, alert rules, their per-version state, alerts and the alert event log.

Every alert change is stored with an event in the same transaction, so the
``WatchAlerts`` sequence never skips or repeats a change, and a watcher that
reconnects replays exactly what it missed.
"""

from __future__ import annotations

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
)
from conveyor.shared.storage import read_transaction, write_transaction

OPEN_STATES: Final = (pb.ALERT_STATE_FIRING, pb.ALERT_STATE_ACKNOWLEDGED)

slos = schema.service_level_objectives
rules = schema.alert_rules
alerts = schema.alerts
events = schema.alert_events
states = schema.rule_states


@dataclass(frozen=True)
class AlertEvent:
    sequence: int
    type: pb.AlertEventType.ValueType
    alert: pb.Alert


class AlertStore:
    """The alerting tables on the monitor's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- SLOs and rules: same shape, one implementation -----------------------

    def create_slo(
        self, slo: pb.ServiceLevelObjective, *, request_id: str, request_hash: str
    ) -> pb.ServiceLevelObjective:
        stored: pb.ServiceLevelObjective = self._create(
            slos, "slo_id", slo, request_id=request_id, request_hash=request_hash
        )
        return stored

    def create_rule(
        self, rule: pb.AlertRule, *, request_id: str, request_hash: str
    ) -> pb.AlertRule:
        stored: pb.AlertRule = self._create(
            rules, "rule_id", rule, request_id=request_id, request_hash=request_hash
        )
        return stored

    def slo(self, name: str) -> pb.ServiceLevelObjective:
        return pb.ServiceLevelObjective.FromString(self._get(slos, "slo_id", name))

    def rule(self, name: str) -> pb.AlertRule:
        return pb.AlertRule.FromString(self._get(rules, "rule_id", name))

    def all_slos(self) -> list[pb.ServiceLevelObjective]:
        return [pb.ServiceLevelObjective.FromString(b) for b in self._bodies(slos, "slo_id")]

    def all_rules(self) -> list[pb.AlertRule]:
        return [pb.AlertRule.FromString(b) for b in self._bodies(rules, "rule_id")]

    def replace_slo(self, slo: pb.ServiceLevelObjective) -> None:
        self._replace(slos, "slo_id", slo)

    def replace_rule(self, rule: pb.AlertRule, *, reset_state: bool) -> None:
        """Store the updated rule; a changed condition restarts its streaks."""
        with write_transaction(self.engine) as connection:
            self._replace_in(connection, rules, "rule_id", rule)
            if reset_state:
                connection.execute(delete(states).where(states.c.rule_id == _id(rule.name)))

    def delete_slo(self, name: str) -> None:
        rule_ids = [
            r.name
            for r in self.all_rules()
            if r.WhichOneof("condition") == "slo" and r.slo.service_level_objective == name
        ]
        if rule_ids:
            raise FailedPreconditionError(
                f"{name} is used by {', '.join(rule_ids)}: delete or change those rules first",
                reason="SLO_IN_USE",
            )
        self._delete(slos, "slo_id", name)

    def delete_rule(self, name: str) -> None:
        with write_transaction(self.engine) as connection:
            self._delete_in(connection, rules, "rule_id", name)
            connection.execute(delete(states).where(states.c.rule_id == _id(name)))

    # -- rule state -------------------------------------------------------------

    def rule_state(self, rule_name: str, model_version: str) -> str | None:
        """The rule's stored state on the version (``alerting.RuleState`` JSON)."""
        with read_transaction(self.engine) as connection:
            text: str | None = connection.execute(
                select(states.c.state).where(
                    states.c.rule_id == _id(rule_name), states.c.model_version == model_version
                )
            ).scalar()
        return text

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
        database over the time index, not by reading rows."""
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

    # -- alerts -----------------------------------------------------------------

    def alert(self, name: str) -> pb.Alert:
        with read_transaction(self.engine) as connection:
            body = connection.execute(
                select(alerts.c.body).where(alerts.c.alert_id == _id(name))
            ).scalar()
        if body is None:
            raise NotFoundError(f"{name} does not exist", reason="ALERT_NOT_FOUND")
        return pb.Alert.FromString(body)

    def all_alerts(self) -> list[pb.Alert]:
        with read_transaction(self.engine) as connection:
            bodies = connection.execute(
                select(alerts.c.body).order_by(alerts.c.open_time_us, alerts.c.alert_id)
            ).scalars()
            return [pb.Alert.FromString(b) for b in bodies]

    def open_alerts(self, rule_name: str | None = None) -> list[pb.Alert]:
        query = select(alerts.c.body).where(alerts.c.state.in_(OPEN_STATES))
        if rule_name is not None:
            query = query.where(alerts.c.rule_id == _id(rule_name))
        with read_transaction(self.engine) as connection:
            return [pb.Alert.FromString(b) for b in connection.execute(query).scalars()]

    def record(
        self,
        changes: Sequence[tuple[pb.AlertEventType.ValueType, pb.Alert]],
        *,
        rule_name: str | None = None,
        model_version: str | None = None,
        state: str | None = None,
    ) -> list[AlertEvent]:
        """Store alert changes (event type, alert) with their events, and the
        rule's state for the version, in one transaction."""
        recorded: list[AlertEvent] = []
        with write_transaction(self.engine) as connection:
            for event_type, alert in changes:
                self._put_alert(connection, alert)
                result = connection.execute(
                    insert(events).values(
                        event_type=event_type,
                        alert_id=_id(alert.name),
                        body=alert.SerializeToString(),
                    )
                )
                sequence = int(result.inserted_primary_key[0])  # type: ignore[index]
                recorded.append(AlertEvent(sequence, event_type, alert))
            if rule_name is not None and model_version is not None and state is not None:
                key = (states.c.rule_id == _id(rule_name), states.c.model_version == model_version)
                connection.execute(delete(states).where(*key))
                connection.execute(
                    insert(states).values(
                        rule_id=_id(rule_name), model_version=model_version, state=state
                    )
                )
        return recorded

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
            return connection.execute(select(func.min(events.c.sequence))).scalar()

    def last_sequence(self) -> int:
        with read_transaction(self.engine) as connection:
            return int(connection.execute(select(func.max(events.c.sequence))).scalar() or 0)

    def _put_alert(self, connection: Connection, alert: pb.Alert) -> None:
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

    # -- shared -------------------------------------------------------------------

    def _create(
        self, table: Any, key: str, message: Any, *, request_id: str, request_hash: str
    ) -> Any:
        if request_id:
            found = self._by_request(table, message, request_id, request_hash)
            if found is not None:
                return found
        try:
            with write_transaction(self.engine) as connection:
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
                f"{message.name} already exists", reason="ALREADY_EXISTS"
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
                "request_id was used for a different request", reason="REQUEST_ID_REUSED"
            )
        return type(message).FromString(row.body)

    def _get(self, table: Any, key: str, name: str) -> bytes:
        with read_transaction(self.engine) as connection:
            body: bytes | None = connection.execute(
                select(table.c.body).where(table.c[key] == _id(name))
            ).scalar()
        if body is None:
            raise NotFoundError(f"{name} does not exist", reason="NOT_FOUND")
        return body

    def _bodies(self, table: Any, key: str) -> list[bytes]:
        with read_transaction(self.engine) as connection:
            return list(connection.execute(select(table.c.body).order_by(table.c[key])).scalars())

    def _replace(self, table: Any, key: str, message: Any) -> None:
        with write_transaction(self.engine) as connection:
            self._replace_in(connection, table, key, message)

    def _replace_in(self, connection: Connection, table: Any, key: str, message: Any) -> None:
        updated = connection.execute(
            update(table)
            .where(table.c[key] == _id(message.name))
            .values(body=message.SerializeToString(), model=message.model)
        ).rowcount
        if not updated:
            raise NotFoundError(f"{message.name} does not exist", reason="NOT_FOUND")

    def _delete(self, table: Any, key: str, name: str) -> None:
        with write_transaction(self.engine) as connection:
            self._delete_in(connection, table, key, name)

    def _delete_in(self, connection: Connection, table: Any, key: str, name: str) -> None:
        if not connection.execute(delete(table).where(table.c[key] == _id(name))).rowcount:
            raise NotFoundError(f"{name} does not exist", reason="NOT_FOUND")


def _id(name: str) -> str:
    """The id of a top-level resource name (``alerts/{id}``)."""
    return name.split("/", 1)[1]
