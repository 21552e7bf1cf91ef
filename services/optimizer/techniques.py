"""Applying one technique to a source model and judging the result.

:class:`Optimization` holds what every technique of a job shares: the source,
its data splits, the measurement settings and the gate, plus the baselines,
measured once and reused. :meth:`Optimization.apply` builds one candidate,
measures it beside its baseline, checks parity, runs the gate and returns a
complete :class:`~conveyor.optimizer.v1.resources_pb2.OptimizationReport` with
the candidate's bytes. Registering is the caller's business.

Baselines (see ``OptimizationReport.baseline``): ONNX export and pruning are
compared with the source as registered (PyTorch); the ONNX-level techniques
with the fp32 ONNX form of the source, so that the comparison isolates the
technique rather than the change of runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer import measurement, runtime, transforms
from conveyor.services.optimizer.gate import evaluate_gate, refusal
from conveyor.services.optimizer.measurement import Predictor, Probabilities
from conveyor.services.optimizer.pruning import prune_model
from conveyor.services.optimizer.source import SourceModel
from conveyor.services.trainer.architectures import ProbabilityOutput
from conveyor.services.trainer.splits import DatasetSplits
from conveyor.shared.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SAMPLES: Final = 512
CALIBRATION_SEED: Final = 0
DEFAULT_FINE_TUNE_LEARNING_RATE: Final = 1e-4

TECHNIQUE_OF: Final = {
    "onnx_export": pb.TECHNIQUE_ONNX_EXPORT,
    "graph_optimization": pb.TECHNIQUE_GRAPH_OPTIMIZATION,
    "dynamic_int8": pb.TECHNIQUE_DYNAMIC_INT8,
    "static_int8": pb.TECHNIQUE_STATIC_INT8,
    "fp16": pb.TECHNIQUE_FP16,
    "pruning": pb.TECHNIQUE_PRUNING,
}
"""The technique each ``TechniqueSpec.options`` field selects."""
RESULT_FORMAT: Final = {
    pb.TECHNIQUE_ONNX_EXPORT: registry_pb.MODEL_FORMAT_ONNX_FP32,
    pb.TECHNIQUE_GRAPH_OPTIMIZATION: registry_pb.MODEL_FORMAT_ONNX_FP32,
    pb.TECHNIQUE_PRUNING: registry_pb.MODEL_FORMAT_ONNX_FP32,
    pb.TECHNIQUE_DYNAMIC_INT8: registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC,
    pb.TECHNIQUE_STATIC_INT8: registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC,
    pb.TECHNIQUE_FP16: registry_pb.MODEL_FORMAT_ONNX_FP16,
}
PRECISION: Final = {
    registry_pb.MODEL_FORMAT_ONNX_FP32: pb.PRECISION_FP32,
    registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC: pb.PRECISION_INT8,
    registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC: pb.PRECISION_INT8,
    registry_pb.MODEL_FORMAT_ONNX_FP16: pb.PRECISION_FP16,
}
TECHNIQUE_NAMES: Final = {
    pb.TECHNIQUE_ONNX_EXPORT: "ONNX export",
    pb.TECHNIQUE_GRAPH_OPTIMIZATION: "graph optimisation",
    pb.TECHNIQUE_DYNAMIC_INT8: "dynamic int8 quantisation",
    pb.TECHNIQUE_STATIC_INT8: "static int8 quantisation",
    pb.TECHNIQUE_FP16: "fp16 conversion",
    pb.TECHNIQUE_PRUNING: "pruning and ONNX export",
}
"""What each technique did, in words (descriptions of results)."""
TRANSFORMATION: Final = {
    pb.TECHNIQUE_ONNX_EXPORT: "onnx_export",
    pb.TECHNIQUE_GRAPH_OPTIMIZATION: "graph_optimization",
    pb.TECHNIQUE_DYNAMIC_INT8: "int8_dynamic",
    pb.TECHNIQUE_STATIC_INT8: "int8_static",
    pb.TECHNIQUE_FP16: "fp16",
    pb.TECHNIQUE_PRUNING: "pruning",
}
"""``Lineage.transformation`` of each technique's result."""

PhaseCallback = Callable[[pb.OptimizationPhase.ValueType, str], None]


def technique_of(spec: pb.TechniqueSpec) -> pb.Technique.ValueType:
    """The technique ``spec`` selects (UNSPECIFIED when none)."""
    chosen = spec.WhichOneof("options")
    return TECHNIQUE_OF[chosen] if chosen else pb.TECHNIQUE_UNSPECIFIED


def resolved_spec(
    spec: pb.TechniqueSpec,
    source: SourceModel,
    provider: pb.ExecutionProvider.ValueType = pb.EXECUTION_PROVIDER_CPU,
) -> pb.TechniqueSpec:
    """``spec`` with every default filled in, as its report records it."""
    resolved = pb.TechniqueSpec()
    resolved.CopyFrom(spec)
    kind = resolved.WhichOneof("options")
    if kind == "onnx_export":
        resolved.onnx_export.opset = resolved.onnx_export.opset or transforms.DEFAULT_OPSET
    elif kind == "graph_optimization" and not resolved.graph_optimization.level:
        resolved.graph_optimization.level = pb.GRAPH_OPTIMIZATION_LEVEL_EXTENDED
    elif kind == "dynamic_int8" and not resolved.dynamic_int8.weight_type:
        resolved.dynamic_int8.weight_type = pb.QUANTIZATION_WEIGHT_TYPE_INT8
    elif kind == "static_int8":
        options = resolved.static_int8
        options.calibration_samples = options.calibration_samples or DEFAULT_CALIBRATION_SAMPLES
        options.calibration_method = options.calibration_method or pb.CALIBRATION_METHOD_MINMAX
        if not options.activation_type:
            on_cpu = provider == pb.EXECUTION_PROVIDER_CPU
            options.activation_type = (
                pb.QUANTIZATION_WEIGHT_TYPE_UINT8 if on_cpu else pb.QUANTIZATION_WEIGHT_TYPE_INT8
            )
    elif kind == "pruning" and not resolved.pruning.fine_tune_learning_rate:
        recorded = source.version.hyperparameters.fields.get("learning_rate")
        rate = recorded.number_value / 10 if recorded is not None else 0.0
        resolved.pruning.fine_tune_learning_rate = rate or DEFAULT_FINE_TUNE_LEARNING_RATE
    return resolved


@dataclass
class Outcome:
    """One technique's result: its report, and the candidate when it was built."""

    report: pb.OptimizationReport
    model: bytes
    model_format: registry_pb.ModelFormat.ValueType

    @property
    def passed(self) -> bool:
        return self.report.gate.passed


@dataclass
class _Measured:
    measurement: pb.ModelMeasurement
    outputs: Probabilities


@dataclass
class Optimization:
    """One job's techniques over one source."""

    job_name: str
    source: SourceModel
    splits: DatasetSplits
    dataset: str
    config: pb.MeasurementConfig
    """Resolved (:func:`measurement.resolved_measurement`)."""
    gate: pb.OptimizationGate
    """Resolved (:func:`gate.resolved_gate`)."""
    export_opset: int = transforms.DEFAULT_OPSET
    should_stop: Callable[[], bool] = lambda: False
    _pytorch_baseline: _Measured | None = field(default=None, init=False)
    _onnx_fp32: bytes | None = field(default=None, init=False)
    _onnx_baseline: _Measured | None = field(default=None, init=False)

    @property
    def provider(self) -> pb.ExecutionProvider.ValueType:
        return self.config.execution_provider

    @property
    def test_features(self) -> npt.NDArray[np.float32]:
        return np.asarray(self.splits.test.features, dtype=np.float32)

    def apply(self, spec: pb.TechniqueSpec, result_id: str, on_phase: PhaseCallback) -> Outcome:
        """Build, measure and judge one technique's candidate."""
        technique = technique_of(spec)
        spec = resolved_spec(spec, self.source, self.provider)
        if technique in (pb.TECHNIQUE_ONNX_EXPORT, pb.TECHNIQUE_PRUNING):
            baseline = self._measure_pytorch_baseline(on_phase)
        else:
            baseline = self._measure_onnx_baseline(on_phase)
        candidate = self._build(technique, spec, on_phase)
        model_format = RESULT_FORMAT[technique]
        on_phase(pb.OPTIMIZATION_PHASE_EVALUATING, f"{result_id}: evaluating on the test split")
        predictor = measurement.onnx_predictor(
            candidate,
            provider=self.provider,
            threads=self.config.intra_op_threads,
            precision=PRECISION[model_format],
            description=f"{TECHNIQUE_NAMES[technique]} of {self.source.version.name}",
        )
        on_phase(pb.OPTIMIZATION_PHASE_BENCHMARKING, f"{result_id}: measuring latency")
        measured, outputs = measurement.measure(
            predictor,
            self.test_features,
            np.asarray(self.splits.test.labels),
            self.config,
            should_stop=self.should_stop,
        )
        on_phase(pb.OPTIMIZATION_PHASE_CHECKING_PARITY, f"{result_id}: comparing outputs")
        parity = measurement.parity(baseline.outputs, outputs)
        outcome = evaluate_gate(technique, self.gate, baseline.measurement, measured, parity)
        report = pb.OptimizationReport(
            name=f"{self.job_name}/reports/{result_id}",
            technique=technique,
            spec=spec,
            source_model_version=self.source.version.name,
            baseline=baseline.measurement,
            candidate=measured,
            parity=parity,
            gate=outcome,
            dataset=self.dataset,
            device=runtime.device_description(self.provider),
            library_versions=runtime.library_versions(),
            measurement=self.config,
            create_time=_now(),
        )
        return Outcome(report=report, model=candidate, model_format=model_format)

    # -- candidates ------------------------------------------------------------

    def _build(
        self,
        technique: pb.Technique.ValueType,
        spec: pb.TechniqueSpec,
        on_phase: PhaseCallback,
    ) -> bytes:
        shape = self.source.input_shape
        if technique == pb.TECHNIQUE_ONNX_EXPORT:
            on_phase(
                pb.OPTIMIZATION_PHASE_EXPORTING, f"exporting at opset {spec.onnx_export.opset}"
            )
            model = ProbabilityOutput(self.source.pytorch_model())
            return transforms.export_onnx(model, shape, opset=spec.onnx_export.opset)
        if technique == pb.TECHNIQUE_PRUNING:
            return self._pruned(spec.pruning, on_phase)
        fp32 = self._fp32_onnx(on_phase)
        if technique == pb.TECHNIQUE_GRAPH_OPTIMIZATION:
            on_phase(pb.OPTIMIZATION_PHASE_OPTIMIZING_GRAPH, "running the offline graph optimiser")
            return transforms.optimize_graph(fp32, spec.graph_optimization.level)
        if technique == pb.TECHNIQUE_DYNAMIC_INT8:
            on_phase(pb.OPTIMIZATION_PHASE_QUANTIZING, "quantising weights to int8")
            return transforms.quantize_dynamic_int8(fp32, spec.dynamic_int8)
        if technique == pb.TECHNIQUE_STATIC_INT8:
            samples = self._calibration_samples(spec.static_int8.calibration_samples)
            on_phase(
                pb.OPTIMIZATION_PHASE_CALIBRATING,
                f"calibrating on {len(samples)} training samples",
            )
            return transforms.quantize_static_int8(fp32, spec.static_int8, samples)
        on_phase(pb.OPTIMIZATION_PHASE_QUANTIZING, "converting to float16")
        return transforms.convert_fp16(fp32, spec.fp16)

    def _pruned(self, options: pb.PruningOptions, on_phase: PhaseCallback) -> bytes:
        on_phase(pb.OPTIMIZATION_PHASE_PRUNING, f"pruning {options.amount:.0%} of the weights")
        model = self.source.pytorch_model()
        train = self.splits.train
        if options.fine_tune_epochs:
            on_phase(
                pb.OPTIMIZATION_PHASE_FINE_TUNING,
                f"fine-tuning for {options.fine_tune_epochs} epochs",
            )
        pruned = prune_model(
            model,
            options,
            fine_tune=(np.asarray(train.features), np.asarray(train.labels)),
            learning_rate=options.fine_tune_learning_rate,
            should_stop=self.should_stop,
        )
        on_phase(pb.OPTIMIZATION_PHASE_EXPORTING, "exporting the pruned model")
        return transforms.export_onnx(
            ProbabilityOutput(pruned), self.source.input_shape, opset=self.export_opset
        )

    def _fp32_onnx(self, on_phase: PhaseCallback) -> bytes:
        """The source as fp32 ONNX: its export, or itself when it is fp32 ONNX."""
        if self._onnx_fp32 is None:
            if self.source.is_pytorch:
                on_phase(pb.OPTIMIZATION_PHASE_EXPORTING, "exporting the source to ONNX")
                model = ProbabilityOutput(self.source.pytorch_model())
                self._onnx_fp32 = transforms.export_onnx(
                    model, self.source.input_shape, opset=self.export_opset
                )
            elif self.source.version.format == registry_pb.MODEL_FORMAT_ONNX_FP32:
                self._onnx_fp32 = self.source.artifact
            else:
                raise FailedPreconditionError(
                    f"{self.source.version.name} is already reduced-precision ONNX; optimise "
                    "its fp32 parent instead",
                    reason="FP32_SOURCE_REQUIRED",
                    metadata={"model_version": self.source.version.name},
                )
        return self._onnx_fp32

    def _calibration_samples(self, count: int) -> npt.NDArray[np.float32]:
        features = np.asarray(self.splits.train.features, dtype=np.float32)
        if count >= len(features):
            return features
        chosen = np.random.default_rng(CALIBRATION_SEED).choice(len(features), count, replace=False)
        return features[np.sort(chosen)]

    # -- baselines ---------------------------------------------------------------

    def _measure_pytorch_baseline(self, on_phase: PhaseCallback) -> _Measured:
        if self._pytorch_baseline is None:
            on_phase(pb.OPTIMIZATION_PHASE_PREPARING, "measuring the PyTorch source")
            predictor = measurement.torch_predictor(
                ProbabilityOutput(self.source.pytorch_model()),
                provider=self.provider,
                threads=self.config.intra_op_threads,
                file_size_bytes=len(self.source.artifact),
                description=f"{self.source.version.name} (PyTorch fp32)",
            )
            self._pytorch_baseline = self._measure(predictor)
        return self._pytorch_baseline

    def _measure_onnx_baseline(self, on_phase: PhaseCallback) -> _Measured:
        if self._onnx_baseline is None:
            fp32 = self._fp32_onnx(on_phase)
            on_phase(pb.OPTIMIZATION_PHASE_PREPARING, "measuring the fp32 ONNX baseline")
            exported = "" if self.source.is_onnx else "ONNX export of "
            predictor = measurement.onnx_predictor(
                fp32,
                provider=self.provider,
                threads=self.config.intra_op_threads,
                precision=pb.PRECISION_FP32,
                description=f"{exported}{self.source.version.name} (fp32)",
            )
            self._onnx_baseline = self._measure(predictor)
        return self._onnx_baseline

    def _measure(self, predictor: Predictor) -> _Measured:
        measured, outputs = measurement.measure(
            predictor,
            self.test_features,
            np.asarray(self.splits.test.labels),
            self.config,
            should_stop=self.should_stop,
        )
        return _Measured(measured, outputs)


def refusal_of(outcome: Outcome, result_id: str) -> pb.OptimizationError | None:
    """The FAILED_PRECONDITION a refused outcome carries; None when it passed."""
    return None if outcome.passed else refusal(outcome.report.gate, result_id)


def result_version(
    source: SourceModel, outcome: Outcome, *, job_name: str
) -> registry_pb.ModelVersion:
    """The registry version of a passed result, everything but its artifact:
    the source's signature, task, hyperparameters and reference statistics,
    the candidate's test metrics, and lineage naming the parent and the
    transformation."""
    parent = source.version
    technique = outcome.report.technique
    version = registry_pb.ModelVersion(
        description=(f"{TECHNIQUE_NAMES[technique]} of {parent.name} by {job_name}")[:16_000],
        format=outcome.model_format,
        task=parent.task,
        signature=parent.signature,
        hyperparameters=parent.hyperparameters,
        lineage=registry_pb.Lineage(
            parent_version=parent.name,
            transformation=TRANSFORMATION[technique],
            training_job=parent.lineage.training_job,
            optimization_job=job_name,
            dataset=parent.lineage.dataset,
            dataset_digest=parent.lineage.dataset_digest,
            code_revision=parent.lineage.code_revision,
        ),
        labels=parent.labels,
        authors=parent.authors,
        model_card=parent.model_card,
        reference_statistics=parent.reference_statistics,
    )
    version.metrics.update(outcome.report.candidate.metrics)
    return version


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp
