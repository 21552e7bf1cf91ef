"""Per-prediction outlier scores against a version's reference, free of gRPC and
storage so that every score can be checked against SciPy and scikit-learn.

The contract is ``conveyor.monitor.v1`` (``OutlierMethod``, ``OutlierConfig``,
``PredictionRecord.outlier_score`` and ``outlier``); the enum is mirrored here by
value, so the service maps it with ``OutlierMethod(message.method)``. The service
fits a scorer once per reference with :func:`fit_scorer`, stores
:meth:`OutlierScorer.to_bytes` beside the reference, and scores each ingested
batch with :meth:`OutlierScorer.score`. Columns are in schema order: a float
array (NaN for a missing value) and a string array ("" for a missing value), rows
by features; features dropped as personal data are simply not passed.

Where the contract leaves room, this module chooses:

- Covariance: ``np.cov``'s unbiased estimate (ddof 1) from the reference's
  complete rows (no NaN). Its pseudo-inverse is taken of the correlation matrix
  (NumPy's default cutoff), so that which directions count as singular does not
  depend on the features' units: a feature in bytes beside a probability is not
  cut off as numerical noise. A constant reference feature has a zero row there
  and is ignored, as the pseudo-inverse ignores every direction the reference
  never varied in (the drift report sees such shifts).
- A missing numerical value is imputed with its conditional mean given the row's
  observed numerical values, under the reference's mean and covariance (0
  standard deviations when none is observed). For Mahalanobis this makes the
  score the distance of the observed features in their own marginal
  distribution: a missing value neither adds evidence (as mean imputation
  does when the row's other features predict a value far from the mean) nor
  hides the row (as leaving it unscored would, for every row of a feature that
  is often missing). The isolation forest gets the same imputed rows, the
  reference's included, so an imputed row keeps the reference's correlations
  instead of landing where mean imputation would put it, off them. Rows are
  imputed in groups of equal missing patterns: one pseudo-inverse per
  pattern, none per row.
- A missing category ("") is a category of its own: one-hot encoded like any
  other, so its score reflects how often the reference had it missing. A
  category the reference never had ("" included, when the reference had no
  missing value there) is encoded as all zeros for its feature (scikit-learn's
  ``OneHotEncoder(handle_unknown="ignore")``), categories in sorted order.
  Most of the forest's splits then fall on the indicator columns, which dilutes
  its sensitivity to a numerical shift: Mahalanobis is the sharper choice for
  those.
- Mahalanobis scores numerical features only; categorical columns are checked
  for shape and otherwise ignored.
- The reference needs more complete rows than numerical features (fewer cannot
  give a full-rank covariance), and the isolation forest at least two rows.
- The default threshold is ``np.percentile`` (linear) at 99 of the reference's
  own scores, imputed rows included; a row is an outlier when its score
  exceeds the threshold.
- Serialisation is NumPy's ``.npz`` read with ``allow_pickle=False``: arrays
  only, never code, like every artifact Conveyor loads. The forest is not
  stored as a model but as what it was fitted on (the encoded reference) and
  its seed, and fitted again on load: scikit-learn's forest is deterministic
  for the same rows and seed, so scores after a round trip are identical
  (with the same scikit-learn version; another may grow other trees).

Cost, for n rows and k numerical features: Mahalanobis O(n k^2) per batch; the
forest (100 trees of 256-row samples) O(n log 256) per tree. Fitting adds
O(n k^2 + k^3) and one scoring pass over the reference.
"""

from __future__ import annotations

import enum
import io
import math
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import IsolationForest

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]

DEFAULT_THRESHOLD_PERCENTILE: Final = 99.0
DEFAULT_SEED: Final = 0
ISOLATION_FOREST_TREES: Final = 100
MIN_ISOLATION_FOREST_ROWS: Final = 2
_FORMAT_VERSION: Final = 1
_MAX_SEED: Final = 2**32 - 1  # scikit-learn's bound on an integer random_state


class OutlierMethod(enum.Enum):
    """How the outlier score is computed (``OutlierMethod``); UNSPECIFIED is MAHALANOBIS."""

    UNSPECIFIED = 0
    MAHALANOBIS = 1
    ISOLATION_FOREST = 2
    NONE = 3


@dataclass(frozen=True)
class OutlierScores:
    """A batch's scores and verdicts, one per row."""

    scores: FloatArray
    """Higher is more anomalous: the Mahalanobis distance, or the negated
    ``IsolationForest.score_samples``."""
    outliers: BoolArray
    """Whether each score exceeds the scorer's threshold."""


@dataclass(frozen=True, eq=False)
class OutlierScorer:
    """A scorer fitted on one reference by :func:`fit_scorer`."""

    method: OutlierMethod
    """MAHALANOBIS or ISOLATION_FOREST."""
    threshold: float
    """The score above which a row is an outlier."""
    mean: FloatArray
    """The numerical features' mean over the reference's complete rows."""
    scale: FloatArray
    """Their standard deviations (ddof 1); 1 for a constant feature."""
    correlation: FloatArray
    """The covariance over ``scale`` on both sides (0 for a constant feature)."""
    precision: FloatArray
    """The pseudo-inverse of ``correlation``."""
    categories: tuple[StrArray, ...]
    """Each categorical feature's sorted reference categories ("" included)."""
    forest: IsolationForest | None
    """The fitted forest of ISOLATION_FOREST; None for MAHALANOBIS."""
    forest_rows: FloatArray | None = None
    """What the forest was fitted on (the encoded reference), kept to store it."""
    seed: int = DEFAULT_SEED
    """The forest's seed."""

    @property
    def numerical_features(self) -> int:
        return int(self.mean.size)

    @property
    def categorical_features(self) -> int:
        return len(self.categories)

    def score(self, numerical: npt.ArrayLike, categorical: npt.ArrayLike) -> OutlierScores:
        """Score a batch: ``numerical`` rows by numerical features (NaN missing),
        ``categorical`` rows by categorical features ("" missing), with the
        reference's columns. Raises ValueError naming the field for a shape that
        does not match the reference or for infinite values."""
        values = _numerical(numerical, "numerical", self.numerical_features)
        labels = _categorical(
            categorical, "categorical", values.shape[0], self.categorical_features
        )
        scores = self._scores(values, labels)
        return OutlierScores(scores, scores > self.threshold)

    def to_bytes(self) -> bytes:
        """The fitted state as an ``.npz`` archive of arrays (see the module notes)."""
        arrays: dict[str, npt.NDArray[Any]] = {
            "format_version": np.array(_FORMAT_VERSION),
            "method": np.array(self.method.value),
            "threshold": np.array(self.threshold),
            "seed": np.array(self.seed),
            "mean": self.mean,
            "scale": self.scale,
            "correlation": self.correlation,
            "precision": self.precision,
        }
        for index, known in enumerate(self.categories):
            arrays[f"categories_{index}"] = known
        if self.forest_rows is not None:
            arrays["forest_rows"] = self.forest_rows
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> OutlierScorer:
        """A scorer from :meth:`to_bytes`, its forest fitted again on the stored
        rows with the stored seed. Raises ValueError for anything else."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                state = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"scorer: not a serialised outlier scorer ({error})") from None
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError("scorer: not a serialised outlier scorer of this format")
        categories: list[StrArray] = []
        while f"categories_{len(categories)}" in state:
            categories.append(state[f"categories_{len(categories)}"].astype(np.str_))
        seed = int(state["seed"])
        forest_rows = state.get("forest_rows")
        forest = None
        if forest_rows is not None:
            forest = IsolationForest(n_estimators=ISOLATION_FOREST_TREES, random_state=seed)
            forest.fit(forest_rows)
        return cls(
            method=OutlierMethod(int(state["method"])),
            threshold=float(state["threshold"]),
            mean=state["mean"],
            scale=state["scale"],
            correlation=state["correlation"],
            precision=state["precision"],
            categories=tuple(categories),
            forest=forest,
            forest_rows=forest_rows,
            seed=seed,
        )

    def _scores(self, numerical: FloatArray, categorical: StrArray) -> FloatArray:
        if numerical.shape[0] == 0:
            return np.empty(0)
        if self.forest is None:
            standardised = self._standardised(numerical)
            squared = np.sum((standardised @ self.precision) * standardised, axis=1)
            # A positive semi-definite form can round a hair below 0.
            return np.asarray(np.sqrt(np.maximum(squared, 0.0)), dtype=np.float64)
        encoded = self._encoded(numerical, categorical)
        return -np.asarray(self.forest.score_samples(encoded), dtype=np.float64)

    def _standardised(self, numerical: FloatArray) -> FloatArray:
        """The rows centred and scaled, missing values imputed."""
        missing = np.isnan(numerical)
        return _impute((numerical - self.mean) / self.scale, missing, self.correlation)

    def _encoded(self, numerical: FloatArray, categorical: StrArray) -> FloatArray:
        """What the forest splits on: the numerical values, missing ones imputed
        (observed ones exactly as given), then the categories one-hot encoded."""
        imputed = self.mean + self.scale * self._standardised(numerical)
        filled = np.where(np.isnan(numerical), imputed, numerical)
        return np.hstack([filled, *_one_hot(categorical, self.categories)])


def fit_scorer(
    method: OutlierMethod,
    numerical: npt.ArrayLike,
    categorical: npt.ArrayLike,
    *,
    threshold: float | None = None,
    seed: int = DEFAULT_SEED,
) -> OutlierScorer | None:
    """Fit a scorer on the reference's columns (rows by features, as
    :meth:`OutlierScorer.score` takes them); None for NONE, whose records stay
    unscored. ``threshold`` None means the 99th percentile of the reference's
    own scores; ``seed`` seeds the isolation forest.

    Raises ValueError naming the field for arrays that are not rows by features
    of matching row counts, infinite values, too few reference rows, no feature
    the method can score, a threshold that is not finite, or a bad seed."""
    if method is OutlierMethod.UNSPECIFIED:
        method = OutlierMethod.MAHALANOBIS
    if method is OutlierMethod.NONE:
        return None
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold: must be finite, not {threshold}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed: must be 0 to {_MAX_SEED}, not {seed}")
    values = _numerical(numerical, "numerical")
    rows, features = values.shape
    labels = _categorical(categorical, "categorical", rows)
    forest_method = method is OutlierMethod.ISOLATION_FOREST
    if features == 0 and not forest_method:
        raise ValueError("numerical: MAHALANOBIS scores numerical features; the reference has none")
    if features == 0 and labels.shape[1] == 0:
        raise ValueError("numerical, categorical: the reference has no feature to score")
    complete = values[~np.isnan(values).any(axis=1)]
    if features and complete.shape[0] <= features:
        raise ValueError(
            f"numerical: the reference has {complete.shape[0]} complete rows (without NaN) "
            f"for {features} numerical features; the covariance needs at least {features + 1}"
        )
    if forest_method and rows < MIN_ISOLATION_FOREST_ROWS:
        field = "numerical" if features else "categorical"
        raise ValueError(
            f"{field}: the reference has {rows} rows; an isolation forest needs "
            f"at least {MIN_ISOLATION_FOREST_ROWS}"
        )

    mean, scale, correlation = _gaussian(complete)
    scorer = OutlierScorer(
        method=method,
        threshold=math.inf,
        mean=mean,
        scale=scale,
        correlation=correlation,
        precision=np.asarray(np.linalg.pinv(correlation, hermitian=True), dtype=np.float64),
        categories=tuple(np.unique(column) for column in labels.T),
        forest=None,
    )
    if forest_method:
        # Fitted on exactly what scoring feeds it, the reference's missing values imputed.
        rows_fitted = scorer._encoded(values, labels)
        forest = IsolationForest(n_estimators=ISOLATION_FOREST_TREES, random_state=seed)
        scorer = replace(scorer, forest=forest.fit(rows_fitted), forest_rows=rows_fitted, seed=seed)
    if threshold is None:
        reference_scores = scorer._scores(values, labels)
        threshold = float(np.percentile(reference_scores, DEFAULT_THRESHOLD_PERCENTILE))
    return replace(scorer, threshold=threshold)


def _gaussian(complete: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Mean, standard deviations (1 where constant) and correlation of the rows."""
    features = complete.shape[1]
    if features == 0:
        return np.empty(0), np.empty(0), np.empty((0, 0))
    covariance = np.atleast_2d(np.cov(complete, rowvar=False, ddof=1))
    deviation = np.sqrt(np.diag(covariance))
    scale = np.where(deviation > 0, deviation, 1.0)
    return complete.mean(axis=0), scale, covariance / np.outer(scale, scale)


def _impute(standardised: FloatArray, missing: BoolArray, correlation: FloatArray) -> FloatArray:
    """The standardised rows with each missing value replaced by its conditional
    mean given the row's observed values (0 when none is observed)."""
    if not missing.any():
        return standardised
    patterns, inverse = np.unique(missing, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    filled = standardised.copy()
    for pattern, rows in zip(patterns, groups, strict=True):
        if not pattern.any():
            continue
        observed = ~pattern
        inverse_observed = np.linalg.pinv(correlation[np.ix_(observed, observed)], hermitian=True)
        weights = correlation[np.ix_(pattern, observed)] @ inverse_observed
        filled[np.ix_(rows, pattern)] = standardised[np.ix_(rows, observed)] @ weights.T
    return filled


def _one_hot(categorical: StrArray, categories: tuple[StrArray, ...]) -> list[FloatArray]:
    """One block of indicator columns per feature; unseen categories are all zeros."""
    blocks: list[FloatArray] = []
    for column, known in zip(categorical.T, categories, strict=True):
        index = np.searchsorted(known, column)
        seen = known[np.minimum(index, known.size - 1)] == column
        block = np.zeros((column.size, known.size))
        block[np.flatnonzero(seen), index[seen]] = 1.0
        blocks.append(block)
    return blocks


def _numerical(values: npt.ArrayLike, field: str, columns: int | None = None) -> FloatArray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{field}: expected rows by features, not an array of shape {array.shape}")
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{field}: numerical values are numbers, not {array.dtype}")
    if columns is not None and array.shape[1] != columns:
        raise ValueError(f"{field}: {array.shape[1]} columns, the reference has {columns}")
    result = array.astype(np.float64, copy=False)
    if np.isinf(result).any():
        raise ValueError(f"{field}: infinite values; only NaN marks a missing value")
    return result


def _categorical(
    values: npt.ArrayLike, field: str, rows: int, columns: int | None = None
) -> StrArray:
    array: npt.NDArray[Any] = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{field}: expected rows by features, not an array of shape {array.shape}")
    if array.shape[0] != rows:
        raise ValueError(f"{field}: {array.shape[0]} rows, numerical has {rows}")
    if columns is not None and array.shape[1] != columns:
        raise ValueError(f"{field}: {array.shape[1]} columns, the reference has {columns}")
    if array.size and array.dtype.kind not in "UOT":
        raise ValueError(f"{field}: categorical values are strings, not {array.dtype}")
    return array.astype(np.str_, copy=False)
