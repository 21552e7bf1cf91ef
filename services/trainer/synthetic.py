"""The seeded synthetic tabular generator (``datasets/synthetic``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from conveyor.services.trainer import arguments
from conveyor.services.trainer.loaded import LoadedDataset
from conveyor.shared.errors import FieldViolation, raise_if_any
from conveyor.trainer.v1 import resources_pb2 as pb

SYNTHETIC = "datasets/synthetic"
MAX_SYNTHETIC_VALUES = 50_000_000
"""The most feature values one generated dataset may hold (200 MB of float32)."""


SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_samples": 1000,
    "num_features": 20,
    "num_informative": 10,
    "num_classes": 2,
    "class_sep": 1.0,
    "noise": 0.0,
    "seed": 0,
    "shift": 0.0,
    "scale": 1.0,
}
"""The generator's arguments and their defaults (``Dataset.generator_args``)."""


def generate_synthetic(
    *,
    num_samples: int = 1000,
    num_features: int = 20,
    num_informative: int | None = None,
    num_classes: int = 2,
    class_sep: float = 1.0,
    noise: float = 0.0,
    seed: int = 0,
    shift: float | Sequence[float] = 0.0,
    scale: float = 1.0,
) -> LoadedDataset:
    """Seeded tabular classification data (``datasets/synthetic``).

    Each class has a centroid drawn from N(0, class_sep²) in the first
    ``num_informative`` features; an example is its class centroid plus unit
    Gaussian noise there, and unit Gaussian noise in the other features.
    Classes are balanced. ``noise`` is the fraction of labels replaced by a
    uniformly drawn class. Drift, applied last: every feature ``j`` becomes
    ``mean_j + (x - mean_j) * scale + shift_j * std_j`` with the undrifted
    column's mean and standard deviation, so the same seed with a different
    ``shift`` or ``scale`` gives the same rows and labels, moved (covariate
    drift). ``shift`` is one number for every feature or one per feature.
    ``num_informative`` defaults to ``min(10, num_features)``. Bad arguments
    are INVALID_ARGUMENT naming ``generator_args.{arg}``.
    """
    given: dict[str, Any] = {
        "num_samples": num_samples,
        "num_features": num_features,
        "num_classes": num_classes,
        "class_sep": class_sep,
        "noise": noise,
        "seed": seed,
        "shift": list(shift) if isinstance(shift, Sequence) else shift,
        "scale": scale,
    }
    if num_informative is not None:
        given["num_informative"] = num_informative
    return generate(**synthetic_arguments(given, "generator_args"))


def generate(
    *,
    num_samples: int,
    num_features: int,
    num_informative: int,
    num_classes: int,
    class_sep: float,
    noise: float,
    seed: int,
    shift: float | Sequence[float],
    scale: float,
) -> LoadedDataset:
    """The generator proper, on arguments :func:`synthetic_arguments` checked."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    centroids = rng.standard_normal((num_classes, num_informative)) * class_sep
    informative = centroids[labels] + rng.standard_normal((num_samples, num_informative))
    uninformative = rng.standard_normal((num_samples, num_features - num_informative))
    features = np.concatenate([informative, uninformative], axis=1)
    flipped = rng.random(num_samples) < noise
    replacements = rng.integers(0, num_classes, size=num_samples)
    labels = np.where(flipped, replacements, labels)
    shifts = np.broadcast_to(np.asarray(shift, dtype=np.float64), (num_features,))
    if scale != 1.0 or np.any(shifts != 0.0):
        mean = features.mean(axis=0)
        std = features.std(axis=0)
        features = mean + (features - mean) * scale + shifts * std
    return LoadedDataset.create(
        name=SYNTHETIC,
        features=features,
        labels=labels,
        feature_names=[f"feature_{i}" for i in range(num_features)],
        class_names=[f"class_{k}" for k in range(num_classes)],
        modality=pb.DATA_MODALITY_TABULAR,
        source=pb.DATASET_SOURCE_GENERATOR,
    )


def synthetic_arguments(args: Mapping[str, Any], field: str) -> dict[str, Any]:
    """The keyword arguments of :func:`generate` from loosely typed ``args``, with
    defaults applied; INVALID_ARGUMENT naming ``{field}.{arg}`` for each bad one."""
    violations: list[FieldViolation] = []
    arguments.unknown_keys(args, SYNTHETIC_DEFAULTS, field, violations)
    d = SYNTHETIC_DEFAULTS
    num_samples = arguments.integer(
        args, "num_samples", d["num_samples"], field, violations, minimum=2, maximum=10_000_000
    )
    num_features = arguments.integer(
        args, "num_features", d["num_features"], field, violations, minimum=1, maximum=10_000
    )
    num_informative = arguments.integer(
        args,
        "num_informative",
        min(d["num_informative"], num_features),
        field,
        violations,
        minimum=1,
        maximum=num_features,
    )
    num_classes = arguments.integer(
        args, "num_classes", d["num_classes"], field, violations, minimum=2, maximum=1000
    )
    kwargs: dict[str, Any] = {
        "num_samples": num_samples,
        "num_features": num_features,
        "num_informative": num_informative,
        "num_classes": num_classes,
        "class_sep": arguments.real(
            args, "class_sep", d["class_sep"], field, violations, minimum=0.0, maximum=1000.0
        ),
        "noise": arguments.real(
            args, "noise", d["noise"], field, violations, minimum=0.0, maximum=1.0
        ),
        "seed": arguments.integer(
            args, "seed", d["seed"], field, violations, minimum=0, maximum=2**63 - 1
        ),
        "shift": _shift(args, num_features, field, violations),
        "scale": arguments.real(
            args,
            "scale",
            d["scale"],
            field,
            violations,
            minimum=0.0,
            maximum=1000.0,
            exclusive_minimum=True,
        ),
    }
    if num_samples < num_classes:
        violations.append(FieldViolation(f"{field}.num_samples", "at least num_classes"))
    if num_samples * num_features > MAX_SYNTHETIC_VALUES:
        violations.append(
            FieldViolation(
                f"{field}.num_samples",
                f"num_samples x num_features must be at most {MAX_SYNTHETIC_VALUES}",
            )
        )
    raise_if_any(violations, "invalid generator arguments")
    return kwargs


def _shift(
    args: Mapping[str, Any], num_features: int, field: str, violations: list[FieldViolation]
) -> float | tuple[float, ...]:
    raw = args.get("shift", 0.0)
    if not isinstance(raw, list | tuple):
        return arguments.real(args, "shift", 0.0, field, violations, minimum=-1e3, maximum=1e3)
    values: list[float] = []
    for index, item in enumerate(raw):
        if isinstance(item, bool) or not isinstance(item, int | float) or not abs(item) <= 1e3:
            violations.append(
                FieldViolation(f"{field}.shift[{index}]", "a number in [-1000, 1000]")
            )
        else:
            values.append(float(item))
    if len(raw) != num_features:
        violations.append(FieldViolation(f"{field}.shift", f"one number or {num_features} numbers"))
    return tuple(values)
