"""What the protocol's descriptive calls answer about a served version:
Triton's ``ModelConfig`` (with the deployment's split, shadow and runtime in
its ``parameters``), ``ModelStatistics``, tensor metadata and repository
states."""

from __future__ import annotations

from typing import Any, Final

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import model_config_pb2
from conveyor.services.inference.deployments import DeploymentRuntime
from conveyor.services.inference.tensors import TensorSpec
from conveyor.services.inference.versions import LoadedVersion

PLATFORM: Final = "onnxruntime_onnx"
CONFIG_TYPES: Final = {
    "BOOL": model_config_pb2.TYPE_BOOL,
    "UINT8": model_config_pb2.TYPE_UINT8,
    "UINT16": model_config_pb2.TYPE_UINT16,
    "UINT32": model_config_pb2.TYPE_UINT32,
    "UINT64": model_config_pb2.TYPE_UINT64,
    "INT8": model_config_pb2.TYPE_INT8,
    "INT16": model_config_pb2.TYPE_INT16,
    "INT32": model_config_pb2.TYPE_INT32,
    "INT64": model_config_pb2.TYPE_INT64,
    "FP16": model_config_pb2.TYPE_FP16,
    "FP32": model_config_pb2.TYPE_FP32,
    "FP64": model_config_pb2.TYPE_FP64,
    "BYTES": model_config_pb2.TYPE_STRING,
}


def model_config(
    runtime: DeploymentRuntime, version: LoadedVersion
) -> model_config_pb2.ModelConfig:
    """Triton's ``ModelConfig`` of a version as it is served: with a batch
    dimension (max_batch_size > 0) the dims leave it out, as Triton's do; the
    split and the shadow are in ``parameters``."""
    batching = version.max_batch_size > 1
    config = model_config_pb2.ModelConfig(
        name=runtime.model_id,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=version.max_batch_size if batching else 0,
        input=[
            model_config_pb2.ModelInput(**_config_tensor(spec, batching)) for spec in version.inputs
        ],
        output=[
            model_config_pb2.ModelOutput(**_config_tensor(spec, batching))
            for spec in version.outputs
        ],
        instance_group=[
            model_config_pb2.ModelInstanceGroup(
                name=f"{runtime.model_id}_{version.number}",
                kind=model_config_pb2.ModelInstanceGroup.KIND_GPU
                if version.device.startswith("cuda")
                else model_config_pb2.ModelInstanceGroup.KIND_CPU,
                count=len(version.instances),
                gpus=[version.options.gpu_device_id] if version.device.startswith("cuda") else [],
            )
        ],
    )
    if batching:
        config.dynamic_batching.max_queue_delay_microseconds = int(
            version.options.max_queue_delay.total_seconds() * 1_000_000
        )
    parameters = {
        "model_version": version.name,
        "execution_provider": version.options.provider,
        "device": version.device,
        "artifact_sha256": version.registered.artifact.sha256,
        "deployment_state": pb.DeploymentState.Name(runtime.state),
    }
    route = runtime.route
    if route is not None:
        parameters["traffic"] = ",".join(f"{v.name}={p}" for v, p in route.targets)
        parameters["sticky"] = str(route.sticky).lower()
        if route.shadow is not None:
            parameters["shadow"] = route.shadow.name
            parameters["shadow_sample_percent"] = str(route.shadow_sample_percent)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _config_tensor(spec: TensorSpec, batching: bool) -> dict[str, Any]:
    """A config input's or output's fields: dims without the batch dimension
    when the model batches."""
    return {
        "name": spec.name,
        "data_type": CONFIG_TYPES[spec.datatype],
        "dims": list(spec.shape[1:] if batching else spec.shape),
    }


def model_statistics(model_id: str, version: LoadedVersion) -> oip.ModelStatistics:
    """Triton's statistics of one version: per request and per batch size."""
    requests = version.statistics
    batcher = version.batcher
    batch = batcher.statistics if batcher is not None else None
    stats = oip.ModelStatistics(
        name=model_id,
        version=version.number,
        last_inference=requests.last_inference_ms,
        inference_count=requests.rows,
        execution_count=batch.executions if batch else 0,
    )
    infer = stats.inference_stats
    answered = requests.success
    infer.success.count, infer.success.ns = answered, requests.success_ns
    infer.fail.count, infer.fail.ns = requests.fail, requests.fail_ns
    infer.queue.count, infer.queue.ns = answered, requests.queue_ns
    infer.compute_input.count, infer.compute_input.ns = answered, requests.input_ns
    infer.compute_infer.count, infer.compute_infer.ns = answered, requests.compute_ns
    infer.compute_output.count, infer.compute_output.ns = answered, requests.output_ns
    if batch is not None:
        for size, count in sorted(batch.batch_sizes.items()):
            entry = stats.batch_stats.add(batch_size=size)
            entry.compute_infer.count = count
            entry.compute_infer.ns = batch.batch_compute_ns.get(size, 0)
    return stats


def tensor_metadata(spec: TensorSpec) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def index_state(version: LoadedVersion) -> str:
    return {
        pb.VERSION_STATE_READY: "READY",
        pb.VERSION_STATE_LOADING: "LOADING",
        pb.VERSION_STATE_WARMING: "LOADING",
        pb.VERSION_STATE_DRAINING: "UNLOADING",
    }.get(version.state, "UNAVAILABLE")
