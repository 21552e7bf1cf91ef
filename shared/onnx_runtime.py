"""ONNX Runtime sessions on an execution provider that really works here.

``onnxruntime-gpu`` lists the CUDA (and TensorRT) providers whether or not a
GPU is present, and a session asked for CUDA on a machine without one logs
errors at every creation (``../shared/TRAPS.md``). :func:`gpu_present` asks the
CUDA driver itself (``libcuda``, through ``ctypes``: no PyTorch needed) whether
a device exists; :func:`create_session` pins a session to exactly one provider,
with no silent fallback, so what a caller reports is what ran.

Imported by the services that run models (the optimizer, inference); never by
the light client.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Final

import onnxruntime as ort

CPU: Final = "CPUExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"
_ERRORS_ONLY: Final = 3
_CUDA_SUCCESS: Final = 0


@functools.cache
def gpu_present() -> bool:
    """Whether the CUDA driver is installed and sees at least one device."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if driver.cuInit(0) != _CUDA_SUCCESS:
        return False
    return bool(driver.cuDeviceGetCount(ctypes.byref(count)) == _CUDA_SUCCESS and count.value > 0)


def create_session(
    model: bytes,
    provider: str,
    *,
    threads: int = 0,
    inter_op_threads: int = 0,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_model_path: str = "",
    gpu_device_id: int = 0,
    spin: bool = True,
) -> ort.InferenceSession:
    """An inference session for the serialized ONNX ``model`` on ``provider``
    only; ``threads`` intra-op threads (0: ONNX Runtime's default),
    ``inter_op_threads`` across operators (0: 1, operators run in order).
    Without ``spin`` the intra-op threads sleep between runs instead of
    spinning, leaving the cores to a server's other threads."""
    options = ort.SessionOptions()
    options.log_severity_level = _ERRORS_ONLY
    options.graph_optimization_level = optimization_level
    # The CPU arena keeps freed blocks for the next run of the same shapes.
    options.enable_cpu_mem_arena = True
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads > 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = inter_op_threads
    else:
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    providers: list[str | tuple[str, dict[str, str]]] = [provider]
    if provider == CUDA:
        providers = [(CUDA, {"device_id": str(gpu_device_id)})]
    return ort.InferenceSession(model, sess_options=options, providers=providers)
