"""The gate's checks on measurements made up here (so the verdicts do not hang
on this machine's timing), the resolved defaults, and the runtime: only
``onnxruntime-gpu`` installed, the provider chosen from whether a GPU is
really present, sessions pinned to it."""

from __future__ import annotations

import importlib.metadata

import pytest

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import gate, measurement, runtime
from conveyor.shared.errors import FailedPreconditionError


def measured(accuracy: float, *p50_ms: float, log_loss: float = 0.1) -> pb.ModelMeasurement:
    result = pb.ModelMeasurement()
    result.metrics.update({"accuracy": accuracy, "log_loss": log_loss})
    for batch_size, milliseconds in zip((1, 32), p50_ms, strict=False):
        entry = result.latencies.add(batch_size=batch_size)
        entry.p50.FromNanoseconds(round(milliseconds * 1e6))
    return result


PARITY = pb.ParityCheck(max_abs_error=2e-5)


def test_defaults_are_filled_in() -> None:
    resolved = gate.resolved_gate(pb.OptimizationGate())
    assert resolved.max_accuracy_drop_points == 1.0
    assert (resolved.accuracy_metric, resolved.latency_tolerance) == ("accuracy", 0.05)
    assert resolved.parity_tolerance == 1e-4
    explicit = gate.resolved_gate(pb.OptimizationGate(max_accuracy_drop_points=0.0))
    assert explicit.max_accuracy_drop_points == 0.0  # an explicit 0 is kept
    config = measurement.resolved_measurement(pb.MeasurementConfig())
    assert (list(config.batch_sizes), config.warmup_runs, config.timed_runs) == ([1, 32], 10, 200)
    assert config.execution_provider == runtime.resolve_provider()


def test_a_result_within_every_bound_passes() -> None:
    outcome = gate.evaluate_gate(
        pb.TECHNIQUE_STATIC_INT8,
        gate.resolved_gate(pb.OptimizationGate()),
        measured(0.9649, 1.0, 12.4),
        measured(0.9561, 0.6, 9.8),
        PARITY,
    )
    assert outcome.passed
    kinds = [(check.type, check.batch_size) for check in outcome.checks]
    assert kinds == [
        (pb.GATE_CHECK_TYPE_ACCURACY_DROP, 0),
        (pb.GATE_CHECK_TYPE_LATENCY_REGRESSION, 1),
        (pb.GATE_CHECK_TYPE_LATENCY_REGRESSION, 32),
    ]  # no parity check for reduced precision
    assert outcome.checks[0].message == "accuracy 0.9561 vs 0.9649: drop 0.88 points <= 1.00"
    assert outcome.checks[0].limit == pytest.approx(0.9549)


def test_a_slower_or_less_accurate_result_is_refused_naming_the_numbers() -> None:
    resolved = gate.resolved_gate(pb.OptimizationGate())
    outcome = gate.evaluate_gate(
        pb.TECHNIQUE_DYNAMIC_INT8,
        resolved,
        measured(0.9649, 1.0, 12.4),
        measured(0.9386, 1.04, 41.2),
        PARITY,
    )
    assert not outcome.passed
    assert [check.passed for check in outcome.checks] == [False, True, False]
    error = gate.refusal(outcome, "dynamic-int8")
    assert (error.code, error.reason) == (9, "OPTIMIZATION_GATE_REFUSED")
    assert error.message == (
        "dynamic-int8: accuracy 0.9386 vs 0.9649: drop 2.63 points > 1.00; "
        "p50 at batch 32 is 41.200 ms vs 12.400 ms (+232%, allowed +5%)"
    )
    assert error.metadata["failed_checks"] == "2"


def test_fp32_techniques_are_held_to_parity() -> None:
    resolved = gate.resolved_gate(pb.OptimizationGate())
    drifted = pb.ParityCheck(max_abs_error=3e-3)
    outcome = gate.evaluate_gate(
        pb.TECHNIQUE_GRAPH_OPTIMIZATION, resolved, measured(0.9, 1.0), measured(0.9, 1.0), drifted
    )
    assert not outcome.passed
    assert outcome.checks[-1].type == pb.GATE_CHECK_TYPE_PARITY
    assert outcome.checks[-1].message == "max abs output difference 0.003 > 0.0001"


def test_a_metric_where_lower_is_better_may_rise_by_the_allowance() -> None:
    resolved = gate.resolved_gate(pb.OptimizationGate(accuracy_metric="log_loss"))
    worse = gate.evaluate_gate(
        pb.TECHNIQUE_FP16,
        resolved,
        measured(0.9, log_loss=0.10),
        measured(0.9, log_loss=0.12),
        PARITY,
    )
    assert not worse.passed
    assert "rise 2.00 points > 1.00" in worse.checks[0].message
    better = gate.evaluate_gate(
        pb.TECHNIQUE_FP16,
        resolved,
        measured(0.9, log_loss=0.10),
        measured(0.9, log_loss=0.05),
        PARITY,
    )
    assert better.passed


def test_bad_gates_are_named() -> None:
    bad = pb.OptimizationGate(
        max_accuracy_drop_points=-1,
        accuracy_metric="speed",
        latency_tolerance=float("nan"),
        parity_tolerance=0.0,
    )
    assert [v.field for v in gate.gate_violations(bad, "gate")] == [
        "gate.max_accuracy_drop_points",
        "gate.accuracy_metric",
        "gate.latency_tolerance",
        "gate.parity_tolerance",
    ]
    assert gate.gate_violations(pb.OptimizationGate(), "gate") == []


def test_only_the_gpu_build_of_onnx_runtime_is_installed() -> None:
    assert importlib.metadata.version("onnxruntime-gpu")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("onnxruntime")


def test_the_provider_follows_whether_a_gpu_is_really_present() -> None:
    if runtime.gpu_present():
        assert runtime.resolve_provider() == pb.EXECUTION_PROVIDER_CUDA
        return
    assert runtime.resolve_provider() == pb.EXECUTION_PROVIDER_CPU
    with pytest.raises(FailedPreconditionError) as refused:
        runtime.resolve_provider(pb.EXECUTION_PROVIDER_CUDA)
    assert refused.value.reason == "NO_GPU"
    assert "cores" in runtime.device_description(pb.EXECUTION_PROVIDER_CPU)


def test_sessions_run_on_exactly_the_provider_asked() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = runtime.session(model.SerializeToString(), pb.EXECUTION_PROVIDER_CPU, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
