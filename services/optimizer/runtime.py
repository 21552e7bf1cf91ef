"""The execution provider a job measures on, and what ran its measurements.

The provider follows whether a GPU is really there
(:func:`conveyor.shared.onnx_runtime.gpu_present`), sessions are pinned to it
(:func:`conveyor.shared.onnx_runtime.create_session`), and every measurement
says which provider and machine ran it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from typing import Final

import onnxruntime as ort
import torch

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.shared import onnx_runtime
from conveyor.shared.errors import FailedPreconditionError

PROVIDER_NAMES: Final = {
    pb.EXECUTION_PROVIDER_CPU: onnx_runtime.CPU,
    pb.EXECUTION_PROVIDER_CUDA: onnx_runtime.CUDA,
}
LIBRARIES: Final = ("onnxruntime-gpu", "onnx", "onnxscript", "torch", "numpy", "scikit-learn")
gpu_present = onnx_runtime.gpu_present


def resolve_provider(
    asked: pb.ExecutionProvider.ValueType = pb.EXECUTION_PROVIDER_UNSPECIFIED,
) -> pb.ExecutionProvider.ValueType:
    """The provider a job measures on: CUDA when asked for or, unasked, when a
    GPU is present; CPU otherwise. FAILED_PRECONDITION for CUDA without a GPU."""
    if asked == pb.EXECUTION_PROVIDER_CUDA and not gpu_present():
        raise FailedPreconditionError(
            "the CUDA execution provider was asked for and no GPU is present",
            reason="NO_GPU",
        )
    if asked == pb.EXECUTION_PROVIDER_UNSPECIFIED:
        return pb.EXECUTION_PROVIDER_CUDA if gpu_present() else pb.EXECUTION_PROVIDER_CPU
    return asked


def session(
    model: bytes,
    provider: pb.ExecutionProvider.ValueType,
    *,
    threads: int = 0,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_model_path: str = "",
) -> ort.InferenceSession:
    """An inference session for the serialized ONNX ``model`` on exactly
    ``provider`` (no silent fallback to another one)."""
    return onnx_runtime.create_session(
        model,
        PROVIDER_NAMES[provider],
        threads=threads,
        optimization_level=optimization_level,
        optimized_model_path=optimized_model_path,
    )


def device_description(provider: pb.ExecutionProvider.ValueType) -> str:
    """The machine a measurement ran on: the GPU's name, or the CPU's and its cores."""
    if provider == pb.EXECUTION_PROVIDER_CUDA:
        return str(torch.cuda.get_device_name(0))
    return f"{_cpu_name()}, {os.cpu_count() or 1} cores"


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    found = []
    for name in LIBRARIES:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(found)


def library_versions() -> dict[str, str]:
    """The versions of the libraries that produce and measure results (read
    from the installed metadata once per process)."""
    return dict(_installed_versions())


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
