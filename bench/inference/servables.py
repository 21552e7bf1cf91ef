"""The two models every server here serves, and how a server describes them.

* **mlp**: 30 features (the breast-cancer set), standardisation folded into the
  graph, hidden 32 and 16 with ReLU, 2 logits. Trained briefly here (full-batch
  Adam, seeded): a real model, though perf_analyzer sends random inputs.
* **resnet18**: torchvision's ResNet-18 with ``num_classes=10`` on 3x32x32
  images, **random weights** (seeded; nothing can be downloaded here), in eval
  mode. Compute-bound where the MLP is transport-bound.

Both are exported with ``torch.onnx.export`` at opset 18 into one
self-contained file each (weights embedded), FP32, input ``input`` and output
``logits`` with a dynamic first dimension ``batch``.

A :class:`ModelSpec` is what a server needs to answer ModelMetadata and
ModelConfig; it is written as JSON plus a serialised Triton
``ModelConfigResponse`` so that servers in other interpreters (KServe's venv,
which must not import Conveyor's ``inference`` protos) can answer with it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18


@dataclass(frozen=True)
class TensorSpec:
    """One tensor in Open Inference Protocol terms; -1 marks the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its name (the OIP model name), file and tensors."""

    name: str
    onnx_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The input's shape without the batch dimension."""
        return self.inputs[0].shape[1:]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["onnx_path"] = str(self.onnx_path)
        return data


def write_spec(spec: ModelSpec, directory: Path) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.config.pb`` (a serialised ``ModelConfigResponse``)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{spec.name}.json"
    json_path.write_text(json.dumps(spec.as_json(), indent=2) + "\n")
    config_path = directory / f"{spec.name}.config.pb"
    config_path.write_bytes(model_config_response(spec))
    return json_path, config_path


def write_input_data(spec: ModelSpec, directory: Path, *, seed: int = 0) -> Path:
    """perf_analyzer's ``--input-data`` directory for ``spec``: one file per input,
    named after it, holding a batch-1 sample as raw little-endian FP32, uniform
    in [0, 1). (perf_analyzer's default "random" data are random bytes, which
    include NaN and infinities: Conveyor refuses those, and denormals would slow
    the others' compute.)"""
    import numpy as np

    folder = directory / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for tensor in spec.inputs:
        sample = rng.random(tensor.shape[1:], dtype=np.float32)
        (folder / tensor.name).write_bytes(sample.astype("<f4").tobytes())
    return folder


def read_spec(path: Path) -> ModelSpec:
    data = json.loads(path.read_text())

    def tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in items)

    return ModelSpec(
        name=data["name"],
        onnx_path=Path(data["onnx_path"]),
        inputs=tensors(data["inputs"]),
        outputs=tensors(data["outputs"]),
    )


def model_config_response(spec: ModelSpec) -> bytes:
    """Triton's ModelConfig answer for a server that does not batch across
    requests: ``max_batch_size`` 0, so the dims carry the batch dimension (-1)
    and perf_analyzer is told the full request shape with ``--shape``."""
    from conveyor.oip.v2 import grpc_service_pb2 as oip
    from conveyor.oip.v2 import model_config_pb2 as mc

    config = mc.ModelConfig(
        name=spec.name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0
    )
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=mc.TYPE_FP32, dims=list(tensor.shape))
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=mc.TYPE_FP32, dims=list(tensor.shape))
    config.instance_group.add(name=spec.name, kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    return oip.ModelConfigResponse(config=config).SerializeToString()


# -- export ----------------------------------------------------------------------


def export_models(directory: Path, *, seed: int = 0) -> tuple[list[ModelSpec], dict[str, Any]]:
    """Both models exported into ``directory``; their specs and how they were made."""
    directory.mkdir(parents=True, exist_ok=True)
    mlp, mlp_info = export_mlp(directory / "mlp.onnx", seed=seed)
    resnet, resnet_info = export_resnet18(directory / "resnet18.onnx", seed=seed)
    return [mlp, resnet], {"mlp": mlp_info, "resnet18": resnet_info}


def export_mlp(path: Path, *, seed: int) -> tuple[ModelSpec, dict[str, Any]]:
    """The breast-cancer MLP (30 -> 32 -> 16 -> 2), trained for 300 full-batch steps."""
    import numpy as np
    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    features, labels = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features.astype(np.float32), labels, test_size=0.25, random_state=seed, stratify=labels
    )
    model = _mlp(x_train.mean(axis=0), x_train.std(axis=0) + 1e-6)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    started = time.perf_counter()
    model.train()
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())
    _export(model, torch.from_numpy(x_test[:2]), path)
    spec = ModelSpec(
        name="mlp",
        onnx_path=path,
        inputs=(TensorSpec(INPUT_NAME, "FP32", (-1, 30)),),
        outputs=(TensorSpec(OUTPUT_NAME, "FP32", (-1, 2)),),
    )
    info = {
        "architecture": "standardisation (in-graph), Linear(30,32)-ReLU-Linear(32,16)-ReLU-"
        "Linear(16,2)",
        "weights": "trained: breast-cancer (sklearn), 75/25 stratified split, "
        "300 full-batch Adam steps (lr 0.01)",
        "test_accuracy": round(accuracy, 4),
        "training_s": round(seconds, 2),
        "file_bytes": path.stat().st_size,
    }
    return spec, info


def export_resnet18(path: Path, *, seed: int) -> tuple[ModelSpec, dict[str, Any]]:
    """torchvision ResNet-18, 10 classes, random weights, 3x32x32 input."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _export(model, torch.randn(2, 3, 32, 32), path)
    spec = ModelSpec(
        name="resnet18",
        onnx_path=path,
        inputs=(TensorSpec(INPUT_NAME, "FP32", (-1, 3, 32, 32)),),
        outputs=(TensorSpec(OUTPUT_NAME, "FP32", (-1, 10)),),
    )
    info = {
        "architecture": "torchvision.models.resnet18(num_classes=10), unmodified stem",
        "weights": f"random (torch.manual_seed({seed})), eval mode",
        "file_bytes": path.stat().st_size,
    }
    return spec, info


def _export(model: Any, example: Any, path: Path) -> None:
    import onnx
    import torch

    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            external_data=False,
            verbose=False,
        )
    # One self-contained file: the registry stores exactly one artifact.
    stray = path.with_name(path.name + ".data")
    if stray.exists():
        raise RuntimeError(f"the export wrote external weights to {stray}")
    graph = onnx.load(str(path)).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    if batch.dim_param != "batch":
        raise RuntimeError(f"the exported input's batch dimension is {batch}, not 'batch'")


def _mlp(mean: Any, std: Any) -> Any:
    """The MLP module (defined here so that importing this file needs no torch)."""
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean))
            self.register_buffer("std", torch.as_tensor(std))
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(30, 32),
                torch.nn.ReLU(),
                torch.nn.Linear(32, 16),
                torch.nn.ReLU(),
                torch.nn.Linear(16, 2),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean, std = cast(torch.Tensor, self.mean), cast(torch.Tensor, self.std)
            return cast(torch.Tensor, self.layers((x - mean) / std))

    return Mlp()
