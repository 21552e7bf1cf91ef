"""Every technique applied to the trained MLP and CNN, its report checked
against numbers the test recomputes itself: accuracy from the candidate ONNX
file run in a fresh ONNX Runtime session on the test split, parity against
the PyTorch model, latency entries that agree with each other, sizes and
sparsity read off the file. Then the refusals: a PyTorch-only step on an ONNX
source, calibration data of the wrong shape, a reduced-precision source, data
that is not the data the model was trained on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer import gate, measurement, transforms
from conveyor.services.optimizer.source import SourceModel, load_splits
from conveyor.services.optimizer.techniques import (
    Optimization,
    Outcome,
    refusal_of,
    result_version,
)
from conveyor.services.trainer.evaluation import classification_metrics
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError
from tests.support.trained import Trained

QUICK = pb.MeasurementConfig(batch_sizes=[1, 32], warmup_runs=2, timed_runs=20)
# Timing decides latency checks; the tests judge on accuracy and parity only.
TIMING_BLIND = pb.OptimizationGate(latency_tolerance=1000.0)


def optimization(trained: Trained, gate_config: pb.OptimizationGate = TIMING_BLIND) -> Optimization:
    source = trained.source
    return Optimization(
        job_name="optimizationJobs/test",
        source=source,
        splits=load_splits(source.version),
        dataset=source.version.lineage.dataset,
        config=measurement.resolved_measurement(QUICK),
        gate=gate.resolved_gate(gate_config),
    )


def apply(job: Optimization, spec: pb.TechniqueSpec, result_id: str = "r") -> Outcome:
    phases: list[int] = []
    outcome = job.apply(spec, result_id, lambda phase, _message: phases.append(phase))
    assert phases  # progress was reported
    return outcome


def accuracy_of(model: bytes, job: Optimization) -> float:
    """The candidate's test accuracy, recomputed from its bytes alone."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    features = np.asarray(job.splits.test.features, dtype=np.float32)
    probabilities = session.run(None, {session.get_inputs()[0].name: features})[0]
    labels = np.asarray(job.splits.test.labels)
    return float(np.mean(np.asarray(probabilities).argmax(axis=1) == labels))


def check_report(outcome: Outcome, job: Optimization, technique: pb.Technique.ValueType) -> None:
    report = outcome.report
    assert report.technique == technique
    assert report.source_model_version == job.source.version.name
    assert report.name == "optimizationJobs/test/reports/r"
    candidate, baseline = report.candidate, report.baseline
    assert candidate.runtime == pb.RUNTIME_ONNXRUNTIME
    assert candidate.execution_provider == pb.EXECUTION_PROVIDER_CPU
    assert candidate.evaluation_samples == len(job.splits.test.labels)
    assert candidate.metrics["accuracy"] == pytest.approx(accuracy_of(outcome.model, job))
    assert candidate.file_size_bytes == len(outcome.model)
    assert candidate.opset == transforms.model_facts(outcome.model).opset == 18
    for measured in (baseline, candidate):
        assert [m.batch_size for m in measured.latencies] == [1, 32]
        for entry in measured.latencies:
            p50, p99 = entry.p50.ToTimedelta(), entry.p99.ToTimedelta()
            mean = entry.mean.ToNanoseconds() / 1e9
            assert 0 < p50.total_seconds() <= p99.total_seconds()
            assert entry.throughput == pytest.approx(entry.batch_size / mean, rel=1e-4)
            assert entry.runs == 20
    assert report.parity.samples == len(job.splits.test.labels)
    assert 0.0 <= report.parity.prediction_agreement <= 1.0
    assert report.gate.passed == all(check.passed for check in report.gate.checks)
    assert "onnxruntime-gpu" in report.library_versions
    assert report.device
    assert report.HasField("create_time")


def test_onnx_export_matches_pytorch_within_1e_4(mlp: Trained) -> None:
    job = optimization(mlp)
    outcome = apply(job, pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions()))
    check_report(outcome, job, pb.TECHNIQUE_ONNX_EXPORT)
    report = outcome.report
    assert report.spec.onnx_export.opset == 18  # the default, recorded
    assert report.baseline.runtime == pb.RUNTIME_PYTORCH
    # Parity recomputed here, against the PyTorch model itself.
    model = torch.nn.Sequential(mlp.source.pytorch_model(), torch.nn.Softmax(dim=-1)).eval()
    features = np.array(job.splits.test.features, dtype=np.float32)  # writable, for torch
    with torch.inference_mode():
        expected = model(torch.from_numpy(features)).numpy()
    session = ort.InferenceSession(outcome.model, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": features})[0]
    assert np.abs(got - expected).max() <= 1e-4
    assert report.parity.max_abs_error <= 1e-4
    assert report.parity.max_abs_error == pytest.approx(np.abs(got - expected).max(), abs=1e-6)
    assert report.parity.prediction_agreement == 1.0
    [parity_check] = [c for c in report.gate.checks if c.type == pb.GATE_CHECK_TYPE_PARITY]
    assert parity_check.passed
    assert report.candidate.metrics["accuracy"] == pytest.approx(mlp.test_accuracy)
    # A dynamic batch dimension, weights inside the one file.
    proto = onnx.load_from_string(outcome.model)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not any(
        tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer
    )
    assert session.run(None, {"input": features[:7]})[0].shape == (7, 2)
    assert outcome.passed
    assert refusal_of(outcome, "r") is None


@pytest.mark.parametrize(
    ("spec", "technique", "precision"),
    [
        (
            pb.TechniqueSpec(graph_optimization=pb.GraphOptimizationOptions()),
            pb.TECHNIQUE_GRAPH_OPTIMIZATION,
            pb.PRECISION_FP32,
        ),
        (
            pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options()),
            pb.TECHNIQUE_DYNAMIC_INT8,
            pb.PRECISION_INT8,
        ),
        (
            pb.TechniqueSpec(static_int8=pb.StaticInt8Options(per_channel=True)),
            pb.TECHNIQUE_STATIC_INT8,
            pb.PRECISION_INT8,
        ),
        (pb.TechniqueSpec(fp16=pb.Fp16Options()), pb.TECHNIQUE_FP16, pb.PRECISION_FP16),
    ],
    ids=["graph", "dynamic-int8", "static-int8", "fp16"],
)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_onnx_level_techniques_are_measured_against_the_fp32_onnx_form(
    model: str,
    spec: pb.TechniqueSpec,
    technique: pb.Technique.ValueType,
    precision: pb.Precision.ValueType,
    request: pytest.FixtureRequest,
) -> None:
    trained: Trained = request.getfixturevalue(model)
    job = optimization(trained)
    outcome = apply(job, spec)
    check_report(outcome, job, technique)
    report = outcome.report
    assert report.baseline.runtime == pb.RUNTIME_ONNXRUNTIME
    assert report.baseline.precision == pb.PRECISION_FP32
    assert report.candidate.precision == precision
    # The baseline is the fp32 export: as accurate as the PyTorch model.
    assert report.baseline.metrics["accuracy"] == pytest.approx(trained.test_accuracy)
    drop = report.baseline.metrics["accuracy"] - report.candidate.metrics["accuracy"]
    [accuracy_check] = [c for c in report.gate.checks if c.type == pb.GATE_CHECK_TYPE_ACCURACY_DROP]
    assert accuracy_check.passed == (drop <= 0.01 + 1e-12)
    if technique == pb.TECHNIQUE_GRAPH_OPTIMIZATION:
        assert report.parity.max_abs_error <= 1e-4
    if precision == pb.PRECISION_INT8:
        assert report.candidate.file_size_bytes < report.baseline.file_size_bytes
        assert report.candidate.parameter_count >= report.baseline.parameter_count
    if precision == pb.PRECISION_INT8 and model == "cnn":  # weights dominate its file
        assert report.candidate.file_size_bytes < report.baseline.file_size_bytes / 2
    if technique == pb.TECHNIQUE_STATIC_INT8:
        assert report.spec.static_int8.calibration_samples == 512
        # Unsigned activations by signed weights: what x86 CPUs run fast.
        assert report.spec.static_int8.activation_type == pb.QUANTIZATION_WEIGHT_TYPE_UINT8
        assert any(
            node.op_type == "QuantizeLinear"
            for node in onnx.load_from_string(outcome.model).graph.node
        )
    # Reduced precision stays close to the fp32 model.
    assert report.parity.prediction_agreement >= 0.95


@pytest.mark.parametrize("method", [pb.PRUNING_METHOD_UNSTRUCTURED, pb.PRUNING_METHOD_STRUCTURED])
def test_pruning_zeroes_the_asked_share_and_fine_tunes(cnn: Trained, method: int) -> None:
    job = optimization(
        cnn, pb.OptimizationGate(latency_tolerance=1000.0, max_accuracy_drop_points=100)
    )
    options = pb.PruningOptions(method=method, amount=0.5, fine_tune_epochs=1)
    outcome = apply(job, pb.TechniqueSpec(pruning=options))
    check_report(outcome, job, pb.TECHNIQUE_PRUNING)
    report = outcome.report
    assert report.baseline.runtime == pb.RUNTIME_PYTORCH
    assert report.baseline.sparsity < 0.01
    # Half of the prunable weights (all but the classifier layer's) are zero.
    assert 0.3 < report.candidate.sparsity < 0.6
    assert report.spec.pruning.fine_tune_learning_rate == pytest.approx(1e-4)  # lr 1e-3 / 10
    assert report.candidate.metrics["accuracy"] > 0.5


def test_a_result_the_gate_refuses_says_why_with_numbers(cnn: Trained) -> None:
    strict = pb.OptimizationGate(latency_tolerance=1000.0, max_accuracy_drop_points=0.0)
    job = optimization(cnn, strict)
    options = pb.PruningOptions(method=pb.PRUNING_METHOD_STRUCTURED, amount=0.9)
    outcome = apply(job, pb.TechniqueSpec(pruning=options), "pruned-hard")
    assert not outcome.passed
    error = refusal_of(outcome, "pruned-hard")
    assert error is not None
    assert (error.code, error.reason) == (9, "OPTIMIZATION_GATE_REFUSED")
    before = outcome.report.baseline.metrics["accuracy"]
    after = outcome.report.candidate.metrics["accuracy"]
    assert error.message.startswith(f"pruned-hard: accuracy {after:.4f} vs {before:.4f}: drop")


def test_a_passed_result_is_registered_with_its_parent_in_the_lineage(mlp: Trained) -> None:
    job = optimization(mlp)
    outcome = apply(job, pb.TechniqueSpec(static_int8=pb.StaticInt8Options()))
    version = result_version(mlp.source, outcome, job_name="optimizationJobs/test")
    parent = mlp.source.version
    assert version.format == registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC
    assert (version.lineage.parent_version, version.lineage.transformation) == (
        parent.name,
        "int8_static",
    )
    assert version.lineage.optimization_job == "optimizationJobs/test"
    assert version.lineage.dataset_digest == parent.lineage.dataset_digest
    assert version.signature == parent.signature
    assert version.metrics["accuracy"] == outcome.report.candidate.metrics["accuracy"]
    assert version.reference_statistics == parent.reference_statistics


def refused(call: Callable[[], object], error_type: type[Exception], reason: str) -> None:
    with pytest.raises(error_type) as raised:
        call()
    assert getattr(raised.value, "reason", "") == reason, raised.value


def test_bad_sources_and_data_are_refused(mlp: Trained, cnn: Trained) -> None:
    job = optimization(mlp)
    exported = apply(job, pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions())).model
    onnx_version = registry_pb.ModelVersion()
    onnx_version.CopyFrom(mlp.source.version)
    onnx_version.format = registry_pb.MODEL_FORMAT_ONNX_FP32
    onnx_job = optimization(Trained(SourceModel(onnx_version, exported), mlp.test_accuracy))
    # A PyTorch-only step on an ONNX source.
    refused(
        lambda: apply(onnx_job, pb.TechniqueSpec(pruning=pb.PruningOptions(method=1, amount=0.2))),
        FailedPreconditionError,
        "PYTORCH_SOURCE_REQUIRED",
    )
    # ONNX-level steps take an fp32 ONNX source as it is...
    graph = apply(onnx_job, pb.TechniqueSpec(graph_optimization=pb.GraphOptimizationOptions()))
    assert graph.report.baseline.description.startswith("models/mlp/versions/1")
    # ...but not a reduced-precision one.
    int8_version = registry_pb.ModelVersion()
    int8_version.CopyFrom(onnx_version)
    int8_version.format = registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC
    int8_job = optimization(Trained(SourceModel(int8_version, exported), mlp.test_accuracy))
    refused(
        lambda: apply(int8_job, pb.TechniqueSpec(fp16=pb.Fp16Options())),
        FailedPreconditionError,
        "FP32_SOURCE_REQUIRED",
    )
    # Calibration samples that do not fit the model's input.
    refused(
        lambda: transforms.quantize_static_int8(
            exported, pb.StaticInt8Options(), np.zeros((10, 64), dtype=np.float32)
        ),
        InvalidArgumentError,
        "CALIBRATION_SHAPE_MISMATCH",
    )
    # Data that is not the data the model was trained on.
    changed = registry_pb.ModelVersion()
    changed.CopyFrom(cnn.source.version)
    changed.lineage.dataset_digest = "sha256:" + "0" * 64
    refused(lambda: load_splits(changed), FailedPreconditionError, "DATASET_CHANGED")


def test_metrics_are_the_trainers_own(mlp: Trained) -> None:
    job = optimization(mlp)
    outcome = apply(job, pb.TechniqueSpec(fp16=pb.Fp16Options()))
    session = ort.InferenceSession(outcome.model, providers=["CPUExecutionProvider"])
    features = np.asarray(job.splits.test.features, dtype=np.float32)
    probabilities = np.asarray(session.run(None, {"input": features})[0], dtype=np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    expected = classification_metrics(np.asarray(job.splits.test.labels), probabilities)
    for key in ("accuracy", "f1", "roc_auc"):
        assert outcome.report.candidate.metrics[key] == pytest.approx(expected[key], abs=1e-6)
