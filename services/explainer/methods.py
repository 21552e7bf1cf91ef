"""The explanation libraries, called as their authors document them.

Each function explains one instance with a model function that evaluates
rows (through :class:`~.sharing.SharedEvaluations` in the service, locally in
a test) and returns a :class:`MethodResult`. Called with the same instance,
the same model outputs and the same seed, each gives what the library gives
when called directly:

- LIME tabular: ``LimeTabularExplainer(reference, mode="regression",
  feature_names=..., random_state=seed)`` and ``explain_instance(row, f,
  num_features=top_k, num_samples=n)`` with ``f`` the explained output
  element (LIME's classification mode fits the same surrogate to that
  column; regression mode needs no probabilities that sum to one).
- LIME image: ``LimeImageExplainer(random_state=seed)`` and
  ``explain_instance(image, f, labels=(target,), top_labels=None,
  hide_color=..., num_features=top_k, num_samples=n, batch_size=n,
  segmentation_fn=...)``: one batch of every sample.
- Kernel SHAP: ``np.random.seed(seed)``, ``KernelExplainer(f, background,
  link="identity")`` and ``shap_values(row[None], nsamples=n, l1_reg=False,
  silent=True)``: every feature's Shapley value estimated, no feature
  selection. SHAP draws from NumPy's global generator, so one explanation at a
  time samples (:data:`GLOBAL_RANDOM`), releasing it for the next while its
  samples are evaluated.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from lime import lime_image as lime_image_module
from lime.lime_image import LimeImageExplainer
from lime.lime_tabular import LimeTabularExplainer
from skimage import segmentation as skimage_segmentation

from conveyor.explainer.v1 import resources_pb2 as pb

# lime 0.2.0.1 wraps LIME image's sampling loop in a tqdm bar it offers no way to
# turn off (later versions take progress_bar=False); a server must not draw one.
lime_image_module.tqdm = functools.partial(lime_image_module.tqdm, disable=True)

with warnings.catch_warnings():
    # SHAP's plotting colours use a matplotlib call due to be deprecated; the
    # explainer draws nothing with SHAP.
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
    import shap
    from shap.utils._legacy import DenseData

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
RowFunction = Callable[[FloatArray], FloatArray]

GLOBAL_RANDOM: Final = threading.Lock()
"""Held while Kernel SHAP draws its samples from ``np.random``."""


@dataclass(frozen=True)
class MethodResult:
    """One instance's explanation, before naming and trimming."""

    weights: list[tuple[int, float]]
    """(feature or superpixel, weight), largest absolute weight first."""
    base_value: float
    conditions: dict[int, str] = field(default_factory=dict)
    local_prediction: float | None = None
    local_fidelity_r2: float | None = None
    segments: IntArray | None = None


def ranked(weights: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Largest absolute weight first; ties by position."""
    return sorted(((int(i), float(w)) for i, w in weights), key=lambda p: (-abs(p[1]), p[0]))


def lime_tabular(
    row: FloatArray,
    predict: RowFunction,
    reference: FloatArray,
    feature_names: Sequence[str],
    *,
    seed: int,
    num_samples: int,
    top_k: int,
) -> MethodResult:
    """LIME tabular; ``predict`` maps rows to the explained output element."""
    explainer = LimeTabularExplainer(
        reference,
        mode="regression",
        feature_names=list(feature_names),
        discretize_continuous=True,
        random_state=seed,
    )
    explanation = explainer.explain_instance(
        row, predict, num_features=min(top_k, len(row)), num_samples=num_samples
    )
    label = 1  # regression mode keeps the surrogate's weights under label 1
    weights = explanation.local_exp[label]
    named = explanation.as_list()
    conditions = {int(index): name for (index, _), (name, _) in zip(weights, named, strict=True)}
    return MethodResult(
        weights=ranked(weights),
        base_value=float(explanation.intercept[label]),
        conditions=conditions,
        local_prediction=float(np.ravel(explanation.local_pred)[0]),
        local_fidelity_r2=float(explanation.score),
    )


def shap_background(reference: FloatArray, weights: FloatArray | None, size: int) -> Any:
    """Kernel SHAP's background: the reference rows themselves when there are
    at most ``size``, else ``shap.kmeans(reference, size)`` (weighted centroids)."""
    if len(reference) <= size:
        names = [str(i) for i in range(reference.shape[1])]
        if weights is None:
            return DenseData(reference, names)
        return DenseData(reference, names, None, weights.copy())
    return shap.kmeans(reference, size)


def kernel_shap(
    row: FloatArray,
    predict: RowFunction,
    background: Any,
    *,
    seed: int,
    num_samples: int,
    known: tuple[float, FloatArray] | None = None,
) -> MethodResult:
    """Kernel SHAP; ``predict`` maps rows to the explained output element.
    ``known``, the output for ``row`` and for the background's rows when they
    are already evaluated, answers SHAP's first two calls without ``predict``."""
    holding = [True]

    def model(rows: FloatArray) -> FloatArray:
        if known is not None and rows is background.data:
            return known[1]
        if known is not None and len(rows) == 1 and np.array_equal(rows[0], row):
            return np.array([known[0]])
        if holding[0]:
            # The samples are drawn by now: let the next explanation draw.
            holding[0] = False
            GLOBAL_RANDOM.release()
        return predict(rows)

    GLOBAL_RANDOM.acquire()
    try:
        np.random.seed(seed)
        explainer = shap.KernelExplainer(model, background, link="identity")
        values = explainer.shap_values(
            row[np.newaxis, :], nsamples=num_samples, l1_reg=False, silent=True
        )
    finally:
        if holding[0]:
            GLOBAL_RANDOM.release()
    phi = np.asarray(values, dtype=np.float64).reshape(-1)
    return MethodResult(
        weights=ranked(list(enumerate(phi.tolist()))),
        base_value=float(np.ravel(explainer.expected_value)[0]),
    )


def lime_image(
    image: FloatArray,
    classify: RowFunction,
    *,
    target: int,
    seed: int,
    num_samples: int,
    top_k: int,
    segmentation: pb.SegmentationAlgorithm.ValueType,
    num_segments: int,
    hide_value: float | None,
) -> MethodResult:
    """LIME image on an ``[H, W, C]`` image (C 1 or 3); ``classify`` maps
    images (``[n, H, W, C]``) to the model's output rows."""
    picture = image[:, :, 0] if image.shape[2] == 1 else image
    channels = image.shape[2]

    def classifier(images: FloatArray) -> FloatArray:
        batch = np.asarray(images, dtype=np.float64)
        # LIME hands grayscale images back as RGB with equal channels.
        return classify(batch[..., :1] if channels == 1 else batch)

    explainer = LimeImageExplainer(random_state=seed)
    explanation = explainer.explain_instance(
        picture,
        classifier,
        labels=(target,),
        top_labels=None,
        hide_color=hide_value,
        num_features=top_k,
        num_samples=num_samples,
        batch_size=num_samples,
        segmentation_fn=segmenter(segmentation, num_segments, seed),
        random_seed=seed,
    )
    return MethodResult(
        weights=ranked(explanation.local_exp[target]),
        base_value=float(explanation.intercept[target]),
        local_prediction=float(np.ravel(explanation.local_pred)[0]),
        local_fidelity_r2=float(explanation.score),
        segments=np.asarray(explanation.segments, dtype=np.int64),
    )


def segmenter(
    algorithm: pb.SegmentationAlgorithm.ValueType, num_segments: int, seed: int
) -> Callable[[FloatArray], IntArray]:
    """The superpixel function for LIME image (it receives the RGB image)."""

    def normalised(image: FloatArray) -> FloatArray:
        low, high = float(image.min()), float(image.max())
        return (image - low) / (high - low) if high > low else np.zeros_like(image)

    def segment(image: FloatArray) -> IntArray:
        rgb = normalised(np.asarray(image, dtype=np.float64))
        if algorithm == pb.SEGMENTATION_ALGORITHM_GRID:
            labels = grid_segments(rgb.shape[0], rgb.shape[1], num_segments)
        elif algorithm == pb.SEGMENTATION_ALGORITHM_SLIC:
            labels = skimage_segmentation.slic(
                rgb, n_segments=num_segments, start_label=0, channel_axis=-1
            )
        elif algorithm == pb.SEGMENTATION_ALGORITHM_FELZENSZWALB:
            labels = skimage_segmentation.felzenszwalb(rgb, scale=100, sigma=0.5, min_size=4)
        else:  # LIME's default quickshift parameters (an unannotated function)
            labels = skimage_segmentation.quickshift(  # type: ignore[no-untyped-call]
                rgb, kernel_size=4, max_dist=200, ratio=0.2, rng=seed
            )
        return np.asarray(labels, dtype=np.int64)

    return segment


def grid_segments(height: int, width: int, num_segments: int) -> IntArray:
    """About ``num_segments`` rectangular cells, row-major ids from 0."""
    rows = max(1, min(height, round(np.sqrt(num_segments * height / width))))
    columns = max(1, min(width, round(num_segments / rows)))
    row_ids = np.arange(height) * rows // height
    column_ids = np.arange(width) * columns // width
    return np.asarray(row_ids[:, np.newaxis] * columns + column_ids[np.newaxis, :], np.int64)
