"""Service level objectives: every bad field named, good predictions counted,
and the SLI, error budget and burn rate against numbers worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from google.protobuf import duration_pb2

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.slo import (
    burn_rate,
    check_slo,
    good_mask,
    resolved_rolling_period,
    slo_status,
)
from conveyor.shared.errors import InvalidArgumentError

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LATENCY = pb.SERVICE_LEVEL_INDICATOR_LATENCY
AVAILABILITY = pb.SERVICE_LEVEL_INDICATOR_AVAILABILITY


def duration(delta: timedelta) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(delta)
    return value


def an_slo(**fields: object) -> pb.ServiceLevelObjective:
    """A valid availability SLO of 99% on models/cnn, with ``fields`` changed."""
    slo = pb.ServiceLevelObjective(model="models/cnn", indicator=AVAILABILITY, goal=0.99)
    for name, value in fields.items():
        if isinstance(value, timedelta):
            getattr(slo, name).CopyFrom(duration(value))
        else:
            setattr(slo, name, value)
    return slo


def violations(
    slo: pb.ServiceLevelObjective, prefix: str = "service_level_objective"
) -> dict[str, str]:
    with pytest.raises(InvalidArgumentError) as caught:
        check_slo(slo, field_prefix=prefix)
    return {v.field: v.description for v in caught.value.violations}


def test_valid_slos_pass() -> None:
    check_slo(an_slo())
    check_slo(an_slo(model_version="models/cnn/versions/3", goal=0.999))
    check_slo(
        an_slo(
            indicator=LATENCY,
            latency_threshold=timedelta(milliseconds=20),
            rolling_period=timedelta(hours=1),
            display_name="x" * 256,
        )
    )
    check_slo(an_slo(rolling_period=timedelta(days=30)))


def test_every_bad_field_is_named_at_once() -> None:
    slo = pb.ServiceLevelObjective(
        model_version="models/other/versions/1", goal=1.0, display_name="x" * 257
    )
    slo.rolling_period.FromTimedelta(timedelta(days=31))

    found = violations(slo, prefix="slo")

    assert set(found) == {
        "slo.model",
        "slo.indicator",
        "slo.goal",
        "slo.rolling_period",
        "slo.display_name",
    }


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": ""}, "model"),
        ({"model": "cnn"}, "model"),
        ({"model": "models/CNN"}, "model"),
        ({"model_version": "models/other/versions/1"}, "model_version"),
        ({"model_version": "models/cnn@production"}, "model_version"),
        ({"model_version": "models/cnn/versions/0"}, "model_version"),
        ({"indicator": pb.SERVICE_LEVEL_INDICATOR_UNSPECIFIED}, "indicator"),
        ({"indicator": 99}, "indicator"),
        ({"indicator": LATENCY}, "latency_threshold"),
        ({"indicator": LATENCY, "latency_threshold": timedelta(0)}, "latency_threshold"),
        ({"goal": 0.0}, "goal"),
        ({"goal": 1.0}, "goal"),
        ({"goal": -0.5}, "goal"),
        ({"goal": float("nan")}, "goal"),
        ({"rolling_period": timedelta(minutes=59)}, "rolling_period"),
        ({"rolling_period": timedelta(days=30, seconds=1)}, "rolling_period"),
        ({"display_name": "x" * 257}, "display_name"),
    ],
)
def test_each_violation_names_its_field(fields: dict[str, object], field: str) -> None:
    assert set(violations(an_slo(**fields))) == {f"service_level_objective.{field}"}


def test_latency_threshold_is_ignored_for_availability() -> None:
    check_slo(an_slo(latency_threshold=timedelta(0)))


def test_rolling_period_defaults_to_28_days() -> None:
    assert resolved_rolling_period(an_slo()) == timedelta(days=28)
    assert resolved_rolling_period(an_slo(rolling_period=timedelta(days=7))) == timedelta(days=7)


def test_availability_counts_successes() -> None:
    codes = np.array([0, 0, 14, 0, 2])
    latencies = np.array([0.01, 5.0, 0.01, 0.02, 0.0])

    assert good_mask(an_slo(), codes, latencies).tolist() == [True, True, False, True, False]


def test_latency_counts_successes_within_the_threshold_inclusive() -> None:
    slo = an_slo(indicator=LATENCY, latency_threshold=timedelta(milliseconds=20))
    codes = np.array([0, 0, 14, 0, 0])
    latencies = np.array([0.01, 0.02, 0.01, 0.0201, 1.0])

    assert good_mask(slo, codes, latencies).tolist() == [True, True, False, False, False]


def test_good_mask_refuses_mismatched_columns() -> None:
    with pytest.raises(ValueError, match="latencies"):
        good_mask(an_slo(), np.zeros(3, dtype=int), np.zeros(2))


def test_budget_exactly_spent_at_the_goal() -> None:
    status = slo_status(an_slo(), good=990, total=1000, evaluate_time=NOW)

    assert status.sli == pytest.approx(0.99)
    assert status.error_budget_remaining == pytest.approx(0.0, abs=1e-12)
    assert status.met
    assert (status.good_count, status.total_count) == (990, 1000)
    assert status.evaluate_time.ToDatetime(tzinfo=UTC) == NOW
    assert burn_rate(an_slo(), good=990, total=1000) == pytest.approx(1.0)


def test_budget_partly_spent() -> None:
    # goal 0.99 allows 1% bad; 2 bad in 1000 is 0.2%, a fifth of the budget.
    status = slo_status(an_slo(), good=998, total=1000, evaluate_time=NOW)

    assert status.sli == pytest.approx(0.998)
    assert status.error_budget_remaining == pytest.approx(0.8)
    assert status.met
    assert burn_rate(an_slo(), good=998, total=1000) == pytest.approx(0.2)


def test_budget_overspent_goes_negative() -> None:
    # goal 0.999 allows 0.1% bad; 3% bad burns 30 times as fast, 29 budgets over.
    slo = an_slo(goal=0.999)
    status = slo_status(slo, good=970, total=1000, evaluate_time=NOW)

    assert status.sli == pytest.approx(0.97)
    assert status.error_budget_remaining == pytest.approx(-29.0)
    assert not status.met
    assert burn_rate(slo, good=970, total=1000) == pytest.approx(30.0)


def test_no_predictions_meet_the_slo_and_have_no_burn_rate() -> None:
    status = slo_status(an_slo(), good=0, total=0, evaluate_time=NOW)

    assert status.sli == 1.0
    assert status.error_budget_remaining == 1.0
    assert status.met
    assert burn_rate(an_slo(), good=0, total=0) is None


def test_impossible_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="good"):
        slo_status(an_slo(), good=11, total=10, evaluate_time=NOW)
