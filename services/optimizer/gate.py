"""The acceptance gate: may an optimised model be registered as deployable?

Every check compares the candidate with its baseline measured the same way:

- **accuracy drop**: the gated metric (``accuracy`` unless the job names
  another) may fall by at most ``max_accuracy_drop_points`` percentage points
  (1.0 by default). For a metric where smaller is better (``log_loss``) the
  same allowance applies upwards.
- **latency**, one check per measured batch size: the candidate's p50 may
  exceed the baseline's by at most ``latency_tolerance`` (5 % by default,
  which absorbs measurement noise; otherwise "no regression").
- **parity**, fp32 techniques only (ONNX export, graph optimisation): the
  largest absolute output difference may be at most ``parity_tolerance``
  (1e-4). Reduced precision is judged on accuracy instead.

A refusal becomes FAILED_PRECONDITION with reason
``OPTIMIZATION_GATE_REFUSED`` and a message naming the numbers.
"""

from __future__ import annotations

import math
from typing import Final

import grpc
from google.protobuf.duration_pb2 import Duration

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.shared.errors import FieldViolation

DEFAULT_MAX_ACCURACY_DROP_POINTS: Final = 1.0
DEFAULT_LATENCY_TOLERANCE: Final = 0.05
DEFAULT_PARITY_TOLERANCE: Final = 1e-4
DEFAULT_METRIC: Final = "accuracy"
LOWER_IS_BETTER: Final = frozenset({"log_loss", "loss"})
FP32_TECHNIQUES: Final = frozenset({pb.TECHNIQUE_ONNX_EXPORT, pb.TECHNIQUE_GRAPH_OPTIMIZATION})
GATED_METRICS: Final = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")


def resolved_gate(gate: pb.OptimizationGate) -> pb.OptimizationGate:
    """``gate`` with every default filled in."""
    resolved = pb.OptimizationGate()
    resolved.CopyFrom(gate)
    if not resolved.HasField("max_accuracy_drop_points"):
        resolved.max_accuracy_drop_points = DEFAULT_MAX_ACCURACY_DROP_POINTS
    resolved.accuracy_metric = resolved.accuracy_metric or DEFAULT_METRIC
    if not resolved.HasField("latency_tolerance"):
        resolved.latency_tolerance = DEFAULT_LATENCY_TOLERANCE
    if not resolved.HasField("parity_tolerance"):
        resolved.parity_tolerance = DEFAULT_PARITY_TOLERANCE
    return resolved


def gate_violations(gate: pb.OptimizationGate, field: str) -> list[FieldViolation]:
    """What is wrong with a requested gate."""
    violations = []
    drop = gate.max_accuracy_drop_points
    if gate.HasField("max_accuracy_drop_points") and not (math.isfinite(drop) and drop >= 0):
        violations.append(
            FieldViolation(f"{field}.max_accuracy_drop_points", "a finite number, at least 0")
        )
    if gate.accuracy_metric and gate.accuracy_metric not in GATED_METRICS:
        violations.append(
            FieldViolation(f"{field}.accuracy_metric", f"one of {', '.join(GATED_METRICS)}")
        )
    tolerance = gate.latency_tolerance
    if gate.HasField("latency_tolerance") and not (math.isfinite(tolerance) and tolerance >= 0):
        violations.append(
            FieldViolation(f"{field}.latency_tolerance", "a finite fraction, at least 0")
        )
    parity = gate.parity_tolerance
    if gate.HasField("parity_tolerance") and not (math.isfinite(parity) and parity > 0):
        violations.append(FieldViolation(f"{field}.parity_tolerance", "greater than 0"))
    return violations


def evaluate_gate(
    technique: pb.Technique.ValueType,
    gate: pb.OptimizationGate,
    baseline: pb.ModelMeasurement,
    candidate: pb.ModelMeasurement,
    parity: pb.ParityCheck,
) -> pb.GateOutcome:
    """Every check of the (resolved) ``gate`` on ``candidate`` against ``baseline``."""
    checks = [_metric_check(gate, baseline, candidate)]
    baseline_latency = {
        m.batch_size: m.p50.ToTimedelta().total_seconds() for m in baseline.latencies
    }
    for measured in candidate.latencies:
        reference = baseline_latency.get(measured.batch_size)
        if reference is not None:
            checks.append(_latency_check(gate, measured.batch_size, reference, measured))
    if technique in FP32_TECHNIQUES:
        passed = parity.max_abs_error <= gate.parity_tolerance
        checks.append(
            pb.GateCheck(
                type=pb.GATE_CHECK_TYPE_PARITY,
                candidate_value=parity.max_abs_error,
                limit=gate.parity_tolerance,
                passed=passed,
                message=(
                    f"max abs output difference {parity.max_abs_error:.3g} "
                    f"{'<=' if passed else '>'} {gate.parity_tolerance:.3g}"
                ),
            )
        )
    return pb.GateOutcome(passed=all(check.passed for check in checks), checks=checks)


def refusal(outcome: pb.GateOutcome, result_id: str) -> pb.OptimizationError:
    """The error of a refused result, naming every failed check's numbers."""
    failed = [check.message for check in outcome.checks if not check.passed]
    return pb.OptimizationError(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
        reason="OPTIMIZATION_GATE_REFUSED",
        message=f"{result_id}: " + "; ".join(failed),
        metadata={"technique": result_id, "failed_checks": str(len(failed))},
    )


def _metric_check(
    gate: pb.OptimizationGate, baseline: pb.ModelMeasurement, candidate: pb.ModelMeasurement
) -> pb.GateCheck:
    metric = gate.accuracy_metric
    before = baseline.metrics.get(metric)
    after = candidate.metrics.get(metric)
    allowed = gate.max_accuracy_drop_points / 100.0
    if before is None or after is None:
        return pb.GateCheck(
            type=pb.GATE_CHECK_TYPE_ACCURACY_DROP,
            passed=False,
            message=f"{metric} could not be computed for both models",
        )
    if metric in LOWER_IS_BETTER:
        limit = before + allowed
        passed = after <= limit
        change = after - before
        words = f"rise {change * 100:.2f} points"
    else:
        limit = before - allowed
        passed = after >= limit
        change = before - after
        words = f"drop {change * 100:.2f} points"
    return pb.GateCheck(
        type=pb.GATE_CHECK_TYPE_ACCURACY_DROP,
        baseline_value=before,
        candidate_value=after,
        limit=limit,
        passed=passed,
        message=(
            f"{metric} {after:.4f} vs {before:.4f}: {words} "
            f"{'<=' if passed else '>'} {gate.max_accuracy_drop_points:.2f}"
        ),
    )


def _latency_check(
    gate: pb.OptimizationGate,
    batch_size: int,
    baseline_p50: float,
    measured: pb.LatencyMeasurement,
) -> pb.GateCheck:
    candidate_p50 = _seconds(measured.p50)
    limit = baseline_p50 * (1.0 + gate.latency_tolerance)
    passed = candidate_p50 <= limit
    change = (candidate_p50 / baseline_p50 - 1.0) * 100 if baseline_p50 > 0 else 0.0
    return pb.GateCheck(
        type=pb.GATE_CHECK_TYPE_LATENCY_REGRESSION,
        batch_size=batch_size,
        baseline_value=baseline_p50,
        candidate_value=candidate_p50,
        limit=limit,
        passed=passed,
        message=(
            f"p50 at batch {batch_size} is {candidate_p50 * 1e3:.3f} ms vs "
            f"{baseline_p50 * 1e3:.3f} ms ({change:+.0f}%, allowed "
            f"+{gate.latency_tolerance * 100:.0f}%)"
        ),
    )


def _seconds(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e9
