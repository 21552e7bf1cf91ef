"""The explainer's pictures, as PNG bytes: a bar chart of the largest
contributions (tabular explanations, global importance) and a mask overlay
of the superpixels that mattered (image explanations).

Drawn by matplotlib's Agg canvas on bare :class:`~matplotlib.figure.Figure`
objects (no pyplot: no global state, safe in worker threads); feature names
are text, never read as ``$…$`` mathematics.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DPI: Final = 100
SUPPORTING: Final = (0.17, 0.63, 0.17)
"""Green: pushes the explained output up."""
OPPOSING: Final = (0.84, 0.15, 0.16)
"""Red: pushes it down."""
TINT: Final = 0.45
LABEL_CHARACTERS: Final = 48


def bar_chart_png(labels: Sequence[str], weights: Sequence[float], *, title: str) -> bytes:
    """Horizontal bars, the first label on top, positive weights green and
    negative ones red."""
    count = max(1, len(labels))
    figure = Figure(figsize=(6.4, 0.9 + 0.32 * count), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(labels))[::-1]
    colours = [SUPPORTING if w >= 0 else OPPOSING for w in weights]
    axes.barh(positions, list(weights), color=colours)
    axes.set_yticks(list(positions), [_cut(label) for label in labels], parse_math=False)
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("contribution", fontsize=8)
    axes.set_title(_cut(title, 80), fontsize=9, parse_math=False)
    axes.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure)


def mask_overlay_png(
    image: FloatArray, segments: IntArray, weights: Sequence[tuple[int, float]], *, title: str
) -> bytes:
    """The ``[H, W, C]`` image in grey (or colour), with the superpixels in
    ``weights`` tinted (green supporting, red opposing) and outlined."""
    from skimage.segmentation import find_boundaries

    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    rgb = np.repeat(scaled, 3, axis=2) if scaled.shape[2] == 1 else scaled[:, :, :3]
    shown = rgb.copy()
    chosen = np.zeros(segments.shape, dtype=bool)
    for segment, weight in weights:
        mask = segments == segment
        colour = np.asarray(SUPPORTING if weight >= 0 else OPPOSING)
        shown[mask] = (1 - TINT) * shown[mask] + TINT * colour
        chosen |= mask
    # scikit-image's segmentation functions are unannotated.
    edges = find_boundaries(np.where(chosen, segments, -1), mode="inner")  # type: ignore[no-untyped-call]
    boundaries = edges & chosen
    shown[boundaries] = (1.0, 0.85, 0.0)
    figure = Figure(figsize=(6.4, 3.4), dpi=DPI)
    FigureCanvasAgg(figure)
    original, overlay = figure.subplots(1, 2)
    original.imshow(rgb, interpolation="nearest")
    original.set_title("instance", fontsize=9)
    overlay.imshow(shown, interpolation="nearest")
    overlay.set_title(_cut(title, 60), fontsize=9, parse_math=False)
    for axes in (original, overlay):
        axes.set_axis_off()
    figure.tight_layout()
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _cut(text: str, limit: int = LABEL_CHARACTERS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
