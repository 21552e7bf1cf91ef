"""The monitor's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Times are integers, microseconds since the Unix epoch: they are compared and
bucketed on every ingest, and integers keep that cheap and exact on both
databases. A prediction's features and outputs are stored as packed float64
bytes (categorical values as a JSON list): rows are written and read whole,
never queried by value. Resources that the API returns whole (configs,
references, SLOs, rules, alerts, stored reports) keep their message in
``body``. Alembic migrations in ``migrations/`` create the tables; a test
checks that the migrated database matches this module.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

NAME = 200
"""Room for ``models/{model}/versions/{version}`` and the other resource names."""

predictions = Table(
    "predictions",
    metadata,
    # (model, request_id) first: feedback joins on it; with the version it is
    # also the record's idempotency key.
    Column("model", String(NAME), primary_key=True),
    Column("request_id", String(256), primary_key=True),
    Column("model_version", String(NAME), primary_key=True),
    Column("time_us", BigInteger, nullable=False),
    Column("window_index", BigInteger, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("latency_us", BigInteger, nullable=False),
    Column("shadow", Boolean, nullable=False),
    Column("numerical", LargeBinary, nullable=False),
    Column("categorical", Text, nullable=False),
    Column("outputs", LargeBinary, nullable=False),
    Column("subject_hash", String(64), nullable=True),
    Column("outlier_score", Float, nullable=True),
    Column("outlier", Boolean, nullable=False),
    Column("label", Integer, nullable=True),
    Column("label_time_us", BigInteger, nullable=True),
    Column("ingest_time_us", BigInteger, nullable=False),
    Index("predictions_by_window", "model_version", "window_index"),
    # Only the rows of subjects: every index entry costs each insert.
    Index(
        "predictions_by_subject",
        "subject_hash",
        sqlite_where=text("subject_hash IS NOT NULL"),
        postgresql_where=text("subject_hash IS NOT NULL"),
    ),
    # Time ranges of a version (canary analysis, retraining, listing), of a
    # model (model-wide SLOs) and retention: the model's rows are few versions'.
    Index("predictions_by_model_time", "model", "time_us"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("model", String(NAME), primary_key=True),
    Column("request_id", String(256), primary_key=True),
    Column("label", Integer, nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("ingest_time_us", BigInteger, nullable=False),
)

windows = Table(
    "windows",
    metadata,
    Column("model_version", String(NAME), primary_key=True),
    Column("window_index", BigInteger, primary_key=True),
    Column("start_us", BigInteger, nullable=False),
    Column("end_us", BigInteger, nullable=False),
    # Time windows: when the window closes; NULL for count windows.
    Column("deadline_us", BigInteger, nullable=True),
    Column("row_count", BigInteger, nullable=False),
    Column("error_count", BigInteger, nullable=False),
    Column("outlier_count", BigInteger, nullable=False),
    Column("closed", Boolean, nullable=False),
    Column("close_time_us", BigInteger, nullable=True),
)

packed_windows = Table(
    "packed_windows",
    metadata,
    # A closed window's successful rows as columns (packed_windows.py): each
    # numerical column sorted, the categories and outputs in runs of rows.
    # Derived from ``predictions``: dropped when an erasure or the retention
    # removes rows of the window.
    Column("model_version", String(NAME), primary_key=True),
    Column("window_index", BigInteger, primary_key=True),
    Column("part", Integer, primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("row_count", BigInteger, nullable=False),
    Column("columns", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

references = Table(
    "version_references",
    metadata,
    Column("model_version", String(NAME), primary_key=True),
    Column("body", LargeBinary, nullable=False),
    # The reference rows (an .npz of numerical, categorical, outputs, labels).
    Column("data", LargeBinary, nullable=False),
    # The fitted outlier scorer (OutlierScorer.to_bytes), NULL without one.
    Column("scorer", LargeBinary, nullable=True),
    Column("scorer_method", Integer, nullable=False),
)

monitoring_configs = Table(
    "monitoring_configs",
    metadata,
    Column("model", String(NAME), primary_key=True),
    Column("body", LargeBinary, nullable=False),
)

reports = Table(
    "reports",
    metadata,
    Column("model_version", String(NAME), primary_key=True),
    Column("window_index", BigInteger, primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("body", LargeBinary, nullable=False),
    # VersionProfile.settings_time_us of the config and reference it was
    # computed under: a report is served back only while they are current.
    Column("settings_time_us", BigInteger, nullable=True),
)

service_level_objectives = Table(
    "service_level_objectives",
    metadata,
    Column("slo_id", String(63), primary_key=True),
    Column("model", String(NAME), nullable=False),
    Column("request_id", String(64), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("body", LargeBinary, nullable=False),
)

alert_rules = Table(
    "alert_rules",
    metadata,
    Column("rule_id", String(63), primary_key=True),
    Column("model", String(NAME), nullable=False),
    Column("request_id", String(64), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("body", LargeBinary, nullable=False),
)

rule_states = Table(
    "rule_states",
    metadata,
    Column("rule_id", String(63), primary_key=True),
    Column("model_version", String(NAME), primary_key=True),
    # alerting.RuleState as JSON: streak counters and the open alert's name.
    Column("state", Text, nullable=False),
)

alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", String(63), primary_key=True),
    Column("rule_id", String(63), nullable=False),
    Column("model_version", String(NAME), nullable=False),
    Column("state", Integer, nullable=False),
    Column("open_time_us", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Index("alerts_by_rule", "rule_id", "model_version", "state"),
)

alert_events = Table(
    "alert_events",
    metadata,
    # The WatchAlerts sequence: resuming after N replays every later event.
    Column("sequence", Integer, primary_key=True, autoincrement=True),
    Column("event_type", Integer, nullable=False),
    Column("alert_id", String(63), nullable=False),
    Column("body", LargeBinary, nullable=False),
    # When it was recorded (retention); NULL for events recorded before 0002.
    Column("time_us", BigInteger, nullable=True),
    # A watch's snapshot reads each open alert's latest event.
    Index("alert_events_by_alert", "alert_id", "sequence"),
)

canary_analyses = Table(
    "canary_analyses",
    metadata,
    Column("model", String(NAME), primary_key=True),
    Column("body", LargeBinary, nullable=False),
)
