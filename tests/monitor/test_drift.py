"""Drift statistics checked against SciPy and NumPy computed here independently,
the automatic test choice, the default config's false-alarm rate and
sensitivity, missing values, too-small windows, and bad input."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats
from scipy.spatial import distance

from conveyor.services.monitor import drift, statistics
from conveyor.services.monitor.drift import (
    DriftConfig,
    DriftTest,
    DriftTestSpec,
    FeatureSpec,
    FeatureType,
    drift_report,
)
from conveyor.services.monitor.references import PREDICTION_FEATURE, ReferenceData
from conveyor.services.monitor.statistics import MultipleTestingCorrection

NUMERICAL = FeatureType.NUMERICAL
CATEGORICAL = FeatureType.CATEGORICAL
TOLERANCE = 1e-9
Columns = list[npt.NDArray[Any]]


def numerical_schema(count: int) -> list[FeatureSpec]:
    return [FeatureSpec(f"x{i}", NUMERICAL) for i in range(count)]


def normal_columns(rng: np.random.Generator, count: int, rows: int) -> Columns:
    return [rng.normal(size=rows) for _ in range(count)]


def by_name(report: drift.DriftReport) -> dict[str, drift.FeatureDrift]:
    return {result.feature: result for result in report.features}


def psi_by_hand(reference: npt.NDArray[Any], current: npt.NDArray[Any], bins: int) -> float:
    """PSI as the module's notes define it, from np.quantile and np.histogram."""
    quantiles = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges = np.concatenate(([-np.inf], quantiles[1:-1], [np.inf]))
    expected = np.histogram(reference, edges)[0] / reference.size
    actual = np.histogram(current, edges)[0] / current.size
    expected[expected == 0] = 1e-4
    actual[actual == 0] = 1e-4
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@pytest.mark.parametrize(
    ("reference_rows", "current_rows", "discrete"),
    [(1000, 500, False), (300, 20_000, False), (20_000, 12_000, False), (400, 30_000, True)],
)
def test_kolmogorov_smirnov_is_scipys(
    reference_rows: int, current_rows: int, discrete: bool
) -> None:
    rng = np.random.default_rng(reference_rows)
    reference, current = rng.normal(size=reference_rows), rng.normal(0.05, size=current_rows)
    if discrete:
        reference, current = np.round(reference * 3), np.round(current * 3)
    expected = stats.ks_2samp(reference, current, method="auto")
    statistic, p_value = statistics.kolmogorov_smirnov(reference, current)
    assert statistic == pytest.approx(expected.statistic, abs=TOLERANCE)
    assert p_value == pytest.approx(expected.pvalue, abs=TOLERANCE)
    schema = [FeatureSpec("x", NUMERICAL)]
    config = DriftConfig(numerical_test=DriftTestSpec(DriftTest.KOLMOGOROV_SMIRNOV))
    result = drift_report(schema, [reference], [current], config).features[0]
    assert (result.statistic, result.p_value) == (statistic, p_value)


@pytest.mark.parametrize(("reference_rows", "current_rows"), [(1000, 500), (5000, 200_000)])
def test_wasserstein_is_scipys_over_the_reference_std(
    reference_rows: int, current_rows: int
) -> None:
    rng = np.random.default_rng(7)
    reference = rng.gamma(2.0, size=reference_rows)
    current = np.round(rng.gamma(2.2, size=current_rows), 2)  # ties on the window's side
    expected = stats.wasserstein_distance(reference, current) / np.std(reference)
    assert statistics.wasserstein(reference, current) == pytest.approx(expected, rel=TOLERANCE)


def test_wasserstein_on_a_constant_reference_is_the_plain_distance() -> None:
    reference, current = np.full(50, 3.0), np.array([3.0, 3.0, 4.0, 5.0])
    assert statistics.wasserstein(reference, current) == pytest.approx(0.75, abs=TOLERANCE)


@pytest.mark.parametrize("bins", [2, 10, 37])
def test_psi_matches_a_hand_computation_on_reference_quantile_bins(bins: int) -> None:
    rng = np.random.default_rng(bins)
    reference, current = rng.normal(size=2000), rng.normal(2.5, 0.5, size=700)
    comparison = statistics.compare_bins(reference, current, bins)
    psi = statistics.population_stability_index(
        comparison.reference_counts, comparison.current_counts
    )
    assert psi == pytest.approx(psi_by_hand(reference, current, bins), abs=TOLERANCE)
    assert 0 in comparison.current_counts  # the window left some bins empty: smoothed
    assert len(comparison.bin_edges) == bins + 1 == len(comparison.current_counts) + 1
    assert (comparison.bin_edges[0], comparison.bin_edges[-1]) == (-math.inf, math.inf)
    assert (sum(comparison.reference_counts), sum(comparison.current_counts)) == (2000, 700)

    config = DriftConfig(
        numerical_test=DriftTestSpec(DriftTest.POPULATION_STABILITY_INDEX), psi_bins=bins
    )
    result = drift_report([FeatureSpec("x", NUMERICAL)], [reference], [current], config).features[0]
    assert result.statistic == pytest.approx(psi, abs=TOLERANCE)
    assert (result.p_value, result.adjusted_p_value, result.threshold) == (None, None, 0.1)
    assert result.drifted


def test_discrete_and_constant_references_keep_their_values_apart() -> None:
    rng = np.random.default_rng(3)
    reference = rng.choice([0.0, 1.0, 2.0, 3.0], p=[0.6, 0.2, 0.15, 0.05], size=1000)
    current = rng.choice([0.0, 1.0, 2.0, 3.0], p=[0.3, 0.2, 0.15, 0.35], size=500)
    comparison = statistics.compare_bins(reference, current, 10)
    assert np.all(np.diff(comparison.bin_edges) > 0)  # duplicate quantiles dropped
    assert comparison.reference_counts == tuple(np.histogram(reference, comparison.bin_edges)[0])
    assert statistics.population_stability_index(
        comparison.reference_counts, comparison.current_counts
    ) == pytest.approx(psi_by_hand(reference, current, 10), abs=TOLERANCE)

    constant = statistics.compare_bins(np.full(100, 2.0), np.array([1.0, 2.0, 2.0, 7.0]), 10)
    assert (constant.reference_counts, constant.current_counts) == ((0, 100, 0), (1, 2, 1))
    two_values = statistics.compare_bins(
        np.array([0.0] * 95 + [1.0] * 5), np.array([0.0, 1.0, 1.0]), 10
    )
    assert (two_values.reference_counts, two_values.current_counts) == ((95, 5), (1, 2))


def test_jensen_shannon_is_scipys_with_the_natural_log() -> None:
    rng = np.random.default_rng(11)
    reference, current = rng.normal(size=3000), rng.normal(0.3, 1.2, size=900)
    binned = statistics.compare_bins(reference, current, 10)
    expected = distance.jensenshannon(
        np.array(binned.reference_counts) / 3000, np.array(binned.current_counts) / 900, base=math.e
    )
    js = statistics.jensen_shannon(binned.reference_counts, binned.current_counts)
    assert js == pytest.approx(expected, abs=TOLERANCE)
    assert statistics.jensen_shannon([3, 1], [30, 10]) == 0.0

    config = DriftConfig(numerical_test=DriftTestSpec(DriftTest.JENSEN_SHANNON))
    result = drift_report([FeatureSpec("x", NUMERICAL)], [reference], [current], config).features[0]
    assert result.statistic == pytest.approx(expected, abs=TOLERANCE)


def test_chi_squared_pools_unseen_categories_with_half_a_reference_count() -> None:
    reference = np.array(["a"] * 500 + ["b"] * 300 + ["c"] * 200)
    current = np.array(["a"] * 200 + ["b"] * 180 + ["c"] * 100 + ["x"] * 12 + ["y"] * 8)
    comparison = statistics.compare_categories(reference, current)
    assert comparison.categories == ("a", "b", "c", "__other__")
    assert comparison.reference_counts == (500, 300, 200, 0)
    assert comparison.current_counts == (200, 180, 100, 20)

    expected_counts = np.array([500, 300, 200, 0.5]) / 1000.5 * 500
    expected = stats.chisquare([200, 180, 100, 20], expected_counts)
    schema = [FeatureSpec("city", CATEGORICAL)]
    report = drift_report(schema, [reference], [current], distributions=True)
    result = report.features[0]
    assert result.test is DriftTest.CHI_SQUARED
    assert result.statistic == pytest.approx(expected.statistic, abs=TOLERANCE)
    assert result.p_value == pytest.approx(expected.pvalue, abs=TOLERANCE)
    assert result.distribution == comparison
    assert result.drifted

    js = distance.jensenshannon([500, 300, 200, 0], [200, 180, 100, 20])
    jensen_shannon = DriftConfig(categorical_test=DriftTestSpec(DriftTest.JENSEN_SHANNON))
    result = drift_report(schema, [reference], [current], jensen_shannon).features[0]
    assert result.statistic == pytest.approx(js, abs=TOLERANCE)


def test_chi_squared_without_unseen_categories_uses_the_reference_shares() -> None:
    reference = np.array(["a"] * 600 + ["b"] * 400)
    current = np.array(["b"] * 150 + ["a"] * 250)
    expected = stats.chisquare([250, 150], [240.0, 160.0])
    comparison = statistics.compare_categories(reference, current)
    assert comparison.categories == ("a", "b")
    statistic, p_value = statistics.chi_squared(
        comparison.reference_counts, comparison.current_counts
    )
    assert (statistic, p_value) == pytest.approx(
        (expected.statistic, expected.pvalue), abs=TOLERANCE
    )
    assert statistics.chi_squared([10], [4]) == (0.0, 1.0)  # one category: nothing can differ


def test_a_few_valued_numerical_feature_is_tested_on_its_values() -> None:
    reference = np.array([0.0] * 500 + [1.0] * 300 + [2.5] * 200)
    current = np.array([0.0] * 200 + [1.0] * 150 + [2.5] * 140 + [7.0] * 10)
    schema = [FeatureSpec("children", NUMERICAL)]
    result = drift_report(schema, [reference], [current], distributions=True).features[0]
    assert result.test is DriftTest.CHI_SQUARED
    assert result.distribution is not None
    assert result.distribution.categories == ("0.0", "1.0", "2.5", "__other__")
    expected = stats.chisquare([200, 150, 140, 10], np.array([500, 300, 200, 0.5]) / 1000.5 * 500)
    assert result.statistic == pytest.approx(expected.statistic, abs=TOLERANCE)
    assert result.p_value == pytest.approx(expected.pvalue, abs=TOLERANCE)


def test_a_reference_category_named_other_takes_the_unseen_ones() -> None:
    comparison = statistics.compare_categories(
        np.array(["a", "__other__", "a"]), np.array(["a", "zzz", "__other__", "yyy"])
    )
    assert comparison.categories == ("__other__", "a")
    assert (comparison.reference_counts, comparison.current_counts) == ((1, 2), (3, 1))


def test_corrections_match_hand_computations_and_scipy() -> None:
    p_values = np.random.default_rng(2).uniform(0, 0.2, size=30) ** 2
    count = p_values.size
    ranked = sorted(range(count), key=lambda i: p_values[i])
    by_hand = np.empty(count)
    for rank, i in enumerate(ranked, start=1):
        later = [p_values[j] * count / r for r, j in enumerate(ranked, start=1) if r >= rank]
        by_hand[i] = min(1.0, min(later))
    bh = statistics.adjust_p_values(p_values, MultipleTestingCorrection.BENJAMINI_HOCHBERG)
    np.testing.assert_allclose(bh, by_hand, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(bh, stats.false_discovery_control(p_values), rtol=0, atol=TOLERANCE)
    bonferroni = statistics.adjust_p_values(p_values, MultipleTestingCorrection.BONFERRONI)
    np.testing.assert_allclose(bonferroni, [min(1.0, p * count) for p in p_values], atol=TOLERANCE)
    none = statistics.adjust_p_values(p_values, MultipleTestingCorrection.NONE)
    np.testing.assert_array_equal(none, p_values)
    assert statistics.adjust_p_values([], MultipleTestingCorrection.BENJAMINI_HOCHBERG).size == 0


@pytest.mark.parametrize("correction", list(MultipleTestingCorrection))
def test_a_report_corrects_its_p_value_tests_and_nothing_else(
    correction: MultipleTestingCorrection,
) -> None:
    rng = np.random.default_rng(4)
    schema = [*numerical_schema(4), FeatureSpec("city", CATEGORICAL)]
    reference = [*normal_columns(rng, 4, 800), rng.choice(["a", "b", "c"], size=800)]
    current = [rng.normal(0.15 * i, size=400) for i in range(4)]
    current.append(rng.choice(["a", "b", "c"], p=[0.4, 0.3, 0.3], size=400))
    psi = DriftTestSpec(DriftTest.POPULATION_STABILITY_INDEX, threshold=0.2)
    config = DriftConfig(feature_tests={"x3": psi}, correction=correction)
    report = drift_report(schema, reference, current, config)
    assert report.correction is correction
    tested = [r for r in report.features if r.test in drift.P_VALUE_TESTS]
    assert [r.feature for r in tested] == ["x0", "x1", "x2", "city"]
    raw = [r.p_value for r in tested]
    expected = statistics.adjust_p_values(raw, correction)
    assert [r.adjusted_p_value for r in tested] == pytest.approx(expected.tolist(), abs=TOLERANCE)
    for result in tested:
        assert result.drifted == (result.adjusted_p_value < 0.05)
    x3 = by_name(report)["x3"]
    assert (x3.p_value, x3.adjusted_p_value, x3.threshold) == (None, None, 0.2)
    assert x3.drifted == (x3.statistic >= 0.2)


@pytest.mark.parametrize(
    ("reference_rows", "distinct", "feature_type", "test"),
    [
        (1000, 6, NUMERICAL, DriftTest.KOLMOGOROV_SMIRNOV),
        (1000, 5, NUMERICAL, DriftTest.CHI_SQUARED),
        (1000, 50, CATEGORICAL, DriftTest.CHI_SQUARED),
        (1001, 6, NUMERICAL, DriftTest.WASSERSTEIN),
        (1001, 5, NUMERICAL, DriftTest.JENSEN_SHANNON),
        (1001, 50, CATEGORICAL, DriftTest.JENSEN_SHANNON),
    ],
)
def test_the_automatic_choice_follows_reference_size_and_distinct_values(
    reference_rows: int, distinct: int, feature_type: FeatureType, test: DriftTest
) -> None:
    chosen = drift.automatic_test(
        feature_type, reference_rows=reference_rows, distinct_values=distinct
    )
    assert chosen is test
    rng = np.random.default_rng(distinct)
    values = rng.integers(0, distinct, size=reference_rows)
    column: npt.NDArray[Any] = (
        values.astype(float) if feature_type is NUMERICAL else values.astype(str)
    )
    schema = [FeatureSpec("f", feature_type)]
    result = drift_report(schema, [column], [column[:300]], distributions=True).features[0]
    assert result.test is test
    assert result.threshold == (0.05 if test in drift.P_VALUE_TESTS else 0.1)
    assert result.distribution is not None
    if test in (DriftTest.KOLMOGOROV_SMIRNOV, DriftTest.WASSERSTEIN):
        assert result.distribution.categories == ()
    else:  # a few-valued numerical feature is compared as categories of its values
        assert len(result.distribution.categories) == distinct
    if feature_type is NUMERICAL and distinct == 5:
        assert result.distribution.categories == ("0.0", "1.0", "2.0", "3.0", "4.0")


def test_false_alarms_stay_within_the_level_with_the_default_correction() -> None:
    rng = np.random.default_rng(2024)
    schema = numerical_schema(30)
    reference = normal_columns(rng, 30, 1000)
    windows = 100
    corrected = uncorrected = 0
    for _ in range(windows):
        report = drift_report(schema, reference, normal_columns(rng, 30, 500))
        assert {r.test for r in report.features} == {DriftTest.KOLMOGOROV_SMIRNOV}
        corrected += any(r.drifted for r in report.features)
        uncorrected += any(r.p_value is not None and r.p_value < 0.05 for r in report.features)
    print(f"windows with a false alarm: {corrected}/{windows} corrected, {uncorrected} uncorrected")
    assert corrected / windows <= 0.10
    assert uncorrected > corrected


def test_half_a_standard_deviation_shift_is_flagged_within_two_windows() -> None:
    rng = np.random.default_rng(99)
    schema = numerical_schema(30)
    reference = normal_columns(rng, 30, 1000)
    flagged = []
    for _ in range(2):
        current = normal_columns(rng, 30, 500)
        current[17] = current[17] + 0.5
        flagged.append(by_name(drift_report(schema, reference, current))["x17"].drifted)
    assert any(flagged)


def test_a_large_reference_is_compared_by_distances() -> None:
    rng = np.random.default_rng(5000)
    schema = [
        *numerical_schema(3),
        FeatureSpec("city", CATEGORICAL),
        FeatureSpec("tier", CATEGORICAL),
    ]
    cities, tiers = ["paris", "lyon", "nice"], ["gold", "silver"]
    reference = [
        *normal_columns(rng, 3, 5000),
        rng.choice(cities, size=5000),
        rng.choice(tiers, size=5000),
    ]
    current = [rng.normal(size=1000), rng.normal(0.5, size=1000), rng.normal(size=1000)]
    current += [rng.choice(cities, size=1000), rng.choice(tiers, p=[0.9, 0.1], size=1000)]
    results = by_name(drift_report(schema, reference, current))
    assert [results[n].test for n in results] == [DriftTest.WASSERSTEIN] * 3 + [
        DriftTest.JENSEN_SHANNON
    ] * 2
    assert [n for n in results if results[n].drifted] == ["x1", "tier"]
    assert results["x1"].statistic == pytest.approx(
        stats.wasserstein_distance(reference[1], current[1]) / np.std(reference[1]), abs=TOLERANCE
    )
    assert all(results[n].p_value is None for n in results)


def test_missing_values_are_left_out_and_counted() -> None:
    rng = np.random.default_rng(8)
    reference, current = rng.normal(size=1000), rng.normal(size=400)
    reference[::10], current[:25] = np.nan, np.nan
    categories = rng.choice(["a", "b", ""], size=400)
    schema = [FeatureSpec("x", NUMERICAL), FeatureSpec("c", CATEGORICAL)]
    report = drift_report(
        schema, [reference, rng.choice(["a", "b"], size=1000)], [current, categories]
    )
    x, c = report.features
    assert (x.current_count, x.missing_count) == (375, 25)
    expected = stats.ks_2samp(reference[~np.isnan(reference)], current[25:])
    assert (x.statistic, x.p_value) == pytest.approx(
        (expected.statistic, expected.pvalue), abs=TOLERANCE
    )
    assert (c.current_count, c.missing_count) == (
        np.sum(categories != ""),
        np.sum(categories == ""),
    )


def test_a_window_without_values_for_a_feature_gets_no_verdict() -> None:
    rng = np.random.default_rng(9)
    schema = numerical_schema(2)
    current = [np.full(200, np.nan), rng.normal(3.0, size=200)]
    report = drift_report(schema, normal_columns(rng, 2, 500), current)
    empty, shifted = report.features
    assert math.isnan(empty.statistic)
    assert (empty.p_value, empty.drifted) == (None, False)
    assert (empty.current_count, empty.missing_count) == (0, 200)
    assert shifted.drifted
    assert shifted.adjusted_p_value == shifted.p_value  # one p-value: nothing to correct
    assert (report.dataset.tested_features, report.dataset.drifted_features) == (1, 1)


def test_a_window_below_min_rows_gets_statistics_but_no_verdict() -> None:
    rng = np.random.default_rng(10)
    schema = numerical_schema(3)
    reference, current = normal_columns(rng, 3, 1000), [rng.normal(4.0, size=60) for _ in range(3)]
    report = drift_report(schema, reference, current)
    assert (report.insufficient_data, report.current_rows) == (True, 60)
    assert all(
        r.p_value is not None and r.p_value < 1e-6 and not r.drifted for r in report.features
    )
    assert (report.dataset.drifted, report.dataset.drifted_features) == (False, 0)
    enough = drift_report(schema, reference, current, DriftConfig(min_rows=60))
    assert (enough.insufficient_data, enough.dataset.drifted) == (False, True)


def test_dataset_drift_is_the_share_of_tested_features_that_drifted() -> None:
    rng = np.random.default_rng(12)
    schema = numerical_schema(5)
    reference = normal_columns(rng, 5, 1000)
    current = [rng.normal(2.0 if i < 2 else 0.0, size=400) for i in range(5)]
    untested = {"x4": DriftTestSpec(DriftTest.NONE)}
    report = drift_report(schema, reference, current, DriftConfig(feature_tests=untested))
    assert [r.feature for r in report.features] == ["x0", "x1", "x2", "x3"]
    assert report.dataset == drift.DatasetDrift(2, 4, 0.5, 0.5, True)
    stricter = DriftConfig(feature_tests=untested, dataset_drift_share=0.75)
    assert not drift_report(schema, reference, current, stricter).dataset.drifted


def test_distributions_only_on_request() -> None:
    rng = np.random.default_rng(13)
    reference, current = rng.normal(size=1000), rng.normal(size=300)
    schema = [FeatureSpec("x", NUMERICAL)]
    assert drift_report(schema, [reference], [current]).features[0].distribution is None
    shown = (
        drift_report(schema, [reference], [current], distributions=True).features[0].distribution
    )
    assert shown == statistics.compare_bins(reference, current, 10)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"numerical_test": DriftTestSpec(DriftTest.CHI_SQUARED)}, r"numerical_test\.test"),
        ({"categorical_test": DriftTestSpec(DriftTest.WASSERSTEIN)}, r"categorical_test\.test"),
        (
            {"numerical_test": DriftTestSpec(DriftTest.KOLMOGOROV_SMIRNOV, 1.5)},
            r"numerical_test\.threshold",
        ),
        ({"categorical_test": DriftTestSpec(threshold=0.0)}, r"categorical_test\.threshold"),
        ({"numerical_test": DriftTestSpec(threshold=1.0)}, r"numerical_test\.threshold"),
        (
            {"numerical_test": DriftTestSpec(DriftTest.WASSERSTEIN, -0.1)},
            r"numerical_test\.threshold",
        ),
        (
            {"numerical_test": DriftTestSpec(DriftTest.WASSERSTEIN, math.nan)},
            r"numerical_test\.threshold",
        ),
        (
            {"feature_tests": {"age": DriftTestSpec(DriftTest.CHI_SQUARED, 2.0)}},
            r"feature_tests\['age'\]\.threshold",
        ),
        ({"psi_bins": 1}, "psi_bins"),
        ({"psi_bins": 101}, "psi_bins"),
        ({"dataset_drift_share": 0.0}, "dataset_drift_share"),
        ({"dataset_drift_share": 1.5}, "dataset_drift_share"),
        ({"large_reference_rows": 0}, "large_reference_rows"),
        ({"min_rows": 0}, "min_rows"),
    ],
)
def test_a_bad_config_names_its_field(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftConfig(**arguments)


def test_distance_thresholds_above_one_are_fine() -> None:
    spec = DriftTestSpec(DriftTest.WASSERSTEIN, 1.5)
    assert DriftConfig(numerical_test=spec).numerical_test.threshold == 1.5


@pytest.mark.parametrize(
    ("feature_tests", "message"),
    [
        (
            {"city": DriftTestSpec(DriftTest.KOLMOGOROV_SMIRNOV)},
            r"feature_tests\['city'\]\.test: .*categorical feature 'city'",
        ),
        (
            {"age": DriftTestSpec(DriftTest.CHI_SQUARED)},
            r"feature_tests\['age'\]\.test: .*numerical feature 'age'",
        ),
        ({"height": DriftTestSpec()}, r"feature_tests\['height'\]: the schema has no feature"),
    ],
)
def test_an_override_must_name_a_feature_it_suits(
    feature_tests: dict[str, DriftTestSpec], message: str
) -> None:
    schema = [FeatureSpec("age", NUMERICAL), FeatureSpec("city", CATEGORICAL)]
    columns = [np.arange(200.0), np.array(["a", "b"] * 100)]
    with pytest.raises(ValueError, match=message):
        drift_report(schema, columns, columns, DriftConfig(feature_tests=feature_tests))


@pytest.mark.parametrize(
    ("reference", "current", "message"),
    [
        ([np.zeros(5)], [np.zeros(5), np.array(["a"] * 5)], "reference has 1 columns for 2"),
        (
            [np.zeros(5), np.array(["a"] * 6)],
            [np.zeros(5), np.array(["a"] * 5)],
            "feature 'city' has 6 rows",
        ),
        (
            [np.array([1.0, np.inf, 2.0]), np.array(["a"] * 3)],
            [np.zeros(3), np.array(["a"] * 3)],
            "feature 'age' holds infinite",
        ),
        (
            [np.zeros(3), np.array(["a"] * 3)],
            [np.array([-np.inf, 0, 1]), np.array(["a"] * 3)],
            "current column of feature 'age' holds infinite",
        ),
        (
            [np.full(3, np.nan), np.array(["a"] * 3)],
            [np.zeros(3), np.array(["a"] * 3)],
            "feature 'age': the reference holds no value",
        ),
        (
            [np.zeros(3), np.zeros(3)],
            [np.zeros(3), np.array(["a"] * 3)],
            "feature 'city': categorical values are strings",
        ),
        (
            [np.array(["1", "2", "3"]), np.array(["a"] * 3)],
            [np.zeros(3), np.array(["a"] * 3)],
            "feature 'age': numerical values are numbers",
        ),
    ],
)
def test_columns_that_do_not_fit_the_schema_name_the_feature(
    reference: Columns, current: Columns, message: str
) -> None:
    schema = [FeatureSpec("age", NUMERICAL), FeatureSpec("city", CATEGORICAL)]
    with pytest.raises(ValueError, match=message):
        drift_report(schema, reference, current)


def test_a_schema_names_each_feature_once() -> None:
    schema = [FeatureSpec("age", NUMERICAL), FeatureSpec("age", CATEGORICAL)]
    columns = [np.zeros(3), np.array(["a"] * 3)]
    with pytest.raises(ValueError, match="feature 'age' twice"):
        drift_report(schema, columns, columns)


def test_summaries_follow_feature_summary() -> None:
    rng = np.random.default_rng(14)
    values = rng.normal(10.0, 2.0, size=500)
    values[:7] = np.nan
    cities = rng.choice(["paris", "lyon", ""], size=500)
    schema = [
        FeatureSpec("x", NUMERICAL),
        FeatureSpec("city", CATEGORICAL),
        FeatureSpec("gone", NUMERICAL),
    ]
    x, city, gone = drift.summarize(schema, [values, cities, np.full(500, np.nan)])
    present = values[7:]
    assert (x.feature, x.count, x.missing_count) == ("x", 493, 7)
    assert (x.mean, x.std) == pytest.approx((np.mean(present), np.std(present)), abs=TOLERANCE)
    assert x.deciles == pytest.approx(
        np.quantile(present, np.linspace(0, 1, 11)).tolist(), abs=TOLERANCE
    )
    assert (x.deciles[0], x.deciles[-1]) == (present.min(), present.max())
    assert x.category_counts == {}
    assert city.category_counts == {name: int(np.sum(cities == name)) for name in ("lyon", "paris")}
    assert (city.count, city.missing_count, city.mean, city.deciles) == (
        np.sum(cities != ""),
        np.sum(cities == ""),
        0.0,
        (),
    )
    assert (gone.count, gone.missing_count, gone.deciles) == (0, 500, ())
    assert math.isnan(gone.mean)
    assert math.isnan(gone.std)


def mixed_reference_and_window(
    rng: np.random.Generator, reference_rows: int, current_rows: int
) -> tuple[list[FeatureSpec], Columns, Columns]:
    """Continuous, few-valued and categorical features, with missing values and
    signed zeros (ties across both samples)."""
    schema = [*numerical_schema(3), FeatureSpec("city", CATEGORICAL)]
    cities = np.array(["", "Oslo", "Bergen", "Tromsø"])
    reference: Columns = [
        rng.normal(size=reference_rows),
        np.round(rng.normal(size=reference_rows)),
        rng.integers(0, 4, reference_rows).astype(np.float64),
        cities[rng.integers(0, 4, reference_rows)],
    ]
    current: Columns = [
        rng.normal(0.2, size=current_rows),
        np.round(rng.normal(0.3, size=current_rows)),
        rng.integers(0, 5, current_rows).astype(np.float64),
        cities[rng.integers(0, 3, current_rows)],
    ]
    reference[0][:20] = 0.0
    reference[0][20:40] = -0.0
    current[0][:15] = -0.0
    reference[1][::9] = np.nan
    current[1][::4] = np.nan
    return schema, reference, current


@pytest.mark.parametrize(
    ("reference_rows", "current_rows"), [(2000, 300), (300, 2000), (20_000, 12_000)]
)
@pytest.mark.parametrize("test", [t for t in DriftTest if t in drift.NUMERICAL_TESTS])
def test_a_prepared_reference_gives_the_raw_columns_results(
    reference_rows: int, current_rows: int, test: DriftTest
) -> None:
    rng = np.random.default_rng(reference_rows + current_rows)
    schema, reference, current = mixed_reference_and_window(rng, reference_rows, current_rows)
    prepared = drift.PreparedReference(schema, reference)
    for distributions in (False, True):
        config = DriftConfig(numerical_test=DriftTestSpec(test), psi_bins=7)
        raw = drift_report(schema, reference, current, config, distributions=distributions)
        # Twice: the second report reads what the first prepared.
        for _ in range(2):
            cached = drift_report(schema, prepared, current, config, distributions=distributions)
            assert cached == raw


@pytest.mark.parametrize("test", [t for t in DriftTest if t in drift.NUMERICAL_TESTS])
def test_a_window_of_sorted_columns_gives_the_unsorted_windows_results(
    test: DriftTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(17)
    schema, reference, current = mixed_reference_and_window(rng, 3000, 2500)
    presorted = [np.sort(column) if column.dtype.kind == "f" else column for column in current]
    prepared = drift.PreparedReference(schema, reference)
    expected = {
        distributions: drift_report(
            schema,
            prepared,
            current,
            DriftConfig(numerical_test=DriftTestSpec(test), psi_bins=7),
            distributions=distributions,
        )
        for distributions in (False, True)
    }
    sorts: list[int] = []
    real_sort = np.sort

    def counting_sort(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        sorts.append(values.size)
        return real_sort(values)

    monkeypatch.setattr(drift.np, "sort", counting_sort)
    for distributions in (False, True):
        found = drift_report(
            schema,
            prepared,
            presorted,
            DriftConfig(numerical_test=DriftTestSpec(test), psi_bins=7),
            distributions=distributions,
            current_sorted=True,
        )
        assert found == expected[distributions]
    if test is not DriftTest.KOLMOGOROV_SMIRNOV:  # SciPy's ks_2samp sorts its own inputs
        assert sorts == []  # the window is never sorted again


def test_the_to_reference_statistics_are_the_sorted_ones_bit_for_bit() -> None:
    rng = np.random.default_rng(11)
    for reference_rows, current_rows in ((50_000, 700), (700, 50_000), (30_000, 30_000)):
        reference = np.sort(np.round(rng.normal(size=reference_rows), 2))
        current = np.sort(np.round(rng.normal(0.1, size=current_rows), 2))
        sample = statistics.ReferenceSample(reference)
        expected = stats.wasserstein_distance(reference, current) / np.std(reference)
        for _ in range(2):
            distance_value = statistics.wasserstein_to_reference(sample, current)
            assert distance_value == statistics.wasserstein_sorted(reference, current)
            assert distance_value == pytest.approx(expected, rel=1e-12)
            assert statistics.kolmogorov_smirnov_to_reference(
                sample, current
            ) == statistics.kolmogorov_smirnov_sorted(reference, current)
        unsorted = rng.permutation(current)
        binned = statistics.compare_bins_to_reference(sample, unsorted, 10, current_sorted=False)
        assert binned == statistics.compare_sorted_bins(reference, current, 10)


def test_a_reference_column_is_prepared_once_and_only_when_tested(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(5)
    schema = numerical_schema(3)
    reference = normal_columns(rng, 3, 5000)
    reference[2][7] = np.inf  # never tested below, so never checked
    prepared = drift.PreparedReference(schema, reference)
    sorts: list[int] = []
    quantiles: list[int] = []
    real_sort, real_edges = np.sort, statistics.quantile_bin_edges

    def counting_sort(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        sorts.append(values.size)
        return real_sort(values)

    def counting_edges(values: npt.NDArray[Any], bins: int) -> npt.NDArray[np.float64]:
        quantiles.append(bins)
        edges: npt.NDArray[np.float64] = real_edges(values, bins)
        return edges

    monkeypatch.setattr(drift.np, "sort", counting_sort)
    monkeypatch.setattr(statistics, "quantile_bin_edges", counting_edges)
    config = DriftConfig(
        numerical_test=DriftTestSpec(DriftTest.POPULATION_STABILITY_INDEX),
        feature_tests={"x2": DriftTestSpec(DriftTest.NONE)},
    )
    for _ in range(3):
        drift_report(schema, prepared, normal_columns(rng, 3, 400), config)
    assert sorts == [5000, 5000]  # the two tested reference columns; PSI sorts no window
    assert quantiles == [10, 10]
    with pytest.raises(ValueError, match="'x2' holds infinite values"):
        drift_report(schema, prepared, normal_columns(rng, 3, 400))


def test_a_prepared_reference_must_fit_the_schema() -> None:
    rng = np.random.default_rng(6)
    prepared = drift.PreparedReference(numerical_schema(2), normal_columns(rng, 2, 100))
    with pytest.raises(ValueError, match="another schema"):
        drift_report(numerical_schema(3), prepared, normal_columns(rng, 3, 100))
    with pytest.raises(ValueError, match="feature 'x1' has 50 rows"):
        drift.PreparedReference(numerical_schema(2), [np.zeros(100), np.zeros(50)])


def test_features_tested_on_threads_give_the_serial_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(8)
    schema, reference, current = mixed_reference_and_window(rng, 3000, 2000)
    prepared = drift.PreparedReference(schema, reference)
    for test in (DriftTest.UNSPECIFIED, DriftTest.KOLMOGOROV_SMIRNOV):
        config = DriftConfig(numerical_test=DriftTestSpec(test), large_reference_rows=100)
        serial = drift_report(schema, prepared, current, config, distributions=True)
        monkeypatch.setattr(drift, "PARALLEL_MIN_VALUES", 1)
        assert drift_report(schema, prepared, current, config, distributions=True) == serial
        monkeypatch.undo()
    monkeypatch.setattr(drift, "PARALLEL_MIN_VALUES", 1)
    current[2][3] = np.inf
    with pytest.raises(ValueError, match="current column of feature 'x2' holds infinite"):
        drift_report(schema, prepared, current)


def test_reference_data_keeps_its_prepared_columns() -> None:
    rng = np.random.default_rng(9)
    outputs = rng.random((400, 3))
    data = ReferenceData(
        rng.normal(size=(400, 2)),
        np.array(["a", "b"])[rng.integers(0, 2, (400, 1))],
        outputs,
        np.full(400, -1),
    )
    schema = [*numerical_schema(2), FeatureSpec("c", CATEGORICAL)]
    assert data.prepared(schema) is data.prepared(schema)
    assert data.prepared([*schema[:2], FeatureSpec("d", CATEGORICAL)]).schema[2].name == "d"
    predictions = data.prepared_predictions()
    assert predictions is data.prepared_predictions()
    (classes,) = predictions.schema
    assert classes == FeatureSpec(PREDICTION_FEATURE, CATEGORICAL)
    expected = np.unique(np.argmax(outputs, axis=1).astype(np.str_), return_counts=True)
    categories, counts = predictions.sample(0).categories()
    assert (categories.tolist(), counts.tolist()) == (expected[0].tolist(), expected[1].tolist())
    window = [*normal_columns(rng, 2, 300), np.array(["a", "c"])[rng.integers(0, 2, 300)]]
    assert drift_report(schema, data.prepared(schema), window) == drift_report(
        schema, data.columns(), window
    )
