"""What the registry commands print: tables, field lists, JSON, progress, errors.

Kept apart from :mod:`conveyor.services.registry.cli` so that the commands read
as calls to the registry, and the presentation can change without touching them.
Machine output (``--json``) is the proto3 JSON mapping of the API's own
messages, with the proto field names, so scripts see what the API returns.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
import pydantic
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.errors import ConveyorError, InvalidArgumentError

KEY_METRICS = ("accuracy", "f1", "roc_auc", "precision", "recall", "log_loss")
"""Metrics the versions table shows first; others follow by name, three in all."""

MAX_TABLE_METRICS = 3


def report(error: ConveyorError, hint: str = "") -> int:
    """Prints a failure the way every command does; returns exit code 1."""
    code = error.code.name
    reason = "" if error.reason in (code, "") else f" [{error.reason}]"
    print(f"conveyor: {code}: {error.message}{reason}", file=sys.stderr)
    if isinstance(error, InvalidArgumentError):
        for violation in error.violations:
            line = f"{violation.field}: {violation.description}"
            if line not in error.message:  # the server often says it in the message already
                print(f"  {line}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return 1


def hint(code: grpc.StatusCode, *, model: str, target: str) -> str:
    """What to do next after a failure with status ``code``."""
    hints = {
        grpc.StatusCode.NOT_FOUND: (
            "check the name: `conveyor models list` shows the models, "
            f"`conveyor models versions {model}` their versions and aliases"
        ),
        grpc.StatusCode.INVALID_ARGUMENT: "fix the fields named above and run the command again",
        grpc.StatusCode.ALREADY_EXISTS: (
            f"the name is taken: `conveyor models show {model}` shows what is there"
        ),
        grpc.StatusCode.FAILED_PRECONDITION: (
            "the model or version is archived or blocked, or an alias still points at it: "
            f"see `conveyor models show {model}`"
        ),
        grpc.StatusCode.ABORTED: (
            f"someone changed it first: check `conveyor models alias list {model}`, "
            "then retry with the right --expected"
        ),
        grpc.StatusCode.UNAVAILABLE: (
            f"is a registry running at {target}? start one with `conveyor serve registry`, "
            "or point at it with --registry HOST:PORT or CONVEYOR_REGISTRY_ADDR"
        ),
        grpc.StatusCode.DEADLINE_EXCEEDED: (
            f"no answer in time: raise --timeout, or check `conveyor health {target}`"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            "send credentials: CONVEYOR_TOKEN_FILE=<file> (`conveyor up` writes development "
            "tokens under <data-dir>/credentials), or a client certificate via "
            "CONVEYOR_TLS_CERT_FILE and CONVEYOR_TLS_KEY_FILE"
        ),
        grpc.StatusCode.PERMISSION_DENIED: "ask the model's owner team for the right to do this",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "the registry is out of space or the input too big",
        grpc.StatusCode.DATA_LOSS: (
            "the registry's stored copy is damaged: restore it (`conveyor registry restore`)"
        ),
    }
    return hints.get(code, "this looks like a registry bug: report it with the message above")


def manifest_summary(manifest: object, directory: Path) -> list[tuple[str, str]]:
    """Top-level facts of a manifest: scalars as they are, collections as counts."""
    fields: Mapping[str, Any] | None = None
    if dataclasses.is_dataclass(manifest) and not isinstance(manifest, type):
        fields = dataclasses.asdict(manifest)
    elif isinstance(manifest, pydantic.BaseModel):
        fields = manifest.model_dump(mode="json")
    elif isinstance(manifest, Mapping):
        fields = manifest
    elif manifest is None and (directory / "manifest.json").is_file():
        loaded = json.loads((directory / "manifest.json").read_text())
        fields = loaded if isinstance(loaded, Mapping) else None
    if fields is None:
        return [] if manifest is None else [("manifest", str(manifest))]
    return [(str(key), _fact(value)) for key, value in fields.items()]


def _fact(value: object) -> str:
    """A scalar as it is; a collection as its size and the sums of its items'
    ``rows`` and ``size_bytes``, where they have them."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        return str(value)
    items = list(value.values()) if isinstance(value, Mapping) else list(value)
    records = [item for item in items if isinstance(item, Mapping)]
    sums = []
    if any("rows" in record for record in records):
        sums.append(f"{sum(int(record.get('rows', 0)) for record in records)} rows")
    if any("size_bytes" in record for record in records):
        sums.append(human_size(sum(int(record.get("size_bytes", 0)) for record in records)))
    return f"{len(items)}" + (f" ({', '.join(sums)})" if sums else "")


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
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


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
        return f"{self._label}: {share:3d}% ({human_size(self._done)} of {human_size(self._total)})"
