"""CT-level aggregation of RADnet's slice probabilities (paper, section 2.3).

Pure functions shared by the node's engine and by training/evaluation, so that a CT is called
positive by exactly the same rule everywhere: hemorrhage predicted in at least ``min_consecutive``
consecutive slices (3 in the paper).

The three quantities are tied together by one number, the *CT score* ``s``: the largest value ``m``
such that some ``min_consecutive`` consecutive slices all have probability ``>= m``. Equivalently,
``s`` is the maximum over all windows of ``min_consecutive`` consecutive slices of the smallest
probability in the window (the k-th order statistic of the best window). Therefore

* ``ct_decision(p, t, k)`` is ``True`` exactly when ``ct_score(p, k) >= t``, for every threshold
  ``t``; sweeping ``t`` over ``ct_score`` values traces the CT-level ROC curve of the rule itself;
* ``ct_certainty`` measures how far ``s`` lies from the threshold, on the side of the decision.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _as_probabilities(slice_probabilities: np.ndarray) -> np.ndarray:
    """Validate slice probabilities: 1-D, non-empty, finite, within [0, 1]."""
    p = np.asarray(slice_probabilities, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(
            f"slice_probabilities must be 1-D (one value per slice), got shape {p.shape}"
        )
    if p.size == 0:
        raise ValueError("slice_probabilities is empty: a CT needs at least one slice")
    if not np.all(np.isfinite(p)):
        raise ValueError("slice_probabilities contains NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"slice_probabilities must lie in [0, 1], got range [{p.min():.6g}, {p.max():.6g}]"
        )
    return p


def _check_rule(threshold: float, min_consecutive: int) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if isinstance(min_consecutive, bool) or int(min_consecutive) != min_consecutive:
        raise ValueError(f"min_consecutive must be an integer, got {min_consecutive!r}")
    if min_consecutive < 1:
        raise ValueError(f"min_consecutive must be at least 1, got {min_consecutive}")


def slices_needed(
    min_consecutive: int, min_extent_mm: float | None, slice_spacing_mm: float
) -> int:
    """Consecutive slices a series needs for a positive CT, when the run must also span a length.

    ``max(min_consecutive, ceil(min_extent_mm / slice_spacing_mm))``: the paper's count where the
    slices are thick enough, more slices on thin series, where 3 slices of 2 mm are only 6 mm of
    tissue. ``None`` (or a spacing that is not positive) leaves ``min_consecutive``.

    Raises
    ------
    ValueError
        If ``min_consecutive`` is not a positive integer or ``min_extent_mm`` is not positive.
    """
    _check_rule(0.5, min_consecutive)
    if min_extent_mm is None:
        return int(min_consecutive)
    if isinstance(min_extent_mm, bool) or not math.isfinite(min_extent_mm) or min_extent_mm <= 0:
        raise ValueError(f"min_extent_mm must be a positive number, got {min_extent_mm!r}")
    if not math.isfinite(slice_spacing_mm) or slice_spacing_mm <= 0:
        return int(min_consecutive)
    # the tolerance keeps 15 mm over 5 mm slices at 3 despite float noise in the spacing
    return max(int(min_consecutive), math.ceil(min_extent_mm / slice_spacing_mm - 1e-6))


def extent_setting(default: float | None, override: float | None) -> float | None:
    """The length rule in force: ``override`` when given (0 turns the rule off), else ``default``
    (a model card's or a training run's value)."""
    extent = default if override is None else override
    return float(extent) if extent else None


def rule_text(min_consecutive: int, min_extent_mm: float | None) -> str:
    """The CT decision rule in words, e.g. ``>= 3 consecutive slices spanning >= 12 mm``."""
    extent = "" if min_extent_mm is None else f" spanning >= {min_extent_mm:g} mm"
    return f">= {min_consecutive} consecutive slices{extent}"


def positive_runs(positive: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive ``True`` values, as half-open slice index ranges.

    Parameters
    ----------
    positive : np.ndarray
        1-D boolean array, one value per slice in order along the slice normal.

    Returns
    -------
    list of (start, stop)
        ``positive[start:stop]`` is all ``True`` for each run; runs in ascending order.

    Raises
    ------
    ValueError
        If ``positive`` is not 1-D.
    """
    flags = np.asarray(positive, dtype=bool)
    if flags.ndim != 1:
        raise ValueError(f"positive must be 1-D (one flag per slice), got shape {flags.shape}")
    # Pad with False on both ends so every run has a rising and a falling edge.
    edges = np.diff(np.concatenate(([False], flags, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def longest_positive_run(positive: np.ndarray) -> int:
    """Length of the longest run of consecutive positive slices.

    Parameters
    ----------
    positive : np.ndarray
        1-D boolean array, one value per slice in order along the slice normal.

    Returns
    -------
    int
        0 when no slice is positive.

    Raises
    ------
    ValueError
        If ``positive`` is not 1-D.
    """
    return max((stop - start for start, stop in positive_runs(positive)), default=0)


def ct_score(slice_probabilities: np.ndarray, min_consecutive: int = 3) -> float:
    """Continuous CT-level score: the best window's smallest slice probability.

    ``max over i of min(p[i : i + min_consecutive])``. It is the score whose thresholding reproduces
    ``ct_decision`` (see the module docstring), so it is the one to use for a CT-level ROC curve.

    Parameters
    ----------
    slice_probabilities : np.ndarray
        1-D hemorrhage probabilities, one per slice, in order along the slice normal.
    min_consecutive : int
        Number of consecutive slices the decision rule requires.

    Returns
    -------
    float
        In [0, 1]. A series with fewer than ``min_consecutive`` slices has no window and scores 0.0:
        the rule can never call it positive.

    Raises
    ------
    ValueError
        If the probabilities are not a non-empty 1-D array of finite values in [0, 1], or
        ``min_consecutive`` is not a positive integer.
    """
    p = _as_probabilities(slice_probabilities)
    _check_rule(0.5, min_consecutive)
    if p.size < min_consecutive:
        return 0.0
    return float(sliding_window_view(p, int(min_consecutive)).min(axis=1).max())


def ct_decision(
    slice_probabilities: np.ndarray, threshold: float = 0.5, min_consecutive: int = 3
) -> bool:
    """CT-level hemorrhage decision of the paper (section 2.3).

    A slice is positive when its probability is ``>= threshold``; the CT is positive when at least
    ``min_consecutive`` consecutive slices are positive.

    Parameters
    ----------
    slice_probabilities : np.ndarray
        1-D hemorrhage probabilities, one per slice, in order along the slice normal.
    threshold : float
        Slice-level operating point, strictly between 0 and 1.
    min_consecutive : int
        Minimum run length of positive slices (3 in the paper).

    Returns
    -------
    bool
        ``True`` when hemorrhage is called present.

    Raises
    ------
    ValueError
        On invalid probabilities, threshold or run length.
    """
    p = _as_probabilities(slice_probabilities)
    _check_rule(threshold, min_consecutive)
    return longest_positive_run(p >= threshold) >= min_consecutive


def ct_certainty(
    slice_probabilities: np.ndarray, threshold: float = 0.5, min_consecutive: int = 3
) -> float:
    """Certainty in [0.5, 1] of the CT-level decision made by ``ct_decision``.

    With ``s = ct_score(p, min_consecutive)`` and threshold ``t``:

    * positive decision (``s >= t``): ``0.5 + 0.5 * (s - t) / (1 - t)``
    * negative decision (``s < t``): ``0.5 + 0.5 * (t - s) / t``

    It is 0.5 at the decision boundary and 1.0 when the best window is certain (all its slices at
    probability 1 for a positive, or no window with any slice above 0 for a negative). For the
    paper's threshold 0.5 it reduces to ``s`` for a positive and ``1 - s`` for a negative: the
    smallest probability within the best run of ``min_consecutive`` slices, or its complement. A
    series shorter than ``min_consecutive`` slices is negative by rule with certainty 1.0.

    Parameters
    ----------
    slice_probabilities : np.ndarray
        1-D hemorrhage probabilities, one per slice, in order along the slice normal.
    threshold : float
        Slice-level operating point, strictly between 0 and 1.
    min_consecutive : int
        Minimum run length of positive slices.

    Returns
    -------
    float
        Certainty of the decision, in [0.5, 1].

    Raises
    ------
    ValueError
        On invalid probabilities, threshold or run length.
    """
    _check_rule(threshold, min_consecutive)
    s = ct_score(slice_probabilities, min_consecutive)
    if s >= threshold:
        return 0.5 + 0.5 * (s - threshold) / (1.0 - threshold)
    return 0.5 + 0.5 * (threshold - s) / threshold
