"""The architecture catalog: specs as data, validated, built into modules.

An ``ArchitectureSpec`` names a builder and its arguments (a ``Struct``):

============  ==============================================================
``mlp``       ``hidden_sizes`` (list of 1-16 widths, 1-4,096; default
              ``[64, 32]``), ``activation`` (``relu``, ``gelu``, ``tanh``,
              ``silu``; default ``relu``). Tabular data, or images flattened.
``logistic``  no arguments: one linear layer (multinomial logistic
              regression). Tabular data, or images flattened.
``small_cnn`` ``channels`` (1-4 convolution widths, 1-512; default
              ``[32, 64]``), ``kernel_size`` (odd, 1-7; default 3),
              ``hidden_size`` (1-4,096; default 128). Images ``C x H x W``.
``resnet18``  no arguments: torchvision's ResNet-18 (``weights=None``), its
              first convolution taking the data's channels, and for inputs
              under 64 pixels a 3x3 stride-1 stem without max-pooling.
============  ==============================================================

Every builder also accepts ``num_classes`` and ``in_features`` (``mlp``,
``logistic``: the flattened input size) or ``in_channels`` (``small_cnn``,
``resnet18``); they default to the dataset's and must match it when given.
The resolved spec (:meth:`ArchitectureConfig.to_proto`) records them, so a
stored spec says what it was built for. ``Hyperparameters.dropout`` sets the
dropout layers' probability (``mlp``, ``small_cnn``, ``resnet18``).

Every model is a :class:`Classifier`: it standardises its raw input with
statistics of the training data kept as buffers (so clients send raw
features), and returns logits; :class:`ProbabilityOutput` adds the softmax a
served model returns (the signature's ``probabilities`` output).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import arguments
from conveyor.shared.errors import FieldViolation, raise_if_any

ARCHITECTURES = ("mlp", "logistic", "small_cnn", "resnet18")
IMAGE_ARCHITECTURES = frozenset({"small_cnn", "resnet18"})
DROPOUT_ARCHITECTURES = frozenset({"mlp", "small_cnn", "resnet18"})
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
SMALL_INPUT_PIXELS = 64
"""Below this height or width, ResNet-18 gets a 3x3 stride-1 stem and no max-pool."""


@dataclass(frozen=True)
class ArchitectureConfig:
    """A validated architecture: the builder, its complete arguments, and the
    input shape and class count it is built for."""

    name: str
    args: Mapping[str, Any] = field(hash=False)
    input_shape: tuple[int, ...]
    num_classes: int

    def to_proto(self) -> registry_pb.ArchitectureSpec:
        """The resolved spec, every argument explicit (stored with the model)."""
        return registry_pb.ArchitectureSpec(name=self.name, args=arguments.to_struct(self.args))


def parse_architecture(
    spec: registry_pb.ArchitectureSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    field: str = "spec.architecture",
) -> ArchitectureConfig:
    """Validate ``spec`` for data of ``input_shape`` with ``num_classes`` classes.

    Raises InvalidArgumentError naming ``{field}.name`` or ``{field}.args.{arg}``.
    """
    violations: list[FieldViolation] = []
    config = check_architecture(spec, input_shape, num_classes, field, violations)
    raise_if_any(violations, "invalid architecture")
    return config


def check_architecture(
    spec: registry_pb.ArchitectureSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    field: str,
    violations: list[FieldViolation],
) -> ArchitectureConfig:
    """Like :func:`parse_architecture`, recording violations instead of raising."""
    name = spec.name
    raw = arguments.to_mapping(spec.args)
    args_field = f"{field}.args"
    if name not in ARCHITECTURES:
        violations.append(FieldViolation(f"{field}.name", f"one of {', '.join(ARCHITECTURES)}"))
        return ArchitectureConfig(name, {}, input_shape, num_classes)
    is_image = len(input_shape) == 3
    if name in IMAGE_ARCHITECTURES and not is_image:
        violations.append(FieldViolation(f"{field}.name", f"{name} needs image data (C x H x W)"))
        return ArchitectureConfig(name, {}, input_shape, num_classes)
    args: dict[str, Any] = {}
    known = {"num_classes"}
    if name in IMAGE_ARCHITECTURES:
        known.add("in_channels")
        args["in_channels"] = _size(raw, "in_channels", input_shape[0], args_field, violations)
    else:
        known.add("in_features")
        args["in_features"] = _size(
            raw, "in_features", math.prod(input_shape), args_field, violations
        )
    args["num_classes"] = _size(raw, "num_classes", num_classes, args_field, violations)
    if name == "mlp":
        known |= {"hidden_sizes", "activation"}
        args["hidden_sizes"] = list(
            arguments.integer_list(
                raw,
                "hidden_sizes",
                (64, 32),
                args_field,
                violations,
                minimum=1,
                maximum=4096,
                min_length=1,
                max_length=16,
            )
        )
        args["activation"] = arguments.choice(
            raw, "activation", "relu", args_field, violations, choices=ACTIVATIONS
        )
    elif name == "small_cnn":
        known |= {"channels", "kernel_size", "hidden_size"}
        args["channels"] = list(
            arguments.integer_list(
                raw,
                "channels",
                (32, 64),
                args_field,
                violations,
                minimum=1,
                maximum=512,
                min_length=1,
                max_length=4,
            )
        )
        kernel = arguments.integer(
            raw, "kernel_size", 3, args_field, violations, minimum=1, maximum=7
        )
        if kernel % 2 == 0:
            violations.append(FieldViolation(f"{args_field}.kernel_size", "an odd number"))
        args["kernel_size"] = kernel
        args["hidden_size"] = arguments.integer(
            raw, "hidden_size", 128, args_field, violations, minimum=1, maximum=4096
        )
    arguments.unknown_keys(raw, known, args_field, violations)
    return ArchitectureConfig(name, args, tuple(input_shape), num_classes)


def build_model(config: ArchitectureConfig, *, dropout: float = 0.0) -> Classifier:
    """A fresh, randomly initialised model for ``config`` (seed torch first)."""
    body: nn.Module
    args = config.args
    if config.name == "logistic":
        body = nn.Sequential(nn.Flatten(), nn.Linear(args["in_features"], config.num_classes))
    elif config.name == "mlp":
        body = _mlp(args, config.num_classes, dropout)
    elif config.name == "small_cnn":
        body = _small_cnn(args, config.input_shape, config.num_classes, dropout)
    else:
        body = _resnet18(config.input_shape, config.num_classes, dropout)
    return Classifier(body, config.input_shape)


def model_signature(
    input_shape: tuple[int, ...],
    class_names: tuple[str, ...],
    feature_names: tuple[str, ...] = (),
) -> registry_pb.ModelSignature:
    """The tensor signature of a served model: raw float32 input, probabilities out."""
    kind = "images (C x H x W)" if len(input_shape) == 3 else "rows of raw features"
    return registry_pb.ModelSignature(
        inputs=[
            registry_pb.TensorSpec(
                name=INPUT_NAME,
                dtype=registry_pb.TENSOR_DATA_TYPE_FP32,
                shape=[-1, *input_shape],
                feature_names=feature_names,
                description=f"{kind}, unscaled: the model standardises its input",
            )
        ],
        outputs=[
            registry_pb.TensorSpec(
                name=OUTPUT_NAME,
                dtype=registry_pb.TENSOR_DATA_TYPE_FP32,
                shape=[-1, len(class_names)],
                class_names=class_names,
                description="class probabilities after softmax",
            )
        ],
    )


class Classifier(nn.Module):
    """Standardises the raw input with training statistics, then runs the body.

    Returns logits. The statistics are buffers (``input_mean``, ``input_std``):
    per feature for tabular input, per channel for images.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, body: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        stats_shape = (input_shape[0], 1, 1) if len(input_shape) == 3 else tuple(input_shape)
        self.body = body
        self.register_buffer("input_mean", torch.zeros(stats_shape))
        self.register_buffer("input_std", torch.ones(stats_shape))

    def fit_normalization(self, features: torch.Tensor) -> None:
        """Set the statistics from the training features (``N x ...``)."""
        values = features.detach().to(device="cpu", dtype=torch.float64)
        dims = (0, 2, 3) if values.dim() == 4 else (0,)
        mean = values.mean(dim=dims).reshape(self.input_mean.shape)
        std = values.std(dim=dims, unbiased=False).reshape(self.input_std.shape)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        with torch.no_grad():
            self.input_mean.copy_(mean.to(self.input_mean.dtype))
            self.input_std.copy_(std.to(self.input_std.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.body((x - self.input_mean) / self.input_std)
        return result


class ProbabilityOutput(nn.Module):
    """A :class:`Classifier` whose output is class probabilities (softmax)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(x), dim=-1)


def _size(
    raw: Mapping[str, Any], key: str, actual: int, field: str, violations: list[FieldViolation]
) -> int:
    value = arguments.integer(raw, key, actual, field, violations, minimum=1, maximum=2**31)
    if value != actual:
        violations.append(FieldViolation(f"{field}.{key}", f"the data gives {actual}"))
    return actual


def _mlp(args: Mapping[str, Any], num_classes: int, dropout: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(args["in_features"])
    for hidden in args["hidden_sizes"]:
        layers += [nn.Linear(width, int(hidden)), ACTIVATIONS[args["activation"]]()]
        layers.append(nn.Dropout(dropout))
        width = int(hidden)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _small_cnn(
    args: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int, dropout: float
) -> nn.Module:
    channels, height, width = input_shape
    kernel = int(args["kernel_size"])
    layers: list[nn.Module] = []
    for out_channels in args["channels"]:
        layers += [
            nn.Conv2d(channels, int(out_channels), kernel, padding=kernel // 2),
            nn.ReLU(),
        ]
        if min(height, width) >= 4:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = int(out_channels)
    # Large images are averaged down to at most 4x4 before the dense head.
    pooled = (min(height, 4), min(width, 4))
    layers += [
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels * pooled[0] * pooled[1], int(args["hidden_size"])),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(int(args["hidden_size"]), num_classes),
    ]
    return nn.Sequential(*layers)


def _resnet18(input_shape: tuple[int, ...], num_classes: int, dropout: float) -> nn.Module:
    from torchvision.models import resnet18

    channels, height, width = input_shape
    model = resnet18(weights=None)
    if min(height, width) < SMALL_INPUT_PIXELS:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    body: nn.Module = model
    return body
