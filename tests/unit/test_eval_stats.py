"""The evaluation's uncertainty: bootstrap intervals on a known distribution, paired comparisons,
Cohen's κ on a table computed by hand, and accuracy against a ground-truth judge."""

from __future__ import annotations

import math

import pytest
import torch

from lit_saferlhf.commands.evaluate.stats import accuracy, bootstrap_estimate, cohen_kappa, paired_comparison


def test_bootstrap_interval_of_a_bernoulli_rate_covers_p_with_the_normal_width() -> None:
    p, n = 0.3, 4000
    draws = (torch.rand(n, generator=torch.Generator().manual_seed(1)) < p).tolist()
    estimate = bootstrap_estimate(draws, resamples=1000, seed=0)
    assert estimate.n == n
    assert estimate.low is not None
    assert estimate.high is not None
    assert estimate.value is not None
    assert estimate.low < p < estimate.high
    assert estimate.low < estimate.value < estimate.high
    normal_width = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert estimate.high - estimate.low == pytest.approx(normal_width, rel=0.15)


def test_bootstrap_is_seeded_and_empty_input_gives_no_numbers() -> None:
    values = [0.0, 1.0, 3.0, 2.0, 5.0, 1.0]
    assert bootstrap_estimate(values, seed=3) == bootstrap_estimate(values, seed=3)
    assert bootstrap_estimate(values, seed=3) != bootstrap_estimate(values, seed=4)
    assert bootstrap_estimate([]).as_dict() == {"value": None, "low": None, "high": None, "n": 0}
    constant = bootstrap_estimate([2.0] * 10)
    assert (constant.value, constant.low, constant.high) == (2.0, 2.0, 2.0)


def test_cohen_kappa_on_a_hand_computed_table() -> None:
    # 2x2 table: both yes 20, first only 5, second only 10, both no 15 (n = 50).
    # p_o = 35/50 = 0.7; p1 = 0.5, p2 = 0.6; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; κ = (0.7 - 0.5) / 0.5 = 0.4.
    first = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    second = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert accuracy(first, second) == pytest.approx(0.7)
    assert cohen_kappa(first, first) == pytest.approx(1.0)
    assert cohen_kappa(first, [not v for v in first]) == pytest.approx(-1.0)


def test_cohen_kappa_is_undefined_when_both_judges_give_one_verdict() -> None:
    assert cohen_kappa([True, True], [True, True]) is None
    assert cohen_kappa([], []) is None
    assert accuracy([], []) is None
    with pytest.raises(ValueError, match="same items"):
        accuracy([True], [True, False])


def test_paired_comparison_counts_wins_and_pairs_the_resamples() -> None:
    result = paired_comparison([3.0, 2.0, 5.0, 1.0], [1.0, 2.0, 4.0, 3.0])
    assert result["n"] == 4
    assert result["win_rate"]["value"] == pytest.approx(0.5)
    assert result["tie_rate"]["value"] == pytest.approx(0.25)
    assert result["loss_rate"]["value"] == pytest.approx(0.25)
    assert result["mean_difference"]["value"] == pytest.approx(0.25)
    # Prompts spread widely, A always exactly 1 above B: the paired interval is the point 1, and
    # A wins on every prompt, whatever the resample.
    b = [float(i * 10) for i in range(50)]
    paired = paired_comparison([x + 1 for x in b], b)
    assert (paired["mean_difference"]["low"], paired["mean_difference"]["high"]) == (1.0, 1.0)
    assert (paired["win_rate"]["low"], paired["win_rate"]["high"]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([1.0], [1.0, 2.0])
