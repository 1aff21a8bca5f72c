"""Stage 4 of 4: PPO-Lagrangian (Safe RLHF, Dai et al., 2023, Sec. 3.3).

Maximise the reward model's score subject to ``E[cost] <= d``: sample responses, score them with
the frozen reward and cost models, shape both streams with the KL to the frozen reference
policy, estimate advantages with one critic per stream (GAE), and update the actor on
``(A_r - λ·A_c) / (1 + λ)``. A constraint solver (``plugins/solvers``) moves λ from the episode
cost once per rollout, identically on every rank.

Manual optimisation with ONE optimiser whose parameter groups hold the actor and both critics
(each with its own lr and schedule): DeepSpeed accepts a single optimiser, and one combined
backward per minibatch keeps DDP free of unused-parameter errors.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn

from lit_saferlhf.losses import (
    gae,
    gather_logprobs,
    kl_shaped_rewards,
    kl_to_reference,
    lagrangian_policy_loss,
    lm_loss,
    value_loss,
)
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export, load_tokenizer
from lit_saferlhf.models.score_model import ScoreModel
from lit_saferlhf.models.sharding import full_state_dict, shard
from lit_saferlhf.rollout import GenerationArgs, Generator, HFGenerate, Rollout, response_mask
from lit_saferlhf.solvers import ConstraintSolver
from lit_saferlhf.utils import OptimizerArgs, build_optimizer


@dataclass(frozen=True)
class PPOArgs:
    """PPO and reward-shaping settings (defaults: Safe RLHF's reference scripts)."""

    epochs: int = 1
    """Passes over each rollout."""
    minibatch_size: int = 16
    """Sequences per optimiser step."""
    clip_eps: float = 0.2
    """Half-width of the trust region on the probability ratio."""
    value_clip: float = 5.0
    """How far a critic's value may move from its rollout value before the loss clips it."""
    score_clip: float = 50.0
    """End reward and cost are clipped to ``±score_clip`` before shaping."""
    kl_coeff: float = 0.01
    """β: per-token KL penalty to the reference policy."""
    gamma: float = 1.0
    """Discount of GAE."""
    gae_lambda: float = 0.95
    """λ of GAE (not the Lagrange multiplier)."""
    cost_window: int = 128
    """The episode cost is the mean cost of the last ``cost_window`` sequences on each rank."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None: no clipping)."""
    ptx_coeff: float = 16.0
    """Weight of the PTX loss (LM loss on demonstrations) when the data carries them (``data.ptx_path``)."""


class PPOLagrangian(L.LightningModule):
    """Safe RLHF's PPO-Lagrangian; with ``FixedPenalty`` it is plain PPO or reward shaping.

    Args:
        policy: The SFT export (hub name or dir): the actor and the frozen reference start from it.
        reward_model: The reward model dir (a score model export).
        solver: The constraint solver that moves λ (``DualAscent``, ``PIDLagrangian``, ``FixedPenalty``).
        cost_model: The cost model dir; may be left out when the solver uses no cost (plain PPO).
        reward_critic: Initial reward critic; defaults to ``reward_model``.
        cost_critic: Initial cost critic; defaults to ``cost_model``.
        actor_optimizer: AdamW and schedule of the actor (reference: lr 1e-5, cosine).
        critic_optimizer: AdamW and schedule of both critics (reference: lr 5e-6).
        generation: Sampling settings.
        ppo: PPO, GAE and shaping settings.
        generator: The generation backend (default: Hugging Face ``generate``).
        dtype: Weights dtype of every network when loading (None: float32).
        gradient_checkpointing: Recompute activations of the trained networks in backward.
        export_dir: Where to write the aligned policy (Hugging Face dir) at the end of ``fit``.
    """

    def __init__(
        self,
        policy: str,
        reward_model: str,
        solver: ConstraintSolver,
        cost_model: str | None = None,
        reward_critic: str | None = None,
        cost_critic: str | None = None,
        actor_optimizer: OptimizerArgs = OptimizerArgs(lr=1e-5, weight_decay=0.01),
        critic_optimizer: OptimizerArgs = OptimizerArgs(lr=5e-6, weight_decay=0.0),
        generation: GenerationArgs = GenerationArgs(),
        ppo: PPOArgs = PPOArgs(),
        generator: Generator | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if solver.uses_cost and cost_model is None:
            raise ValueError(f"model.cost_model: {type(solver).__name__} needs a cost model dir")
        self.automatic_optimization = False
        self.save_hyperparameters(
            ignore=["solver", "generator", "actor_optimizer", "critic_optimizer", "generation", "ppo"]
        )
        self.paths = {"policy": policy, "reward": reward_model, "cost": cost_model}
        self.critic_paths = {"reward": reward_critic or reward_model, "cost": cost_critic or cost_model}
        self.solver, self.generator = solver, generator or HFGenerate()
        self.actor_args, self.critic_args = actor_optimizer, critic_optimizer
        self.generation, self.ppo = generation, ppo
        self.dtype_name, self.gradient_checkpointing, self.export_dir = dtype, gradient_checkpointing, export_dir
        self.tokenizer = load_tokenizer(ModelSource(path=policy))
        self.cost_window: deque[float] = deque(maxlen=ppo.cost_window)
        self.multiplier_history: list[float] = []
        self.actor: nn.Module | None = None

    def configure_model(self) -> None:
        """Build the six networks here, so sharded strategies can place them as they are created."""
        if self.actor is not None:
            return
        self.actor = self.policy_network(self.paths["policy"], trained=True)
        self.reference = self.policy_network(self.paths["policy"], trained=False)
        self.reward_model = self.score_network(self.paths["reward"], trained=False)
        self.reward_critic = self.score_network(self.critic_paths["reward"], trained=True)
        self.cost_model = self.score_network(self.paths["cost"], trained=False) if self.paths["cost"] else None
        self.cost_critic = (
            self.score_network(self.critic_paths["cost"], trained=True) if self.solver.uses_cost else None
        )
        self.train(self.training)  # from_pretrained returns eval mode; Lightning keeps modes as it finds them

    def policy_network(self, path: str, trained: bool) -> nn.Module:
        """The actor (trained) or the reference (frozen), sharded when the strategy gives a device mesh."""
        model = build_causal_lm(self.source(path, trained), self.tokenizer)
        return shard(model if trained else frozen(model), self.device_mesh)

    def score_network(self, path: str, trained: bool) -> nn.Module:
        """A critic (trained) or the reward/cost model (frozen), sharded when the strategy gives a device mesh."""
        model = ScoreModel.from_source(self.source(path, trained), self.tokenizer)
        return shard(model if trained else frozen(model), self.device_mesh)

    def source(self, path: str, trained: bool) -> ModelSource:
        """How to load one network (trained ones may use gradient checkpointing)."""
        checkpointing = trained and self.gradient_checkpointing
        return ModelSource(path=path, dtype=self.dtype_name, gradient_checkpointing=checkpointing)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """One prompt batch: roll out, step λ, then PPO epochs over minibatches."""
        started = time.perf_counter()
        rollout = self.collect_rollout(batch["input_ids"], batch["attention_mask"])  # no grad
        generated = time.perf_counter()

        # Every rank must step λ from the same number, or the multipliers drift apart.
        episode_cost = self.episode_cost(rollout.end_costs)
        solver_stats = self.solver.update(episode_cost)
        self.multiplier_history.append(self.solver.multiplier)

        minibatches = rollout.minibatches(self.ppo.minibatch_size, self.ppo.epochs)
        ptx = ptx_chunks(batch, len(minibatches))
        update_stats = [
            self.policy_update(minibatch, ptx[i % len(ptx)] if ptx else None) for i, minibatch in enumerate(minibatches)
        ]
        self.log_dict(
            {
                **average(update_stats),
                **solver_stats,
                **rollout_stats(rollout),
                "rollout/episode_cost": episode_cost,
                "time/generation_s": generated - started,
                "time/train_s": time.perf_counter() - generated,
            },
            prog_bar=False,
            batch_size=len(rollout),
        )

    @torch.no_grad()
    def collect_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Rollout:
        """Sample responses and score them: log-probs, end scores, values, GAE advantages."""
        sequences = self.generator.generate(
            self.actor,
            prompt_ids,
            prompt_mask,
            self.generation,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
        )  # (N, P + A)
        start = prompt_ids.shape[1]
        mask = response_mask(sequences[:, start:], self.tokenizer.eos_token_id)  # (N, A)
        prompt_mask = prompt_mask.repeat_interleave(self.generation.num_return_sequences, dim=0)
        attention = torch.cat([prompt_mask, mask.long()], dim=1)  # (N, P + A)
        old_logprobs = response_logprobs(self.actor, sequences, attention, start)
        ref_logprobs = response_logprobs(self.reference, sequences, attention, start)
        end_rewards = self.reward_model(sequences, attention).end_scores  # (N,)
        end_costs = (
            self.cost_model(sequences, attention).end_scores
            if self.cost_model
            else end_rewards.new_zeros(len(sequences))
        )
        reward_values = response_values(self.reward_critic, sequences, attention, start)
        cost_values = (
            response_values(self.cost_critic, sequences, attention, start)
            if self.cost_critic
            else torch.zeros_like(reward_values)
        )
        return self.estimate_advantages(
            sequences, attention, mask, old_logprobs, ref_logprobs, end_rewards, end_costs, reward_values, cost_values
        )

    def estimate_advantages(
        self,
        sequences: Tensor,
        attention: Tensor,
        mask: Tensor,
        old_logprobs: Tensor,
        ref_logprobs: Tensor,
        end_rewards: Tensor,
        end_costs: Tensor,
        reward_values: Tensor,
        cost_values: Tensor,
    ) -> Rollout:
        """KL-shaped reward and cost streams, then GAE for each critic."""
        shaping = {"kl_coeff": self.ppo.kl_coeff, "score_clip": self.ppo.score_clip}
        rewards = kl_shaped_rewards(end_rewards, old_logprobs, ref_logprobs, mask, kl_sign=-1.0, **shaping)  # (N, A)
        costs = kl_shaped_rewards(end_costs, old_logprobs, ref_logprobs, mask, kl_sign=1.0, **shaping)  # (N, A)
        reward_advantages, reward_returns = gae(rewards, reward_values, mask, self.ppo.gamma, self.ppo.gae_lambda)
        cost_advantages, cost_returns = gae(costs, cost_values, mask, self.ppo.gamma, self.ppo.gae_lambda)
        return Rollout(
            input_ids=sequences,
            attention_mask=attention,
            mask=mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            reward_values=reward_values,
            cost_values=cost_values,
            end_rewards=end_rewards,
            end_costs=end_costs,
            reward_advantages=reward_advantages,
            reward_returns=reward_returns,
            cost_advantages=cost_advantages,
            cost_returns=cost_returns,
        )

    def episode_cost(self, end_costs: Tensor) -> float:
        """Mean cost of this rank's last ``cost_window`` sequences, averaged over ranks."""
        self.cost_window.extend(end_costs.float().tolist())
        local = torch.tensor(sum(self.cost_window) / len(self.cost_window), device=self.device, dtype=torch.float64)
        return float(self.trainer.strategy.reduce(local, reduce_op="mean"))

    def policy_update(self, minibatch: Rollout, ptx: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """One optimiser step on actor + critics (+ PTX) with one combined backward."""
        optimizer = self.optimizers()
        assert isinstance(optimizer, LightningOptimizer)
        start = minibatch.input_ids.shape[1] - minibatch.mask.shape[1]
        logprobs = response_logprobs(self.actor, minibatch.input_ids, minibatch.attention_mask, start)
        multiplier = torch.tensor(self.solver.multiplier, device=logprobs.device)
        actor_loss, stats = lagrangian_policy_loss(
            logprobs,
            minibatch.old_logprobs,
            minibatch.reward_advantages,
            minibatch.cost_advantages,
            minibatch.mask,
            multiplier,
            clip_eps=self.ppo.clip_eps,
            normalize=self.solver.normalize_advantage,
        )
        loss, stats = actor_loss, {"loss/actor": actor_loss.detach(), **stats}
        for name, critic in (("reward", self.reward_critic), ("cost", self.cost_critic)):
            if critic is not None:
                critic_loss, critic_stats = self.critic_loss(name, critic, minibatch, start)
                loss = loss + critic_loss
                stats |= critic_stats
        if ptx is not None:
            logits = self.actor(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"]).logits
            ptx_loss, _ = lm_loss(logits, ptx["labels"])
            loss = loss + self.ppo.ptx_coeff * ptx_loss
            stats["loss/ptx"] = ptx_loss.detach()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.ppo.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        self.lr_schedulers().step()
        return stats

    def critic_loss(
        self, name: str, critic: nn.Module, minibatch: Rollout, start: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value loss of the ``name`` critic against its GAE returns."""
        values = response_values(critic, minibatch.input_ids, minibatch.attention_mask, start)
        old_values, returns = getattr(minibatch, f"{name}_values"), getattr(minibatch, f"{name}_returns")
        loss, stats = value_loss(values, old_values, returns, minibatch.mask, clip_range=self.ppo.value_clip)
        return loss, {
            f"loss/{name}_critic": loss.detach(),
            **{f"{name}_critic/{key}": value for key, value in stats.items()},
        }

    def train(self, mode: bool = True) -> PPOLagrangian:
        """Keep the frozen networks in eval mode whatever Lightning sets."""
        super().train(mode)
        for network in (
            getattr(self, "reference", None),
            getattr(self, "reward_model", None),
            getattr(self, "cost_model", None),
        ):
            if network is not None:
                network.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The solver's state, the cost window and λ's history, as plain Python data."""
        checkpoint["solver"] = self.solver.state_dict()
        checkpoint["cost_window"] = list(self.cost_window)
        checkpoint["multiplier_history"] = list(self.multiplier_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the same λ, solver state and cost window."""
        self.solver.load_state_dict(checkpoint["solver"])
        self.cost_window.extend(checkpoint["cost_window"])
        self.multiplier_history = list(checkpoint["multiplier_history"])

    def on_train_end(self) -> None:
        """Export the aligned policy and λ's history."""
        state = full_state_dict(self, "actor")  # every rank takes part in gathering a sharded model
        if self.export_dir and self.trainer.is_global_zero:
            self.export_to(self.export_dir, state)

    def export_to(self, out: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the actor as a Hugging Face dir with ``multiplier_history.json`` (also ``lit-saferlhf export``).

        Args:
            out: The dir to write (replaced atomically if it exists).
            state_dict: The actor's gathered full state when it is sharded; None writes the live weights.
        """
        out = export(self.actor, self.tokenizer, out, state_dict=state_dict)
        history = {"solver": type(self.solver).__name__, "multiplier": self.multiplier_history}
        (out / "multiplier_history.json").write_text(json.dumps(history))
        return out

    def configure_optimizers(self) -> dict:
        """One AdamW: actor and critics in their own parameter groups, each with its schedule."""
        rollout_size = self.trainer.datamodule.batch_size * self.generation.num_return_sequences
        updates_per_rollout = self.ppo.epochs * -(-rollout_size // self.ppo.minibatch_size)
        total = int(self.trainer.estimated_stepping_batches) * updates_per_rollout
        networks = [(self.actor, self.actor_args), (self.reward_critic, self.critic_args)]
        if self.cost_critic is not None:
            networks.append((self.cost_critic, self.critic_args))
        optimizer, scheduler = build_optimizer(networks, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def frozen(network: nn.Module) -> nn.Module:
    """Eval mode and no gradients: never in the optimiser."""
    network.eval()
    network.requires_grad_(False)
    return network


def position_ids(attention: Tensor) -> Tensor:
    """Positions that skip left padding, as generation counts them, ``(N, L)``."""
    return (attention.long().cumsum(-1) - 1).clamp_min(0)


def response_logprobs(model: nn.Module, sequences: Tensor, attention: Tensor, start: int) -> Tensor:
    """Log-probs of the response tokens ``sequences[:, start:]`` under ``model``, ``(N, A)``."""
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=position_ids(attention)).logits
    return gather_logprobs(logits[:, start - 1 : -1], sequences[:, start:])


def response_values(critic: nn.Module, sequences: Tensor, attention: Tensor, start: int) -> Tensor:
    """A critic's value of the state before each response token, ``(N, A)``."""
    return critic(sequences, attention).scores[:, start - 1 : -1]


def rollout_stats(rollout: Rollout) -> dict[str, Tensor]:
    """Mean reward, cost, KL to the reference and response length of a rollout."""
    return {
        "rollout/reward": rollout.end_rewards.mean(),
        "rollout/cost": rollout.end_costs.mean(),
        "rollout/kl": kl_to_reference(rollout.old_logprobs, rollout.ref_logprobs, rollout.mask),
        "rollout/response_length": rollout.mask.sum(-1).float().mean(),
    }


def ptx_chunks(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """The batch's ``ptx_*`` demonstrations split into up to ``parts`` chunks (none without PTX data)."""
    if "ptx_input_ids" not in batch:
        return []
    names = ("input_ids", "attention_mask", "labels")
    pieces = {name: torch.tensor_split(batch[f"ptx_{name}"], min(parts, len(batch["ptx_input_ids"]))) for name in names}
    return [dict(zip(names, chunk, strict=True)) for chunk in zip(*pieces.values(), strict=True)]


def average(stats: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Mean of each metric over minibatches."""
    return {key: torch.stack([s[key].float() for s in stats]).mean() for key in stats[0]}
