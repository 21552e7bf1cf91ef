"""The compute ceiling: the same ONNX files run in-process with ONNX Runtime.

No transport, no server: one Python caller runs ``session.run`` in a loop on
a pre-built input, with ONNX Runtime's CPU provider, ``intra_op_num_threads``
1 or 2, ``inter_op_num_threads`` 1, every graph optimisation. Batch 1 gives the
per-call latency (p50/p99 of every call) and throughput (calls/s); for
ResNet-18, batches 8, 16 and 32 give the throughput (images/s) a server that
merges requests into such batches could reach at best.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from servables import ModelSpec


@dataclass(frozen=True)
class InProcessResult:
    model: str
    batch: int
    threads: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        """Rows (inferences) per second."""
        return self.calls * self.batch / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch": self.batch,
            "threads": self.threads,
            "calls": self.calls,
            "seconds": round(self.seconds, 3),
            "infer_per_s": round(self.throughput, 1),
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
        }


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def session(spec: ModelSpec, threads: int, provider: str = CPU) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(spec.onnx_path), options, providers=[provider])


def measure(
    spec: ModelSpec,
    *,
    batch: int,
    threads: int,
    seconds: float,
    warmup_s: float = 0.5,
    provider: str = CPU,
) -> InProcessResult:
    """``session.run`` in a loop for ``seconds`` (after ``warmup_s`` of the same)."""
    sess = session(spec, threads, provider)
    rng = np.random.default_rng(0)
    feed = {spec.inputs[0].name: rng.random((batch, *spec.sample_shape), dtype=np.float32)}
    run = sess.run
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        run(None, feed)
    latencies: list[int] = []
    clock = time.perf_counter_ns
    started = clock()
    end = started + int(seconds * 1e9)
    now = started
    while now < end:
        run(None, feed)
        after = clock()
        latencies.append(after - now)
        now = after
    elapsed = (now - started) / 1e9
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return InProcessResult(
        model=spec.name,
        batch=batch,
        threads=threads,
        calls=len(latencies),
        seconds=elapsed,
        p50_ms=quantiles[49] / 1e6,
        p99_ms=quantiles[98] / 1e6,
    )


def ceiling(
    specs: list[ModelSpec],
    *,
    threads: tuple[int, ...],
    batches: dict[str, tuple[int, ...]],
    seconds: float,
    provider: str = CPU,
) -> list[InProcessResult]:
    """Every (model, batch, threads) combination, threads alternating."""
    results = []
    for spec in specs:
        for batch in batches.get(spec.name, (1,)):
            for count in threads:
                results.append(
                    measure(spec, batch=batch, threads=count, seconds=seconds, provider=provider)
                )
    return results
