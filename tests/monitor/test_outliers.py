"""Outlier scores checked against SciPy and scikit-learn computed here
independently, the default threshold's false-alarm rate and sensitivity,
missing values and unseen categories, serialisation, and bad input."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy.spatial import distance
from sklearn.ensemble import IsolationForest
from sklearn.preprocessing import OneHotEncoder

from conveyor.services.monitor.outliers import (
    OutlierMethod,
    OutlierScorer,
    fit_scorer,
)

MAHALANOBIS = OutlierMethod.MAHALANOBIS
ISOLATION_FOREST = OutlierMethod.ISOLATION_FOREST
TOLERANCE = 1e-9
FOREST_TOLERANCE = 1e-12
SEED = 7
Array = npt.NDArray[Any]
Scorers = dict[OutlierMethod, OutlierScorer]
# Correlated features on very different scales and offsets.
MIXING = np.array([[1.0, 0.6, 0.2], [0.0, 0.8, -0.4], [0.0, 0.0, 0.5]]) * [1.0, 1e4, 1e-3]
OFFSET = np.array([5.0, -3e4, 0.2])
SCALES = np.sqrt(np.diag(MIXING.T @ MIXING))


def correlated(rng: np.random.Generator, rows: int) -> Array:
    result: Array = rng.normal(size=(rows, 3)) @ MIXING + OFFSET
    return result


def categories(rng: np.random.Generator, rows: int) -> Array:
    """Two categorical features; the second is missing ("") in about a tenth of rows."""
    colour = rng.choice(["red", "green", "blue"], size=rows, p=[0.6, 0.3, 0.1])
    size = rng.choice(["S", "M", "L", ""], size=rows, p=[0.3, 0.4, 0.2, 0.1])
    return np.column_stack([colour, size])


def none(rows: int) -> Array:
    return np.empty((rows, 0), dtype=np.str_)


def fitted(
    method: OutlierMethod, numerical: Array, categorical: Array, **kwargs: Any
) -> OutlierScorer:
    scorer = fit_scorer(method, numerical, categorical, **kwargs)
    assert scorer is not None
    return scorer


@pytest.fixture(scope="module")
def scorers() -> Scorers:
    """Both methods fitted on three numerical and two categorical features."""
    rng = np.random.default_rng(17)
    reference = correlated(rng, 300), categories(rng, 300)
    return {method: fitted(method, *reference) for method in (MAHALANOBIS, ISOLATION_FOREST)}


def scipy_mahalanobis(reference: Array, rows: Array) -> Array:
    precision = np.linalg.pinv(np.cov(reference, rowvar=False, ddof=1))
    mean = reference.mean(axis=0)
    return np.array([distance.mahalanobis(row, mean, precision) for row in rows])


def sklearn_forest_scores(
    reference: tuple[Array, Array], rows: tuple[Array, Array], seed: int = SEED
) -> Array:
    encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    if reference[1].shape[1]:
        encoder.fit(reference[1])
        encode = encoder.transform
    else:

        def encode(column: Array) -> Array:
            return np.empty((column.shape[0], 0))

    fit_on = np.hstack([reference[0], encode(reference[1])])
    forest = IsolationForest(n_estimators=100, random_state=seed).fit(fit_on)
    result: Array = -forest.score_samples(np.hstack([rows[0], encode(rows[1])]))
    return result


@pytest.mark.parametrize("method", [OutlierMethod.UNSPECIFIED, MAHALANOBIS])
def test_mahalanobis_is_scipys(method: OutlierMethod) -> None:
    rng = np.random.default_rng(1)
    reference, current = correlated(rng, 2000), correlated(rng, 300) * 1.5 - OFFSET * 0.5
    scorer = fitted(method, reference, none(2000))
    assert scorer.method is MAHALANOBIS
    scores = scorer.score(current, none(300)).scores
    np.testing.assert_allclose(
        scores, scipy_mahalanobis(reference, current), rtol=0, atol=TOLERANCE
    )


def test_singular_covariance_uses_the_pseudo_inverse() -> None:
    rng = np.random.default_rng(2)
    base, fresh = correlated(rng, 2000), correlated(rng, 300) * 2
    reference = np.column_stack([base, base[:, 1]])  # a duplicated column
    current = np.column_stack([fresh, fresh[:, 1]])
    scorer = fitted(MAHALANOBIS, reference, none(2000))
    scores = scorer.score(current, none(300)).scores
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(
        scores, scipy_mahalanobis(reference, current), rtol=0, atol=TOLERANCE
    )
    # The duplicate adds nothing: the distance is that of the three distinct features.
    np.testing.assert_allclose(scores, scipy_mahalanobis(base, fresh), rtol=0, atol=TOLERANCE)


def test_a_constant_reference_feature_is_ignored() -> None:
    rng = np.random.default_rng(3)
    base, fresh = correlated(rng, 1000), correlated(rng, 50)
    reference = np.column_stack([base, np.full(1000, 4.0)])
    current = np.column_stack([fresh, rng.normal(size=50)])
    scores = fitted(MAHALANOBIS, reference, none(1000)).score(current, none(50)).scores
    np.testing.assert_allclose(scores, scipy_mahalanobis(base, fresh), rtol=0, atol=TOLERANCE)


def test_mahalanobis_ignores_categorical_features() -> None:
    rng = np.random.default_rng(4)
    reference, current = correlated(rng, 1000), correlated(rng, 100)
    scorer = fitted(MAHALANOBIS, reference, categories(rng, 1000))
    with_categories = scorer.score(current, categories(rng, 100)).scores
    unseen = np.full((100, 2), "never seen")
    np.testing.assert_array_equal(scorer.score(current, unseen).scores, with_categories)
    np.testing.assert_allclose(
        with_categories, scipy_mahalanobis(reference, current), atol=TOLERANCE
    )


def test_isolation_forest_is_sklearns_with_one_hot_categories() -> None:
    rng = np.random.default_rng(5)
    reference = correlated(rng, 3000), categories(rng, 3000)
    current_categories = categories(rng, 400)
    # Unseen categories, and "" in a feature the reference never had missing:
    # both encode as all zeros for their feature.
    current_categories[:40, 0] = "purple"
    current_categories[40:80, 0] = ""
    current_categories[80:120, 1] = "XXL"
    current = correlated(rng, 400) * 1.3, current_categories
    scorer = fitted(ISOLATION_FOREST, *reference, seed=SEED)
    scores = scorer.score(*current).scores
    np.testing.assert_allclose(
        scores, sklearn_forest_scores(reference, current), rtol=0, atol=FOREST_TOLERANCE
    )
    again = fitted(ISOLATION_FOREST, *reference, seed=SEED).score(*current).scores
    np.testing.assert_array_equal(again, scores)
    other_seed = fitted(ISOLATION_FOREST, *reference, seed=SEED + 1).score(*current).scores
    assert not np.array_equal(other_seed, scores)


def test_isolation_forest_on_categorical_features_only() -> None:
    rng = np.random.default_rng(6)
    reference = np.empty((500, 0)), categories(rng, 500)
    current = np.empty((60, 0)), categories(rng, 60)
    scores = fitted(ISOLATION_FOREST, *reference, seed=SEED).score(*current).scores
    np.testing.assert_allclose(
        scores, sklearn_forest_scores(reference, current), rtol=0, atol=FOREST_TOLERANCE
    )


@pytest.mark.parametrize("method", [MAHALANOBIS, ISOLATION_FOREST])
@pytest.mark.parametrize("with_categories", [False, True])
def test_default_threshold_flags_about_one_percent_and_shifted_rows(
    method: OutlierMethod, with_categories: bool
) -> None:
    rng = np.random.default_rng(8)

    def labels(rows: int) -> Array:
        return categories(rng, rows) if with_categories else none(rows)

    reference = correlated(rng, 3000), labels(3000)
    scorer = fitted(method, *reference)
    assert scorer.threshold == np.percentile(scorer.score(*reference).scores, 99)

    fresh = scorer.score(correlated(rng, 20_000), labels(20_000))
    np.testing.assert_array_equal(fresh.outliers, fresh.scores > scorer.threshold)
    assert 0.002 <= fresh.outliers.mean() <= 0.03

    shifted = scorer.score(correlated(rng, 200) + 5 * SCALES, labels(200)).outliers
    if method is ISOLATION_FOREST and with_categories:
        # Most of the forest's splits fall on the category indicators, which
        # the shift leaves alone: it still flags far more than 1% of the rows.
        assert shifted.mean() >= 0.3
    else:
        assert shifted.all()


def test_given_threshold_flags_scores_above_it() -> None:
    rng = np.random.default_rng(9)
    reference, current = correlated(rng, 1000), correlated(rng, 500)
    unthresholded = fitted(MAHALANOBIS, reference, none(1000)).score(current, none(500))
    threshold = float(np.sort(unthresholded.scores)[250])
    result = fitted(MAHALANOBIS, reference, none(1000), threshold=threshold).score(
        current, none(500)
    )
    np.testing.assert_array_equal(result.scores, unthresholded.scores)
    np.testing.assert_array_equal(result.outliers, result.scores > threshold)
    assert result.outliers.sum() == 249  # a score equal to the threshold does not exceed it


def with_missing_values(rng: np.random.Generator, rows: Array, share: float) -> Array:
    holes = rows.copy()
    holes[rng.random(holes.shape) < share] = np.nan
    return holes


def conditional_means(reference: Array, rows: Array) -> Array:
    """Each NaN replaced by its conditional mean given the row's observed values,
    from the complete reference rows' mean and covariance, row by row."""
    complete = reference[~np.isnan(reference).any(axis=1)]
    mean, covariance = complete.mean(axis=0), np.cov(complete, rowvar=False, ddof=1)
    filled = rows.copy()
    for row in filled:
        missing = np.isnan(row)
        observed = ~missing
        if missing.any():
            gain = covariance[np.ix_(missing, observed)] @ np.linalg.pinv(
                covariance[np.ix_(observed, observed)]
            )
            row[missing] = mean[missing] + gain @ (row[observed] - mean[observed])
    return filled


def test_mahalanobis_with_missing_values_is_the_observed_features_distance() -> None:
    rng = np.random.default_rng(10)
    complete_reference = correlated(rng, 2000)
    reference = np.vstack([complete_reference, with_missing_values(rng, correlated(rng, 300), 0.3)])
    current = with_missing_values(rng, correlated(rng, 400) * 1.5, 0.25)
    current[0] = np.nan
    scorer = fitted(MAHALANOBIS, reference, none(2300))
    scores = scorer.score(current, none(400)).scores

    complete = reference[~np.isnan(reference).any(axis=1)]
    mean, covariance = complete.mean(axis=0), np.cov(complete, rowvar=False, ddof=1)
    expected = []
    for row in current:
        observed = ~np.isnan(row)
        precision = np.linalg.pinv(covariance[np.ix_(observed, observed)])
        delta = row[observed] - mean[observed]
        expected.append(np.sqrt(delta @ precision @ delta))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
    assert scores[0] == 0  # nothing observed: no evidence of anything
    # Only complete rows fit the mean and covariance.
    on_complete = fitted(MAHALANOBIS, complete, none(len(complete))).score(current, none(400))
    np.testing.assert_allclose(scores, on_complete.scores, rtol=0, atol=TOLERANCE)


def test_a_missing_value_alone_does_not_make_an_outlier() -> None:
    rng = np.random.default_rng(11)
    scorer = fitted(MAHALANOBIS, correlated(rng, 3000), none(3000))
    fresh = correlated(rng, 20_000)
    fresh[:, 1] = np.nan
    assert scorer.score(fresh, none(20_000)).outliers.mean() <= 0.03


def test_isolation_forest_imputes_conditional_means() -> None:
    rng = np.random.default_rng(12)
    reference_numbers = with_missing_values(rng, correlated(rng, 2000), 0.05)
    reference = reference_numbers, categories(rng, 2000)
    current = with_missing_values(rng, correlated(rng, 300), 0.3), categories(rng, 300)
    scores = fitted(ISOLATION_FOREST, *reference, seed=SEED).score(*current).scores
    imputed_reference = conditional_means(reference_numbers, reference_numbers), reference[1]
    imputed_current = conditional_means(reference_numbers, current[0]), current[1]
    expected = sklearn_forest_scores(imputed_reference, imputed_current)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=FOREST_TOLERANCE)


@pytest.mark.parametrize("method", [MAHALANOBIS, ISOLATION_FOREST])
def test_serialisation_round_trip_gives_identical_scores(method: OutlierMethod) -> None:
    rng = np.random.default_rng(13)
    scorer = fitted(method, correlated(rng, 2000), categories(rng, 2000))
    current = with_missing_values(rng, correlated(rng, 500), 0.1), categories(rng, 500)
    current[1][:10, 0] = "unseen"
    restored = OutlierScorer.from_bytes(scorer.to_bytes())
    assert (restored.method, restored.threshold) == (scorer.method, scorer.threshold)
    before, after = scorer.score(*current), restored.score(*current)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.outliers, before.outliers)


def test_stored_scorers_hold_arrays_only_and_other_bytes_are_refused(scorers: Scorers) -> None:
    for scorer in scorers.values():
        with np.load(io.BytesIO(scorer.to_bytes()), allow_pickle=False) as archive:
            assert all(archive[name].dtype != np.object_ for name in archive.files)
    for garbage in (b"something else", b"", pickle.dumps({"method": 1})):
        with pytest.raises(ValueError, match=r"^scorer: "):
            OutlierScorer.from_bytes(garbage)


def test_method_none_fits_no_scorer() -> None:
    rng = np.random.default_rng(15)
    assert fit_scorer(OutlierMethod.NONE, correlated(rng, 100), none(100)) is None


@pytest.mark.parametrize("method", [MAHALANOBIS, ISOLATION_FOREST])
def test_an_empty_batch_gets_no_scores(scorers: Scorers, method: OutlierMethod) -> None:
    result = scorers[method].score(np.empty((0, 3)), np.empty((0, 2), dtype=np.str_))
    assert result.scores.shape == result.outliers.shape == (0,)


@pytest.mark.parametrize(
    ("method", "numerical", "categorical", "options", "field"),
    [
        (MAHALANOBIS, np.ones((10, 2)), none(10), {"threshold": np.nan}, "threshold"),
        (MAHALANOBIS, np.ones((10, 2)), none(10), {"threshold": np.inf}, "threshold"),
        (ISOLATION_FOREST, np.ones((10, 2)), none(10), {"seed": -1}, "seed"),
        (MAHALANOBIS, np.ones(10), none(10), {}, "numerical"),
        (MAHALANOBIS, np.full((10, 2), "1"), none(10), {}, "numerical"),
        (MAHALANOBIS, np.full((10, 2), np.inf), none(10), {}, "numerical"),
        (MAHALANOBIS, np.ones((10, 2)), none(9), {}, "categorical"),
        (MAHALANOBIS, np.ones((10, 2)), np.ones((10, 1)), {}, "categorical"),
        (MAHALANOBIS, np.ones((2, 2)), none(2), {}, "numerical"),
        (MAHALANOBIS, np.full((10, 2), np.nan), none(10), {}, "numerical"),
        (MAHALANOBIS, np.empty((10, 0)), np.full((10, 1), "a"), {}, "numerical"),
        (ISOLATION_FOREST, np.empty((10, 0)), none(10), {}, "numerical, categorical"),
        (ISOLATION_FOREST, np.empty((1, 0)), np.full((1, 1), "a"), {}, "categorical"),
    ],
)
def test_bad_reference_is_refused_naming_the_field(
    method: OutlierMethod,
    numerical: Array,
    categorical: Array,
    options: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        fit_scorer(method, numerical, categorical, **options)


@pytest.mark.parametrize("method", [MAHALANOBIS, ISOLATION_FOREST])
@pytest.mark.parametrize(
    ("numerical", "categorical", "field"),
    [
        (np.zeros((5, 2)), np.full((5, 2), "red"), "numerical"),
        (np.zeros((5, 3, 1)), np.full((5, 2), "red"), "numerical"),
        (np.full((5, 3), -np.inf), np.full((5, 2), "red"), "numerical"),
        (np.zeros((5, 3)), np.full((5, 1), "red"), "categorical"),
        (np.zeros((5, 3)), np.full((4, 2), "red"), "categorical"),
    ],
)
def test_bad_batch_is_refused_naming_the_field(
    scorers: Scorers, method: OutlierMethod, numerical: Array, categorical: Array, field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        scorers[method].score(numerical, categorical)
