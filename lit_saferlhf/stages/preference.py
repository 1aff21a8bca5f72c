"""Offline preference optimisation: one stage for DPO, IPO, KTO, BFPO, SafeDPO, C-DPO, SACPO, MoCAN and PeCAN.

Starts from a policy (usually the SFT export, stage 1) and trains it on response pairs against a
frozen reference (by default the starting policy) with a swappable objective
(``lit_saferlhf.objectives.Objective``; built-ins in ``plugins/objectives``). Log-probabilities are
summed over response tokens, weighted by the objective's ``token_weights`` (METHODS.md §0): the sum for
DPO, KTO, BFPO, SafeDPO, C-DPO and CAN, as their papers and code do; IPO sums too (as OpenRLHF)
unless ``logprobs: token_mean`` divides by the response length, as TRL does. Objectives that
need scores take them from a reward and a cost *score source*: a score-model export, or the
implicit reward ``β·(ℓ_π − ℓ_ref)`` of a DPO-trained policy (PeCAN). C-DPO's multiplier is moved by a
constraint solver from the cost of the policy's own samples; CAN's λ* is fitted once, before
training, from scored reference samples. The export is a Hugging Face dir like SFT's, plus
``objective.json`` (the objective, its λ and the solver's state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from transformers import PreTrainedModel

from lit_saferlhf.data.templates import (
    load_template,
    policy_files,
    recorded_template,
    save_template,
    trained_template,
)
from lit_saferlhf.data.tokenizers import check_tokenizers, load_tokenizer
from lit_saferlhf.errors import ConfigError
from lit_saferlhf.generators import GenerationArgs, Generator, HFGenerate
from lit_saferlhf.losses import gather_logprobs, pair_metrics, response_mask
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from lit_saferlhf.models.frozen import ReferencePolicy, frozen, shared_frozen
from lit_saferlhf.models.peft import LoraArgs, describe_parameters, drop_frozen, restore_frozen
from lit_saferlhf.models.score_model import ScoreModel
from lit_saferlhf.models.sharding import full_state_dict, shard
from lit_saferlhf.objectives import Objective, PairBatch
from lit_saferlhf.optim import OptimizerArgs, build_optimizer

if TYPE_CHECKING:  # peft is imported where it is used
    from peft import PeftModel


@dataclass(frozen=True)
class ScoreSource:
    """Where a per-response score comes from: a score model, or the implicit reward of a DPO policy."""

    path: str
    """A score-model export (reward or cost stage), or a policy dir when ``implicit_beta`` is set."""
    implicit_beta: float | None = None
    """None: ``path`` is a score model (its end score). A number β: ``path`` is a policy trained by DPO from
    this stage's reference, and the score is its implicit reward ``β·(ℓ_π(y|x) − ℓ_ref(y|x))``."""
    negate: bool = False
    """Use minus the score (a safety model's implicit reward is a utility; as a cost it is negated)."""


torch.serialization.add_safe_globals([ScoreSource])


class PreferenceOptimization(L.LightningModule):
    """Trains a policy on response pairs with an offline objective against a frozen reference.

    Args:
        policy: The starting policy (hub name or dir; usually the SFT export).
        objective: The loss (``DPO``, ``IPO``, ``KTO``, ``BFPO``, ``SafeDPO``, ``CDPO``, ``MoCAN``, ``PeCAN``).
        reference: The frozen reference policy; defaults to ``policy`` (SACPO's second step names the first's export).
        reward_model: Reward scores for objectives that need them (C-DPO, MoCAN, PeCAN).
        cost_model: Cost scores (> 0 harmful) for objectives that need them.
        optimizer: AdamW and schedule (BFPO: lr 5e-7 cosine; SACPO: 2e-5 cosine).
        generation: Sampling settings for C-DPO's cost estimate and CAN's reference samples.
        generator: The generation backend (default: Hugging Face ``generate``).
        cache_reference: Keep each training pair's reference log-probs the first time it is seen, so later
            epochs skip the reference forward (valid while the objective's token weights are fixed per pair).
        dtype: Weights dtype of every network when loading (None: float32).
        gradient_checkpointing: Recompute the policy's activations in backward.
        lora: Train LoRA adapters on the policy instead of its full weights (None: full fine-tuning). When the
            reference is the starting policy, it is the policy with its adapters off (no second copy).
        export_dir: Where to write the trained policy (Hugging Face dir) at the end of ``fit``.
    """

    def __init__(
        self,
        policy: str,
        objective: Objective,
        reference: str | None = None,
        reward_model: ScoreSource | None = None,
        cost_model: ScoreSource | None = None,
        optimizer: OptimizerArgs = OptimizerArgs(lr=5e-7),
        generation: GenerationArgs = GenerationArgs(max_new_tokens=128),
        generator: Generator | None = None,
        cache_reference: bool = False,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraArgs | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_sources(objective, reward_model, cost_model)
        sources = {"reward_model": reward_model, "cost_model": cost_model}
        check_tokenizers(  # the reference and the score sources read the policy's token ids
            [("model.init_args.policy", policy), ("model.init_args.reference", reference)]
            + [(f"model.init_args.{key}.path", None if s is None else s.path) for key, s in sources.items()]
        )
        self.save_hyperparameters(ignore=["objective", "generator", "optimizer", "generation"])
        self.paths = {"policy": policy, "reference": reference or policy}
        self.sources = {"rewards": reward_model, "costs": cost_model}
        self.objective, self.generator = objective, generator or HFGenerate()
        self.optimizer_args, self.generation, self.cache_reference = optimizer, generation, cache_reference
        self.dtype_name, self.gradient_checkpointing, self.export_dir = dtype, gradient_checkpointing, export_dir
        self.lora = lora
        self.tokenizer = load_tokenizer(ModelSource(path=policy))
        self.default_template = recorded_template(policy)  # the pair data's template unless it sets one
        self.reference_cache: dict[int, Tensor] = {}
        self.last_dual_step = -1
        self.policy: PreTrainedModel | PeftModel | None = None  # built by configure_model

    def configure_model(self) -> None:
        """Build the policy, the frozen reference and the score sources the objective needs."""
        if self.policy is not None:
            return
        self.policy = self.causal_lm(self.paths["policy"], trained=True)
        self.reference = self.reference_network()
        self.scorers = nn.ModuleDict(
            {name: self.scorer(source) for name, source in self.sources.items() if source is not None}
        )
        # The objective's own frozen networks (ADPO's token scorer), loaded like a score source.
        networks = self.objective.frozen_networks(lambda path: self.scorer(ScoreSource(path)))
        self.objective_networks = nn.ModuleDict(networks)
        self.train(self.training)  # from_pretrained returns eval mode; Lightning keeps modes as it finds them
        rank_zero_info(describe_parameters(self))  # Lightning's logger: shown by `lit-saferlhf fit`

    def reference_network(self) -> nn.Module | ReferencePolicy:
        """The frozen reference: with LoRA and the starting policy as reference, the policy with adapters off."""
        if self.lora is not None and self.paths["reference"] == self.paths["policy"]:
            assert self.policy is not None  # configure_model builds it first
            return shared_frozen(self.policy)
        return self.causal_lm(self.paths["reference"], trained=False)

    def causal_lm(self, path: str, trained: bool) -> PreTrainedModel | PeftModel:
        """A policy network, trained (with LoRA when set) or frozen, sharded when the strategy gives a device mesh."""
        checkpointing, lora = trained and self.gradient_checkpointing, self.lora if trained else None
        source = ModelSource(path=path, dtype=self.dtype_name, gradient_checkpointing=checkpointing, lora=lora)
        model = build_causal_lm(source, self.tokenizer)
        return shard(model if trained else frozen(model), self.device_mesh)

    def scorer(self, source: ScoreSource) -> nn.Module:
        """The frozen network behind a score source."""
        if source.implicit_beta is not None:
            return self.causal_lm(source.path, trained=False)
        model = ScoreModel.from_source(ModelSource(path=source.path, dtype=self.dtype_name), self.tokenizer)
        return shard(frozen(model), self.device_mesh)

    def on_fit_start(self) -> None:
        """CAN: fit λ* once from scored reference samples (every rank takes rank 0's)."""
        if self.objective.dual_samples > 0 and self.objective.multiplier is None:
            rewards, costs = self.score_reference_samples()
            stats = self.trainer.strategy.broadcast(self.objective.fit_dual(rewards, costs), src=0)
            self.objective.load_state_dict({"multiplier": stats["multiplier"]})
            self.print(f"{type(self.objective).__name__}: λ* = {stats['multiplier']:.6g} ({stats})")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The objective on one batch of pairs (plus the buffer batch when the data has one)."""
        pairs = self.pair_batch(batch, cache=self.cache_reference)
        loss, stats = self.objective(pairs)
        if "buffer_input_ids" in batch:
            buffer = {key.removeprefix("buffer_"): value for key, value in batch.items() if key.startswith("buffer_")}
            buffer_loss, _ = self.objective(self.pair_batch(buffer, cache=False))
            loss = loss + self.objective.buffer_weight * buffer_loss
            stats["buffer_loss"] = buffer_loss.detach()
        self.log_dict(self.metrics("train", loss, stats, pairs), prog_bar=False, batch_size=len(pairs))
        return loss

    def pair_batch(self, batch: dict[str, Tensor], cache: bool) -> PairBatch:
        """Summed response log-probs of policy and reference, ``(B, 2)``, the data's labels and the scores."""
        weights = self.objective.token_weights(batch["response_mask"][:, 1:], batch)  # (2B, L - 1)
        assert self.policy is not None  # configure_model ran
        logprobs = summed_logprobs(self.policy, batch["input_ids"], batch["attention_mask"], weights)
        with torch.no_grad():
            ref_logprobs = self.reference_logprobs(batch, weights, cache)
            scores = {name: self.score(name, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                      for name in self.scorers}  # fmt: skip
        labels = {name: batch[name] for name in ("better", "safer", "is_safe") if name in batch}
        pairs = {name: values.view(-1, 2) for name, values in scores.items()}
        return PairBatch(logprobs.view(-1, 2), ref_logprobs.view(-1, 2), **labels, **pairs)

    def reference_logprobs(self, batch: dict[str, Tensor], weights: Tensor, cache: bool) -> Tensor:
        """The reference's summed log-probs ``(2B,)``, from the cache when every pair of the batch is in it."""
        indices = batch["index"].tolist()
        if cache and all(i in self.reference_cache for i in indices):
            return torch.cat([self.reference_cache[i] for i in indices]).to(weights.device)
        values = summed_logprobs(self.reference, batch["input_ids"], batch["attention_mask"], weights)
        if cache:
            self.reference_cache.update({i: pair.cpu() for i, pair in zip(indices, values.view(-1, 2), strict=True)})
        return values

    def score(self, name: str, ids: Tensor, attention: Tensor, responses: Tensor) -> Tensor:
        """Scores of sequences ``(N,)`` from the ``rewards`` or ``costs`` source; ``responses`` marks the response."""
        source, network = self.sources[name], self.scorers[name]
        assert source is not None  # there is a scorer only for a configured source
        if source.implicit_beta is None:
            values = network(ids, attention).end_scores.float()
        else:
            mask = responses[:, 1:].float()
            policy = summed_logprobs(network, ids, attention, mask)
            values = source.implicit_beta * (policy - summed_logprobs(self.reference, ids, attention, mask))
        return -values if source.negate else values

    def metrics(self, split: str, loss: Tensor, stats: dict[str, Tensor], pairs: PairBatch) -> dict[str, Any]:
        """Loss, the objective's stats, margins and accuracies per pair kind, and λ where there is one."""
        out: dict[str, Any] = {
            f"{split}/loss": loss.detach(),
            **{f"{split}/objective/{k}": v for k, v in stats.items()},
        }
        out |= {f"{split}/{k}": v for k, v in pair_metrics(pairs.logratios, pairs.better, pairs.safer).items()}
        if self.objective.multiplier is not None:
            out[f"{split}/multiplier"] = float(self.objective.multiplier)
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """C-DPO with ``update_every``: a dual step every that many optimiser steps (once under accumulation)."""
        every = self.objective.update_every
        due = every and self.global_step % every == 0 and self.global_step != self.last_dual_step
        if self.objective.solver is not None and due:
            self.last_dual_step = self.global_step
            self.dual_step()

    def on_train_epoch_end(self) -> None:
        """C-DPO without ``update_every``: a dual step at the end of every epoch."""
        if self.objective.solver is not None and not self.objective.update_every:
            self.dual_step()

    def dual_step(self) -> None:
        """Sample the policy on held-out prompts, score with the cost model, and step the solver on the mean."""
        solver = self.objective.solver
        assert solver is not None  # dual steps run only for objectives with a solver
        assert self.policy is not None  # configure_model ran
        costs = torch.cat([self.sample_and_score(self.policy, batch, 1, ("costs",))["costs"] for batch in
                           self.prompt_batches()])  # fmt: skip
        mean_cost = float(self.trainer.strategy.reduce(costs.mean().double(), reduce_op="mean"))
        stats = solver.update(mean_cost)
        self.log_dict({"dual/policy_cost": mean_cost, **{f"dual/{k}": v for k, v in stats.items()}})

    def score_reference_samples(self) -> tuple[Tensor, Tensor]:
        """``dual_samples`` reference samples per prompt, scored: rewards and costs ``(n, N)`` each."""
        count = self.objective.dual_samples
        scored = [self.sample_and_score(self.reference, batch, count, ("rewards", "costs"))
                  for batch in self.prompt_batches()]  # fmt: skip
        rewards, costs = (torch.cat([s[name] for s in scored]).view(-1, count).cpu() for name in ("rewards", "costs"))
        return rewards, costs

    def prompt_batches(self) -> list[dict[str, Tensor]]:
        """The datamodule's sampling prompts, on this device."""
        data = self.trainer.datamodule  # type: ignore[attr-defined]  # Lightning sets it at fit; Trainer declares none
        batches = data.prompt_batches(self.objective.sample_prompts, data.batch_size)
        return [{key: value.to(self.device) for key, value in batch.items()} for batch in batches]

    @torch.no_grad()
    def sample_and_score(
        self, model: nn.Module | ReferencePolicy, prompts: dict[str, Tensor], count: int, names: tuple[str, ...]
    ) -> dict[str, Tensor]:
        """Sample ``count`` responses per prompt from ``model`` and score each with the named sources."""
        was_training = model.training
        model.eval()
        args = replace(self.generation, num_return_sequences=count)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        sequences = self.generator.generate(model, prompts["input_ids"], prompts["attention_mask"], args, eos, pad)
        model.train(was_training)
        start = prompts["input_ids"].shape[1]
        responses = response_mask(sequences[:, start:], eos)  # (N, A)
        prompt_mask = prompts["attention_mask"].repeat_interleave(count, dim=0)
        attention = torch.cat([prompt_mask, responses.long()], dim=1)
        marks = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), responses], dim=1)
        return {name: self.score(name, sequences, attention, marks) for name in names}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The objective and the pair metrics on held-out pairs."""
        pairs = self.pair_batch(batch, cache=False)
        loss, stats = self.objective(pairs)
        self.log_dict(self.metrics("val", loss, stats, pairs), batch_size=len(pairs), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The objective's λ and solver state, as plain Python data, and the template; with LoRA, no frozen base."""
        checkpoint["objective"] = self.objective.state_dict()
        save_template(self, checkpoint)
        drop_frozen(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the same λ and solver state; restore the template; with LoRA, the base comes from its dir."""
        self.objective.load_state_dict(checkpoint["objective"])
        load_template(self, checkpoint)
        restore_frozen(checkpoint, self)

    def on_train_end(self) -> None:
        """Export the trained policy with ``objective.json``."""
        state = full_state_dict(self, "policy")  # every rank takes part in gathering a sharded model
        if self.export_dir and self.trainer.is_global_zero:
            self.export_to(self.export_dir, state)

    def export_to(self, out: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the policy as a Hugging Face dir with ``objective.json`` and the template (``lit_saferlhf.json``).

        Every file is written into a staging dir beside ``out`` that is renamed into place, so an
        interrupted export never leaves a dir without its ``objective.json``. With LoRA the adapters are
        merged into the weights, or written alone in ``peft``'s format (``LoraArgs.export``).
        """
        summary = {**self.objective.state_dict(), "settings": objective_settings(self.objective)}
        extra = {"objective.json": json.dumps(summary, indent=2, default=str)}
        extra |= policy_files(trained_template(self))  # lit_saferlhf.json: the template
        assert self.policy is not None  # configure_model ran
        return export(self.policy, self.tokenizer, out, state_dict=state_dict, extra_files=extra)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW without decay on biases and norms; warm-up then the configured decay, per step."""
        assert self.policy is not None  # configure_model ran
        optimizer, scheduler = build_optimizer(
            [(self.policy, self.optimizer_args)], self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_sources(objective: Objective, reward_model: ScoreSource | None, cost_model: ScoreSource | None) -> None:
    """Stop at start-up when the objective needs a score source that is not configured."""
    needs = set(objective.requires) | ({"costs"} if objective.solver is not None else set())
    needs |= {"rewards", "costs"} if objective.dual_samples > 0 else set()
    for name, key, source in (("rewards", "reward_model", reward_model), ("costs", "cost_model", cost_model)):
        if name in needs and source is None:
            raise ConfigError(
                f"model.init_args.{key}",
                f"the objective {type(objective).__name__} needs {name} scores: set {key}: {{path: <score-model "
                "dir>}} (or a DPO policy with implicit_beta)",
            )


def objective_settings(objective: Objective) -> dict[str, Any]:
    """The objective's plain settings (numbers, strings, flags), for ``objective.json``."""
    return {k: v for k, v in vars(objective).items() if isinstance(v, int | float | str | bool | type(None))}


def summed_logprobs(model: nn.Module | ReferencePolicy, ids: Tensor, attention: Tensor, weights: Tensor) -> Tensor:
    """``Σ_t w_t log π(y_t | y_<t)`` per sequence, ``(N,)``; ``weights`` align with the targets ``ids[:, 1:]``."""
    positions = (attention.long().cumsum(-1) - 1).clamp_min(0)  # skips left padding of sampled sequences
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits  # (N, L, V)
    logprobs = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (N, L - 1)
    return (logprobs * weights.to(logprobs.dtype)).sum(-1)
