"""KServe's Python model server (``kserve`` 0.21) serving the benchmark's ONNX files.

A custom model as KServe documents it (``kserve.Model`` with a synchronous
``predict`` that runs an ONNX Runtime session, CPU provider, ``--threads``
intra-op threads, 0 for ONNX Runtime's default), started with
``kserve.ModelServer``. Run by bench_inference.py with the interpreter of its
own venv (``bench/inference/.venv-kserve``: KServe pins protobuf and must not
share a process with Conveyor's ``inference`` protos)::

    .venv-kserve/bin/python kserve_server.py --grpc-port P --http-port H [--quiet] SPEC.json ...

What this wrapper changes in KServe, and why:

1. **ModelConfig** (the only change to what the server answers): KServe 0.21
   has no ``inference.GRPCInferenceService/ModelConfig`` method and
   perf_analyzer refuses to start without it ("failed to get model config:
   Method not found!"). A generic handler added to KServe's own ``grpc.aio``
   server answers it with Triton's ``ModelConfigResponse`` for the model
   (``max_batch_size`` 0, the signature), serialised by bench_inference.py
   (``<name>.config.pb``; this interpreter cannot load Conveyor's protos). The
   request is decoded with KServe's ``ModelMetadataRequest``, which has the
   same wire layout (``name`` = 1, ``version`` = 2). It passes through
   KServe's interceptors like every other call.
2. **Loopback**: KServe binds ``[::]`` (gRPC) and ``0.0.0.0`` (REST) with no
   host option; here both bind 127.0.0.1. This changes no code path per call.

``--quiet`` is KServe's quiet logging: ``KSERVE_LOGLEVEL=WARNING`` (drops the
per-call ``grpc method:`` line of its logging interceptor) and
``enable_latency_logging=False`` (drops the per-request latency line). Without
it KServe runs with its defaults (INFO, latency logging on); the logs go to
the file bench_inference.py gives as stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from servables import ModelSpec, read_spec

MODEL_CONFIG_METHOD = "ModelConfig"
SERVICE = "inference.GRPCInferenceService"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--quiet", action="store_true", help="KServe's quiet logging")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads per session; 0: its default (one per core)",
    )
    parser.add_argument("specs", nargs="+", type=Path)
    args = parser.parse_args()
    if args.quiet:
        os.environ["KSERVE_LOGLEVEL"] = "WARNING"  # read when kserve is imported
    # kserve.model_server parses sys.argv when it is imported: give it none of ours.
    sys.argv = sys.argv[:1]
    specs = [read_spec(path) for path in args.specs]
    configs = {
        spec.name: (path.parent / f"{spec.name}.config.pb").read_bytes()
        for spec, path in zip(specs, args.specs, strict=True)
    }
    serve(specs, configs, args.threads, args.grpc_port, args.http_port, quiet=args.quiet)
    return 0


def serve(
    specs: list[ModelSpec],
    configs: dict[str, bytes],
    threads: int,
    grpc_port: int,
    http_port: int,
    *,
    quiet: bool,
) -> None:
    # kserve lives only in its own venv (and ships no type information).
    import kserve  # type: ignore[import-not-found]
    from kserve import model_server
    from kserve.protocol.grpc import server as grpc_server  # type: ignore[import-not-found]

    _patch_grpc_server(grpc_server, configs)
    _patch_rest_server(model_server)
    models = [_onnx_model(kserve, spec, threads) for spec in specs]
    server = kserve.ModelServer(
        http_port=http_port, grpc_port=grpc_port, enable_latency_logging=not quiet
    )
    server.start(models)


def _onnx_model(kserve: Any, spec: ModelSpec, threads: int) -> Any:
    """A ``kserve.Model`` running ``spec``'s ONNX file, as KServe's docs write one."""
    import onnxruntime as ort
    from kserve import (
        InferOutput,
        InferRequest,
        InferResponse,
    )

    class OnnxModel(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(spec.name)
            self.load()

        def load(self) -> bool:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(spec.onnx_path), options, providers=["CPUExecutionProvider"]
            )
            self.ready = True
            return True

        def get_input_types(self) -> list[dict[str, Any]]:
            return [_tensor(t) for t in spec.inputs]

        def get_output_types(self) -> list[dict[str, Any]]:
            return [_tensor(t) for t in spec.outputs]

        def predict(
            self, payload: InferRequest, headers: dict[str, str] | None = None
        ) -> InferResponse:
            feed = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
            names = [t.name for t in spec.outputs]
            results = self.session.run(names, feed)
            outputs = [
                InferOutput(name=name, shape=list(result.shape), datatype="FP32", data=result)
                for name, result in zip(names, results, strict=True)
            ]
            return InferResponse(
                response_id=payload.id, model_name=self.name, infer_outputs=outputs
            )

    return OnnxModel()


def _tensor(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _patch_grpc_server(grpc_server: Any, configs: dict[str, bytes]) -> None:
    """KServe's gRPC server, built as KServe builds it, plus a ModelConfig
    handler, bound to loopback instead of ``[::]``."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    async def model_config(request: Any, context: grpc.aio.ServicerContext[Any, bytes]) -> bytes:
        config = configs.get(request.name)
        if config is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
            raise AssertionError("abort raises")
        return config

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            MODEL_CONFIG_METHOD: grpc.unary_unary_rpc_method_handler(
                model_config,
                # ModelConfigRequest is wire-identical to ModelMetadataRequest.
                request_deserializer=pb.ModelMetadataRequest.FromString,
                response_serializer=lambda answer: answer,
            )
        },
    )
    real_aio = grpc_server.aio

    def loopback_server(*args: Any, **kwargs: Any) -> Any:
        server = real_aio.server(*args, **kwargs)
        server.add_generic_rpc_handlers((handler,))
        bind = server.add_insecure_port

        def add_insecure_port(address: str) -> int:
            port: int = bind(address.replace("[::]", "127.0.0.1"))
            return port

        server.add_insecure_port = add_insecure_port
        return server

    grpc_server.aio = SimpleNamespace(server=loopback_server)


def _patch_rest_server(model_server: Any) -> None:
    """KServe's REST server (always started) on 127.0.0.1 instead of 0.0.0.0."""

    class LoopbackRESTServer(model_server.RESTServer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = "127.0.0.1"

    model_server.RESTServer = LoopbackRESTServer


if __name__ == "__main__":
    sys.exit(main())
