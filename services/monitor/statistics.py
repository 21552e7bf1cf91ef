"""The statistics drift is measured with, free of gRPC, storage and configuration
so that every number can be checked against SciPy: the tests and distances of
``conveyor.monitor.v1.DriftTest``, the histograms they compare
(``DistributionComparison``) and the multiple-testing corrections.

Where the contract leaves room, this module chooses:

- Bins (PSI, and Jensen-Shannon on numerical features, :func:`quantile_bin_edges`):
  the reference's quantiles at 0, 1/k, ..., 1 (``np.quantile``, linear), duplicates
  (the atoms of discrete data) dropped, bins closed on the left. The outer edges
  are -inf and +inf, so window values beyond the reference's range land in the
  outer bins, where a shift shows first, instead of falling out of the
  histogram. A reference whose quantiles take two values is cut at its maximum,
  a constant one below, at and above its value, so that there are always bins
  to compare.
- PSI smoothing: a share of 0 on either side counts as 1e-4, without
  renormalising (Evidently's convention). Jensen-Shannon needs no smoothing.
- Wasserstein on a constant reference (standard deviation 0) is not
  normalised: the distance stays in the feature's own units.
- Categories the reference never saw are pooled into one ``__other__`` cell,
  present only when the window has such values. Chi-squared expects it with
  half a reference count: the reference had none in its rows, so its share is
  taken as ``0.5 / (reference rows + 0.5)`` and the seen categories' shares
  are renormalised to match.

Chi-squared, as the contract defines it, takes the reference's proportions as
exact (goodness of fit), so a window much larger than the reference also
detects the reference's own sampling noise.

Cost, for a window of n values and a reference of m: the ``*_sorted`` functions
take samples sorted once by the caller, O(n log n), the only super-linear step
over the window; the ``*_to_reference`` ones take the reference prepared once
(:class:`ReferenceSample`). After that the KS statistic costs O(m log n) (SciPy's
own pass, which brings the exact p-value, is kept for samples of at most 10,000
values), Wasserstein a binary search of the smaller sample's values and a linear
pass over both, and quantile bins O(b log n) for b bins (O(n log b) unsorted).
Categorical columns cost O(n log c) string comparisons for c reference
categories (``np.searchsorted``, ``np.bincount``). Nothing loops over rows in
Python.
"""

from __future__ import annotations

import enum
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.spatial import distance

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

PSI_SMOOTHING: Final = 1e-4
UNSEEN_CATEGORY: Final = "__other__"
UNSEEN_REFERENCE_COUNT: Final = 0.5
_KS_EXACT_MAX_ROWS: Final = 10_000  # `ks_2samp`'s exact p-values under `auto`
_WARNING_FILTERS = threading.Lock()
"""Held around ``warnings.catch_warnings``: the filters are process-wide, and two
threads that save and restore them out of order would leave one's filter in place."""


class MultipleTestingCorrection(enum.Enum):
    """The correction of a report's p-values (``MultipleTestingCorrection``)."""

    NONE = 1
    BONFERRONI = 2
    BENJAMINI_HOCHBERG = 3


@dataclass(frozen=True)
class DistributionComparison:
    """Reference and window histograms of one feature (``DistributionComparison``):
    bin edges (one more than the counts; the outer ones infinite) for binned
    numerical features, categories for the others."""

    bin_edges: tuple[float, ...]
    categories: tuple[str, ...]
    reference_counts: tuple[int, ...]
    current_counts: tuple[int, ...]


class ReferenceSample:
    """A reference column prepared once for every window compared with it: its
    non-missing values (sorted when numerical, as the ``*_sorted`` functions
    need them) and, each computed when a test first needs it, what the tests
    derive from them alone.

    Reports on several threads may share one: a value two threads compute at
    once is computed twice, identically, and either result is kept. The arrays
    are read-only."""

    def __init__(self, values: npt.NDArray[Any]) -> None:
        self.values = values.view()
        self.values.flags.writeable = False  # the view only: the caller's array stays as it was
        self._std: float | None = None
        self._distinct_values: int | None = None
        self._categories: tuple[npt.NDArray[Any], IntArray] | None = None
        self._bins: dict[int, tuple[FloatArray, IntArray]] = {}

    @property
    def size(self) -> int:
        return int(self.values.size)

    def std(self) -> float:
        """The standard deviation (ddof 0) of numerical values."""
        std = self._std
        if std is None:
            std = self._std = float(np.std(self.values))
        return std

    def distinct_values(self) -> int:
        """How many distinct values the sorted numerical values hold."""
        distinct = self._distinct_values
        if distinct is None:
            distinct = 1 + int(np.count_nonzero(np.diff(self.values))) if self.size else 0
            self._distinct_values = distinct
        return distinct

    def categories(self) -> tuple[npt.NDArray[Any], IntArray]:
        """The distinct values, sorted, and how often each occurs."""
        categories = self._categories
        if categories is None:
            values, counts = np.unique(self.values, return_counts=True)
            values.flags.writeable = counts.flags.writeable = False
            categories = self._categories = (values, counts)
        return categories

    def bins(self, bins: int) -> tuple[FloatArray, IntArray]:
        """:func:`quantile_bin_edges` and the sorted numerical values' count per bin."""
        found = self._bins.get(bins)
        if found is None:
            edges = quantile_bin_edges(self.values, bins)
            counts = _sorted_bin_counts(self.values, edges)
            edges.flags.writeable = counts.flags.writeable = False
            found = self._bins[bins] = (edges, counts)
        return found


def adjust_p_values(p_values: npt.ArrayLike, correction: MultipleTestingCorrection) -> FloatArray:
    """The p-values corrected for testing them together: unchanged (NONE),
    multiplied by their number (BONFERRONI) or Benjamini-Hochberg's step-up
    adjusted p-values, all capped at 1."""
    raw = np.asarray(p_values, dtype=np.float64)
    count = raw.size
    if correction is MultipleTestingCorrection.NONE or count == 0:
        return raw.copy()
    if correction is MultipleTestingCorrection.BONFERRONI:
        return np.minimum(raw * count, 1.0)
    order = np.argsort(raw)
    scaled = raw[order] * count / np.arange(1, count + 1)
    # Step-up: a p-value's adjustment is the smallest among it and every larger one.
    stepped = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted = np.empty(count)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def kolmogorov_smirnov(reference: FloatArray, current: FloatArray) -> tuple[float, float]:
    """The two-sample KS statistic and p-value, identical to ``scipy.stats.ks_2samp``
    with method ``auto``."""
    return kolmogorov_smirnov_sorted(np.sort(reference), np.sort(current))


def wasserstein(reference: FloatArray, current: FloatArray) -> float:
    """``scipy.stats.wasserstein_distance`` over the reference's standard deviation
    (ddof 0); the plain distance when the reference is constant."""
    return wasserstein_sorted(np.sort(reference), np.sort(current))


def population_stability_index(
    reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike
) -> float:
    """PSI, ``sum((c - r) * ln(c / r))`` over the bins' shares, a share of 0
    counting as 1e-4."""
    reference_share = _shares(reference_counts)
    current_share = _shares(current_counts)
    reference_share[reference_share == 0] = PSI_SMOOTHING
    current_share[current_share == 0] = PSI_SMOOTHING
    return float(
        np.sum((current_share - reference_share) * np.log(current_share / reference_share))
    )


def jensen_shannon(reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike) -> float:
    """The Jensen-Shannon distance between two frequency vectors (natural log)."""
    with np.errstate(invalid="ignore"):
        # Nearly equal frequencies can round the divergence a hair below 0, whose
        # square root is NaN: that distance is 0.
        value = float(distance.jensenshannon(_shares(reference_counts), _shares(current_counts)))
    return 0.0 if math.isnan(value) else value


def chi_squared(
    reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike
) -> tuple[float, float]:
    """Chi-squared goodness of fit of the window's counts against the reference's
    proportions (``scipy.stats.chisquare``); a cell the reference has no count
    in (the pooled unseen categories) is expected with half a count."""
    reference_cells = np.asarray(reference_counts, dtype=np.float64)
    observed = np.asarray(current_counts, dtype=np.float64)
    if observed.sum() <= 0:
        raise ValueError("chi-squared needs at least one current value")
    if observed.size == 1:
        return 0.0, 1.0  # one category on both sides: nothing can differ
    reference_cells[reference_cells == 0] = UNSEEN_REFERENCE_COUNT
    expected = reference_cells / reference_cells.sum() * observed.sum()
    result = stats.chisquare(observed, expected)
    return float(result.statistic), float(result.pvalue)


def quantile_bin_edges(reference: FloatArray, bins: int) -> FloatArray:
    """The edges of up to ``bins`` bins at the reference's quantiles, the outer
    ones infinite (see the module's notes for discrete and constant references)."""
    quantiles = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)))
    if quantiles.size >= 3:
        cuts = quantiles[1:-1]
    elif quantiles.size == 2:
        cuts = quantiles[1:]
    else:
        cuts = np.array([quantiles[0], np.nextafter(quantiles[0], np.inf)])
    return np.concatenate(([-np.inf], cuts, [np.inf]))


def compare_bins(reference: FloatArray, current: FloatArray, bins: int) -> DistributionComparison:
    """Both samples counted in :func:`quantile_bin_edges`' bins, closed on the left."""
    return compare_sorted_bins(np.sort(reference), np.sort(current), bins)


def compare_categories(
    reference: npt.NDArray[Any], current: npt.NDArray[Any]
) -> DistributionComparison:
    """Both samples counted per reference category (strings, or the values of a
    numerical feature, named by ``repr``), the window's unseen ones pooled as
    ``__other__``."""
    return compare_categories_to_reference(ReferenceSample(reference), current)


def compare_categories_to_reference(
    reference: ReferenceSample, current: npt.NDArray[Any]
) -> DistributionComparison:
    """:func:`compare_categories` with the reference's categories kept."""
    categories, reference_counts = reference.categories()
    positions = np.minimum(np.searchsorted(categories, current), categories.size - 1)
    seen = categories[positions] == current
    current_counts = np.bincount(positions[seen], minlength=categories.size)
    names = [c if isinstance(c, str) else repr(float(c)) for c in categories.tolist()]
    unseen = current.size - int(np.count_nonzero(seen))
    if unseen and UNSEEN_CATEGORY in names:
        current_counts[names.index(UNSEEN_CATEGORY)] += unseen  # a real `__other__` takes them
    elif unseen:
        names.append(UNSEEN_CATEGORY)
        reference_counts = np.append(reference_counts, 0)
        current_counts = np.append(current_counts, unseen)
    return DistributionComparison(
        bin_edges=(),
        categories=tuple(names),
        reference_counts=tuple(reference_counts.tolist()),
        current_counts=tuple(current_counts.tolist()),
    )


def kolmogorov_smirnov_sorted(first: FloatArray, second: FloatArray) -> tuple[float, float]:
    """:func:`kolmogorov_smirnov` on sorted samples (see
    :func:`kolmogorov_smirnov_to_reference`)."""
    return kolmogorov_smirnov_to_reference(ReferenceSample(first), second)


def kolmogorov_smirnov_to_reference(
    reference: ReferenceSample, current: FloatArray
) -> tuple[float, float]:
    """:func:`kolmogorov_smirnov` of the reference's and the window's sorted values.

    Up to 10,000 values a side SciPy computes the exact p-value, so it is asked
    for everything. Beyond, its statistic costs a pass over both samples' CDFs
    at every value of either; here the difference of the two step functions is
    taken only where it can peak, at the smaller sample's distinct values and
    just before them, which gives the same numbers from the same integer counts.
    The p-value is then SciPy's asymptotic one, as ``ks_2samp`` computes it."""
    if max(reference.size, current.size) <= _KS_EXACT_MAX_ROWS:
        with _WARNING_FILTERS, warnings.catch_warnings():
            # `auto` falls back from the exact p-value to the asymptotic one with a
            # RuntimeWarning; the fallback is the behaviour mirrored here.
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ks_2samp(reference.values, current, method="auto")
        return float(result.statistic), float(result.pvalue)
    if reference.size <= current.size:
        small_size, large = reference.size, current
        values, counts = reference.categories()
    else:
        small_size, large = current.size, reference.values
        values, counts = np.unique(current, return_counts=True)
    small_cdf = np.cumsum(counts) / small_size
    large_cdf = np.searchsorted(large, values, side="right") / large.size
    large_cdf_before = np.searchsorted(large, values, side="left") / large.size
    differences = np.concatenate(
        (
            small_cdf - large_cdf,  # at each value of the small sample
            small_cdf[:-1] - large_cdf_before[1:],  # at the last large-sample value before the next
            [-large_cdf_before[0], 0.0],  # below the small sample; 0 where both reach 1
        )
    )
    statistic = float(max(differences.max(), -differences.min()))
    rows, other_rows = float(large.size), float(small_size)
    effective_rows = np.round(rows * other_rows / (rows + other_rows))
    return statistic, float(np.clip(stats.kstwo.sf(statistic, effective_rows), 0.0, 1.0))


def wasserstein_sorted(reference: FloatArray, current: FloatArray) -> float:
    """:func:`wasserstein` on sorted samples (see :func:`wasserstein_to_reference`)."""
    return wasserstein_to_reference(ReferenceSample(reference), current)


def wasserstein_to_reference(reference: ReferenceSample, current: FloatArray) -> float:
    """:func:`wasserstein` of the reference's and the window's sorted values:
    SciPy's sum of ``|F_ref - F_cur|`` times the gaps between consecutive values
    of both, with the CDFs counted along the merged order.

    The merge places only the smaller sample by binary search, O(s log l) for
    sizes s <= l, then fills in the larger one: the order a stable sort of the
    reference followed by the window gives (a reference value before an equal
    window value). Each count is exact at the last of equal values, the only
    ones with a gap after them."""
    larger_is_reference = current.size <= reference.size
    small, large = (
        (current, reference.values) if larger_is_reference else (reference.values, current)
    )
    side: Literal["left", "right"] = "right" if larger_is_reference else "left"
    merged_size = small.size + large.size
    small_at = np.arange(small.size) + np.searchsorted(large, small, side=side)
    from_small = np.zeros(merged_size, dtype=np.bool_)
    from_small[small_at] = True
    merged = np.empty(merged_size)
    merged[small_at] = small
    merged[~from_small] = large
    # Small-sample values up to each merged position; 32-bit counts sum faster (and are exact).
    counter: type[np.signedinteger[Any]] = (
        np.int32 if merged_size < np.iinfo(np.int32).max else np.int64
    )
    small_before: npt.NDArray[np.signedinteger[Any]] = np.cumsum(from_small[:-1], dtype=counter)
    large_before: npt.NDArray[np.signedinteger[Any]] = (
        np.arange(1, merged_size, dtype=counter) - small_before
    )
    reference_at, current_at = (
        (large_before, small_before) if larger_is_reference else (small_before, large_before)
    )
    gaps = np.diff(merged)
    moved = float(
        np.vecdot(np.abs(reference_at / reference.size - current_at / current.size), gaps)
    )
    scale = reference.std()
    return moved / scale if scale > 0 else moved


def compare_sorted_bins(
    reference: FloatArray, current: FloatArray, bins: int
) -> DistributionComparison:
    return compare_bins_to_reference(ReferenceSample(reference), current, bins, current_sorted=True)


def compare_bins_to_reference(
    reference: ReferenceSample, current: FloatArray, bins: int, *, current_sorted: bool
) -> DistributionComparison:
    """The reference's sorted values and the window's counted in
    :func:`quantile_bin_edges`' bins, from sorted window values in O(b log n),
    else by one binary search per value among the b edges."""
    edges, reference_counts = reference.bins(bins)
    if current_sorted:
        current_counts = _sorted_bin_counts(current, edges)
    else:
        bin_of = np.searchsorted(edges[1:-1], current, side="right")
        current_counts = np.bincount(bin_of, minlength=edges.size - 1)
    return DistributionComparison(
        bin_edges=tuple(edges.tolist()),
        categories=(),
        reference_counts=tuple(reference_counts.tolist()),
        current_counts=tuple(current_counts.tolist()),
    )


def _sorted_bin_counts(values: FloatArray, edges: FloatArray) -> IntArray:
    """Values per left-closed bin, from where each inner edge falls in the sorted values."""
    below = np.searchsorted(values, edges[1:-1], side="left")
    counts: IntArray = np.diff(below, prepend=0, append=values.size)
    return counts


def _shares(counts: npt.ArrayLike) -> FloatArray:
    array = np.asarray(counts, dtype=np.float64)
    shares: FloatArray = array / array.sum()
    return shares
