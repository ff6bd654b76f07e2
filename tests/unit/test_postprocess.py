"""Tests of the CT-level rule (>= 3 consecutive positive slices), its score and certainty."""

from __future__ import annotations

import numpy as np
import pytest

from radnet_node.postprocess import (
    ct_certainty,
    ct_decision,
    ct_score,
    extent_setting,
    longest_positive_run,
    positive_runs,
    rule_text,
    slices_needed,
)


def test_an_extent_override_replaces_the_default_and_zero_turns_the_rule_off() -> None:
    assert extent_setting(12.0, None) == 12.0
    assert extent_setting(None, None) is None
    assert extent_setting(12.0, 20.0) == 20.0
    assert extent_setting(12.0, 0.0) is None
    assert rule_text(3, None) == ">= 3 consecutive slices"
    assert rule_text(3, 12.0) == ">= 3 consecutive slices spanning >= 12 mm"


def test_slices_needed_keeps_the_paper_count_on_thick_slices_and_grows_on_thin_ones() -> None:
    assert slices_needed(3, None, 0.625) == 3
    assert slices_needed(3, 15.0, 5.0) == 3  # exactly 3 slices, despite float noise
    assert slices_needed(3, 15.0, 5.0000001) == 3
    assert slices_needed(3, 14.0, 3.0) == 5
    assert slices_needed(3, 14.0, 2.0) == 7
    assert slices_needed(3, 14.0, 10.0) == 3  # never fewer than the slice count
    assert slices_needed(3, 14.0, float("nan")) == 3  # spacing unknown: slices only
    with pytest.raises(ValueError, match="min_extent_mm"):
        slices_needed(3, 0.0, 5.0)
    with pytest.raises(ValueError, match="min_consecutive"):
        slices_needed(0, 14.0, 5.0)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], 0),
        ([0], 0),
        ([1], 1),
        ([0, 0, 0, 0], 0),
        ([1, 1, 1, 1], 4),
        ([1, 0, 1, 1, 0, 1, 1, 1, 0], 3),
        ([1, 1, 0, 1, 1], 2),
        ([0, 1, 1, 1, 1, 1], 5),
        ([1, 1, 1, 0, 0], 3),
    ],
)
def test_longest_positive_run_table(flags: list[int], expected: int) -> None:
    assert longest_positive_run(np.array(flags, dtype=bool)) == expected


def test_positive_runs_are_half_open_ranges_in_order() -> None:
    flags = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    assert positive_runs(flags) == [(0, 2), (4, 5), (6, 9)]
    assert positive_runs(np.zeros(3, dtype=bool)) == []


@pytest.mark.parametrize(
    ("probabilities", "threshold", "k", "expected"),
    [
        # the paper's rule: three consecutive slices at >= 0.5
        ([0.1, 0.6, 0.7, 0.8, 0.2], 0.5, 3, True),
        ([0.1, 0.6, 0.7, 0.2, 0.8, 0.9], 0.5, 3, False),  # two runs of 2 are not one run of 3
        ([0.9, 0.9, 0.4, 0.9, 0.9, 0.9], 0.5, 3, True),  # run at the very end
        ([0.5, 0.5, 0.5], 0.5, 3, True),  # the threshold itself counts as positive
        ([0.4999, 0.9, 0.9], 0.5, 3, False),
        ([0.9, 0.9], 0.5, 3, False),  # fewer slices than the rule needs
        ([0.9], 0.5, 1, True),
        ([0.2, 0.35, 0.4, 0.45], 0.3, 3, True),  # other operating point
        ([0.2, 0.35, 0.4, 0.45], 0.5, 3, False),
        ([0.6, 0.6, 0.6, 0.6], 0.5, 5, False),
    ],
)
def test_ct_decision_table(
    probabilities: list[float], threshold: float, k: int, expected: bool
) -> None:
    assert ct_decision(np.array(probabilities), threshold, k) is expected


@pytest.mark.parametrize(
    ("probabilities", "k", "expected"),
    [
        ([0.1, 0.6, 0.7, 0.8, 0.2], 3, 0.6),  # best window (0.6, 0.7, 0.8) -> its minimum
        ([0.9, 0.1, 0.9, 0.8, 0.95, 0.3], 3, 0.8),
        ([0.9, 0.9], 3, 0.0),  # no window of 3
        ([0.3, 0.2, 0.1], 3, 0.1),
        ([0.3, 0.2, 0.1], 1, 0.3),  # k = 1: the maximum
    ],
)
def test_ct_score_is_best_window_minimum(
    probabilities: list[float], k: int, expected: float
) -> None:
    assert ct_score(np.array(probabilities), k) == pytest.approx(expected)


def test_ct_score_thresholding_reproduces_the_decision_rule() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        p = rng.random(int(rng.integers(1, 12))) ** 2
        k = int(rng.integers(1, 5))
        t = float(rng.uniform(0.05, 0.95))
        assert ct_decision(p, t, k) == (ct_score(p, k) >= t)


@pytest.mark.parametrize(
    ("probabilities", "threshold", "expected"),
    [
        ([0.1, 0.6, 0.7, 0.8, 0.2], 0.5, 0.6),  # positive at t = 0.5: the best window's minimum
        ([0.1, 0.3, 0.2, 0.9, 0.2], 0.5, 0.8),  # negative at t = 0.5: 1 - 0.2
        ([1.0, 1.0, 1.0], 0.5, 1.0),
        ([0.0, 0.0, 0.0, 0.0], 0.5, 1.0),
        ([0.5, 0.5, 0.5], 0.5, 0.5),  # on the boundary
        ([0.2, 0.6, 0.6, 0.6], 0.2, 0.75),  # positive at t = 0.2: 0.5 + 0.5 * 0.4 / 0.8
        ([0.1, 0.1, 0.1], 0.2, 0.75),  # negative at t = 0.2: 0.5 + 0.5 * 0.1 / 0.2
        ([0.99, 0.99], 0.5, 1.0),  # too short: negative by rule
    ],
)
def test_ct_certainty_table(probabilities: list[float], threshold: float, expected: float) -> None:
    assert ct_certainty(np.array(probabilities), threshold, 3) == pytest.approx(expected)


def test_ct_certainty_stays_within_half_and_one() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        p = rng.random(int(rng.integers(1, 10)))
        c = ct_certainty(p, float(rng.uniform(0.05, 0.95)), 3)
        assert 0.5 <= c <= 1.0


@pytest.mark.parametrize(
    ("probabilities", "threshold", "k", "message"),
    [
        ([], 0.5, 3, "empty"),
        ([[0.1, 0.2]], 0.5, 3, "1-D"),
        ([0.1, np.nan, 0.3], 0.5, 3, "NaN"),
        ([0.1, 1.2], 0.5, 3, r"\[0, 1\]"),
        ([0.1, -0.1], 0.5, 3, r"\[0, 1\]"),
        ([0.1, 0.2], 0.0, 3, "threshold"),
        ([0.1, 0.2], 1.0, 3, "threshold"),
        ([0.1, 0.2], 0.5, 0, "min_consecutive"),
        ([0.1, 0.2], 0.5, 2.5, "min_consecutive"),
    ],
)
def test_invalid_input_is_refused_with_a_message(
    probabilities: list[float], threshold: float, k: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ct_decision(np.array(probabilities, dtype=float), threshold, k)
    with pytest.raises(ValueError, match=message):
        ct_certainty(np.array(probabilities, dtype=float), threshold, k)
