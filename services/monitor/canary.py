"""Canary analysis: is the version under test as good as the one it would replace?

While a model's canary alias and baseline alias point at different versions
and the inference service splits traffic between them, the monitor compares
the two at each window close and recommends promoting the canary, rolling it
back, or waiting for more predictions. This module makes that comparison, free
of gRPC and storage: the service reads both versions' logged predictions since
the canary alias last moved (shadow predictions left out), hands them over as
two :class:`CanarySide` s, and fills in the analysis's name, interval, compute
time and action. The contract is ``conveyor.monitor.v1`` (``CanaryConfig``,
``CanaryCheck``, ``CanaryCheckType``, ``CanaryAnalysis``,
``CanaryRecommendation``).

Three checks, each with the numbers in its message:

- **Error rate**: non-OK predictions over all predictions; the canary passes
  when its rate is at most the baseline's plus ``max_error_rate_increase``.
- **p99 latency** of successful predictions, in seconds (``np.quantile``,
  linear interpolation); the canary passes when it is at most the baseline's
  times ``1 + max_latency_increase``.
- **Prediction drift**: the canary's predicted classes against the baseline's
  as a categorical feature, with the configured prediction test
  (:func:`.drift.drift_report`, no multiple-testing correction: there is one
  test). The automatic choice is chi-squared at 0.05 for at most
  ``large_reference_rows`` (1,000) baseline predictions and Jensen-Shannon at
  0.1 above. For chi-squared the check's value is the p-value and the canary
  passes when it is at least the threshold; for a distance the value is the
  distance and the canary passes when it is below the threshold.

Where the contract leaves room, this module chooses:

- A check that cannot be measured is left out of ``checks``, and the summary
  says so: the error rate when a side has no prediction, latency and
  prediction drift when a side has no successful one (an all-failing canary
  still fails on its error rate), prediction drift when the test is NONE.
- Limits are compared with a tolerance of 1e-12, so an error rate of exactly
  the baseline's plus the allowed increase passes despite binary rounding.
- The recommendation: CONTINUE while either side has fewer than
  ``min_predictions`` predictions (the checks are still reported); otherwise
  ROLL_BACK when any reported check failed and PROMOTE when all passed.

Cost, for n logged predictions: O(n) for the counts and the quantiles
(``np.quantile`` partitions), O(n log n) for the predicted classes' categories
(``np.unique`` in :func:`.statistics.compare_categories`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.drift import (
    DEFAULT_CONFIG,
    DriftConfig,
    DriftTest,
    DriftTestSpec,
    FeatureSpec,
    FeatureType,
    drift_report,
)
from conveyor.services.monitor.references import PREDICTION_FEATURE
from conveyor.services.monitor.statistics import MultipleTestingCorrection
from conveyor.shared.errors import FieldViolation
from conveyor.shared.names import ID_PATTERN

DEFAULT_CANARY_ALIAS: Final = "canary"
DEFAULT_BASELINE_ALIAS: Final = "production"
DEFAULT_MIN_PREDICTIONS: Final = 500
DEFAULT_MAX_ERROR_RATE_INCREASE: Final = 0.01
DEFAULT_MAX_LATENCY_INCREASE: Final = 0.1
DEFAULT_LARGE_REFERENCE_ROWS: Final = DEFAULT_CONFIG.large_reference_rows
"""``DriftConfig.large_reference_rows``' default: the automatic prediction test
switches from chi-squared to Jensen-Shannon above this many baseline predictions."""
TOLERANCE: Final = 1e-12

_ALIAS: Final = re.compile(rf"^{ID_PATTERN}\Z")
_INCREASES: Final = ("max_error_rate_increase", "max_latency_increase")


@dataclass(frozen=True)
class CanarySide:
    """One version's logged predictions over the analysis's interval, shadow
    predictions excluded."""

    model_version: str
    """The version. Format: ``models/{model}/versions/{version}``."""
    status_codes: npt.NDArray[np.int32]
    """The gRPC status code of every prediction; 0 is OK."""
    latencies_s: npt.NDArray[np.float64]
    """The latency of every prediction in seconds, aligned with ``status_codes``."""
    predicted_classes: npt.NDArray[np.int64]
    """The arg-max class of every successful prediction, in order."""

    def __post_init__(self) -> None:
        arrays = (self.status_codes, self.latencies_s, self.predicted_classes)
        if any(np.ndim(array) != 1 for array in arrays):
            raise ValueError(f"{self.model_version}: the arrays are not all one-dimensional")
        if not np.isfinite(self.latencies_s).all():
            raise ValueError(f"{self.model_version}: latencies must be finite")
        if self.status_codes.shape != self.latencies_s.shape:
            raise ValueError(
                f"{self.model_version}: {self.predictions} status codes but "
                f"{self.latencies_s.size} latencies"
            )
        if self.predicted_classes.size != self.successes:
            raise ValueError(
                f"{self.model_version}: {self.predicted_classes.size} predicted classes for "
                f"{self.successes} successful predictions"
            )

    @property
    def predictions(self) -> int:
        """Predictions logged, successful or not."""
        return int(self.status_codes.size)

    @property
    def successes(self) -> int:
        """Predictions with status OK."""
        return self.predictions - int(np.count_nonzero(self.status_codes))


@dataclass(frozen=True)
class ResolvedCanaryConfig:
    """``CanaryConfig`` with its defaults filled in (see :meth:`from_proto`)."""

    canary_alias: str = DEFAULT_CANARY_ALIAS
    """The alias of the version under test."""
    baseline_alias: str = DEFAULT_BASELINE_ALIAS
    """The alias of the version it is compared with; never the canary alias."""
    auto_apply: bool = False
    """Whether the monitor performs the recommendation (see :func:`recommended_action`)."""
    min_predictions: int = DEFAULT_MIN_PREDICTIONS
    """Predictions each side needs before a verdict, at least 1."""
    max_error_rate_increase: float = DEFAULT_MAX_ERROR_RATE_INCREASE
    """How much higher the canary's error rate may be, an absolute difference, >= 0."""
    max_latency_increase: float = DEFAULT_MAX_LATENCY_INCREASE
    """How much higher the canary's p99 latency may be, a fraction of the baseline's, >= 0."""

    def __post_init__(self) -> None:
        problems = _problems(vars(self))
        if problems:
            raise ValueError("; ".join(f"{name}: {description}" for name, description in problems))

    @classmethod
    def from_proto(cls, config: pb.CanaryConfig) -> ResolvedCanaryConfig:
        """The config with the contract's defaults for empty and unset fields;
        ValueError for what :func:`check_canary_config` refuses."""
        return cls(**_resolve(config))


class CanaryAction(NamedTuple):
    """What ``auto_apply`` does for a recommendation: move ``alias`` of the
    analysed model to ``target_version`` through the registry."""

    kind: pb.ActionKind.ValueType
    """ACTION_KIND_PROMOTE or ACTION_KIND_ROLLBACK."""
    alias: str
    """The alias id to move (``production``), not its resource name."""
    target_version: str
    """Where it moves. Format: ``models/{model}/versions/{version}``."""


def check_canary_config(config: pb.CanaryConfig, *, field_prefix: str) -> list[FieldViolation]:
    """Every problem with ``config``, each naming its field under ``field_prefix``
    (``monitoring_config.canary`` gives ``monitoring_config.canary.min_predictions``;
    an empty prefix gives the bare field names)."""
    prefix = f"{field_prefix}." if field_prefix else ""
    return [
        FieldViolation(prefix + name, description)
        for name, description in _problems(_resolve(config))
    ]


def analyse_canary(
    canary: CanarySide,
    baseline: CanarySide,
    config: ResolvedCanaryConfig,
    prediction_test: DriftTestSpec,
    *,
    large_reference_rows: int = DEFAULT_LARGE_REFERENCE_ROWS,
) -> pb.CanaryAnalysis:
    """Compare the canary with the baseline: the analysis's versions, prediction
    counts, checks, recommendation and summary (the caller fills in ``name``,
    ``interval``, ``compute_time`` and ``action``). ``prediction_test`` is
    ``DriftConfig.prediction_test`` and ``large_reference_rows`` the drift
    config's, both resolved.

    Raises ValueError when both sides are the same version or the prediction
    test does not suit a categorical feature (KS, PSI, Wasserstein)."""
    if canary.model_version == baseline.model_version:
        raise ValueError(f"the canary and the baseline are both {canary.model_version}")
    measured = (
        _error_rate_check(canary, baseline, config),
        _latency_check(canary, baseline, config),
        _prediction_drift_check(canary, baseline, prediction_test, large_reference_rows),
    )
    checks = [check for check in measured if isinstance(check, pb.CanaryCheck)]
    unmeasured = [reason for reason in measured if isinstance(reason, str)]
    failed = [check for check in checks if not check.passed]
    short = min(canary.predictions, baseline.predictions) < config.min_predictions
    if short:
        recommendation = pb.CANARY_RECOMMENDATION_CONTINUE
        summary = (
            f"Continue: a verdict needs {config.min_predictions} predictions on each side; "
            f"the canary {canary.model_version} has {canary.predictions} and the baseline "
            f"{baseline.model_version} {baseline.predictions}."
        )
    elif failed:
        recommendation = pb.CANARY_RECOMMENDATION_ROLL_BACK
        *others, last = [_CHECK_NAMES[check.type] for check in failed]
        names = f"{', '.join(others)} and {last}" if others else last
        summary = (
            f"Roll back the canary {canary.model_version}: it failed the {names} "
            f"{'check' if len(failed) == 1 else 'checks'} against the baseline "
            f"{baseline.model_version}: " + "; ".join(check.message for check in failed) + "."
        )
    else:
        recommendation = pb.CANARY_RECOMMENDATION_PROMOTE
        summary = (
            f"Promote the canary {canary.model_version}: every check passed "
            f"over {canary.predictions} canary and {baseline.predictions} baseline "
            f"predictions of {baseline.model_version}."
        )
    if unmeasured:
        summary += " Not measured: " + "; ".join(unmeasured) + "."
    return pb.CanaryAnalysis(
        canary_model_version=canary.model_version,
        baseline_model_version=baseline.model_version,
        canary_predictions=canary.predictions,
        baseline_predictions=baseline.predictions,
        checks=checks,
        recommendation=recommendation,
        summary=summary,
    )


def recommended_action(
    analysis: pb.CanaryAnalysis, config: ResolvedCanaryConfig
) -> CanaryAction | None:
    """What ``auto_apply`` would do for the analysis's recommendation: PROMOTE
    moves the baseline alias to the canary version, ROLL_BACK moves the canary
    alias back to the baseline version; CONTINUE does nothing (None). It does not
    look at ``config.auto_apply``: whether to act is the caller's decision."""
    if analysis.recommendation == pb.CANARY_RECOMMENDATION_PROMOTE:
        return CanaryAction(
            pb.ACTION_KIND_PROMOTE, config.baseline_alias, analysis.canary_model_version
        )
    if analysis.recommendation == pb.CANARY_RECOMMENDATION_ROLL_BACK:
        return CanaryAction(
            pb.ACTION_KIND_ROLLBACK, config.canary_alias, analysis.baseline_model_version
        )
    return None


# -- checks ---------------------------------------------------------------------------

_CHECK_NAMES: Final = {
    pb.CANARY_CHECK_TYPE_ERROR_RATE: "error rate",
    pb.CANARY_CHECK_TYPE_LATENCY_P99: "p99 latency",
    pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT: "prediction drift",
}

_TEST_NAMES: Final = {
    DriftTest.CHI_SQUARED: "chi-squared",
    DriftTest.JENSEN_SHANNON: "Jensen-Shannon",
}


def _error_rate_check(
    canary: CanarySide, baseline: CanarySide, config: ResolvedCanaryConfig
) -> pb.CanaryCheck | str:
    """The error-rate check, or why it cannot be measured."""
    if lacking := _lacking(canary, baseline, successful=False):
        return f"error rate ({lacking} no prediction)"
    canary_errors = canary.predictions - canary.successes
    baseline_errors = baseline.predictions - baseline.successes
    canary_rate = canary_errors / canary.predictions
    baseline_rate = baseline_errors / baseline.predictions
    limit = baseline_rate + config.max_error_rate_increase
    passed = canary_rate <= limit + TOLERANCE
    message = (
        f"error rate {_num(canary_rate)} ({canary_errors} of {canary.predictions}) against "
        f"the baseline's {_num(baseline_rate)} ({baseline_errors} of {baseline.predictions}); "
        f"limit {_num(limit)} (+{_num(config.max_error_rate_increase)}): "
        + ("passed" if passed else "failed")
    )
    return pb.CanaryCheck(
        type=pb.CANARY_CHECK_TYPE_ERROR_RATE,
        canary_value=canary_rate,
        baseline_value=baseline_rate,
        limit=limit,
        passed=passed,
        message=message,
    )


def _latency_check(
    canary: CanarySide, baseline: CanarySide, config: ResolvedCanaryConfig
) -> pb.CanaryCheck | str:
    """The p99 latency check over successful predictions, or why it cannot be measured."""
    if lacking := _lacking(canary, baseline, successful=True):
        return f"p99 latency ({lacking} no successful prediction)"
    canary_p99 = _p99(canary)
    baseline_p99 = _p99(baseline)
    limit = baseline_p99 * (1 + config.max_latency_increase)
    passed = canary_p99 <= limit + TOLERANCE
    message = (
        f"p99 latency {_num(canary_p99)} s over {canary.successes} successful predictions "
        f"against the baseline's {_num(baseline_p99)} s over {baseline.successes}; limit "
        f"{_num(limit)} s (+{_num(100 * config.max_latency_increase)}%): "
        + ("passed" if passed else "failed")
    )
    return pb.CanaryCheck(
        type=pb.CANARY_CHECK_TYPE_LATENCY_P99,
        canary_value=canary_p99,
        baseline_value=baseline_p99,
        limit=limit,
        passed=passed,
        message=message,
    )


def _prediction_drift_check(
    canary: CanarySide, baseline: CanarySide, spec: DriftTestSpec, large_reference_rows: int
) -> pb.CanaryCheck | str:
    """The canary's predicted classes tested against the baseline's as a
    categorical feature, or why it cannot be measured."""
    if spec.test is DriftTest.NONE:
        return "prediction drift (the prediction test is NONE)"
    if lacking := _lacking(canary, baseline, successful=True):
        return f"prediction drift ({lacking} no successful prediction)"
    config = DriftConfig(
        categorical_test=spec,
        correction=MultipleTestingCorrection.NONE,
        large_reference_rows=large_reference_rows,
        min_rows=1,  # the canary's own min_predictions decides when a verdict counts
    )
    report = drift_report(
        [FeatureSpec(PREDICTION_FEATURE, FeatureType.CATEGORICAL)],
        [baseline.predicted_classes.astype(np.str_)],
        [canary.predicted_classes.astype(np.str_)],
        config,
    )
    (result,) = report.features
    name = _TEST_NAMES.get(result.test, result.test.name.lower())
    passed = not result.drifted
    counts = (
        f"of the canary's {canary.successes} predicted classes against the baseline's "
        f"{baseline.successes}"
    )
    if result.p_value is not None:
        value = result.p_value
        message = (
            f"prediction drift: {name} p-value {_num(value)} (statistic "
            f"{_num(result.statistic)}) {counts}; passes when p >= {_num(result.threshold)}: "
        )
    else:
        value = result.statistic
        message = (
            f"prediction drift: {name} distance {_num(value)} {counts}; passes when the "
            f"distance < {_num(result.threshold)}: "
        )
    return pb.CanaryCheck(
        type=pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT,
        canary_value=value,
        baseline_value=0.0,
        limit=result.threshold,
        passed=passed,
        message=message + ("passed" if passed else "failed"),
    )


def _p99(side: CanarySide) -> float:
    return float(np.quantile(side.latencies_s[side.status_codes == 0], 0.99))


def _resolve(config: pb.CanaryConfig) -> dict[str, Any]:
    """:class:`ResolvedCanaryConfig`'s fields: the defaults for empty and unset ones."""
    return {
        "canary_alias": config.canary_alias or DEFAULT_CANARY_ALIAS,
        "baseline_alias": config.baseline_alias or DEFAULT_BASELINE_ALIAS,
        "auto_apply": config.auto_apply,
        "min_predictions": config.min_predictions or DEFAULT_MIN_PREDICTIONS,
        "max_error_rate_increase": DEFAULT_MAX_ERROR_RATE_INCREASE,
        "max_latency_increase": DEFAULT_MAX_LATENCY_INCREASE,
    } | {field.name: value for field, value in config.ListFields() if field.name in _INCREASES}


def _problems(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field, description)`` for each bad value of a resolved config; the
    defaults are valid, so what is reported is what the caller set."""
    problems = [
        (
            name,
            f"{fields[name]!r} is not an alias: use 1-63 lowercase letters, digits and "
            "hyphens, starting with a letter and not ending with a hyphen",
        )
        for name in ("canary_alias", "baseline_alias")
        if not _ALIAS.match(fields[name])
    ]
    if fields["canary_alias"] == fields["baseline_alias"]:
        alias = fields["canary_alias"]
        problems.append(("canary_alias", f"the canary and baseline aliases are both {alias!r}"))
    if fields["min_predictions"] < 1:
        minimum = fields["min_predictions"]
        problems.append(("min_predictions", f"must be at least 1 (0 means 500), not {minimum}"))
    for name in _INCREASES:
        value = fields[name]
        if not (math.isfinite(value) and value >= 0):
            problems.append((name, f"must be a finite number at least 0, not {value}"))
    return problems


def _lacking(canary: CanarySide, baseline: CanarySide, *, successful: bool) -> str:
    """Which side has no (successful) prediction, in words; empty when both have."""
    empty = [
        role
        for role, side in (("the canary", canary), ("the baseline", baseline))
        if (side.successes if successful else side.predictions) == 0
    ]
    if len(empty) == 2:
        return "both sides have"
    return f"{empty[0]} has" if empty else ""


def _num(value: float) -> str:
    return f"{value:.4g}"
