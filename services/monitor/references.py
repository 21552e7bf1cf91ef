"""A version's reference: its feature schema, its rows, and how they are built.

A reference comes either from a ``SetReference`` upload (rows as they are)
or from the training statistics the trainer registered with the version
(:func:`from_training_statistics`): the stored sample for numerical features
(the deciles, interpolated, when the trainer stored none) and the category
counts for categorical ones, which the categorical tests use exactly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor import drift
from conveyor.shared.errors import FieldViolation

FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]

MAX_FEATURES: Final = 10_000
MAX_NAME_LENGTH: Final = 128
DECILE_SAMPLE_ROWS: Final = 1_000
"""Rows interpolated from the deciles when training statistics carry no sample."""
PREDICTION_FEATURE: Final = "prediction"
"""The name prediction drift reports its predicted classes under."""
_FORMAT_VERSION: Final = 1


@dataclass(frozen=True)
class FeatureSchema:
    """A version's features in column order, and where each sits in the
    positional ``FeatureValues`` lists (numerical and categorical apart)."""

    features: tuple[pb.FeatureSpec, ...]
    numerical: tuple[int, ...] = field(init=False)
    """Schema positions of the numerical features, in order."""
    categorical: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        kinds = [f.type for f in self.features]
        numerical = tuple(i for i, k in enumerate(kinds) if k == pb.FEATURE_TYPE_NUMERICAL)
        categorical = tuple(i for i, k in enumerate(kinds) if k == pb.FEATURE_TYPE_CATEGORICAL)
        object.__setattr__(self, "numerical", numerical)
        object.__setattr__(self, "categorical", categorical)

    @property
    def numerical_names(self) -> list[str]:
        return [self.features[i].name for i in self.numerical]

    @property
    def categorical_names(self) -> list[str]:
        return [self.features[i].name for i in self.categorical]

    def kinds(self) -> dict[str, int]:
        return {f.name: f.type for f in self.features}

    def drift_schema(self) -> list[drift.FeatureSpec]:
        """Numerical features first, then categorical: the order columns are kept in."""
        return [
            drift.FeatureSpec(self.features[i].name, drift.FeatureType(self.features[i].type))
            for i in (*self.numerical, *self.categorical)
        ]


def check_schema(features: Sequence[pb.FeatureSpec], *, prefix: str) -> list[FieldViolation]:
    """Violations of a declared feature schema."""
    violations: list[FieldViolation] = []
    if not features:
        violations.append(FieldViolation(prefix, "required: at least one feature"))
    if len(features) > MAX_FEATURES:
        violations.append(FieldViolation(prefix, f"at most {MAX_FEATURES:,} features"))
    seen: set[str] = set()
    for index, feature in enumerate(features):
        if not 1 <= len(feature.name) <= MAX_NAME_LENGTH:
            violations.append(
                FieldViolation(f"{prefix}[{index}].name", "1 to 128 characters required")
            )
        elif feature.name in seen:
            violations.append(
                FieldViolation(f"{prefix}[{index}].name", f"{feature.name!r} is named twice")
            )
        seen.add(feature.name)
        if feature.type not in (pb.FEATURE_TYPE_NUMERICAL, pb.FEATURE_TYPE_CATEGORICAL):
            violations.append(
                FieldViolation(f"{prefix}[{index}].type", "required: NUMERICAL or CATEGORICAL")
            )
    return violations


@dataclass(frozen=True, eq=False)
class ReferenceData:
    """The reference rows, column blocks in schema order within each kind, and
    the columns as the drift tests use them, prepared once for every report
    (:meth:`prepared`, :meth:`prepared_predictions`)."""

    numerical: FloatArray
    """Rows by numerical features; NaN where missing."""
    categorical: StrArray
    """Rows by categorical features; "" where missing."""
    outputs: FloatArray
    """Rows by output columns (no columns when the reference carries none)."""
    labels: npt.NDArray[np.int64]
    """One class per row, -1 where the row has none."""
    _prepared: dict[str, drift.PreparedReference] = field(
        default_factory=dict, init=False, repr=False
    )
    """By what the columns are: reports on several threads share it, and one of
    two preparations made at once is kept (a dict's item assignment is atomic)."""

    @property
    def rows(self) -> int:
        return int(self.numerical.shape[0])

    def columns(self) -> list[npt.NDArray[Any]]:
        """One array per feature, numerical first (:meth:`FeatureSchema.drift_schema`)."""
        return [*self.numerical.T, *self.categorical.T]

    def prepared(self, schema: Sequence[drift.FeatureSpec]) -> drift.PreparedReference:
        """:meth:`columns` prepared for :func:`.drift.drift_report` with ``schema``
        (:meth:`FeatureSchema.drift_schema`), kept for the next report."""
        prepared = self._prepared.get("features")
        if prepared is None or prepared.schema != tuple(schema):
            prepared = self._prepared["features"] = drift.PreparedReference(schema, self.columns())
        return prepared

    def prepared_predictions(self) -> drift.PreparedReference:
        """The outputs' predicted classes (:func:`predicted_classes`) as the
        categorical feature ``PREDICTION_FEATURE``, prepared and kept."""
        prepared = self._prepared.get(PREDICTION_FEATURE)
        if prepared is None:
            classes = predicted_class_names(self.outputs)
            schema = [drift.FeatureSpec(PREDICTION_FEATURE, drift.FeatureType.CATEGORICAL)]
            prepared = self._prepared[PREDICTION_FEATURE] = drift.PreparedReference(
                schema, [classes]
            )
        return prepared

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format_version=np.array(_FORMAT_VERSION),
            numerical=self.numerical,
            categorical=self.categorical,
            outputs=self.outputs,
            labels=self.labels,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceData:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            if int(stored["format_version"]) != _FORMAT_VERSION:
                raise ValueError(f"unknown reference format {int(stored['format_version'])}")
            return cls(
                numerical=stored["numerical"],
                categorical=stored["categorical"],
                outputs=stored["outputs"],
                labels=stored["labels"],
            )


def predicted_classes(outputs: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """The arg-max class of each output row (one column: class 1 at >= 0.5;
    the same for probabilities and, through the sigmoid, for logits at 0)."""
    if outputs.shape[1] == 1:
        classes: npt.NDArray[np.int64] = (outputs[:, 0] >= 0.5).astype(np.int64)
    else:
        classes = np.argmax(outputs, axis=1).astype(np.int64)
    return classes


def predicted_class_names(outputs: npt.NDArray[np.float64]) -> npt.NDArray[np.str_]:
    """:func:`predicted_classes` as category names (``"0"``, ``"1"``, ...), the
    prediction drift's categorical values."""
    classes = predicted_classes(outputs)
    # Indexing a few names: ``astype(str)`` formats each of a million rows.
    names: npt.NDArray[np.str_] = np.arange(classes_of(outputs.shape[1])).astype(np.str_)[classes]
    return names


def classes_of(output_columns: int) -> int:
    """The number of classes an output row of that width stands for (one
    column is a binary model's class 1)."""
    return 2 if output_columns == 1 else output_columns


def from_rows(
    schema: FeatureSchema, rows: Sequence[rpc.ReferenceRow], *, max_violations: int
) -> tuple[ReferenceData, list[FieldViolation]]:
    """The uploaded rows as columns, with every violation (up to ``max_violations``):
    value counts that do not match the schema, missing values where not
    allowed, infinities, output rows of different widths, labels that are not
    classes of the outputs."""
    n_num, n_cat = len(schema.numerical), len(schema.categorical)
    violations: list[FieldViolation] = []
    numerical = np.full((len(rows), n_num), np.nan)
    categorical = np.full((len(rows), n_cat), "", dtype=object)
    widths = {len(row.outputs) for row in rows}
    width = max(widths) if widths else 0
    outputs = np.zeros((len(rows), width))
    labels = np.full(len(rows), -1, dtype=np.int64)
    if len(widths) > 1:
        violations.append(
            FieldViolation(
                "rows.outputs", f"every row needs the same outputs; found {sorted(widths)}"
            )
        )
    for index, row in enumerate(rows):
        prefix = f"rows[{index}]"
        if len(row.features.numerical) != n_num or len(row.features.categorical) != n_cat:
            violations.append(
                FieldViolation(
                    f"{prefix}.features",
                    f"{n_num} numerical and {n_cat} categorical values needed, not "
                    f"{len(row.features.numerical)} and {len(row.features.categorical)}",
                )
            )
            continue
        numerical[index] = row.features.numerical
        categorical[index] = row.features.categorical
        if len(row.outputs) == width:
            outputs[index] = row.outputs
        if row.HasField("label"):
            if width and not 0 <= row.label < classes_of(width):
                violations.append(
                    FieldViolation(f"{prefix}.label", f"must be 0 to {classes_of(width) - 1}")
                )
            labels[index] = row.label
        if len(violations) >= max_violations:
            break
    violations.extend(check_values(schema, numerical, categorical, prefix="rows"))
    if not np.isfinite(outputs).all():
        violations.append(FieldViolation("rows.outputs", "outputs must be finite"))
    data = ReferenceData(numerical, categorical.astype(np.str_), outputs, labels)
    return data, violations[:max_violations]


def check_values(
    schema: FeatureSchema, numerical: FloatArray, categorical: npt.NDArray[Any], *, prefix: str
) -> list[FieldViolation]:
    """Infinite values, and missing ones where the feature does not allow them,
    named by feature (one violation per feature, with its first row)."""
    violations: list[FieldViolation] = []
    for column, position in enumerate(schema.numerical):
        feature = schema.features[position]
        values = numerical[:, column]
        infinite = np.flatnonzero(np.isinf(values))
        if infinite.size:
            violations.append(
                FieldViolation(
                    f"{prefix}[{infinite[0]}].features.numerical[{column}]",
                    f"{feature.name!r}: infinite values are not allowed ({infinite.size} rows)",
                )
            )
        missing = np.flatnonzero(np.isnan(values))
        if missing.size and not feature.allow_missing:
            violations.append(
                FieldViolation(
                    f"{prefix}[{missing[0]}].features.numerical[{column}]",
                    f"{feature.name!r} does not allow missing values (NaN in {missing.size} rows)",
                )
            )
    for column, position in enumerate(schema.categorical):
        feature = schema.features[position]
        missing = np.flatnonzero(categorical[:, column] == "")
        if missing.size and not feature.allow_missing:
            violations.append(
                FieldViolation(
                    f"{prefix}[{missing[0]}].features.categorical[{column}]",
                    f"{feature.name!r} does not allow missing values "
                    f"(empty in {missing.size} rows)",
                )
            )
    return violations


def from_training_statistics(
    statistics: registry_pb.ReferenceStatistics,
) -> tuple[FeatureSchema, ReferenceData]:
    """The schema and rows that stand for the registered training statistics.

    Numerical columns come from the stored sample when it has one column per
    feature, else from the feature's deciles (a piecewise-linear inverse CDF
    at :data:`DECILE_SAMPLE_ROWS` evenly spaced levels); categorical columns
    repeat each category by its count, which is exact for chi-squared and
    Jensen-Shannon, the tests that read them. Raises ValueError when a
    numerical feature has neither sample nor quantiles."""
    features = tuple(
        pb.FeatureSpec(
            name=f.name,
            type=(
                pb.FEATURE_TYPE_CATEGORICAL
                if f.type == registry_pb.FEATURE_TYPE_CATEGORICAL
                else pb.FEATURE_TYPE_NUMERICAL
            ),
            allow_missing=f.missing_count > 0,
        )
        for f in statistics.features
    )
    schema = FeatureSchema(features)
    sample = statistics.sample
    columns = sample.column_count
    has_sample = columns == len(features) and columns > 0 and len(sample.values) >= columns
    matrix = (
        np.asarray(sample.values, dtype=np.float64).reshape(-1, columns) if has_sample else None
    )
    numerical_columns: list[npt.NDArray[Any]] = []
    for position in schema.numerical:
        if matrix is not None:
            numerical_columns.append(matrix[:, position])
            continue
        quantiles = statistics.features[position].quantiles
        if len(quantiles) < 2:
            raise ValueError(
                f"feature {features[position].name!r}: the training statistics hold neither "
                "a sample nor quantiles"
            )
        levels = np.linspace(0.0, 1.0, DECILE_SAMPLE_ROWS)
        numerical_columns.append(
            np.interp(levels, [q.level for q in quantiles], [q.value for q in quantiles])
        )
    categorical_columns: list[npt.NDArray[Any]] = [
        np.repeat(
            np.asarray([c.value for c in statistics.features[p].categories], dtype=np.str_),
            [c.count for c in statistics.features[p].categories],
        )
        for p in schema.categorical
    ]
    rows = max((len(c) for c in [*numerical_columns, *categorical_columns]), default=0)
    numerical = np.full((rows, len(numerical_columns)), np.nan)
    for j, column in enumerate(numerical_columns):
        numerical[: len(column), j] = column
    categorical = np.full((rows, len(categorical_columns)), "", dtype=object)
    for j, column in enumerate(categorical_columns):
        categorical[: len(column), j] = column
    data = ReferenceData(
        numerical, categorical.astype(np.str_), np.zeros((rows, 0)), np.full(rows, -1)
    )
    return schema, data


def summaries(schema: FeatureSchema, data: ReferenceData) -> list[pb.FeatureSummary]:
    """``Reference.feature_summaries``, in schema order."""
    by_name = {s.feature: s for s in drift.summarize(schema.drift_schema(), data.columns())}
    result: list[pb.FeatureSummary] = []
    for feature in schema.features:
        summary = by_name[feature.name]
        result.append(
            pb.FeatureSummary(
                feature=summary.feature,
                count=summary.count,
                missing_count=summary.missing_count,
                mean=_finite_or_zero(summary.mean),
                std=_finite_or_zero(summary.std),
                deciles=summary.deciles,
                category_counts=dict(summary.category_counts),
            )
        )
    return result


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0
