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
from itertools import chain
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
    settings_time_us: int
    """When the settings reports depend on last changed (the config's
    ``update_time``, the reference's ``create_time``): a stored report computed
    under older settings is stale."""


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
    n_cat = len(schema.categorical)
    successful = [(i, r) for i, r in records if r.status_code == 0]
    numerical, categorical, violations = _feature_matrices(profile, successful)
    outputs, expected, output_violations = _output_matrix(profile, successful)
    violations.extend(_records_violations(records, successful, outputs))
    violations.extend(output_violations)
    if successful and not violations:
        found = check_values(schema, numerical, categorical, prefix="records")
        violations.extend(_renumbered(found, [i for i, _ in successful]))
    if violations:
        return (
            PreparedRows(profile.model_version, [], profile.output_columns),
            violations[:max_violations],
        )

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
    # Each successful record's values, cut from one buffer per kind.
    feature_bytes = _row_bytes(numerical)
    output_bytes = _row_bytes(outputs)
    category_texts = (
        [json.dumps(row) for row in categorical_text.tolist()]
        if n_cat
        else ["[]"] * len(successful)
    )
    score_values: list[float | None] = scores.tolist() if scores.size else [None] * len(successful)
    outlier_flags: list[bool] = outliers.tolist() if outliers.size else [False] * len(successful)
    model, version = profile.model, profile.model_version
    rows: list[dict[str, Any]] = []
    slot = 0
    for _, record in records:
        ok = record.status_code == 0
        moment, latency = record.time, record.latency
        rows.append(
            {
                "model": model,
                "request_id": record.request_id,
                "model_version": version,
                "time_us": (
                    moment.seconds * _US + moment.nanos // 1000
                    if moment.seconds or moment.nanos
                    else now_us
                ),
                "window_index": 0,
                "status_code": record.status_code,
                "latency_us": latency.seconds * _US + latency.nanos // 1000,
                "shadow": record.shadow,
                "numerical": feature_bytes[slot] if ok else b"",
                "categorical": category_texts[slot] if ok else "[]",
                "outputs": output_bytes[slot] if ok else b"",
                "subject_hash": hasher(record.subject_key) if record.subject_key else None,
                "outlier_score": score_values[slot] if ok else None,
                "outlier": outlier_flags[slot] if ok else False,
                "label": None,
                "label_time_us": None,
                "ingest_time_us": now_us,
            }
        )
        slot += ok
    return PreparedRows(version, rows, expected), []


def _feature_matrices(
    profile: VersionProfile, successful: list[tuple[int, pb.PredictionRecord]]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[Any], list[FieldViolation]]:
    """The successful records' numerical and categorical values as matrices
    (a row of a record with the wrong counts stays NaN / empty)."""
    schema = profile.schema
    n_num, n_cat = len(schema.numerical), len(schema.categorical)
    rows = len(successful)
    if all(
        len(r.features.numerical) == n_num and len(r.features.categorical) == n_cat
        for _, r in successful
    ):
        numerical = np.fromiter(
            chain.from_iterable(r.features.numerical for _, r in successful),
            dtype=np.float64,
            count=rows * n_num,
        ).reshape(rows, n_num)
        categorical = np.full((rows, n_cat), "", dtype=object)
        if n_cat:
            categorical[:] = [list(r.features.categorical) for _, r in successful]
        return numerical, categorical, []
    numerical = np.full((rows, n_num), np.nan)
    categorical = np.full((rows, n_cat), "", dtype=object)
    violations: list[FieldViolation] = []
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
    return numerical, categorical, violations


def _output_matrix(
    profile: VersionProfile, successful: list[tuple[int, pb.PredictionRecord]]
) -> tuple[npt.NDArray[np.float64], int | None, list[FieldViolation]]:
    """The successful records' outputs as a matrix, the width every record
    must have (the version's, or the narrowest of the call's first ones), and
    the first record that differs."""
    widths = {len(record.outputs) for _, record in successful}
    known = profile.output_columns
    expected = known if known is not None else (min(widths) if widths else None)
    if expected is not None and widths != {expected}:
        for index, record in successful:
            if len(record.outputs) != expected:
                return (
                    np.empty((0, 0)),
                    expected,
                    [
                        FieldViolation(
                            f"records[{index}].outputs",
                            f"{profile.model_version} logs {expected} outputs per record, "
                            f"not {len(record.outputs)}",
                        )
                    ],
                )
    width = expected or 0
    outputs = np.fromiter(
        chain.from_iterable(record.outputs for _, record in successful),
        dtype=np.float64,
        count=len(successful) * width,
    ).reshape(len(successful), width)
    return outputs, expected, []


def _records_violations(
    records: Sequence[tuple[int, pb.PredictionRecord]],
    successful: list[tuple[int, pb.PredictionRecord]],
    outputs: npt.NDArray[np.float64],
) -> list[FieldViolation]:
    """Every record's own checks: one cheap pass, the detailed checks (which
    name each violation) only for the records it doubts."""
    doubted = {
        index
        for index, record in records
        if not (
            0 < len(record.request_id) <= MAX_REQUEST_ID
            and 0 <= record.status_code <= MAX_STATUS_CODE
            and len(record.subject_key) <= MAX_SUBJECT_KEY
            and record.HasField("latency")
            and record.latency.seconds >= 0
            and record.latency.nanos >= 0
            and (record.status_code != 0 or record.outputs)
        )
    }
    if outputs.shape[0] == len(successful):
        finite = np.isfinite(outputs).all(axis=1)
        doubted.update(successful[row][0] for row in np.flatnonzero(~finite).tolist())
    else:  # the widths differ: checked record by record
        doubted.update(index for index, _ in successful)
    violations: list[FieldViolation] = []
    for index, record in records:
        if index in doubted:
            violations.extend(_record_violations(index, record))
    return violations


def _row_bytes(matrix: npt.NDArray[np.float64]) -> list[bytes]:
    """Each row's float64 bytes."""
    data = np.ascontiguousarray(matrix, dtype=np.float64).tobytes()
    size = matrix.shape[1] * 8
    return (
        [data[start : start + size] for start in range(0, len(data), size)]
        if size
        else [b""] * matrix.shape[0]
    )


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
