"""The Python transport ceiling: a bare ``grpc.aio`` Open Inference Protocol server.

It answers ModelInfer and ModelStreamInfer with a **fixed** response (zeros of
the output's shape for batch 1, as raw output contents) without looking at
the inputs or computing anything, plus the metadata and configuration RPCs
perf_analyzer calls before it starts (ServerLive/Ready, ModelReady,
ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics). gRPC still
receives and parses each request and serialises each response: what any
Python gRPC server pays per call, and nothing else. No interceptors, no
logging, no tracing; the default ``grpc.aio`` options.

Run by bench_inference.py with the repository's venv::

    python bench/inference/bare_server.py --listen 127.0.0.1:PORT SPEC.json [SPEC.json ...]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from servables import ModelSpec, read_spec

from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc as oip_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class BareServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Fixed answers per model name; NOT_FOUND for any other name."""

    def __init__(self, specs: Sequence[ModelSpec], spec_dir: Path) -> None:
        self._metadata: dict[str, oip.ModelMetadataResponse] = {}
        self._config: dict[str, oip.ModelConfigResponse] = {}
        self._answer: dict[str, oip.ModelInferResponse] = {}
        for spec in specs:
            self._metadata[spec.name] = oip.ModelMetadataResponse(
                name=spec.name,
                versions=["1"],
                platform="onnxruntime_onnx",
                inputs=[
                    oip.ModelMetadataResponse.TensorMetadata(
                        name=t.name, datatype=t.datatype, shape=list(t.shape)
                    )
                    for t in spec.inputs
                ],
                outputs=[
                    oip.ModelMetadataResponse.TensorMetadata(
                        name=t.name, datatype=t.datatype, shape=list(t.shape)
                    )
                    for t in spec.outputs
                ],
            )
            self._config[spec.name] = oip.ModelConfigResponse.FromString(
                (spec_dir / f"{spec.name}.config.pb").read_bytes()
            )
            answer = oip.ModelInferResponse(model_name=spec.name, model_version="1")
            for tensor in spec.outputs:
                shape = [1, *tensor.shape[1:]]
                answer.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
                elements = 1
                for size in shape:
                    elements *= size
                answer.raw_output_contents.append(bytes(4 * elements))
            self._answer[spec.name] = answer

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Context
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Context
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Context
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=request.name in self._answer)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="bare-oip", version="1")

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        if request.name not in self._metadata:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return self._metadata[request.name]

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: Context
    ) -> oip.ModelConfigResponse:
        if request.name not in self._config:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return self._config[request.name]

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: Context
    ) -> oip.ModelStatisticsResponse:
        return oip.ModelStatisticsResponse()

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        answer = self._answer.get(request.model_name)
        if answer is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name!r}")
        return _with_id(answer, request.id)

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: Context
    ) -> oip.RepositoryIndexResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no model repository")
        raise AssertionError("abort raises")

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: Context
    ) -> oip.RepositoryModelLoadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no model repository")
        raise AssertionError("abort raises")

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: Context
    ) -> oip.RepositoryModelUnloadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no model repository")
        raise AssertionError("abort raises")

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest],
        context: Context,
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        async for request in request_iterator:
            answer = self._answer.get(request.model_name)
            if answer is None:
                yield oip.ModelStreamInferResponse(error_message="no such model")
            else:
                # Stream clients match answers to requests by id: echo it.
                yield oip.ModelStreamInferResponse(infer_response=_with_id(answer, request.id))


def _with_id(answer: oip.ModelInferResponse, request_id: str) -> oip.ModelInferResponse:
    """The fixed answer, copied with the request's id when it has one."""
    if not request_id:
        return answer
    copy = oip.ModelInferResponse()
    copy.CopyFrom(answer)
    copy.id = request_id
    return copy


async def serve(listen: str, specs: Sequence[ModelSpec], spec_dir: Path) -> None:
    server = grpc.aio.server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(BareServicer(specs, spec_dir), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    parser.add_argument("specs", nargs="+", type=Path, help="model spec JSON files")
    args = parser.parse_args(argv)
    specs = [read_spec(path) for path in args.specs]
    asyncio.run(serve(args.listen, specs, args.specs[0].parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
