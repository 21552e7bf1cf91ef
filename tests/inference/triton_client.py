"""Talks to a Conveyor inference server with Triton's own Python client
(``tritonclient.grpc``) and prints what it saw as JSON.

Run as a script (``python triton_client.py HOST:PORT``) in its own process:
tritonclient defines protobuf package ``inference`` too, and two definitions
of it cannot live in one interpreter (``../shared/TRAPS.md``). The test that
starts the server checks the JSON.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def status_of(call: Any) -> str:
    try:
        call()
    except InferenceServerException as error:
        return str(error.status())
    return "OK"


def every_type_values() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(1)
    values: dict[str, np.ndarray[Any, Any]] = {}
    for datatype, dtype in TYPES.items():
        if datatype == "BYTES":
            values[datatype] = np.array(
                [[b"a", b"", "\u00e9t\u00e9".encode()], [b"xyz", b"q", b"r"]], dtype=object
            )
        elif datatype == "BOOL":
            values[datatype] = rng.integers(0, 2, size=(2, 3)).astype(bool)
        else:
            values[datatype] = (rng.integers(0, 100, size=(2, 3))).astype(dtype)
    return values


def main(url: str) -> None:
    client = triton.InferenceServerClient(url)
    seen: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
    }
    client.load_model("classifier")
    seen["model_ready"] = client.is_model_ready("classifier")
    seen["metadata"] = client.get_model_metadata("classifier", as_json=True)
    seen["config"] = client.get_model_config("classifier", as_json=True)

    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    given = triton.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    result = client.infer(
        "classifier",
        [given],
        outputs=[triton.InferRequestedOutput("probabilities")],
        request_id="triton-1",
    )
    response = result.get_response()
    seen["infer"] = {
        "id": response.id,
        "model_version": response.model_version,
        "probabilities": result.as_numpy("probabilities").tolist(),
    }

    # Every datatype, round-tripped through an identity model.
    inputs = []
    for datatype, array in every_type_values().items():
        tensor = triton.InferInput(f"in_{datatype.lower()}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    echoed = client.infer("every-type", inputs)
    seen["every_type"] = {
        datatype: [
            [v.decode() if isinstance(v, bytes) else v for v in row]
            for row in echoed.as_numpy(f"out_{datatype.lower()}").tolist()
        ]
        for datatype in TYPES
    }

    # Streaming: several requests on one stream, answers matched by id.
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for index in range(5):
        row = triton.InferInput("input", [1, 4], "FP32")
        row.set_data_from_numpy(x[index % 3 : index % 3 + 1])
        client.async_stream_infer("classifier", [row], request_id=f"stream-{index}")
    streamed = {}
    for _ in range(5):
        result, error = answers.get(timeout=30)
        assert error is None, error
        streamed[result.get_response().id] = result.as_numpy("probabilities").tolist()
    client.stop_stream()
    seen["stream"] = streamed

    seen["statistics"] = client.get_inference_statistics("classifier", as_json=True)
    seen["index"] = client.get_model_repository_index(as_json=True)

    wrong = triton.InferInput("input", [3, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((3, 5), dtype=np.float32))
    not_text = triton.InferInput("in_bytes", [2, 3], "BYTES")
    not_text.set_data_from_numpy(np.array([[b"\xff", b"a", b"b"]] * 2, dtype=object))
    others = [t for t in inputs if t.name() != "in_bytes"]
    try:
        client.infer("every-type", [*others, not_text])
        seen["not_utf8"] = "OK"
    except InferenceServerException as error:
        seen["not_utf8"] = f"{error.status()} {error.message()}"
    seen["errors"] = {
        "wrong_shape": status_of(lambda: client.infer("classifier", [wrong])),
        "unknown_model": status_of(lambda: client.get_model_metadata("nothing-here")),
        "unknown_version": status_of(
            lambda: client.infer("classifier", [given], model_version="99")
        ),
    }
    client.unload_model("every-type")
    seen["after_unload"] = status_of(lambda: client.get_model_config("every-type"))
    client.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
