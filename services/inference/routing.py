"""Where a deployment's requests go, and how its shadow compares.

A :class:`Route` is the immutable snapshot requests read: the weighted split
(sticky by the request id's hash when asked) and the shadow with its sample
share and tolerance. :class:`ShadowCounters` keeps the comparison of the
shadow's answers with the served ones.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from google.protobuf.duration_pb2 import Duration

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.services.inference.versions import LoadedVersion

PERCENT: Final = 100


@dataclass(frozen=True)
class Route:
    """Where requests go: a weighted split and an optional shadow."""

    targets: tuple[tuple[LoadedVersion, int], ...]
    sticky: bool
    shadow: LoadedVersion | None = None
    shadow_sample_percent: int = PERCENT
    shadow_tolerance: float = 0.0

    def pick(self, request_id: str) -> LoadedVersion:
        """The version for a request: by weight, by the id's hash when sticky."""
        if len(self.targets) == 1:
            return self.targets[0][0]
        total = sum(percent for _, percent in self.targets)
        if self.sticky and request_id:
            digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") % total
        else:
            point = random.randrange(total)
        for version, percent in self.targets:
            if point < percent:
                return version
            point -= percent
        return self.targets[-1][0]

    def shadows(self) -> bool:
        """Whether this request gets copied to the shadow."""
        return self.shadow is not None and (
            self.shadow_sample_percent >= PERCENT
            or random.randrange(PERCENT) < self.shadow_sample_percent
        )


@dataclass
class ShadowCounters:
    """How the shadow's answers compared with the served ones."""

    model_version: str
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    mirrored: int = 0
    dropped: int = 0
    errors: int = 0
    compared: int = 0
    mismatches: int = 0
    top1_disagreements: int = 0
    abs_difference_sum: float = 0.0
    abs_difference_max: float = 0.0
    served_latency_s: float = 0.0
    shadow_latency_s: float = 0.0

    def compare(
        self,
        served: Mapping[str, npt.NDArray[Any]],
        shadow: Mapping[str, npt.NDArray[Any]],
        tolerance: float,
    ) -> bool:
        """Count one comparison; whether the answers agreed within ``tolerance``."""
        self.compared += 1
        agreed = True
        for name, answer in served.items():
            other = shadow.get(name)
            if other is None or other.shape != answer.shape:
                agreed = False
                continue
            if answer.dtype.kind in "fiub" and other.dtype.kind in "fiub":
                difference = float(np.max(np.abs(answer.astype(np.float64) - other)))
                self.abs_difference_max = max(self.abs_difference_max, difference)
                self.abs_difference_sum += difference
                agreed = agreed and difference <= tolerance
                if answer.ndim == 2 and answer.shape[1] > 1:
                    top1 = np.argmax(answer, axis=1) != np.argmax(other, axis=1)
                    self.top1_disagreements += int(np.any(top1))
            else:
                agreed = agreed and bool(np.array_equal(answer, other))
        if not agreed:
            self.mismatches += 1
        return agreed

    def to_proto(self) -> pb.ShadowStats:
        stats = pb.ShadowStats(
            model_version=self.model_version,
            mirrored_count=self.mirrored,
            dropped_count=self.dropped,
            error_count=self.errors,
            compared_count=self.compared,
            mismatch_count=self.mismatches,
            top1_disagreement_count=self.top1_disagreements,
            mean_abs_difference=self.abs_difference_sum / self.compared if self.compared else 0.0,
            max_abs_difference=self.abs_difference_max,
            mean_served_latency=duration(self.served_latency_s / max(self.compared, 1)),
            mean_shadow_latency=duration(self.shadow_latency_s / max(self.compared, 1)),
        )
        stats.start_time.FromDatetime(self.start_time)
        return stats


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value
