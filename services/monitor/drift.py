"""Data drift: how far a window's feature values moved from the reference.

The monitor compares each window of predictions with its version's reference,
feature by feature, and flags the window when enough features moved. This
module chooses the test for each feature, applies the thresholds and the
correction, and gives the verdicts; :mod:`.statistics` computes the numbers.
Both are free of gRPC and storage so that every number can be checked against
SciPy. The contract is ``conveyor.monitor.v1`` (``DriftTest``, ``DriftConfig``,
``FeatureDrift``, ``DatasetDrift``, ``FeatureSummary``); its enums are mirrored
here by value, so the service maps them with ``DriftTest(message.test)``.
Configs hold resolved values: the proto's "0 or unset means the default" is the
service's to translate.

:func:`drift_report` is what the service calls: raw columns in, one
:class:`FeatureDrift` per tested feature and a :class:`DatasetDrift` out.
p-value tests (Kolmogorov-Smirnov, chi-squared) flag drift when the p-value,
corrected across the report's p-value tests (:func:`~.statistics.adjust_p_values`),
is below the threshold; distances (PSI, Wasserstein, Jensen-Shannon) when they
reach it. A feature whose window has no value gets a NaN statistic and no
verdict, and is left out of the correction and of the dataset-level count.

A window's numerical column is sorted for KS and Wasserstein, O(n log n) for
n values, the only super-linear step over the window (see :mod:`.statistics`
for the rest), unless it comes sorted (a closed window's packed copy);
binned tests count it unsorted. The reference's side, its sort,
categories and bins, is prepared once per reference (:class:`PreparedReference`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.services.monitor.statistics import (
    DistributionComparison,
    MultipleTestingCorrection,
    ReferenceSample,
    adjust_p_values,
    chi_squared,
    compare_bins_to_reference,
    compare_categories_to_reference,
    jensen_shannon,
    kolmogorov_smirnov_to_reference,
    population_stability_index,
    wasserstein_to_reference,
)


class FeatureType(enum.Enum):
    """A feature's statistical type (``FeatureType``)."""

    NUMERICAL = 1
    CATEGORICAL = 2


class DriftTest(enum.Enum):
    """A drift test (``DriftTest``); UNSPECIFIED is the automatic choice."""

    UNSPECIFIED = 0
    KOLMOGOROV_SMIRNOV = 1
    POPULATION_STABILITY_INDEX = 2
    WASSERSTEIN = 3
    CHI_SQUARED = 4
    JENSEN_SHANNON = 5
    NONE = 6


P_VALUE_TESTS: Final = frozenset({DriftTest.KOLMOGOROV_SMIRNOV, DriftTest.CHI_SQUARED})
NUMERICAL_TESTS: Final = frozenset(DriftTest) - {DriftTest.CHI_SQUARED}
CATEGORICAL_TESTS: Final = frozenset(
    {DriftTest.UNSPECIFIED, DriftTest.CHI_SQUARED, DriftTest.JENSEN_SHANNON, DriftTest.NONE}
)
DEFAULT_SIGNIFICANCE: Final = 0.05
DEFAULT_DISTANCE_THRESHOLD: Final = 0.1
MAX_CATEGORY_LIKE_VALUES: Final = 5
"""The automatic choice tests a numerical feature with at most this many distinct
reference values as categories of its values."""
PARALLEL_THREADS: Final = 2
"""Threads that test a large window's features side by side."""
PARALLEL_MIN_VALUES: Final = 2_000_000
"""Window values (rows times tested features) from which the features are
tested on :data:`PARALLEL_THREADS` threads."""
MIN_PSI_BINS: Final = 2
MAX_PSI_BINS: Final = 100
_DECILES: Final = np.linspace(0.0, 1.0, 11)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the schema."""

    name: str
    type: FeatureType


@dataclass(frozen=True)
class DriftTestSpec:
    """A test with its threshold (``DriftTestSpec``)."""

    test: DriftTest = DriftTest.UNSPECIFIED
    """UNSPECIFIED: the automatic choice (see :func:`automatic_test`)."""
    threshold: float | None = None
    """The significance level of p-value tests, in (0, 1), or the drifting distance,
    above 0; None means 0.05 for p-value tests and 0.1 for distances. With the
    automatic choice it must suit both kinds: in (0, 1)."""

    def _check(self, field_name: str, allowed: frozenset[DriftTest], what: str) -> None:
        """Raise ValueError, naming ``field_name``, unless the test is ``allowed``
        (it suits ``what``) and the threshold suits the test."""
        if self.test not in allowed:
            names = ", ".join(sorted(test.name for test in allowed))
            raise ValueError(
                f"{field_name}.test: {self.test.name} does not suit {what}; use one of {names}"
            )
        threshold = self.threshold
        if threshold is None or self.test is DriftTest.NONE:
            return
        if self.test in P_VALUE_TESTS or self.test is DriftTest.UNSPECIFIED:
            if not 0 < threshold < 1:
                raise ValueError(
                    f"{field_name}.threshold: a significance level is in (0, 1), not {threshold}"
                )
        elif not (threshold > 0 and math.isfinite(threshold)):
            raise ValueError(
                f"{field_name}.threshold: a distance threshold is above 0, not {threshold}"
            )


@dataclass(frozen=True)
class DriftConfig:
    """Drift tests and thresholds (``DriftConfig``), with ``WindowSpec.min_rows``."""

    numerical_test: DriftTestSpec = DriftTestSpec()
    """The test for numerical features."""
    categorical_test: DriftTestSpec = DriftTestSpec()
    """The test for categorical features."""
    feature_tests: Mapping[str, DriftTestSpec] = field(default_factory=dict)
    """Per-feature overrides, by feature name."""
    correction: MultipleTestingCorrection = MultipleTestingCorrection.BENJAMINI_HOCHBERG
    """The correction of the report's p-values."""
    dataset_drift_share: float = 0.5
    """Dataset drift when at least this share of the tested features drifted, in (0, 1]."""
    large_reference_rows: int = 1000
    """References with more rows (missing values included) get distances from the
    automatic choice."""
    psi_bins: int = 10
    """Quantile bins for PSI and for Jensen-Shannon on numerical features, 2 to 100."""
    min_rows: int = 100
    """Windows with fewer rows get statistics but no verdict (``insufficient_data``)."""

    def __post_init__(self) -> None:
        self.numerical_test._check("numerical_test", NUMERICAL_TESTS, "numerical features")
        self.categorical_test._check("categorical_test", CATEGORICAL_TESTS, "categorical features")
        for name, spec in self.feature_tests.items():
            spec._check(f"feature_tests[{name!r}]", frozenset(DriftTest), "any feature")
        if not 0 < self.dataset_drift_share <= 1:
            raise ValueError(
                f"dataset_drift_share must be in (0, 1], not {self.dataset_drift_share}"
            )
        if self.large_reference_rows < 1:
            raise ValueError(
                f"large_reference_rows must be at least 1, not {self.large_reference_rows}"
            )
        if not MIN_PSI_BINS <= self.psi_bins <= MAX_PSI_BINS:
            raise ValueError(
                f"psi_bins must be {MIN_PSI_BINS} to {MAX_PSI_BINS}, not {self.psi_bins}"
            )
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, not {self.min_rows}")

    def check_schema(self, schema: Sequence[FeatureSpec]) -> None:
        """Raise ValueError unless the schema's names are unique and every override
        names one of its features with a test that suits the feature's type."""
        types: dict[str, FeatureType] = {}
        for feature in schema:
            if feature.name in types:
                raise ValueError(f"the schema names feature {feature.name!r} twice")
            types[feature.name] = feature.type
        for name, spec in self.feature_tests.items():
            field_name = f"feature_tests[{name!r}]"
            if name not in types:
                raise ValueError(f"{field_name}: the schema has no feature {name!r}")
            numerical = types[name] is FeatureType.NUMERICAL
            allowed = NUMERICAL_TESTS if numerical else CATEGORICAL_TESTS
            spec._check(field_name, allowed, f"the {types[name].name.lower()} feature {name!r}")


DEFAULT_CONFIG: Final = DriftConfig()


@dataclass(frozen=True)
class FeatureDrift:
    """The drift of one feature in one window (``FeatureDrift``)."""

    feature: str
    type: FeatureType
    test: DriftTest
    """The test used, never UNSPECIFIED."""
    statistic: float
    """KS D, PSI, normalised Wasserstein, chi-squared or JS distance; NaN when the
    window has no value."""
    p_value: float | None
    """The raw p-value of p-value tests; None for distances."""
    adjusted_p_value: float | None
    """The p-value after the report's correction; None for distances."""
    threshold: float
    drifted: bool
    """False whenever the window is below ``min_rows`` or has no value."""
    current_count: int
    missing_count: int
    distribution: DistributionComparison | None = None
    """The histograms, when the report was asked for them."""


@dataclass(frozen=True)
class DatasetDrift:
    """Whether enough features drifted at once (``DatasetDrift``)."""

    drifted_features: int
    tested_features: int
    drifted_share: float
    share_threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    """One window against the reference: features in schema order (those with
    test NONE left out) and the dataset-level verdict."""

    features: tuple[FeatureDrift, ...]
    dataset: DatasetDrift
    correction: MultipleTestingCorrection
    insufficient_data: bool
    reference_rows: int
    current_rows: int


@dataclass(frozen=True)
class FeatureSummary:
    """Summary statistics of one reference feature (``FeatureSummary``)."""

    feature: str
    count: int
    missing_count: int
    mean: float
    """Numerical: the mean (NaN without values); 0 for categorical features."""
    std: float
    """Numerical: the standard deviation, ddof 0 (NaN without values); 0 otherwise."""
    deciles: tuple[float, ...]
    """Numerical: 11 values from the minimum to the maximum; empty otherwise."""
    category_counts: Mapping[str, int] = field(default_factory=dict)


class PreparedReference:
    """A reference's columns in schema order, each checked and prepared (a
    :class:`~.statistics.ReferenceSample`) when a report first tests its feature,
    then kept for every later report against the same reference.

    Reports on several threads may share one: a column two of them prepare at
    once is prepared twice, identically, and either result is kept. A column
    that fails its checks is not kept: every report raises its error."""

    def __init__(self, schema: Sequence[FeatureSpec], columns: Sequence[npt.ArrayLike]) -> None:
        """Raises ValueError unless there is one column per feature, all of one length."""
        self.rows = _row_count(schema, columns, "reference")
        self.schema = tuple(schema)
        self._columns = tuple(columns)
        self._samples: list[ReferenceSample | None] = [None] * len(self.schema)

    def sample(self, index: int) -> ReferenceSample:
        """The prepared column of the feature at ``index``; ValueError for bad or
        missing values as :func:`drift_report` gives it."""
        sample = self._samples[index]
        if sample is None:
            feature = self.schema[index]
            values, _ = _values(feature, self._columns[index], "reference")
            if values.size == 0:
                raise ValueError(
                    f"feature {feature.name!r}: the reference holds no value to compare"
                )
            if feature.type is FeatureType.NUMERICAL:
                values = np.sort(values)
            sample = self._samples[index] = ReferenceSample(values)
        return sample


def drift_report(
    schema: Sequence[FeatureSpec],
    reference: Sequence[npt.ArrayLike] | PreparedReference,
    current: Sequence[npt.ArrayLike],
    config: DriftConfig = DEFAULT_CONFIG,
    *,
    distributions: bool = False,
    current_sorted: bool = False,
) -> DriftReport:
    """Compare the window's columns with the reference's, both in schema order
    (float columns with NaN for missing, string columns with "" for missing),
    and include each feature's histograms when ``distributions`` is set. A
    reference compared with many windows is best passed prepared once
    (:class:`PreparedReference` of the same schema). ``current_sorted`` says
    the window's numerical columns come sorted (NaN last): no test sorts them.

    Raises ValueError naming the feature or config field for columns that do
    not match the schema, infinite values, an empty reference column, or an
    override that names no feature or does not suit its type."""
    if not isinstance(reference, PreparedReference):
        reference = PreparedReference(schema, reference)
    elif reference.schema != tuple(schema):
        raise ValueError("the prepared reference was prepared for another schema")
    reference_rows = reference.rows
    current_rows = _row_count(schema, current, "current")
    config.check_schema(schema)
    to_test: list[tuple[int, DriftTestSpec]] = []
    for index, feature in enumerate(schema):
        spec = config.feature_tests.get(feature.name)
        if spec is None:
            numerical = feature.type is FeatureType.NUMERICAL
            spec = config.numerical_test if numerical else config.categorical_test
        if spec.test is not DriftTest.NONE:
            to_test.append((index, spec))

    def measure(index: int, spec: DriftTestSpec) -> FeatureDrift:
        reference_sample = reference.sample(index)
        current_values, missing = _values(schema[index], current[index], "current")
        return _measure(
            schema[index],
            reference_sample,
            current_values,
            missing,
            spec,
            reference_rows,
            config,
            distributions=distributions,
            current_sorted=current_sorted,
        )

    if len(to_test) > 1 and current_rows * len(to_test) >= PARALLEL_MIN_VALUES:
        # NumPy's sorts and passes release the GIL; errors surface in schema order.
        with ThreadPoolExecutor(PARALLEL_THREADS, thread_name_prefix="drift") as pool:
            measured = list(pool.map(measure, *zip(*to_test, strict=True)))
    else:
        measured = [measure(index, spec) for index, spec in to_test]

    p_values = {
        i: result.p_value for i, result in enumerate(measured) if result.p_value is not None
    }
    adjusted = adjust_p_values(list(p_values.values()), config.correction)
    for i, adjusted_p_value in zip(p_values, adjusted.tolist(), strict=True):
        measured[i] = replace(measured[i], adjusted_p_value=adjusted_p_value)
    insufficient = current_rows < config.min_rows
    results = tuple(replace(r, drifted=not insufficient and _drifted(r)) for r in measured)

    tested = [r for r in results if not math.isnan(r.statistic)]
    drifted = sum(r.drifted for r in tested)
    share = drifted / len(tested) if tested else 0.0
    dataset = DatasetDrift(
        drifted_features=drifted,
        tested_features=len(tested),
        drifted_share=share,
        share_threshold=config.dataset_drift_share,
        drifted=not insufficient and bool(tested) and share >= config.dataset_drift_share,
    )
    return DriftReport(
        features=results,
        dataset=dataset,
        correction=config.correction,
        insufficient_data=insufficient,
        reference_rows=reference_rows,
        current_rows=current_rows,
    )


def summarize(
    schema: Sequence[FeatureSpec], columns: Sequence[npt.ArrayLike]
) -> tuple[FeatureSummary, ...]:
    """The reference's summary statistics, one per feature in schema order."""
    _row_count(schema, columns, "reference")
    summaries: list[FeatureSummary] = []
    for feature, column in zip(schema, columns, strict=True):
        values, missing = _values(feature, column, "reference")
        if feature.type is FeatureType.CATEGORICAL:
            categories, counts = np.unique(values, return_counts=True)
            category_counts = dict(zip(categories.tolist(), counts.tolist(), strict=True))
            summary = FeatureSummary(
                feature.name, values.size, missing, 0.0, 0.0, (), category_counts
            )
        elif values.size == 0:
            summary = FeatureSummary(feature.name, 0, missing, math.nan, math.nan, ())
        else:
            values = np.sort(values)  # the sums below run in sorted order
            deciles = tuple(np.quantile(values, _DECILES).tolist())
            mean, std = float(np.mean(values)), float(np.std(values))
            summary = FeatureSummary(feature.name, values.size, missing, mean, std, deciles)
        summaries.append(summary)
    return tuple(summaries)


def automatic_test(
    feature_type: FeatureType,
    *,
    reference_rows: int,
    distinct_values: int,
    large_reference_rows: int = DEFAULT_CONFIG.large_reference_rows,
) -> DriftTest:
    """The test DRIFT_TEST_UNSPECIFIED stands for (Evidently's defaults): KS or,
    for larger references, Wasserstein on numerical features with more than 5
    distinct reference values; chi-squared or Jensen-Shannon on the others."""
    continuous = (
        feature_type is FeatureType.NUMERICAL and distinct_values > MAX_CATEGORY_LIKE_VALUES
    )
    if reference_rows <= large_reference_rows:
        return DriftTest.KOLMOGOROV_SMIRNOV if continuous else DriftTest.CHI_SQUARED
    return DriftTest.WASSERSTEIN if continuous else DriftTest.JENSEN_SHANNON


def _measure(
    feature: FeatureSpec,
    reference: ReferenceSample,
    current: npt.NDArray[Any],
    missing: int,
    spec: DriftTestSpec,
    reference_rows: int,
    config: DriftConfig,
    *,
    distributions: bool,
    current_sorted: bool,
) -> FeatureDrift:
    """One feature's statistic (window values in any order, or sorted as
    ``current_sorted`` says), before the correction and the verdict."""
    test = spec.test
    as_categories = feature.type is FeatureType.CATEGORICAL
    if test is DriftTest.UNSPECIFIED:
        distinct = 0 if as_categories else reference.distinct_values()
        test = automatic_test(
            feature.type,
            reference_rows=reference_rows,
            distinct_values=distinct,
            large_reference_rows=config.large_reference_rows,
        )
        # A numerical feature with few distinct values is tested as categories of them.
        as_categories = test in (DriftTest.CHI_SQUARED, DriftTest.JENSEN_SHANNON)
    comparison = None
    histogram_test = test not in (DriftTest.KOLMOGOROV_SMIRNOV, DriftTest.WASSERSTEIN)
    if not histogram_test and not current_sorted:
        current = np.sort(current)  # only these tests need the window sorted
        current_sorted = True
    if histogram_test or distributions:
        comparison = (
            compare_categories_to_reference(reference, current)
            if as_categories
            else compare_bins_to_reference(
                reference, current, config.psi_bins, current_sorted=current_sorted
            )
        )
    statistic, p_value = math.nan, None
    if current.size == 0:
        pass  # nothing to compare: no statistic, no verdict
    elif test is DriftTest.KOLMOGOROV_SMIRNOV:
        statistic, p_value = kolmogorov_smirnov_to_reference(reference, current)
    elif test is DriftTest.WASSERSTEIN:
        statistic = wasserstein_to_reference(reference, current)
    elif comparison is not None:
        counts = comparison.reference_counts, comparison.current_counts
        if test is DriftTest.CHI_SQUARED:
            statistic, p_value = chi_squared(*counts)
        elif test is DriftTest.JENSEN_SHANNON:
            statistic = jensen_shannon(*counts)
        else:
            statistic = population_stability_index(*counts)
    default = DEFAULT_SIGNIFICANCE if test in P_VALUE_TESTS else DEFAULT_DISTANCE_THRESHOLD
    return FeatureDrift(
        feature=feature.name,
        type=feature.type,
        test=test,
        statistic=statistic,
        p_value=p_value,
        adjusted_p_value=None,
        threshold=default if spec.threshold is None else spec.threshold,
        drifted=False,
        current_count=int(current.size),
        missing_count=missing,
        distribution=comparison if distributions else None,
    )


def _drifted(result: FeatureDrift) -> bool:
    if math.isnan(result.statistic):
        return False
    if result.adjusted_p_value is not None:
        return result.adjusted_p_value < result.threshold
    return result.statistic >= result.threshold


def _row_count(schema: Sequence[FeatureSpec], columns: Sequence[npt.ArrayLike], side: str) -> int:
    """The columns' common length; ValueError unless there is one per feature."""
    if len(columns) != len(schema):
        raise ValueError(f"{side} has {len(columns)} columns for {len(schema)} schema features")
    rows = None
    for feature, column in zip(schema, columns, strict=True):
        length = np.shape(column)
        if len(length) != 1:
            raise ValueError(f"{side} column of feature {feature.name!r} is not one-dimensional")
        if rows is not None and length[0] != rows:
            raise ValueError(
                f"{side} column of feature {feature.name!r} has {length[0]} rows, not {rows}"
            )
        rows = length[0]
    return rows or 0


def _values(feature: FeatureSpec, column: npt.ArrayLike, side: str) -> tuple[npt.NDArray[Any], int]:
    """The column's non-missing values, in its order (possibly the column
    itself), and how many were missing."""
    where = f"{side} column of feature {feature.name!r}"
    array = np.asarray(column)
    if feature.type is FeatureType.NUMERICAL:
        if array.dtype.kind not in "fiub":
            raise ValueError(f"{where}: numerical values are numbers, not {array.dtype}")
        values = array.astype(np.float64, copy=False)
        if np.isfinite(values).all():
            return values, 0  # the usual case: one pass, no copy
        if np.isinf(values).any():
            raise ValueError(f"{where} holds infinite values; only NaN marks a missing value")
        kept = values[~np.isnan(values)]
        return kept, int(values.size - kept.size)
    if array.dtype.kind not in "UOT":
        raise ValueError(f"{where}: categorical values are strings, not {array.dtype}")
    strings = array.astype(np.str_, copy=False)
    present = strings[strings != ""]
    return present, int(strings.size - present.size)
