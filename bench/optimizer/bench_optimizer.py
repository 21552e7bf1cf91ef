"""Optimizer benchmark: fp32 against dynamic and static int8 (and fp16), latency and accuracy.

Two workloads, each trained here first by the trainer's own library on the
CPU (seeded), then optimised by the optimizer's library exactly as a job does
(:class:`conveyor.services.optimizer.techniques.Optimization`):

* **breast-cancer MLP**: ``mlp``, hidden ``[32, 16]``, 30 epochs;
* **digits ResNet-18**: torchvision's ResNet-18 adapted to 1x8x8 inputs (the
  trainer's ``resnet18``), 4 epochs;
* **digits-32 ResNet-18**: the same on the digits upsampled to 1x32x32
  (bilinear), 2 epochs: the image sets that ship with the libraries here are
  8x8 digits and nothing can be downloaded, and at 8x8 the convolutions are too
  small for int8 kernels to pay for their quantise/dequantise steps.

For each, the fp32 ONNX export is the baseline; graph optimisation, dynamic
int8, static int8 (QDQ, per-tensor and per-channel, calibrated on 512
training samples) and fp16 are measured beside it on the test split (accuracy)
and at batch 1 and 32 (p50 latency over ``--timed-runs`` runs after warm-up,
ONNX Runtime's CPU provider with ``--threads`` intra-op threads, or the CUDA
provider with ``--provider cuda`` on a GPU machine). The whole
measurement repeats ``--repeats`` times in alternation and the table gives
the median p50 of the repeats. Run from the repository root::

    .venv/bin/python bench/optimizer/bench_optimizer.py --json bench/optimizer/results.json

Target (issue 6): static int8 at least 1.5x faster than fp32 on ResNet-18 at
batch 32 with at most 1 point of accuracy lost. Not a test: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import gate, measurement
from conveyor.services.optimizer.source import SourceModel
from conveyor.services.optimizer.techniques import Optimization, Outcome
from conveyor.services.trainer import datasets
from conveyor.services.trainer.evaluation import evaluate
from conveyor.services.trainer.loaded import LoadedDataset
from conveyor.services.trainer.splits import DatasetSplits
from conveyor.services.trainer.training import train, training_result
from conveyor.services.trainer.weights import export_weights
from conveyor.services.trainer.worker import model_version
from conveyor.trainer.v1 import resources_pb2 as trainer_pb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchkit import machine_info

PROVIDERS = {"cpu": pb.EXECUTION_PROVIDER_CPU, "cuda": pb.EXECUTION_PROVIDER_CUDA}
BASELINE = "fp32 (ONNX export)"
VARIANTS: dict[str, pb.TechniqueSpec] = {
    "graph-optimized fp32": pb.TechniqueSpec(graph_optimization=pb.GraphOptimizationOptions()),
    "dynamic int8": pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options()),
    "static int8": pb.TechniqueSpec(static_int8=pb.StaticInt8Options()),
    "static int8 per-channel": pb.TechniqueSpec(static_int8=pb.StaticInt8Options(per_channel=True)),
    "fp16": pb.TechniqueSpec(fp16=pb.Fp16Options()),
}


UPSAMPLED_SIDE = 32


def workload_spec(name: str, epochs: int) -> trainer_pb.TrainingJobSpec:
    spec = trainer_pb.TrainingJobSpec()
    spec.compute.device = trainer_pb.DEVICE_CPU
    spec.data.stratify = True
    hp = spec.hyperparameters
    hp.batch_size, hp.learning_rate = 32, 1e-3
    if name == "cancer-mlp":
        spec.data.dataset, spec.data.split_seed = "datasets/breast-cancer", 7
        spec.architecture.name = "mlp"
        spec.architecture.args.update({"hidden_sizes": [32, 16]})
        hp.epochs, hp.seed = epochs or 30, 1
    else:
        spec.data.dataset, spec.data.split_seed = "datasets/digits", 3
        spec.architecture.name = "resnet18"
        hp.epochs, hp.seed = epochs or (2 if name.startswith("digits32") else 4), 2
    return spec


def load_dataset(name: str, spec: trainer_pb.TrainingJobSpec) -> LoadedDataset:
    """The workload's data: a built-in set, or the digits upsampled to 32x32."""
    dataset = datasets.load_training_data(spec.data)
    if not name.startswith("digits32"):
        return dataset
    images = torch.from_numpy(np.array(dataset.features))
    side = (UPSAMPLED_SIDE, UPSAMPLED_SIDE)
    upsampled = functional.interpolate(images, size=side, mode="bilinear", align_corners=False)
    return LoadedDataset.create(
        name="datasets/digits-32",
        features=upsampled.numpy(),
        labels=dataset.labels,
        feature_names=[],
        class_names=dataset.class_names,
        modality=trainer_pb.DATA_MODALITY_IMAGE,
        source=trainer_pb.DATASET_SOURCE_UPLOADED,
    )


def trained_source(name: str, epochs: int) -> tuple[SourceModel, DatasetSplits, float, float]:
    """The workload trained here: its registry version, its splits, test
    accuracy and training seconds."""
    spec = workload_spec(name, epochs)
    dataset = load_dataset(name, spec)
    started = time.perf_counter()
    outcome = train(spec, dataset)
    seconds = time.perf_counter() - started
    test = evaluate(outcome.model, outcome.splits.test, dataset.class_names)
    result = training_result(outcome, test)
    job = trainer_pb.TrainingJob(name=f"trainingJobs/bench-{name}", spec=spec)
    version = model_version(job, dataset, outcome, result)
    version.name = f"models/{name}/versions/1"
    source = SourceModel(version, export_weights(outcome.model))
    return source, outcome.splits, test.metrics["accuracy"], seconds


def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    source, splits, pytorch_accuracy, train_seconds = trained_source(name, args.epochs)
    print(f"{name}: trained in {train_seconds:.1f} s, test accuracy {pytorch_accuracy:.4f}")
    config = measurement.resolved_measurement(
        pb.MeasurementConfig(
            batch_sizes=[1, 32],
            warmup_runs=args.warmup_runs,
            timed_runs=args.timed_runs,
            execution_provider=PROVIDERS[args.provider],
            intra_op_threads=args.threads,
        )
    )
    p50: dict[str, dict[int, list[float]]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        # A fresh job each repeat: its baseline is measured again beside the variants.
        job = Optimization(
            job_name=f"optimizationJobs/bench-{name}",
            source=source,
            splits=splits,
            dataset=source.version.lineage.dataset,
            config=config,
            gate=gate.resolved_gate(pb.OptimizationGate()),
        )
        for index, (variant, spec) in enumerate(VARIANTS.items()):
            outcome = job.apply(spec, variant.replace(" ", "-"), lambda _phase, _text: None)
            if index == 0:  # every variant shares the job's one fp32 baseline
                _collect(rows, p50, BASELINE, outcome.report.baseline, None)
            _collect(rows, p50, variant, outcome.report.candidate, outcome)
        print(f"  repeat {repeat + 1}/{args.repeats} done")
    for variant, row in rows.items():
        row["p50_ms"] = {b: statistics.median(v) * 1e3 for b, v in p50[variant].items()}
    baseline = rows[BASELINE]
    for row in rows.values():
        row["speedup"] = {b: baseline["p50_ms"][b] / row["p50_ms"][b] for b in row["p50_ms"]}
        row["accuracy_drop_points"] = (baseline["accuracy"] - row["accuracy"]) * 100
    return {
        "workload": name,
        "pytorch_test_accuracy": pytorch_accuracy,
        "train_seconds": train_seconds,
        "test_samples": int(baseline["samples"]),
        "variants": rows,
    }


def _collect(
    rows: dict[str, dict[str, Any]],
    p50: dict[str, dict[int, list[float]]],
    variant: str,
    measured: pb.ModelMeasurement,
    outcome: Outcome | None,
) -> None:
    row = rows.setdefault(
        variant,
        {
            "accuracy": measured.metrics["accuracy"],
            "size_bytes": measured.file_size_bytes,
            "samples": measured.evaluation_samples,
        },
    )
    if outcome is not None:
        row["parity_max_abs_error"] = outcome.report.parity.max_abs_error
        row["gate_passed"] = outcome.report.gate.passed
        row["gate_checks"] = [check.message for check in outcome.report.gate.checks]
    for entry in measured.latencies:
        seconds = entry.p50.ToNanoseconds() / 1e9
        p50.setdefault(variant, {}).setdefault(entry.batch_size, []).append(seconds)


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['workload']} ({result['test_samples']} test samples)")
    print(
        f"{'variant':26} {'accuracy':>9} {'drop':>6} {'p50 b1':>10} {'p50 b32':>10} "
        f"{'x b1':>6} {'x b32':>6} {'size':>10}"
    )
    for variant, row in result["variants"].items():
        print(
            f"{variant:26} {row['accuracy']:9.4f} {row['accuracy_drop_points']:6.2f} "
            f"{row['p50_ms'][1]:8.3f}ms {row['p50_ms'][32]:8.3f}ms "
            f"{row['speedup'][1]:6.2f} {row['speedup'][32]:6.2f} {row['size_bytes']:10,}"
        )


def target_line(result: dict[str, Any]) -> str:
    """Issue 6's target for a ResNet workload: the fastest static int8 variant
    at batch 32 among those that lose at most 1 point of accuracy."""
    static = {v: result["variants"][v] for v in ("static int8", "static int8 per-channel")}
    allowed = {v: r for v, r in static.items() if r["accuracy_drop_points"] <= 1.0}
    if not allowed:
        return f"target {result['workload']}: every static int8 variant lost more than 1 point"
    variant, row = max(allowed.items(), key=lambda item: item[1]["speedup"][32])
    met = row["speedup"][32] >= 1.5
    return (
        f"target {result['workload']}: {variant} {row['speedup'][32]:.2f}x fp32 at batch 32 "
        f"(>= 1.5x), {row['accuracy_drop_points']:.2f} points lost (<= 1): "
        f"{'met' if met else 'NOT met'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="cancer-mlp,digits-resnet18,digits32-resnet18")
    parser.add_argument("--epochs", type=int, default=0, help="0: each workload's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-runs", type=int, default=20)
    parser.add_argument("--timed-runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default="cpu",
        help="cuda: measure on the GPU (fp32 against fp16 is the comparison that matters there)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads, 1))
    machine = machine_info()
    results = [run_workload(name, args) for name in args.workloads.split(",")]
    for result in results:
        print_table(result)
    for result in results:
        if "resnet" in result["workload"]:
            print(target_line(result))
    if args.json:
        recorded = {"machine": machine, "args": vars(args), "results": results}
        args.json.write_text(json.dumps(recorded, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
