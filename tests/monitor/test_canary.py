"""Canary analysis: each check passing and failing on numbers computed here, the
prediction-drift test checked against SciPy, the recommendation and the action
auto-apply would take, and config validation by field path."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats
from scipy.spatial import distance

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.canary import (
    CanaryAction,
    CanarySide,
    ResolvedCanaryConfig,
    analyse_canary,
    check_canary_config,
    recommended_action,
)
from conveyor.services.monitor.drift import DriftTest, DriftTestSpec

CANARY = "models/churn/versions/3"
BASELINE = "models/churn/versions/2"
UNAVAILABLE = 14
AUTOMATIC = DriftTestSpec()
DEFAULTS = ResolvedCanaryConfig()


def side(
    version: str,
    class_counts: Sequence[int],
    *,
    errors: int = 0,
    latencies: npt.NDArray[np.float64] | None = None,
    seed: int = 0,
) -> CanarySide:
    """A side whose successful predictions have ``class_counts`` of each class and
    ``latencies`` (10 ms each by default), and ``errors`` failed predictions of 30 s,
    all shuffled together."""
    classes = np.repeat(np.arange(len(class_counts)), class_counts).astype(np.int64)
    ok_latencies = np.full(classes.size, 0.01) if latencies is None else latencies
    status = np.concatenate((np.zeros(classes.size, np.int32), np.full(errors, UNAVAILABLE)))
    latency = np.concatenate((ok_latencies, np.full(errors, 30.0)))
    order = np.random.default_rng(seed).permutation(status.size)
    rng = np.random.default_rng(seed + 1)
    return CanarySide(
        version, status[order].astype(np.int32), latency[order], rng.permutation(classes)
    )


def checks_by_type(analysis: pb.CanaryAnalysis) -> dict[int, pb.CanaryCheck]:
    return {check.type: check for check in analysis.checks}


# -- error rate -----------------------------------------------------------------------


def test_an_error_rate_up_to_the_allowed_increase_passes() -> None:
    baseline = side(BASELINE, [490, 294, 196], errors=20)  # 20 of 1000: 0.02
    canary = side(CANARY, [291, 175, 116], errors=18)  # 18 of 600: 0.03, the limit exactly

    analysis = analyse_canary(canary, baseline, DEFAULTS, AUTOMATIC)

    check = checks_by_type(analysis)[pb.CANARY_CHECK_TYPE_ERROR_RATE]
    assert check.canary_value == pytest.approx(18 / 600)
    assert check.baseline_value == pytest.approx(20 / 1000)
    assert check.limit == pytest.approx(20 / 1000 + 0.01)
    assert check.passed
    assert "18 of 600" in check.message
    assert "20 of 1000" in check.message
    assert "limit 0.03" in check.message
    assert analysis.recommendation == pb.CANARY_RECOMMENDATION_PROMOTE
    assert (analysis.canary_predictions, analysis.baseline_predictions) == (600, 1000)
    assert (analysis.canary_model_version, analysis.baseline_model_version) == (CANARY, BASELINE)
    assert [check.passed for check in analysis.checks] == [True, True, True]
    assert analysis.summary.startswith(f"Promote the canary {CANARY}: every check passed")


def test_an_error_rate_above_the_allowed_increase_rolls_back() -> None:
    baseline = side(BASELINE, [490, 294, 196], errors=20)
    canary = side(CANARY, [290, 175, 116], errors=19)  # 19 of 600

    analysis = analyse_canary(canary, baseline, DEFAULTS, AUTOMATIC)

    check = checks_by_type(analysis)[pb.CANARY_CHECK_TYPE_ERROR_RATE]
    assert check.canary_value == pytest.approx(19 / 600)
    assert check.limit == pytest.approx(0.03)
    assert not check.passed
    assert "0.03167 (19 of 600)" in check.message
    assert check.message.endswith("failed")
    assert analysis.recommendation == pb.CANARY_RECOMMENDATION_ROLL_BACK
    assert "error rate" in analysis.summary
    assert check.message in analysis.summary


def test_the_allowed_error_rate_increase_is_configurable() -> None:
    baseline = side(BASELINE, [500, 500])
    canary = side(CANARY, [490, 500], errors=10)  # 0.01 against 0
    strict = ResolvedCanaryConfig(max_error_rate_increase=0.0)

    check = checks_by_type(analyse_canary(canary, baseline, strict, AUTOMATIC))[
        pb.CANARY_CHECK_TYPE_ERROR_RATE
    ]
    assert (check.limit, check.passed) == (0.0, False)


# -- latency --------------------------------------------------------------------------


@pytest.mark.parametrize(("factor", "passed"), [(1.0, True), (1.1, True), (1.11, False)])
def test_the_p99_latency_of_successful_predictions_is_held_to_the_baselines(
    factor: float, passed: bool
) -> None:
    rng = np.random.default_rng(7)
    baseline_latencies = rng.lognormal(np.log(0.02), 0.5, size=800)
    baseline = side(BASELINE, [400, 400], errors=5, latencies=baseline_latencies)
    canary = side(CANARY, [400, 400], errors=5, latencies=baseline_latencies * factor)

    analysis = analyse_canary(canary, baseline, DEFAULTS, AUTOMATIC)

    check = checks_by_type(analysis)[pb.CANARY_CHECK_TYPE_LATENCY_P99]
    # The failed predictions' 30 s do not count.
    baseline_p99 = float(np.percentile(baseline_latencies, 99))
    assert check.baseline_value == pytest.approx(baseline_p99, rel=1e-12)
    assert check.canary_value == pytest.approx(baseline_p99 * factor, rel=1e-12)
    assert check.limit == pytest.approx(baseline_p99 * 1.1, rel=1e-12)
    assert check.passed is passed
    assert f"{baseline_p99:.4g} s" in check.message
    assert "(+10%)" in check.message
    expected = pb.CANARY_RECOMMENDATION_PROMOTE if passed else pb.CANARY_RECOMMENDATION_ROLL_BACK
    assert analysis.recommendation == expected


# -- prediction drift -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("canary_counts", "passed"), [([210, 150, 90], True), ([260, 120, 70], False)]
)
def test_prediction_drift_on_a_small_baseline_is_chi_squared_at_0_05(
    canary_counts: list[int], passed: bool
) -> None:
    baseline_counts = [400, 300, 200]  # 900 baseline predictions: at most 1,000
    baseline = side(BASELINE, baseline_counts)
    canary = side(CANARY, canary_counts)
    config = ResolvedCanaryConfig(min_predictions=100)

    analysis = analyse_canary(canary, baseline, config, AUTOMATIC)

    check = checks_by_type(analysis)[pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT]
    expected = np.array(baseline_counts) / sum(baseline_counts) * sum(canary_counts)
    scipy_result = stats.chisquare(canary_counts, expected)
    assert check.canary_value == pytest.approx(float(scipy_result.pvalue), rel=1e-9)
    assert check.baseline_value == 0
    assert check.limit == 0.05
    assert check.passed is passed
    assert "chi-squared p-value" in check.message
    assert f"statistic {float(scipy_result.statistic):.4g}" in check.message
    assert "passes when p >= 0.05" in check.message


@pytest.mark.parametrize(
    ("canary_counts", "passed"), [([300, 200, 100], True), ([150, 200, 250], False)]
)
def test_prediction_drift_on_a_large_baseline_is_jensen_shannon_at_0_1(
    canary_counts: list[int], passed: bool
) -> None:
    baseline_counts = [600, 400, 200]  # 1,200 baseline predictions
    baseline = side(BASELINE, baseline_counts)
    canary = side(CANARY, canary_counts)
    config = ResolvedCanaryConfig(min_predictions=100)

    analysis = analyse_canary(canary, baseline, config, AUTOMATIC)

    check = checks_by_type(analysis)[pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT]
    expected = distance.jensenshannon(
        np.array(baseline_counts) / sum(baseline_counts),
        np.array(canary_counts) / sum(canary_counts),
    )
    assert check.canary_value == pytest.approx(float(expected), abs=1e-9)
    assert check.limit == 0.1
    assert check.passed is passed
    assert "Jensen-Shannon distance" in check.message
    assert "passes when the distance < 0.1" in check.message


def test_the_prediction_test_and_threshold_are_configurable() -> None:
    baseline_counts, canary_counts = [400, 300, 200], [150, 200, 250]
    baseline, canary = side(BASELINE, baseline_counts), side(CANARY, canary_counts)
    config = ResolvedCanaryConfig(min_predictions=100)
    lenient = DriftTestSpec(DriftTest.JENSEN_SHANNON, threshold=0.5)

    analysis = analyse_canary(canary, baseline, config, lenient)

    check = checks_by_type(analysis)[pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT]
    expected = distance.jensenshannon(
        np.array(baseline_counts) / 900, np.array(canary_counts) / 600
    )
    assert check.canary_value == pytest.approx(float(expected), abs=1e-9)
    assert 0.1 < check.canary_value < 0.5
    assert (check.limit, check.passed) == (0.5, True)


def test_a_prediction_test_of_none_leaves_the_drift_check_out() -> None:
    baseline, canary = side(BASELINE, [300, 300]), side(CANARY, [600, 0])
    none = DriftTestSpec(DriftTest.NONE)

    analysis = analyse_canary(canary, baseline, DEFAULTS, none)

    assert pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT not in checks_by_type(analysis)
    assert analysis.recommendation == pb.CANARY_RECOMMENDATION_PROMOTE
    assert "Not measured: prediction drift (the prediction test is NONE)." in analysis.summary


def test_a_prediction_test_that_does_not_suit_categories_is_refused() -> None:
    baseline, canary = side(BASELINE, [300, 300]), side(CANARY, [300, 300])
    with pytest.raises(ValueError, match="KOLMOGOROV_SMIRNOV does not suit"):
        analyse_canary(canary, baseline, DEFAULTS, DriftTestSpec(DriftTest.KOLMOGOROV_SMIRNOV))


# -- recommendation -------------------------------------------------------------------


@pytest.mark.parametrize("short_side", ["canary", "baseline"])
def test_below_min_predictions_the_recommendation_is_continue(short_side: str) -> None:
    full = [250, 250]
    few = [240, 250]  # 490 successes and 9 errors: 499 predictions
    canary = side(
        CANARY, few if short_side == "canary" else full, errors=9 * (short_side == "canary")
    )
    baseline = side(
        BASELINE, few if short_side == "baseline" else full, errors=9 * (short_side == "baseline")
    )

    analysis = analyse_canary(canary, baseline, DEFAULTS, AUTOMATIC)

    assert analysis.recommendation == pb.CANARY_RECOMMENDATION_CONTINUE
    assert len(analysis.checks) == 3  # still reported
    assert "needs 500 predictions on each side" in analysis.summary
    assert "499" in analysis.summary
    assert recommended_action(analysis, DEFAULTS) is None


def test_at_min_predictions_a_failed_check_rolls_back() -> None:
    canary = side(CANARY, [240, 250], errors=10)  # 500 predictions, error rate 0.02
    baseline = side(BASELINE, [250, 250])
    continuing = analyse_canary(
        canary, baseline, ResolvedCanaryConfig(min_predictions=501), AUTOMATIC
    )
    decided = analyse_canary(canary, baseline, DEFAULTS, AUTOMATIC)

    assert continuing.recommendation == pb.CANARY_RECOMMENDATION_CONTINUE
    assert not checks_by_type(continuing)[pb.CANARY_CHECK_TYPE_ERROR_RATE].passed
    assert decided.recommendation == pb.CANARY_RECOMMENDATION_ROLL_BACK


def test_a_canary_that_always_fails_rolls_back_on_its_error_rate_alone() -> None:
    canary = side(CANARY, [], errors=600)
    baseline = side(BASELINE, [300, 300])

    analysis = analyse_canary(canary, baseline, DEFAULTS, AUTOMATIC)

    assert [check.type for check in analysis.checks] == [pb.CANARY_CHECK_TYPE_ERROR_RATE]
    assert analysis.checks[0].canary_value == 1.0
    assert analysis.recommendation == pb.CANARY_RECOMMENDATION_ROLL_BACK
    assert "p99 latency (the canary has no successful prediction)" in analysis.summary
    assert "prediction drift (the canary has no successful prediction)" in analysis.summary


def test_recommended_actions_move_the_configured_aliases() -> None:
    baseline = side(BASELINE, [300, 300])
    good, bad = side(CANARY, [300, 300]), side(CANARY, [300, 280], errors=20)
    config = ResolvedCanaryConfig(canary_alias="candidate", baseline_alias="live", auto_apply=True)

    promote = analyse_canary(good, baseline, config, AUTOMATIC)
    roll_back = analyse_canary(bad, baseline, config, AUTOMATIC)

    assert recommended_action(promote, config) == CanaryAction(
        pb.ACTION_KIND_PROMOTE, "live", CANARY
    )
    assert recommended_action(roll_back, config) == (pb.ACTION_KIND_ROLLBACK, "candidate", BASELINE)
    assert recommended_action(promote, DEFAULTS) == (pb.ACTION_KIND_PROMOTE, "production", CANARY)
    assert recommended_action(pb.CanaryAnalysis(), DEFAULTS) is None


def test_bad_sides_are_refused() -> None:
    one = side(CANARY, [300, 300])
    with pytest.raises(ValueError, match="both models/churn/versions/3"):
        analyse_canary(one, one, DEFAULTS, AUTOMATIC)
    with pytest.raises(ValueError, match="2 predicted classes for 3 successful"):
        CanarySide(CANARY, np.zeros(3, np.int32), np.zeros(3), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="latencies must be finite"):
        CanarySide(CANARY, np.zeros(1, np.int32), np.array([math.nan]), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="3 status codes but 2 latencies"):
        CanarySide(CANARY, np.zeros(3, np.int32), np.zeros(2), np.zeros(3, np.int64))


# -- config ---------------------------------------------------------------------------


def test_an_empty_config_resolves_to_the_contracts_defaults() -> None:
    resolved = ResolvedCanaryConfig.from_proto(pb.CanaryConfig())
    assert resolved == ResolvedCanaryConfig(
        canary_alias="canary",
        baseline_alias="production",
        auto_apply=False,
        min_predictions=500,
        max_error_rate_increase=0.01,
        max_latency_increase=0.1,
    )
    assert check_canary_config(pb.CanaryConfig(), field_prefix="canary") == []


def test_set_values_are_kept_including_zero_increases() -> None:
    config = pb.CanaryConfig(
        canary_alias="candidate",
        baseline_alias="live",
        auto_apply=True,
        min_predictions=50,
        max_error_rate_increase=0.0,
        max_latency_increase=0.0,
    )
    assert check_canary_config(config, field_prefix="canary") == []
    assert ResolvedCanaryConfig.from_proto(config) == ResolvedCanaryConfig(
        "candidate", "live", True, 50, 0.0, 0.0
    )


@pytest.mark.parametrize(
    ("config", "field", "description"),
    [
        (pb.CanaryConfig(canary_alias="Canary"), "canary_alias", "is not an alias"),
        (pb.CanaryConfig(baseline_alias="prod-"), "baseline_alias", "is not an alias"),
        (pb.CanaryConfig(baseline_alias="canary"), "canary_alias", "both 'canary'"),
        (pb.CanaryConfig(min_predictions=-1), "min_predictions", "not -1"),
        (pb.CanaryConfig(max_error_rate_increase=-0.01), "max_error_rate_increase", "at least 0"),
        (pb.CanaryConfig(max_error_rate_increase=math.nan), "max_error_rate_increase", "nan"),
        (pb.CanaryConfig(max_latency_increase=math.inf), "max_latency_increase", "inf"),
    ],
)
def test_config_violations_name_their_field(
    config: pb.CanaryConfig, field: str, description: str
) -> None:
    violations = check_canary_config(config, field_prefix="monitoring_config.canary")

    assert [v.field for v in violations] == [f"monitoring_config.canary.{field}"]
    assert description in violations[0].description
    with pytest.raises(ValueError, match=field):
        ResolvedCanaryConfig.from_proto(config)


def test_every_violation_is_reported_and_an_empty_prefix_gives_bare_fields() -> None:
    config = pb.CanaryConfig(canary_alias="9lives", min_predictions=-5, max_latency_increase=-1.0)
    fields = [v.field for v in check_canary_config(config, field_prefix="")]
    assert fields == ["canary_alias", "min_predictions", "max_latency_increase"]
