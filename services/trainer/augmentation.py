"""Seeded image augmentation of training batches (``AugmentationSpec``).

Every random choice comes from a ``torch.Generator`` the training loop owns
and checkpoints, so augmentation is reproducible and resumable. Translation
(``RandomCrop(padding=p)``: a shift by up to ``p`` pixels, zero-filled), the
left-right flip and the rotation are one affine resampling per image; the
Gaussian noise is in units of the normalised pixels (the channel's training
standard deviation in raw units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional

from conveyor.shared.errors import FieldViolation
from conveyor.trainer.v1 import resources_pb2 as pb


@dataclass(frozen=True)
class Augmentation:
    """The resolved augmentation settings; each is off at zero."""

    crop_padding: int = 0
    horizontal_flip: bool = False
    rotation_degrees: float = 0.0
    noise_std: float = 0.0

    @classmethod
    def from_proto(cls, spec: pb.AugmentationSpec) -> Augmentation:
        return cls(
            crop_padding=spec.random_crop_padding,
            horizontal_flip=spec.horizontal_flip,
            rotation_degrees=spec.rotation_degrees,
            noise_std=spec.gaussian_noise_std,
        )

    @property
    def geometric(self) -> bool:
        return bool(self.crop_padding or self.horizontal_flip or self.rotation_degrees)

    @property
    def enabled(self) -> bool:
        return self.geometric or self.noise_std > 0


def augmentation_violations(
    spec: pb.AugmentationSpec, image_shape: tuple[int, ...] | None, field: str
) -> list[FieldViolation]:
    """What is wrong with ``spec`` for data of ``image_shape`` (None: tabular)."""
    if image_shape is None:
        return [FieldViolation(field, "augmentation applies to image data only")]
    violations = []
    largest = max(image_shape[1:])
    if not 0 <= spec.random_crop_padding <= largest:
        violations.append(
            FieldViolation(f"{field}.random_crop_padding", f"from 0 to {largest} (the image size)")
        )
    if not (math.isfinite(spec.rotation_degrees) and 0.0 <= spec.rotation_degrees <= 180.0):
        violations.append(FieldViolation(f"{field}.rotation_degrees", "from 0 to 180"))
    if not (math.isfinite(spec.gaussian_noise_std) and 0.0 <= spec.gaussian_noise_std <= 10.0):
        violations.append(FieldViolation(f"{field}.gaussian_noise_std", "from 0 to 10"))
    return violations


def augment_batch(
    images: torch.Tensor,
    augmentation: Augmentation,
    generator: torch.Generator,
    channel_std: torch.Tensor,
) -> torch.Tensor:
    """A randomly augmented copy of ``images`` (``B x C x H x W``).

    Random values are drawn on the CPU from ``generator`` (the same draws on
    every device) and moved to the images' device.
    """
    batch, _, height, width = images.shape
    result = images
    if augmentation.geometric:
        angles = (torch.rand(batch, generator=generator, dtype=torch.float64) * 2 - 1) * (
            math.radians(augmentation.rotation_degrees)
        )
        span = augmentation.crop_padding
        shifts = torch.randint(-span, span + 1, (batch, 2), generator=generator)
        flips = torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5
        sign = torch.where(
            flips & augmentation.horizontal_flip,
            torch.tensor(-1.0, dtype=torch.float64),
            torch.tensor(1.0, dtype=torch.float64),
        )
        cos, sin = torch.cos(angles), torch.sin(angles)
        # affine_grid maps output coordinates to input ones, normalised to [-1, 1]:
        # input = rotation @ flip @ output - shift (a pixel spans 2 / size).
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cos * sign
        theta[:, 0, 1] = -sin
        theta[:, 1, 0] = sin * sign
        theta[:, 1, 1] = cos
        theta[:, 0, 2] = -2.0 * shifts[:, 0].double() / width
        theta[:, 1, 2] = -2.0 * shifts[:, 1].double() / height
        theta_device = theta.to(device=images.device, dtype=images.dtype)
        grid = functional.affine_grid(theta_device, list(images.shape), align_corners=False)
        result = functional.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
    if augmentation.noise_std > 0:
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        result = result + noise.to(images.device) * (augmentation.noise_std * channel_std)
    return result
