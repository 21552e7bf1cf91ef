"""Prediction records to stored rows: checked against the version's schema,
personal data hashed or dropped, outliers scored, a batch at a time.

Everything here is vectorised over a version's records of one call: the
values are read out of the messages once, into one matrix per kind, and
checked, transformed and scored as matrices. Nothing is stored unless every
record of the call passes (:class:`IngestRejected` carries every violation).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.config import ResolvedConfig
from conveyor.services.monitor.outliers import OutlierScorer
from conveyor.services.monitor.references import FeatureSchema, ReferenceData, check_values
from conveyor.shared.errors import FieldViolation

MAX_REQUEST_ID: Final = 256
MAX_STATUS_CODE: Final = 16
MAX_SUBJECT_KEY: Final = 1024
_US: Final = 1_000_000


@dataclass(frozen=True, eq=False)
class VersionProfile:
    """What ingest and reports know about one model version."""

    model_version: str
    model: str
    schema: FeatureSchema
    config: ResolvedConfig
    reference: pb.Reference | None
    """None until a reference is set or the registry provides training statistics."""
    reference_data: ReferenceData | None
    scorer: OutlierScorer | None
    output_columns: int | None
    """The width of every output row, None until known (from the reference or
    the first stored record)."""
    registered_metrics: dict[str, float]


class SubjectHasher:
    """Keyed hashes (HMAC-SHA-256) of subject keys and hashed personal
    features: stable for joins and frequencies, unreadable without the key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, eq=False)
class PreparedRows:
    """One version's records of a call, ready to store (window not yet assigned)."""

    model_version: str
    rows: list[dict[str, Any]]
    """Column values by name, in the call's order."""
    output_columns: int | None


def time_us(timestamp: Any, default_us: int) -> int:
    """A ``Timestamp`` in microseconds; ``default_us`` when unset."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return default_us
    return int(timestamp.seconds) * _US + int(timestamp.nanos) // 1000


def prepare(
    profile: VersionProfile,
    records: Sequence[tuple[int, pb.PredictionRecord]],
    *,
    hasher: SubjectHasher,
    now_us: int,
    max_violations: int,
) -> tuple[PreparedRows, list[FieldViolation]]:
    """Check and transform one version's records (each with its index in the
    call, for violation paths)."""
    schema = profile.schema
    n_num, n_cat = len(schema.numerical), len(schema.categorical)
    violations: list[FieldViolation] = []
    successful = [(i, r) for i, r in records if r.status_code == 0]
    numerical = np.full((len(successful), n_num), np.nan)
    categorical = np.full((len(successful), n_cat), "", dtype=object)
    widths: set[int] = set()
    for row, (index, record) in enumerate(successful):
        values = record.features
        if len(values.numerical) != n_num or len(values.categorical) != n_cat:
            violations.append(
                FieldViolation(
                    f"records[{index}].features",
                    f"{profile.model_version} takes {n_num} numerical and {n_cat} categorical "
                    f"values, not {len(values.numerical)} and {len(values.categorical)}",
                )
            )
            continue
        if n_num:
            numerical[row] = values.numerical
        if n_cat:
            categorical[row] = values.categorical
        widths.add(len(record.outputs))
    for index, record in records:
        violations.extend(_record_violations(index, record))
    output_columns = profile.output_columns
    expected = output_columns if output_columns is not None else (min(widths) if widths else None)
    if expected is not None:
        for index, record in successful:
            if len(record.outputs) != expected:
                violations.append(
                    FieldViolation(
                        f"records[{index}].outputs",
                        f"{profile.model_version} logs {expected} outputs per record, "
                        f"not {len(record.outputs)}",
                    )
                )
                break
    if successful and not violations:
        found = check_values(schema, numerical, categorical, prefix="records")
        indices = [i for i, _ in successful]
        violations.extend(_renumbered(found, indices))
    if violations:
        return PreparedRows(profile.model_version, [], output_columns), violations[:max_violations]

    # Object arrays until the hashes are in: a fixed-width string array would
    # cut each hash to the width of the longest original value.
    categorical_text = categorical.astype(object)
    privacy = profile.config.privacy
    for column, position in enumerate(schema.numerical):
        if schema.features[position].name in privacy.dropped:
            numerical[:, column] = np.nan
    for column, position in enumerate(schema.categorical):
        name = schema.features[position].name
        if name in privacy.dropped:
            categorical_text[:, column] = ""
        elif name in privacy.hashed:
            categorical_text[:, column] = [
                hasher(v) if v else "" for v in categorical_text[:, column].tolist()
            ]
    categorical_text = categorical_text.astype(np.str_)
    scores, outliers = _scores(profile, numerical, categorical_text, privacy.dropped)
    by_index: dict[int, int] = {index: row for row, (index, _) in enumerate(successful)}
    model, version = profile.model, profile.model_version
    rows: list[dict[str, Any]] = []
    empty = b""
    for index, record in records:
        slot = by_index.get(index)
        ok = slot is not None
        row = slot if slot is not None else 0
        rows.append(
            {
                "model": model,
                "request_id": record.request_id,
                "model_version": version,
                "time_us": time_us(record.time, now_us),
                "window_index": 0,
                "status_code": record.status_code,
                "latency_us": record.latency.seconds * _US + record.latency.nanos // 1000,
                "shadow": record.shadow,
                "numerical": numerical[row].tobytes() if ok else empty,
                "categorical": (
                    json.dumps(categorical_text[row].tolist()) if ok and n_cat else "[]"
                ),
                "outputs": (
                    np.asarray(record.outputs, dtype=np.float64).tobytes() if ok else empty
                ),
                "subject_hash": hasher(record.subject_key) if record.subject_key else None,
                "outlier_score": float(scores[row]) if ok and scores.size else None,
                "outlier": bool(outliers[row]) if ok and outliers.size else False,
                "label": None,
                "label_time_us": None,
                "ingest_time_us": now_us,
            }
        )
    return PreparedRows(version, rows, expected), []


def _record_violations(index: int, record: pb.PredictionRecord) -> list[FieldViolation]:
    prefix = f"records[{index}]"
    violations: list[FieldViolation] = []
    if not 1 <= len(record.request_id) <= MAX_REQUEST_ID:
        violations.append(FieldViolation(f"{prefix}.request_id", "1 to 256 characters required"))
    if not 0 <= record.status_code <= MAX_STATUS_CODE:
        violations.append(
            FieldViolation(f"{prefix}.status_code", "a canonical gRPC status code, 0 to 16")
        )
    if not record.HasField("latency"):
        violations.append(FieldViolation(f"{prefix}.latency", "required"))
    elif record.latency.seconds < 0 or record.latency.nanos < 0:
        violations.append(FieldViolation(f"{prefix}.latency", "must not be negative"))
    if len(record.subject_key) > MAX_SUBJECT_KEY:
        violations.append(FieldViolation(f"{prefix}.subject_key", "at most 1,024 characters"))
    if record.status_code == 0 and not all(math.isfinite(v) for v in record.outputs):
        violations.append(FieldViolation(f"{prefix}.outputs", "outputs must be finite"))
    if record.status_code == 0 and not record.outputs:
        violations.append(FieldViolation(f"{prefix}.outputs", "required for a successful record"))
    return violations


def _renumbered(violations: list[FieldViolation], indices: list[int]) -> list[FieldViolation]:
    """Violations named by row of the successful records' matrix, renamed by
    the record's index in the call (``records[3]`` is the fourth successful one)."""
    renamed: list[FieldViolation] = []
    for violation in violations:
        head, _, rest = violation.field.partition("]")
        row = int(head.removeprefix("records["))
        renamed.append(FieldViolation(f"records[{indices[row]}]{rest}", violation.description))
    return renamed


def _scores(
    profile: VersionProfile,
    numerical: npt.NDArray[np.float64],
    categorical: npt.NDArray[np.str_],
    dropped: frozenset[str],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Outlier scores of the successful rows; empty arrays without a scorer."""
    scorer = profile.scorer
    if scorer is None or numerical.shape[0] == 0:
        return np.empty(0), np.empty(0, dtype=np.bool_)
    schema = profile.schema
    keep_num = [c for c, p in enumerate(schema.numerical) if schema.features[p].name not in dropped]
    keep_cat = [
        c for c, p in enumerate(schema.categorical) if schema.features[p].name not in dropped
    ]
    result = scorer.score(numerical[:, keep_num], categorical[:, keep_cat])
    return result.scores, result.outliers
