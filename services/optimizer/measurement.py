"""Measuring a model the same way before and after a technique.

A :class:`Predictor` is either runtime (an ONNX Runtime session on one
execution provider, or the PyTorch module) behind one call: float32 inputs in,
class probabilities out. On it, :func:`measure` computes the test-split
metrics (the registry's metric keys, with the trainer's own definitions),
latency percentiles and throughput per batch size after warm-up, and
:func:`parity` the distance between two models' outputs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import runtime
from conveyor.services.trainer.evaluation import classification_metrics

DEFAULT_BATCH_SIZES: Final = (1, 32)
DEFAULT_WARMUP_RUNS: Final = 10
DEFAULT_TIMED_RUNS: Final = 200
EVALUATION_BATCH: Final = 256

Probabilities = npt.NDArray[np.float64]


@dataclass
class Predictor:
    """One model, ready to run: ``predict`` maps a float32 batch to class
    probabilities (float64, for metrics)."""

    predict: Callable[[npt.NDArray[np.float32]], Probabilities]
    runtime: pb.Runtime.ValueType
    precision: pb.Precision.ValueType
    execution_provider: pb.ExecutionProvider.ValueType
    description: str
    opset: int = 0
    file_size_bytes: int = 0
    parameter_count: int = 0
    sparsity: float = 0.0


def onnx_predictor(
    model: bytes,
    *,
    provider: pb.ExecutionProvider.ValueType,
    threads: int,
    precision: pb.Precision.ValueType,
    description: str,
) -> Predictor:
    """An ONNX Runtime session of ``model`` on ``provider``. Inputs are cast
    to what the model takes (float16 for an fp16 model with fp16 inputs)."""
    from conveyor.services.optimizer.transforms import model_facts  # onnx only here

    facts = model_facts(model)
    session = runtime.session(model, provider, threads=threads)
    graph_input = session.get_inputs()[0]
    input_type = np.float16 if graph_input.type == "tensor(float16)" else np.float32

    def predict(batch: npt.NDArray[np.float32]) -> Probabilities:
        feed = {graph_input.name: np.ascontiguousarray(batch, dtype=input_type)}
        outputs = session.run(None, feed)
        return np.asarray(outputs[0], dtype=np.float64)

    return Predictor(
        predict=predict,
        runtime=pb.RUNTIME_ONNXRUNTIME,
        precision=precision,
        execution_provider=provider,
        description=description,
        opset=facts.opset,
        file_size_bytes=len(model),
        parameter_count=facts.parameter_count,
        sparsity=facts.sparsity,
    )


def torch_predictor(
    model: nn.Module,
    *,
    provider: pb.ExecutionProvider.ValueType,
    threads: int,
    file_size_bytes: int,
    description: str,
) -> Predictor:
    """The PyTorch module ``model`` (returning probabilities) on the CPU or GPU."""
    device = torch.device("cuda" if provider == pb.EXECUTION_PROVIDER_CUDA else "cpu")
    model = model.eval().to(device)
    if threads:
        torch.set_num_threads(threads)
    weights = [p.detach() for p in model.parameters()]
    count = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)

    def predict(batch: npt.NDArray[np.float32]) -> Probabilities:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.array(batch, dtype=np.float32)).to(device)
            outputs = model(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            probabilities: Probabilities = outputs.double().cpu().numpy()
            return probabilities

    return Predictor(
        predict=predict,
        runtime=pb.RUNTIME_PYTORCH,
        precision=pb.PRECISION_FP32,
        execution_provider=provider,
        description=description,
        file_size_bytes=file_size_bytes,
        parameter_count=count,
        sparsity=zeros / count if count else 0.0,
    )


def resolved_measurement(config: pb.MeasurementConfig) -> pb.MeasurementConfig:
    """``config`` with every default filled in."""
    resolved = pb.MeasurementConfig()
    resolved.CopyFrom(config)
    if not resolved.batch_sizes:
        resolved.batch_sizes.extend(DEFAULT_BATCH_SIZES)
    resolved.warmup_runs = resolved.warmup_runs or DEFAULT_WARMUP_RUNS
    resolved.timed_runs = resolved.timed_runs or DEFAULT_TIMED_RUNS
    resolved.execution_provider = runtime.resolve_provider(config.execution_provider)
    return resolved


def predict_all(predictor: Predictor, features: npt.NDArray[np.float32]) -> Probabilities:
    """``predictor``'s outputs for every row of ``features``."""
    outputs = [
        predictor.predict(features[start : start + EVALUATION_BATCH])
        for start in range(0, len(features), EVALUATION_BATCH)
    ]
    return np.concatenate(outputs)


def measure(
    predictor: Predictor,
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    config: pb.MeasurementConfig,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[pb.ModelMeasurement, Probabilities]:
    """Metrics on (``features``, ``labels``), then latency at each batch size
    of ``config`` (resolved); the measurement and the model's outputs."""
    outputs = predict_all(predictor, features)
    measurement = pb.ModelMeasurement(
        description=predictor.description,
        runtime=predictor.runtime,
        precision=predictor.precision,
        execution_provider=predictor.execution_provider,
        opset=predictor.opset,
        evaluation_samples=len(labels),
        file_size_bytes=predictor.file_size_bytes,
        parameter_count=predictor.parameter_count,
        sparsity=predictor.sparsity,
    )
    measurement.metrics.update(classification_metrics(labels, _normalised(outputs)))
    for batch_size in config.batch_sizes:
        if should_stop():
            break
        batch = _batch_of(features, batch_size)
        measurement.latencies.append(
            latency(
                predictor,
                batch,
                warmup=config.warmup_runs,
                runs=config.timed_runs,
                should_stop=should_stop,
            )
        )
    return measurement, outputs


def latency(
    predictor: Predictor,
    batch: npt.NDArray[np.float32],
    *,
    warmup: int,
    runs: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> pb.LatencyMeasurement:
    """p50, p99 and mean latency of one batch over ``runs`` timed calls (fewer
    when ``should_stop`` turns true: a cancelled job stops within one run)."""
    for _ in range(warmup):
        if should_stop():
            break
        predictor.predict(batch)
    seconds = []
    for _ in range(runs):
        if should_stop():
            break
        started = time.perf_counter()
        predictor.predict(batch)
        seconds.append(time.perf_counter() - started)
    if not seconds:
        return pb.LatencyMeasurement(batch_size=len(batch))
    mean = statistics.fmean(seconds)
    result = pb.LatencyMeasurement(
        batch_size=len(batch),
        throughput=len(batch) / mean if mean > 0 else 0.0,
        runs=len(seconds),
    )
    # Nanoseconds: a timedelta would round a 20 µs batch to the microsecond.
    result.p50.FromNanoseconds(round(percentile(seconds, 50) * 1e9))
    result.p99.FromNanoseconds(round(percentile(seconds, 99) * 1e9))
    result.mean.FromNanoseconds(round(mean * 1e9))
    return result


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, linearly interpolated (NumPy's default)."""
    return float(np.percentile(np.asarray(values), q))


def parity(baseline: Probabilities, candidate: Probabilities) -> pb.ParityCheck:
    """How far ``candidate``'s outputs are from ``baseline``'s, row by row."""
    difference = np.abs(baseline - candidate)
    agreement = float(np.mean(baseline.argmax(axis=1) == candidate.argmax(axis=1)))
    return pb.ParityCheck(
        max_abs_error=float(difference.max()) if difference.size else 0.0,
        mean_abs_error=float(difference.mean()) if difference.size else 0.0,
        prediction_agreement=agreement,
        samples=len(baseline),
    )


def _normalised(outputs: Probabilities) -> Probabilities:
    """Probabilities renormalised to sum to 1 (float16 rounding leaves them a
    hair off), clipped to be non-negative."""
    clipped = np.clip(outputs, 0.0, None)
    totals = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[1])
    normalised: Probabilities = np.divide(clipped, totals, out=uniform, where=totals > 0)
    return normalised


def _batch_of(features: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """``size`` rows of ``features``, repeated when there are fewer."""
    repeats = math.ceil(size / len(features))
    return np.ascontiguousarray(np.concatenate([features] * repeats)[:size], dtype=np.float32)
