"""Uncertainty of the evaluation's numbers: bootstrap intervals, paired comparisons, judges' agreement.

Pure functions of plain sequences. Every interval is a 95% percentile bootstrap (Efron & Tibshirani,
1993, Ch. 13): ``resamples`` (default :data:`RESAMPLES`) resamples of the items with replacement,
drawn by a ``torch.Generator`` seeded with ``seed``, so the same inputs give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

RESAMPLES = 1000
"""Default number of bootstrap resamples."""

LEVEL = 0.95
"""Default coverage of an interval."""

CHUNK = 100
"""Resamples drawn at once (bounds the memory to ``CHUNK x n`` indices)."""


@dataclass(frozen=True)
class Estimate:
    """A rate or mean with its bootstrap interval; every number None over no items."""

    value: float | None
    """The mean of the items (a rate when they are 0/1)."""
    low: float | None
    """Lower end of the interval."""
    high: float | None
    """Upper end of the interval."""
    n: int
    """How many items."""

    def as_dict(self) -> dict[str, Any]:
        """``{"value", "low", "high", "n"}``, for JSON."""
        return asdict(self)


def bootstrap_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Means of ``resamples`` resamples of ``values`` (with replacement), ``(resamples,)``; seeded."""
    generator = torch.Generator().manual_seed(seed)
    n = values.numel()
    means = []
    for start in range(0, resamples, CHUNK):
        rows = min(CHUNK, resamples - start)
        index = torch.randint(0, n, (rows, n), generator=generator)
        means.append(values[index].mean(dim=1))
    return torch.cat(means)


def percentile_interval(means: torch.Tensor, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of bootstrap means."""
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype))
    return float(low), float(high)


def bootstrap_estimate(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Estimate:
    """The mean of ``values`` with its percentile bootstrap interval.

    Args:
        values: One number per item (``True``/``False`` give a rate).
        resamples: Bootstrap resamples.
        seed: Seed of the resampling generator.
        level: Coverage of the interval.

    Returns:
        The estimate; ``value``, ``low`` and ``high`` are None when ``values`` is empty.
    """
    if not values:
        return Estimate(None, None, None, 0)
    data = torch.tensor([float(v) for v in values], dtype=torch.float64)
    low, high = percentile_interval(bootstrap_means(data, resamples, seed), level)
    return Estimate(float(data.mean()), low, high, len(values))


def paired_comparison(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, Any]:
    """Two policies' scores on the same prompts, compared prompt by prompt (higher is better).

    The interval of the mean difference is a paired bootstrap: prompts are resampled, and each keeps
    both of its scores, so the prompts' own spread cancels out.

    Args:
        a: Policy A's score per prompt (e.g. reward, or minus cost).
        b: Policy B's score on the same prompts, in the same order.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling generator.
        level: Coverage of the intervals.

    Returns:
        ``win_rate`` (share of prompts with a > b), ``tie_rate`` and ``loss_rate``, and
        ``mean_difference`` (mean of a - b), each as :meth:`Estimate.as_dict`; ``n``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same prompts: {len(a)} scores against {len(b)}")
    pairs = list(zip(a, b, strict=True))
    columns: dict[str, list[float]] = {
        "win_rate": [x > y for x, y in pairs],
        "tie_rate": [x == y for x, y in pairs],
        "loss_rate": [x < y for x, y in pairs],
        "mean_difference": [x - y for x, y in pairs],
    }
    # One seed for all four: each resample takes the same prompts in every column.
    out: dict[str, Any] = {k: bootstrap_estimate(v, resamples, seed, level).as_dict() for k, v in columns.items()}
    return {**out, "n": len(pairs)}


def accuracy(verdicts: Sequence[bool], truth: Sequence[bool]) -> float | None:
    """Share of items on which a judge's binary verdict equals the truth's; None over no items."""
    if len(verdicts) != len(truth):
        raise ValueError(f"agreement needs the same items: {len(verdicts)} verdicts against {len(truth)}")
    return sum(v == t for v, t in zip(verdicts, truth, strict=True)) / len(truth) if truth else None


def cohen_kappa(first: Sequence[bool], second: Sequence[bool]) -> float | None:
    """Cohen's κ of two judges' binary verdicts on the same items (Cohen, 1960).

    ``κ = (p_o - p_e) / (1 - p_e)``, with ``p_o`` the observed agreement and ``p_e`` the agreement
    expected by chance from each judge's own rate of ``True``: ``p1 p2 + (1 - p1)(1 - p2)``.

    Args:
        first: One judge's verdicts.
        second: The other judge's verdicts on the same items.

    Returns:
        κ in [-1, 1]; None over no items, or when chance agreement is 1 (both judges give one
        verdict only, so κ is undefined).
    """
    observed = accuracy(first, second)
    if observed is None:
        return None
    p1, p2 = sum(first) / len(first), sum(second) / len(second)
    chance = p1 * p2 + (1 - p1) * (1 - p2)
    return None if chance == 1 else (observed - chance) / (1 - chance)
