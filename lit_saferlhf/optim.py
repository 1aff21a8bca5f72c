"""Optimiser set-up shared by every stage: AdamW parameter groups (no decay on norms and biases) and the lr schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lit_saferlhf.errors import require


@dataclass(frozen=True)
class OptimizerArgs:
    """AdamW and its learning-rate schedule for one network."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's moment decay rates."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    warmup_ratio: float = 0.03
    """Share of the run spent warming the learning rate up linearly from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a share of ``lr``."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", "a learning rate > 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(all(0 <= beta < 1 for beta in self.betas), "betas", "two numbers in [0, 1)", self.betas)
        require(self.eps > 0, "eps", "a number > 0", self.eps)
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "a fraction in [0, 1)", self.warmup_ratio)
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a fraction in [0, 1]", self.min_lr_ratio)


# Stages built in Python (not by the CLI) keep these in their checkpoints' hyper-parameters.
torch.serialization.add_safe_globals([OptimizerArgs])


def parameter_groups(module: nn.Module, args: OptimizerArgs) -> list[dict[str, Any]]:
    """Two AdamW groups: weights with decay, biases and norms (1-D tensors) without."""
    trainable = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
    decay = [param for _, param in trainable if param.ndim >= 2]
    no_decay = [param for _, param in trainable if param.ndim < 2]
    common = {"lr": args.lr, "betas": args.betas, "eps": args.eps}
    return [
        {"params": decay, "weight_decay": args.weight_decay, **common},
        {"params": no_decay, "weight_decay": 0.0, **common},
    ]


def lr_factor(step: int, total_steps: float, args: OptimizerArgs) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then the decay of ``args.schedule``."""
    warmup = math.ceil(args.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if args.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * decay


def build_optimizer(
    networks: Sequence[tuple[nn.Module, OptimizerArgs]], total_steps: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """One AdamW over every network, each with its own lr, decay and schedule (one per group).

    ``total_steps`` is a number as ``Trainer.estimated_stepping_batches`` gives it (an int, or a float).
    """
    groups: list[dict[str, Any]] = []
    schedules: list[Callable[[int], float]] = []
    for module, args in networks:
        for group in parameter_groups(module, args):
            groups.append(group)
            schedules.append(schedule_fn(total_steps, args))
    optimizer = torch.optim.AdamW(groups)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def schedule_fn(total_steps: float, args: OptimizerArgs) -> Callable[[int], float]:
    """``lr_factor`` bound to one network's arguments (LambdaLR takes one callable per group)."""
    return lambda step: lr_factor(step, total_steps, args)
