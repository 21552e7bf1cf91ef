"""The architecture catalog: validation, building, signatures and the weights format."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import architectures
from conveyor.services.trainer.architectures import (
    Classifier,
    build_model,
    model_signature,
    parse_architecture,
)
from conveyor.services.trainer.weights import export_weights, load_model, load_weights
from conveyor.shared.errors import InvalidArgumentError
from tests.trainer.conftest import violation_fields


def _spec(name: str, **args: Any) -> registry_pb.ArchitectureSpec:
    spec = registry_pb.ArchitectureSpec(name=name)
    spec.args.update(args)
    return spec


def _build(
    name: str, shape: tuple[int, ...], classes: int, dropout: float = 0.0, **args: Any
) -> Classifier:
    torch.manual_seed(0)
    return build_model(parse_architecture(_spec(name, **args), shape, classes), dropout=dropout)


@pytest.mark.parametrize(
    ("name", "shape", "args"),
    [
        ("mlp", (30,), {"hidden_sizes": [16, 8], "activation": "gelu"}),
        ("mlp", (1, 8, 8), {}),
        ("logistic", (30,), {}),
        ("logistic", (3, 4, 4), {}),
        ("small_cnn", (1, 8, 8), {"channels": [8, 16], "hidden_size": 32}),
        ("small_cnn", (3, 32, 32), {"kernel_size": 5}),
        ("small_cnn", (1, 2, 3), {}),
        ("resnet18", (1, 8, 8), {}),
        ("resnet18", (3, 64, 64), {}),
    ],
)
def test_every_architecture_maps_a_batch_to_class_logits(
    name: str, shape: tuple[int, ...], args: dict[str, Any]
) -> None:
    model = _build(name, shape, 5, dropout=0.25, **args).eval()
    with torch.no_grad():
        logits = model(torch.rand(3, *shape))
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()


def test_resnet18_is_torchvisions_with_a_small_input_stem() -> None:
    small = _build("resnet18", (1, 8, 8), 10)
    body: Any = small.body
    assert body.conv1.kernel_size == (3, 3)
    assert body.conv1.stride == (1, 1)
    assert body.conv1.in_channels == 1
    assert isinstance(body.maxpool, nn.Identity)
    large = _build("resnet18", (3, 96, 96), 10)
    assert large.body.conv1.kernel_size == (7, 7)  # type: ignore[union-attr]
    # torchvision's ResNet-18 has 11.2M parameters; ours differs only in the stem and head.
    count = sum(p.numel() for p in large.parameters())
    assert 11_000_000 < count < 11_300_000


def test_resolved_spec_records_defaults_and_sizes() -> None:
    config = parse_architecture(_spec("mlp"), (30,), 2)
    resolved = config.to_proto()
    assert resolved.name == "mlp"
    assert dict(resolved.args) == {
        "hidden_sizes": [64.0, 32.0],
        "activation": "relu",
        "in_features": 30.0,
        "num_classes": 2.0,
    }
    assert parse_architecture(resolved, (30,), 2) == config
    cnn = parse_architecture(_spec("small_cnn"), (1, 8, 8), 10).to_proto()
    assert cnn.args["in_channels"] == 1
    assert list(cnn.args["channels"]) == [32.0, 64.0]


def test_unknown_architecture_and_wrong_modality() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_architecture(_spec("transformer"), (30,), 2)
    assert violation_fields(caught.value) == {"spec.architecture.name"}
    with pytest.raises(InvalidArgumentError) as caught:
        parse_architecture(_spec("small_cnn"), (30,), 2)
    assert violation_fields(caught.value) == {"spec.architecture.name"}


def test_bad_arguments_name_each_argument() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_architecture(
            _spec(
                "mlp",
                hidden_sizes=[64, 0],
                activation="sigmoid",
                in_features=31,
                num_classes=3,
                depth=4,
            ),
            (30,),
            2,
        )
    assert violation_fields(caught.value) == {
        "spec.architecture.args.hidden_sizes",
        "spec.architecture.args.activation",
        "spec.architecture.args.in_features",
        "spec.architecture.args.num_classes",
        "spec.architecture.args.depth",
    }
    with pytest.raises(InvalidArgumentError) as caught:
        parse_architecture(
            _spec("small_cnn", kernel_size=4, channels="wide", hidden_size=1.5, in_channels=3),
            (1, 8, 8),
            10,
        )
    assert violation_fields(caught.value) == {
        "spec.architecture.args.kernel_size",
        "spec.architecture.args.channels",
        "spec.architecture.args.hidden_size",
        "spec.architecture.args.in_channels",
    }
    with pytest.raises(InvalidArgumentError) as caught:
        parse_architecture(_spec("logistic", hidden_sizes=[4]), (30,), 2)
    assert violation_fields(caught.value) == {"spec.architecture.args.hidden_sizes"}


def test_matching_sizes_in_args_are_accepted() -> None:
    config = parse_architecture(_spec("mlp", in_features=30, num_classes=2), (30,), 2)
    assert config.args["in_features"] == 30


def test_normalization_statistics_are_per_feature_or_per_channel() -> None:
    tabular = _build("mlp", (3,), 2)
    rows = torch.tensor([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0]])
    tabular.fit_normalization(rows)
    assert tabular.input_mean.tolist() == [2.0, 20.0, 5.0]
    assert tabular.input_std.tolist() == [1.0, 10.0, 1.0]  # constant feature: 1
    images = _build("small_cnn", (2, 4, 4), 2)
    batch = torch.stack([torch.zeros(2, 4, 4), torch.ones(2, 4, 4) * 2])
    images.fit_normalization(batch)
    assert images.input_mean.shape == (2, 1, 1)
    assert images.input_mean.flatten().tolist() == [1.0, 1.0]


def test_signature_describes_raw_input_and_probabilities() -> None:
    signature = model_signature((30,), ("malignant", "benign"), ("a",) * 30)
    (tensor_in,) = signature.inputs
    (tensor_out,) = signature.outputs
    assert tensor_in.name == architectures.INPUT_NAME
    assert list(tensor_in.shape) == [-1, 30]
    assert tensor_in.dtype == registry_pb.TENSOR_DATA_TYPE_FP32
    assert len(tensor_in.feature_names) == 30
    assert tensor_out.name == "probabilities"
    assert list(tensor_out.shape) == [-1, 2]
    assert list(tensor_out.class_names) == ["malignant", "benign"]
    image = model_signature((1, 8, 8), tuple("0123456789"))
    assert list(image.inputs[0].shape) == [-1, 1, 8, 8]
    assert not image.inputs[0].feature_names


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (30,)), ("small_cnn", (1, 8, 8)), ("resnet18", (3, 16, 16))]
)
def test_weights_round_trip_through_a_state_dict(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape, 4, dropout=0.5)
    model.fit_normalization(torch.rand(10, *shape) * 7)
    model.eval()
    data = export_weights(model)
    plain = torch.load(io.BytesIO(data), weights_only=True)
    assert set(plain) == set(model.state_dict())
    assert all(isinstance(value, torch.Tensor) for value in plain.values())
    spec = parse_architecture(_spec(name), shape, 4).to_proto()
    rebuilt = load_model(data, spec, shape, 4)
    batch = torch.rand(6, *shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), model(batch))
        probabilities = load_model(data, spec, shape, 4, probabilities=True)(batch)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(6))
    assert not rebuilt.training


def test_weights_are_never_a_pickled_module() -> None:
    model = _build("mlp", (4,), 2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with pytest.raises(InvalidArgumentError) as caught:
        load_weights(buffer.getvalue())
    assert caught.value.reason == "WEIGHTS_UNREADABLE"
    with pytest.raises(InvalidArgumentError):
        load_weights(pickle.dumps({"weight": np.zeros(3)}))
    with pytest.raises(InvalidArgumentError):
        load_weights(b"not weights")


def test_weights_of_another_architecture_are_refused() -> None:
    data = export_weights(_build("mlp", (4,), 2, hidden_sizes=[8]))
    with pytest.raises(InvalidArgumentError) as caught:
        load_model(data, _spec("mlp", hidden_sizes=[16]), (4,), 2)
    assert caught.value.reason == "WEIGHTS_MISMATCH"
    assert "wrong shape" in caught.value.message
    with pytest.raises(InvalidArgumentError) as caught:
        load_model(data, _spec("logistic"), (4,), 2)
    assert caught.value.reason == "WEIGHTS_MISMATCH"
