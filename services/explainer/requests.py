"""What a caller asks the explainer for, checked.

:func:`resolve_config` checks an ``ExplanationConfig`` on its own (ranges,
method) before anything is looked up; :func:`check_instances` checks the
instances against the method and then, once the version is known, against
the model (:func:`tabular_rows`, :func:`images`). Every problem becomes a
field violation naming the field, so one INVALID_ARGUMENT lists them all.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.services.explainer.model_spec import ExplainedModel
from conveyor.shared.errors import FieldViolation, raise_if_any

FloatArray = npt.NDArray[np.float64]

MIN_SAMPLES: Final = 10
MAX_SAMPLES: Final = 100_000
DEFAULT_SAMPLES: Final = {
    pb.EXPLANATION_METHOD_LIME_TABULAR: 5_000,
    pb.EXPLANATION_METHOD_LIME_IMAGE: 1_000,
}
KERNEL_SHAP_BASE_SAMPLES: Final = 2_048
"""Kernel SHAP's default is ``2 x features + 2,048`` (the library's ``auto``)."""
DEFAULT_TOP_K: Final = 10
DEFAULT_BACKGROUND: Final = 50
MAX_BACKGROUND: Final = 1_000
DEFAULT_SEGMENTS: Final = 16
MAX_SEGMENTS: Final = 1_000
MAX_INSTANCES: Final = 64
TABULAR_METHODS: Final = (pb.EXPLANATION_METHOD_LIME_TABULAR, pb.EXPLANATION_METHOD_KERNEL_SHAP)


@dataclass(frozen=True)
class ExplanationPlan:
    """An ``ExplanationConfig`` with every default applied."""

    method: pb.ExplanationMethod.ValueType
    seed: int
    requested_samples: int
    """0 for the method's default (Kernel SHAP's depends on the feature count)."""
    top_k: int
    target_index: int | None
    output_name: str
    background_size: int
    segmentation: pb.SegmentationAlgorithm.ValueType
    num_segments: int
    hide_value: float | None

    @property
    def is_tabular(self) -> bool:
        return self.method in TABULAR_METHODS

    def num_samples(self, num_features: int) -> int:
        """Perturbed samples per instance."""
        if self.requested_samples:
            return self.requested_samples
        if self.method == pb.EXPLANATION_METHOD_KERNEL_SHAP:
            return 2 * num_features + KERNEL_SHAP_BASE_SAMPLES
        return DEFAULT_SAMPLES[self.method]

    def evaluations_per_instance(self, num_features: int, background_rows: int) -> int:
        """Rows the model evaluates for one instance (Kernel SHAP evaluates every
        sample against every background row)."""
        samples = self.num_samples(num_features)
        if self.method == pb.EXPLANATION_METHOD_KERNEL_SHAP:
            return samples * background_rows
        return samples

    def to_config(self) -> pb.ExplanationConfig:
        """The config as used, seed included (for reports)."""
        config = pb.ExplanationConfig(
            method=self.method,
            seed=self.seed,
            num_samples=self.requested_samples,
            top_k=self.top_k,
            output_name=self.output_name,
        )
        if self.target_index is not None:
            config.target_index = self.target_index
        if self.method == pb.EXPLANATION_METHOD_KERNEL_SHAP:
            config.background_size = self.background_size
        if self.method == pb.EXPLANATION_METHOD_LIME_IMAGE:
            config.image_options.segmentation = self.segmentation
            config.image_options.num_segments = self.num_segments
            if self.hide_value is not None:
                config.image_options.hide_value = self.hide_value
        return config


def resolve_config(config: pb.ExplanationConfig, *, field: str = "config") -> ExplanationPlan:
    """The plan for ``config``, or INVALID_ARGUMENT naming every bad field."""
    violations: list[FieldViolation] = []
    if config.method not in pb.ExplanationMethod.values() or (
        config.method == pb.EXPLANATION_METHOD_UNSPECIFIED
    ):
        violations.append(
            FieldViolation(f"{field}.method", "required: LIME_TABULAR, LIME_IMAGE or KERNEL_SHAP")
        )
    if config.num_samples and not MIN_SAMPLES <= config.num_samples <= MAX_SAMPLES:
        violations.append(
            FieldViolation(
                f"{field}.num_samples",
                f"{config.num_samples} is outside {MIN_SAMPLES} to {MAX_SAMPLES:,} (0: default)",
            )
        )
    if config.top_k < 0:
        violations.append(FieldViolation(f"{field}.top_k", "must not be negative (0: 10)"))
    if config.HasField("target_index") and config.target_index < 0:
        violations.append(FieldViolation(f"{field}.target_index", "must not be negative"))
    if config.background_size and not 1 <= config.background_size <= MAX_BACKGROUND:
        violations.append(
            FieldViolation(
                f"{field}.background_size",
                f"{config.background_size} is outside 1 to {MAX_BACKGROUND:,} (0: 50)",
            )
        )
    options = config.image_options
    if options.segmentation not in pb.SegmentationAlgorithm.values():
        violations.append(
            FieldViolation(f"{field}.image_options.segmentation", "unknown algorithm")
        )
    if options.num_segments and not 2 <= options.num_segments <= MAX_SEGMENTS:
        violations.append(
            FieldViolation(
                f"{field}.image_options.num_segments",
                f"{options.num_segments} is outside 2 to {MAX_SEGMENTS:,} (0: 16)",
            )
        )
    if options.HasField("hide_value") and not math.isfinite(options.hide_value):
        violations.append(FieldViolation(f"{field}.image_options.hide_value", "must be finite"))
    raise_if_any(violations, "invalid explanation config")
    return ExplanationPlan(
        method=config.method,
        seed=config.seed if config.HasField("seed") else secrets.randbits(32),
        requested_samples=config.num_samples,
        top_k=config.top_k or DEFAULT_TOP_K,
        target_index=config.target_index if config.HasField("target_index") else None,
        output_name=config.output_name,
        background_size=config.background_size or DEFAULT_BACKGROUND,
        segmentation=options.segmentation or pb.SEGMENTATION_ALGORITHM_QUICKSHIFT,
        num_segments=options.num_segments or DEFAULT_SEGMENTS,
        hide_value=options.hide_value if options.HasField("hide_value") else None,
    )


def check_instances(instances: Sequence[pb.Instance], plan: ExplanationPlan, *, field: str) -> None:
    """INVALID_ARGUMENT unless there are 1 to 64 instances, each of the kind
    the method explains (the model is not needed for this)."""
    violations: list[FieldViolation] = []
    if not instances:
        violations.append(FieldViolation(field, "required: at least one instance"))
    if len(instances) > MAX_INSTANCES:
        violations.append(
            FieldViolation(field, f"{len(instances)} instances; at most {MAX_INSTANCES}")
        )
    wanted = "row" if plan.is_tabular else "image"
    for index, instance in enumerate(instances[:MAX_INSTANCES]):
        kind = instance.WhichOneof("data")
        name = instance_field(field, index)
        if kind is None:
            violations.append(FieldViolation(name, f"required: a {wanted}"))
        elif kind != wanted:
            violations.append(
                FieldViolation(
                    f"{name}.{kind}",
                    f"{pb.ExplanationMethod.Name(plan.method)} explains a {wanted}, not a {kind}",
                )
            )
    raise_if_any(violations, "invalid instances")


def instance_field(field: str, index: int) -> str:
    """``instances[3]`` in a list, ``instance`` alone."""
    return f"{field}[{index}]" if field.endswith("s") else field


def tabular_rows(
    rows: Sequence[pb.TabularRow], model: ExplainedModel, *, field: str, item: str = ""
) -> list[FloatArray]:
    """Each row as a float64 vector, or INVALID_ARGUMENT for a wrong feature
    count or a value that is not finite (violations name
    ``{field}[i]{item}.values``)."""
    violations: list[FieldViolation] = []
    vectors: list[FloatArray] = []
    for index, row in enumerate(rows):
        name = f"{instance_field(field, index)}{item}.values"
        values = np.asarray(row.values, dtype=np.float64)
        if len(values) != model.num_features:
            violations.append(
                FieldViolation(
                    name,
                    f"{len(values)} values; {model.version_name} takes {model.num_features} "
                    "features",
                )
            )
        elif not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            violations.append(FieldViolation(name, f"value {bad} is not finite"))
        vectors.append(values)
    raise_if_any(violations, "invalid rows")
    return vectors


def images(
    pictures: Sequence[pb.Image], model: ExplainedModel, *, field: str, item: str = ""
) -> list[FloatArray]:
    """Each image as a float64 ``[H, W, C]`` array, or INVALID_ARGUMENT when its
    shape, layout or pixels do not fit the model's input (violations name
    ``{field}[i]{item}.shape`` and the like)."""
    layout = model.image_layout()
    violations: list[FieldViolation] = []
    arrays: list[FloatArray] = []
    for index, image in enumerate(pictures):
        name = instance_field(field, index) + item
        shape = tuple(int(d) for d in image.shape)
        pixels = np.asarray(image.pixels, dtype=np.float64)
        problem = _image_problem(image, shape, len(pixels))
        if problem:
            violations.append(FieldViolation(f"{name}.{problem[0]}", problem[1]))
            continue
        hwc = _as_hwc(pixels.reshape(shape), image.layout)
        if layout is None or hwc.shape != (layout.height, layout.width, layout.channels):
            wanted = (
                f"{layout.height}x{layout.width}x{layout.channels}"
                if layout is not None
                else f"no image (its input is {list(model.instance_shape)})"
            )
            violations.append(
                FieldViolation(
                    f"{name}.shape",
                    f"the image is {'x'.join(map(str, hwc.shape))} (height x width x channels); "
                    f"{model.version_name} takes {wanted}",
                )
            )
            continue
        if not np.isfinite(hwc).all():
            violations.append(FieldViolation(f"{name}.pixels", "every pixel must be finite"))
            continue
        arrays.append(hwc)
    raise_if_any(violations, "invalid images")
    return arrays


def _image_problem(image: pb.Image, shape: tuple[int, ...], count: int) -> tuple[str, str] | None:
    if len(shape) not in (2, 3) or any(d <= 0 for d in shape):
        return "shape", f"{list(shape)}: expected [H, W], [H, W, C] or [C, H, W], all positive"
    if image.layout not in pb.ImageLayout.values():
        return "layout", "unknown layout"
    if len(shape) == 3 and image.layout in (pb.IMAGE_LAYOUT_UNSPECIFIED, pb.IMAGE_LAYOUT_HW):
        return "layout", "required for a three-dimensional image: HWC or CHW"
    if len(shape) == 2 and image.layout not in (pb.IMAGE_LAYOUT_UNSPECIFIED, pb.IMAGE_LAYOUT_HW):
        return "layout", "a two-dimensional image is HW"
    if math.prod(shape) != count:
        return "pixels", f"{count} pixels; the shape {list(shape)} holds {math.prod(shape)}"
    return None


def _as_hwc(array: FloatArray, layout: pb.ImageLayout.ValueType) -> FloatArray:
    if array.ndim == 2:
        return array[:, :, np.newaxis]
    if layout == pb.IMAGE_LAYOUT_CHW:
        return np.ascontiguousarray(array.transpose(1, 2, 0))
    return array
