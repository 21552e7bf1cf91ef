"""What the registry commands print: tables, field lists, JSON and progress.

Kept apart from :mod:`conveyor.services.registry.cli` so that the commands read
as calls to the registry, and the presentation can change without touching them.
Machine output (``--json``) is the proto3 JSON mapping of the API's own
messages, with the proto field names, so scripts see what the API returns.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.registry.v1 import resources_pb2 as pb

KEY_METRICS = ("accuracy", "f1", "roc_auc", "precision", "recall", "log_loss")
"""Metrics the versions table shows first; others follow by name, three in all."""

MAX_TABLE_METRICS = 3


def print_json(payload: Mapping[str, object]) -> None:
    """One JSON document on stdout."""
    print(json.dumps(payload, indent=2, sort_keys=True))


def message_dict(message: Message) -> dict[str, object]:
    """The proto3 JSON mapping of ``message``, with the proto field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Left-aligned columns separated by two spaces, headers in capitals."""
    table = [[h.upper() for h in headers], *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """``label:  value`` lines, the values aligned."""
    width = max(len(label) for label, _ in fields) + 1
    for label, value in fields:
        print(f"{label + ':':<{width}}  {value}".rstrip())


def model_rows(models: Iterable[pb.Model]) -> list[list[str]]:
    """Rows of the ``models list`` table."""
    return [
        [
            model_id(m.name),
            m.owner_team,
            enum_label(pb.RiskTier, m.risk_tier, "RISK_TIER_"),
            version_number(m.latest_version) or "-",
            alias_summary(m.aliases) or "-",
        ]
        for m in models
    ]


def model_fields(model: pb.Model, aliases: Sequence[pb.Alias]) -> list[tuple[str, str]]:
    """The ``models show`` listing: every field a person asks about, then aliases."""
    fields = [
        ("name", model.name),
        ("display name", model.display_name),
        ("description", model.description),
        ("owner team", model.owner_team),
        ("risk tier", enum_label(pb.RiskTier, model.risk_tier, "RISK_TIER_")),
        ("state", enum_label(pb.ModelState, model.state, "MODEL_STATE_")),
        ("tags", ", ".join(model.tags)),
        ("compliance tags", ", ".join(model.compliance_tags)),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(model.labels.items()))),
        ("promotion gates", ", ".join(_threshold(t) for t in model.promotion_thresholds)),
        ("latest version", model.latest_version or "-"),
        ("created", f"{timestamp(model.create_time)} by {model.created_by or '?'}"),
        ("updated", timestamp(model.update_time)),
        ("aliases", "" if aliases else "none"),
    ]
    fields.extend(
        (
            f"  {a.name.rpartition('/')[2]}",
            f"-> {a.version} (revision {a.revision}, {timestamp(a.update_time)}, "
            f"by {a.updated_by or '?'}: {a.reason})",
        )
        for a in aliases
    )
    return fields


def version_rows(versions: Iterable[pb.ModelVersion]) -> list[list[str]]:
    """Rows of the ``models versions`` table."""
    return [
        [
            version_number(v.name),
            enum_label(pb.ModelFormat, v.format, "MODEL_FORMAT_"),
            enum_label(pb.Stage, v.stage, "STAGE_"),
            ", ".join(v.aliases) or "-",
            key_metrics(v.metrics) or "-",
            v.artifact.sha256[:12],
            human_size(v.artifact.size_bytes),
            timestamp(v.create_time),
        ]
        for v in versions
    ]


def alias_rows(aliases: Iterable[pb.Alias]) -> list[list[str]]:
    """Rows of the ``models alias list`` table."""
    return [
        [
            a.name.rpartition("/")[2],
            version_number(a.version),
            version_number(a.previous_version) or "-",
            str(a.revision),
            timestamp(a.update_time),
            a.updated_by or "-",
            a.reason,
        ]
        for a in aliases
    ]


def key_metrics(metrics: Mapping[str, float]) -> str:
    """Up to three metrics, the well-known ones first: ``accuracy=0.97 f1=0.91``."""
    keys = [k for k in KEY_METRICS if k in metrics]
    keys += sorted(k for k in metrics if k not in KEY_METRICS)
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys[:MAX_TABLE_METRICS])


def alias_summary(aliases: Mapping[str, str]) -> str:
    """``production=3, staging=4`` from a model's alias map."""
    return ", ".join(f"{alias}={version_number(v)}" for alias, v in sorted(aliases.items()))


def model_id(name: str) -> str:
    """``churn`` from ``models/churn``."""
    return name.removeprefix("models/")


def version_number(name: str) -> str:
    """``3`` from ``models/churn/versions/3``; empty for an empty name."""
    return name.rpartition("/versions/")[2]


def enum_label(enum: object, value: int, prefix: str) -> str:
    """``medium`` for ``RISK_TIER_MEDIUM``; ``-`` when unset."""
    if value == 0:
        return "-"
    full: str = enum.Name(value)  # type: ignore[attr-defined]
    return full.removeprefix(prefix).lower()


def timestamp(value: Timestamp) -> str:
    """``2026-01-31 12:00:00Z``, or ``-`` when unset."""
    if not value.seconds and not value.nanos:
        return "-"
    return value.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def human_size(size: int) -> str:
    """``4.0 MiB``: binary units, one decimal above bytes."""
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def _threshold(threshold: pb.MetricThreshold) -> str:
    sign = {
        pb.THRESHOLD_COMPARISON_GREATER_OR_EQUAL: ">=",
        pb.THRESHOLD_COMPARISON_LESS_OR_EQUAL: "<=",
    }.get(threshold.comparison, "?")
    return f"{threshold.metric} {sign} {threshold.value:g}"


class Progress:
    """Transfer progress on stderr.

    On a terminal one line is rewritten at most ten times a second; otherwise
    (logs, CI) a line is printed at each quarter, so the output stays short.
    """

    def __init__(self, label: str, total: int, *, done: int = 0) -> None:
        self._label = label
        self._total = total
        self._done = done
        self._tty = sys.stderr.isatty()
        self._last_draw = 0.0
        self._quarter = self._quarters()

    def advance(self, count: int) -> None:
        self._done += count
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self._done >= self._total:
                self._last_draw = now
                print(f"\r{self._line()}", end="", file=sys.stderr, flush=True)
        elif (quarter := self._quarters()) > self._quarter:
            self._quarter = quarter
            print(self._line(), file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self._tty:
            print(f"\r{self._line()}", file=sys.stderr, flush=True)

    def _quarters(self) -> int:
        return 4 if self._total <= 0 else self._done * 4 // self._total

    def _line(self) -> str:
        share = 100 if self._total <= 0 else self._done * 100 // self._total
        return (
            f"{self._label}: {share:3d}% "
            f"({human_size(self._done)} of {human_size(self._total)})"
        )
