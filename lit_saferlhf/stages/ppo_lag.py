"""Stage 4 of 4: PPO-Lagrangian (Safe RLHF, Dai et al., 2023, Sec. 3.3).

Maximise the reward model's score subject to ``E[cost] <= d``: sample responses, score them with
the frozen reward and cost models, shape both streams with the KL to the frozen reference
policy (or keep the KL as a separate loss term), turn each stream into advantages on its own with
an advantage estimator, and update the actor on ``(A_r - λ·A_c) / (1 + λ)``. A constraint solver
(``plugins/solvers``) moves λ from the episode cost once per rollout, identically on every rank.

Several constraints (``constraints``, ``stages/constraints.py``) each bring a cost, a limit ``d_k`` and
their own solver; the actor then trains on ``(A_r - Σ_k λ_k A_ck) / (1 + Σ_k λ_k)`` (METHODS.md §6.2),
a constraint may bound one prompt category or every response (RePO), and its cost may come from a
scorer (``lit_saferlhf.scorers``: a guard model, a rule) instead of a trained cost model.

The estimator (``lit_saferlhf.advantages``) is GAE with one critic per stream by default (six
networks: actor, reference, reward and cost models, two critics); the critic-free ones in
``plugins/advantages`` (GRPO's group z-score, RLOO's leave-one-out mean) compare the
``generation.num_return_sequences`` samples of each prompt instead, and the stage then builds,
trains and saves no critics (four networks).

Manual optimisation with ONE optimiser whose parameter groups hold the actor and its critics
(each with its own lr and schedule): DeepSpeed accepts a single optimiser, and one combined
backward per minibatch keeps DDP free of unused-parameter errors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel

from lit_saferlhf.advantages import GAE, AdvantageEstimator
from lit_saferlhf.data.templates import (
    load_template,
    policy_files,
    recorded_template,
    save_template,
    trained_template,
)
from lit_saferlhf.data.tokenizers import check_tokenizers, load_tokenizer
from lit_saferlhf.errors import ConfigError, require
from lit_saferlhf.generators import GenerationArgs, Generator, HFGenerate
from lit_saferlhf.losses import (
    appo_lagrangian_mask,
    appo_surrogate_loss,
    clipped_surrogate_loss,
    constrained_advantage,
    k3_kl_loss,
    kl_shaped_rewards,
    kl_to_reference,
    lm_loss,
    response_mask,
    value_loss,
)
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from lit_saferlhf.models.frozen import ReferencePolicy, frozen, shared_frozen
from lit_saferlhf.models.layouts import check_model_path, require_policy, require_score_model
from lit_saferlhf.models.logprobs import response_logprobs as chunked_response_logprobs
from lit_saferlhf.models.peft import LoraArgs, drop_frozen, parameter_counts, restore_frozen
from lit_saferlhf.models.score_model import ScoreModel
from lit_saferlhf.models.sharding import full_state_dict, shard
from lit_saferlhf.optim import OptimizerArgs, build_optimizer
from lit_saferlhf.scorers import Samples, Scorer, ScorerContext, checked_scores, split_stream_key
from lit_saferlhf.solvers import ConstraintSolver
from lit_saferlhf.stages.constraints import (
    COST_MODEL,
    Constraint,
    ConstraintLedger,
    check_constraints,
    response_weights,
    stream_costs,
)
from lit_saferlhf.stages.rollout import Rollout

if TYPE_CHECKING:  # peft is imported where it is used
    from peft import PeftModel


@dataclass(frozen=True)
class APPOArgs:
    """APPO (Equilibrate RLHF's AMA on PPO), a variant of the actor loss with its own parameter.

    The clipped surrogate keeps only the response tokens whose Lagrangian critic value ``V_r - λ·V_c`` agrees in
    sign with their advantage ``A_r - λ·A_c`` (``lit_saferlhf.losses.appo_lagrangian_mask``, decisions in
    ``lit_saferlhf_plugins.objectives.ama``), averaged over each sequence's kept tokens, then over all sequences
    (``lit_saferlhf.losses.appo_surrogate_loss``). Needs critics (GAE) and ``loss_aggregation: sequence_mean``.
    """

    baseline: float = 0.0
    """``b`` of the sign test: a token is kept where ``V > b`` if ``A >= 0``, where ``V < b`` if ``A < 0``."""


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
    """Each per-token stream is clipped to ``±score_clip`` after the end score is added to its last token's
    KL term (as safe-rlhf clips), so the end score itself is clipped only where it exceeds the bound."""
    kl_coeff: float = 0.01
    """β: weight of the KL to the reference policy (a reward penalty or a loss term, see ``kl_penalty``)."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """``reward``: ``-β·KL_t`` shapes the reward stream and ``+β·KL_t`` the cost stream, per token (Safe RLHF).
    ``loss``: the streams hold the end scores only, and ``β·k3`` (``exp(ref - logp) - (ref - logp) - 1``, averaged
    over response tokens by ``loss_aggregation``) is added to the actor loss (GRPO's form)."""
    loss_aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    """How the actor loss (and the k3 term) averages tokens: ``sequence_mean`` averages each response, then the
    batch (safe-rlhf, every response weighs the same); ``token_mean`` averages all response tokens of the
    minibatch (align-anything's GRPO, long responses weigh more)."""
    cost_window: int = 128
    """The episode cost is the mean cost of the last ``cost_window`` sequences on each rank."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None: no clipping)."""
    ptx_coeff: float = 16.0
    """Weight of the PTX loss (LM loss on demonstrations) when the data carries them (``data.ptx_path``)."""
    normalize_advantage: bool = True
    """Divide the actor's advantage by ``1 + Σ_k λ_k`` (Safe RLHF). False: ``A_r - Σ_k λ_k A_ck`` as it is, Constrained
    GRPO's form (Girgis et al., 2026), where each stream was normalised within its group first."""
    appo: APPOArgs | None = None
    """The actor loss: None, the clipped surrogate on every response token; ``{baseline: b}``, APPO (``APPOArgs``:
    only the tokens whose Lagrangian critic value agrees with their advantage). APPO needs critics (GAE)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "minibatch_size", "cost_window"):
            require(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        for key in ("clip_eps", "value_clip", "score_clip"):
            require(getattr(self, key) > 0, key, "a number > 0", getattr(self, key))
        for key in ("kl_coeff", "ptx_coeff"):
            require(getattr(self, key) >= 0, key, "a number >= 0", getattr(self, key))
        norm = self.max_grad_norm
        require(norm is None or norm > 0, "max_grad_norm", "None or a number > 0", norm)
        require(self.kl_penalty in ("reward", "loss"), "kl_penalty", "'reward' or 'loss'", self.kl_penalty)
        aggregations = ("sequence_mean", "token_mean")
        require(
            self.loss_aggregation in aggregations, "loss_aggregation", " or ".join(aggregations), self.loss_aggregation
        )
        if self.appo is not None:  # APPO averages each sequence's kept tokens, then all sequences
            expected = "sequence_mean with appo (APPO's per-sequence mean)"
            require(self.loss_aggregation == "sequence_mean", "loss_aggregation", expected, self.loss_aggregation)


NETWORKS = ("actor", "reference", "reward_model", "cost_model", "reward_critic", "cost_critic")
"""Attribute names of every network the stage may hold (frozen ones: reference, reward and cost models)."""
KL_SIGNS = {"reward": -1.0, "cost": 1.0}
"""The sign of ``β·KL_t`` in each stream a solver may name: a penalty on the reward, an addition to the cost."""


class PPOLagrangian(L.LightningModule):
    """Safe RLHF's PPO-Lagrangian; with ``FixedPenalty`` it is plain PPO or reward shaping.

    With a critic-free ``advantage`` (``GroupNormalized``, ``LeaveOneOut``) it is GRPO- or RLOO-Lagrangian
    with the same solvers; ``FixedPenalty(0)`` then gives plain GRPO or RLOO.

    Args:
        policy: The SFT export (hub name or dir): the actor and the frozen reference start from it.
        reward_model: The reward model dir (a score model export).
        solver: The constraint solver that moves λ (``DualAscent``, ``PIDLagrangian``, ``FixedPenalty``): one
            constraint on the cost model. Give either it or ``constraints``.
        cost_model: The cost model dir; may be left out when no constraint reads it, or when its solver uses
            no cost (plain PPO).
        constraints: Several constraints, each with a name, a cost (``cost_model`` or a scorer's stream), its own
            solver (whose ``cost_limit`` is ``d_k``), an optional prompt category and RePO's ``rectified``
            (``stages/constraints.py``). ``solver: S`` is ``constraints: [{name: cost, solver: S}]``.
        scorers: Named scorers whose streams constraints may use as costs (``GuardScorer``, ``FunctionScorer``,
            ``ScoreModelScorer``); frozen, built and placed with the other networks.
        reward_critic: Initial reward critic; defaults to ``reward_model``.
        cost_critic: Initial cost critic; defaults to ``cost_model``.
        actor_optimizer: AdamW and schedule of the actor (reference: lr 1e-5, cosine).
        critic_optimizer: AdamW and schedule of the critics (reference: lr 5e-6); unused without critics.
        generation: Sampling settings.
        ppo: PPO, KL and loss-aggregation settings.
        advantage: The advantage estimator, run on the reward and the cost stream separately (default: ``GAE``,
            a critic per stream; ``GroupNormalized`` or ``LeaveOneOut`` need no critic and at least 2
            ``generation.num_return_sequences``).
        generator: The generation backend (default: Hugging Face ``generate``).
        dtype: Weights dtype of every network when loading (None: float32).
        gradient_checkpointing: Recompute activations of the trained networks in backward.
        export_dir: Where to write the aligned policy (Hugging Face dir) at the end of ``fit``.
        lora: Train LoRA adapters instead of full weights (None: full fine-tuning). The frozen networks then
            share the trained ones' bases: the reference is the actor with its adapters off, each frozen
            score model its critic's backbone with the adapter off (``models/frozen.py``).
        rollouts: Stop after this many rollouts (one prompt batch each): sets ``trainer.max_steps``, which counts
            optimiser steps, to ``rollouts × ppo.epochs × ⌈batch_size × num_return_sequences / minibatch_size⌉``
            at start-up (leave ``trainer.max_steps`` unset). None: ``trainer.max_steps`` / ``max_epochs`` decide.
    """

    def __init__(
        self,
        policy: str,
        reward_model: str,
        solver: ConstraintSolver | None = None,
        cost_model: str | None = None,
        constraints: list[Constraint] | None = None,
        scorers: dict[str, Scorer] | None = None,
        reward_critic: str | None = None,
        cost_critic: str | None = None,
        actor_optimizer: OptimizerArgs = OptimizerArgs(lr=1e-5, weight_decay=0.01),
        critic_optimizer: OptimizerArgs = OptimizerArgs(lr=5e-6, weight_decay=0.0),
        generation: GenerationArgs = GenerationArgs(),
        ppo: PPOArgs = PPOArgs(),
        advantage: AdvantageEstimator | None = None,
        generator: Generator | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        lora: LoraArgs | None = None,
        rollouts: int | None = None,
    ) -> None:
        super().__init__()
        dirs = {"policy": policy, "reward_model": reward_model, "cost_model": cost_model}
        given = {**dirs, "reward_critic": reward_critic, "cost_critic": cost_critic}
        for key, path in given.items():
            if path is not None:
                check_model_path(path, key)  # "model dir not found: PATH", before anything is loaded
        for key, path in given.items():  # of the kind its role needs (a hub model is checked as it loads)
            if path is not None and Path(path).is_dir():
                (require_policy if key == "policy" else require_score_model)(path, f"model.init_args.{key}")
        check_tokenizers([(f"model.init_args.{key}", path) for key, path in given.items()])  # score models read ids
        shared_bases = (reward_critic or reward_model, cost_critic or cost_model) == (reward_model, cost_model)
        if lora is not None and not shared_bases:
            raise ConfigError(
                "model.reward_critic / model.cost_critic",
                "with model.lora each critic is an adapter on its score "
                "model's backbone; leave them unset (or equal to model.reward_model / model.cost_model)",
            )
        if (solver is None) == (constraints is None):
            raise ConfigError(
                "model.init_args.solver / model.init_args.constraints",
                "exactly one of them: a solver (one constraint on the cost model) or a list of constraints",
            )
        self.constraints = constraints or [Constraint("cost", cast(ConstraintSolver, solver))]
        check_constraints(self.constraints)
        self.scorer_map: dict[str, Scorer] = dict(scorers or {})
        self.scorers = nn.ModuleDict(self.scorer_map)  # placed, sharded and put in eval mode with the stage
        for i, constraint in enumerate(self.constraints):
            if constraint.cost == COST_MODEL:
                if constraint.solver.needs_cost_model() and cost_model is None:
                    raise ConfigError("model.cost_model", f"{type(constraint.solver).__name__} needs a cost model dir")
            else:
                split_stream_key(constraint.cost, self.scorer_map, f"model.init_args.constraints[{i}].cost")
        if ppo.appo is not None and len(self.constraints) > 1:
            raise ConfigError("model.init_args.ppo.appo", "APPO's mask is defined for one constraint; use one")
        if lora is not None and (len(self.constraints) > 1 or self.constraints[0].cost != COST_MODEL):
            raise ConfigError(
                "model.init_args.lora",
                "LoRA shares each critic's backbone with its frozen score model: one constraint on the cost model",
            )
        if ppo.appo is not None and advantage is not None and not advantage.needs_critics:
            raise ConfigError(
                "model.init_args.ppo.appo",
                f"APPO masks tokens by critic values; {type(advantage).__name__} has no critic (use GAE)",
            )
        self.advantage = advantage or GAE()
        check_estimator(self.advantage, generation, reward_critic, cost_critic)
        self.automatic_optimization = False
        self.save_hyperparameters(
            ignore=[
                "solver",
                "constraints",
                "scorers",
                "advantage",
                "generator",
                "actor_optimizer",
                "critic_optimizer",
                "generation",
                "ppo",
            ]
        )
        self.paths = {"policy": policy, "reward": reward_model, "cost": cost_model}
        self.critic_paths = {"reward": reward_critic or reward_model, "cost": cost_critic or cost_model}
        self.generator = generator or HFGenerate()
        self.actor_args, self.critic_args = actor_optimizer, critic_optimizer
        self.generation, self.ppo = generation, ppo
        self.dtype_name, self.gradient_checkpointing, self.export_dir = dtype, gradient_checkpointing, export_dir
        require(rollouts is None or rollouts >= 1, "rollouts", "None or an integer >= 1", rollouts)
        self.lora, self.rollouts = lora, rollouts
        self.tokenizer = load_tokenizer(ModelSource(path=policy))
        self.default_template = recorded_template(policy)  # the prompt data's template unless it sets one
        self.ledger = ConstraintLedger(self.constraints, ppo.cost_window)
        self.actor: PreTrainedModel | PeftModel | None = None  # built by configure_model

    def setup(self, stage: str) -> None:
        """Check the constraints' categories against the prompts; with ``rollouts``, set ``trainer.max_steps``.

        ``trainer.max_steps`` counts optimiser steps: ``rollouts`` times the steps of one rollout.
        """
        if stage == "fit":
            self.check_categories()
        if self.rollouts is None or stage != "fit":
            return
        if self.trainer.max_steps != -1:
            expected = f"unset when model.init_args.rollouts is set ({self.rollouts}): rollouts sets it"
            raise ConfigError("trainer.max_steps", expected, self.trainer.max_steps)
        self.trainer.fit_loop.epoch_loop.max_steps = self.rollouts * self.updates_per_rollout()

    def configure_model(self) -> None:
        """Build the networks here (six with GAE, four without critics), so sharded strategies can place them."""
        if self.actor is not None:
            return
        self.actor = self.policy_network(required(self.paths, "policy"), trained=True)
        self.generator.check_model(self.actor)  # an unsupported model fails here, not at the first rollout
        critics = self.critic_names()
        for name in critics:
            setattr(self, critic_attribute(name), self.score_network(self.critic_path(name), trained=True))
        # β = 0: the KL enters neither the rewards nor the loss, so no reference is built and no log-probs computed.
        self.reference = self.frozen_network("policy", self.actor) if self.ppo.kl_coeff > 0 else None
        self.reward_model = self.frozen_network("reward", getattr(self, "reward_critic", None))
        cost_critic = getattr(self, "cost_critic", None)
        self.cost_model = self.frozen_network("cost", cost_critic) if self.paths["cost"] else None
        policy, mesh = required(self.paths, "policy"), self.device_mesh
        context = ScorerContext(policy, self.tokenizer, self.dtype_name, lambda m: shard(frozen(m), mesh))
        for name in self.scorer_map:
            self.scorer_map[name].configure(context)
        self.train(self.training)  # from_pretrained returns eval mode; Lightning keeps modes as it finds them
        rank_zero_info(self.network_summary())  # Lightning's logger: shown by `lit-saferlhf fit`

    def streamed(self) -> list[Constraint]:
        """The constraints whose solver keeps a cost stream (advantages, a critic under GAE).

        The others (``FixedPenalty``'s reward shaping) fold their cost into the reward's end score.
        """
        return [c for c in self.constraints if "cost" in c.solver.stream_names()]

    def check_categories(self) -> None:
        """Refuse a constraint bound to a category that no training prompt has, before any network is built."""
        wanted = {i: c.category for i, c in enumerate(self.constraints) if c.category is not None}
        if not wanted:
            return
        data = self.trainer.datamodule  # type: ignore[attr-defined]  # Lightning sets it at fit
        have = data.categories()
        if not have:
            expected = "the prompts' category column (constraints are bound to categories)"
            raise ConfigError("data.init_args.category_column", expected, getattr(data, "category_column", None))
        for i, category in wanted.items():
            if category not in have:
                expected = f"a category of the training prompts ({', '.join(sorted(have))})"
                raise ConfigError(f"model.init_args.constraints[{i}].category", expected, category)

    def critic_names(self) -> tuple[str, ...]:
        """The critics this run builds and trains: the reward's and one per cost stream with GAE, none without."""
        return ("reward", *(c.name for c in self.streamed())) if self.advantage.needs_critics else ()

    def critic_path(self, name: str) -> str:
        """Where a critic starts: its own dir, else its score model's.

        Every cost critic starts from ``cost_critic`` (or the cost model) when given, else from the reward critic's
        dir (a constraint whose cost is a guard or a rule has no score model of its own).
        """
        if name == "reward":
            return required(self.critic_paths, "reward")
        return self.critic_paths["cost"] or required(self.critic_paths, "reward")

    def held_networks(self) -> dict[str, nn.Module]:
        """Every network this run holds, by attribute name (scorers' networks under ``scorers``)."""
        names = [*NETWORKS, *(critic_attribute(name) for name in self.critic_names())]
        held = {name: getattr(self, name) for name in dict.fromkeys(names) if getattr(self, name, None) is not None}
        return held | ({"scorers": self.scorers} if len(self.scorers) else {})

    def network_summary(self) -> str:
        """One start-up line: the networks held, their parameters (shared ones counted once) and how many train."""
        held, trained = parameter_counts(self)
        names = list(self.held_networks())
        no_reference = "; no reference policy: ppo.kl_coeff is 0, so nothing reads its log-probs"
        return (
            f"{type(self).__name__} holds {len(names)} networks ({', '.join(names)}) with "
            f"{type(self.advantage).__name__}: {held:,} parameters, {trained:,} trained"
        ) + (no_reference if self.ppo.kl_coeff == 0 else "")

    def policy_network(self, path: str, trained: bool) -> PreTrainedModel | PeftModel:
        """The actor (trained) or the reference (frozen), sharded when the strategy gives a device mesh."""
        model = build_causal_lm(self.source(path, trained), self.tokenizer)
        return shard(model if trained else frozen(model), self.device_mesh)

    def score_network(self, path: str, trained: bool) -> nn.Module:
        """A critic (trained) or the reward/cost model (frozen), sharded when the strategy gives a device mesh."""
        model = ScoreModel.from_source(self.source(path, trained), self.tokenizer)
        return shard(model if trained else frozen(model), self.device_mesh)

    def frozen_network(self, name: str, trained: nn.Module | None) -> nn.Module | ReferencePolicy:
        """The frozen ``name`` network: with LoRA, the ``trained`` one's base with its adapters off; else a copy."""
        if self.lora is not None and trained is not None:
            return shared_frozen(trained)
        build = self.policy_network if name == "policy" else self.score_network
        return build(required(self.paths, name), trained=False)

    def source(self, path: str, trained: bool) -> ModelSource:
        """How to load one network (trained ones may use gradient checkpointing and LoRA)."""
        checkpointing = trained and self.gradient_checkpointing
        lora = self.lora if trained else None
        return ModelSource(path=path, dtype=self.dtype_name, gradient_checkpointing=checkpointing, lora=lora)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One prompt batch: roll out, step λ, then PPO epochs over minibatches."""
        started = time.perf_counter()
        rollout = self.collect_rollout(
            batch["input_ids"], batch["attention_mask"], batch.get("prompts"), batch.get("categories")
        )  # no grad
        generated = time.perf_counter()
        solver_stats = self.step_multipliers(rollout, per_sample(batch.get("categories"), len(rollout)))

        minibatches = rollout.minibatches(self.ppo.minibatch_size, self.ppo.epochs)
        ptx = ptx_chunks(batch, len(minibatches))
        update_stats = [
            self.policy_update(minibatch, ptx[i % len(ptx)] if ptx else None) for i, minibatch in enumerate(minibatches)
        ]
        self.log_dict(
            {
                **average(update_stats),
                **solver_stats,
                **self.rollout_stats(rollout),
                "time/generation_s": self.generation_seconds,
                "time/scoring_s": generated - started - self.generation_seconds,
                "time/update_s": time.perf_counter() - generated,
            },
            prog_bar=False,
            batch_size=len(rollout),
        )

    @torch.no_grad()
    def collect_rollout(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        prompts: list[str] | None = None,
        categories: list[str | None] | None = None,
    ) -> Rollout:
        """Sample responses and score them: log-probs, end scores, critic values, advantages.

        ``prompts`` (the user's texts) and ``categories`` come with the prompt data's batches; the scorers
        read the texts, and category-bound constraints the categories.
        """
        began = time.perf_counter()
        assert self.actor is not None  # configure_model ran
        sequences = self.generator.generate(
            self.actor,
            prompt_ids,
            prompt_mask,
            self.generation,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
        )  # (N, P + A)
        self.generation_seconds = time.perf_counter() - began  # logged apart from scoring
        start = prompt_ids.shape[1]
        mask = response_mask(sequences[:, start:], self.tokenizer.eos_token_id)  # (N, A)
        prompt_mask = prompt_mask.repeat_interleave(self.generation.num_return_sequences, dim=0)
        attention = torch.cat([prompt_mask, mask.long()], dim=1)  # (N, P + A)
        old_logprobs = response_logprobs(self.actor, sequences, attention, start)
        # Without a reference (β = 0) the rollout's own log-probs stand in: every KL term is then 0, and not logged.
        ref = self.reference
        ref_logprobs = old_logprobs if ref is None else response_logprobs(ref, sequences, attention, start)  # (N, A)
        end_rewards = self.reward_model(sequences, attention).end_scores  # (N,)
        categories = per_sample(categories, len(sequences))
        end_costs = self.constraint_costs(sequences, attention, start, prompts, categories)  # (N, K)
        values = {
            name: response_values(getattr(self, critic_attribute(name)), sequences, attention, start)
            for name in self.critic_names()
        }  # each (N, A)
        weights = [response_weights(c, categories, end_costs.device) for c in self.constraints]
        ones = end_costs.new_ones(len(sequences))
        cost_weights = torch.stack([ones if w is None else w for w in weights], dim=1)  # (N, K)
        return self.estimate_advantages(
            sequences, attention, mask, old_logprobs, ref_logprobs, end_rewards, end_costs, values, cost_weights
        )

    def constraint_costs(
        self, sequences: Tensor, attention: Tensor, start: int, prompts: list[str] | None, categories: list[str | None]
    ) -> Tensor:
        """Each constraint's end cost of every sequence, ``(N, K)``: the cost model's, or a scorer's stream.

        Each scorer scores the batch once, whatever number of constraints read its streams.
        """
        n = len(sequences)
        scores: dict[str, dict[str, Tensor]] = {}
        if any(c.cost != COST_MODEL for c in self.constraints):
            texts = self.tokenizer.batch_decode(sequences[:, start:], skip_special_tokens=True)
            given = prompts if prompts is not None else self.tokenizer.batch_decode(sequences[:, :start], True)
            group = self.generation.num_return_sequences
            samples = Samples(
                sequences, attention, start, tuple(p for p in given for _ in range(group)) if prompts else tuple(given),
                tuple(texts), tuple(categories),
            )  # fmt: skip
            for name in {c.cost.partition(".")[0] for c in self.constraints if c.cost != COST_MODEL}:
                scores[name] = checked_scores(name, self.scorer_map[name], samples)
        model_costs = sequences.new_zeros(n, dtype=torch.float32)  # no cost model: plain PPO's zero cost
        if self.cost_model is not None and any(c.cost == COST_MODEL for c in self.constraints):
            model_costs = self.cost_model(sequences, attention).end_scores.float()
        columns = []
        for constraint in self.constraints:
            if constraint.cost == COST_MODEL:
                columns.append(model_costs)
            else:
                scorer, stream = split_stream_key(constraint.cost, self.scorer_map, "model.init_args.constraints")
                columns.append(scores[scorer][stream])
        return torch.stack(columns, dim=1)

    def estimate_advantages(
        self,
        sequences: Tensor,
        attention: Tensor,
        mask: Tensor,
        old_logprobs: Tensor,
        ref_logprobs: Tensor,
        end_rewards: Tensor,
        end_costs: Tensor,
        values: dict[str, Tensor],
        cost_weights: Tensor | None = None,
    ) -> Rollout:
        """The per-token streams, each turned into advantages by the estimator on its own (never combined first).

        ``end_costs`` is ``(N, K)``, one column per constraint. A stream the run does not have (the cost
        under reward shaping or plain PPO) and a critic it does not hold leave zeros in the rollout.
        """
        zeros = torch.zeros_like(old_logprobs)  # (N, A)
        streams = self.score_streams(end_rewards, end_costs, old_logprobs, ref_logprobs, mask)
        group_size = self.generation.num_return_sequences
        advantages: dict[str, Tensor] = {}
        returns: dict[str, Tensor] = {}
        for name, stream in streams.items():
            advantages[name], estimated = self.advantage.estimate(stream, mask, group_size, values.get(name))
            returns[name] = estimated if estimated is not None else zeros
        names = [c.name for c in self.constraints]
        return Rollout(
            input_ids=sequences,
            attention_mask=attention,
            mask=mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            reward_values=values.get("reward", zeros),
            cost_values=torch.stack([values.get(name, zeros) for name in names], dim=1),
            end_rewards=end_rewards,
            end_costs=end_costs,
            reward_advantages=advantages["reward"],
            reward_returns=returns["reward"],
            cost_advantages=torch.stack([advantages.get(name, zeros) for name in names], dim=1),
            cost_returns=torch.stack([returns.get(name, zeros) for name in names], dim=1),
            cost_weights=cost_weights if cost_weights is not None else end_costs.new_ones(end_costs.shape),
        )

    def score_streams(
        self, end_rewards: Tensor, end_costs: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        """Per-token streams of the solvers' end scores: ``reward`` and one per constraint that keeps a cost stream.

        The end score sits at the last token, with ``∓β·KL_t`` per token (a penalty on the reward stream,
        an addition to a cost stream) when the KL is a reward penalty, clipped to ``±score_clip``.

        Each constraint's solver says what its cost does: a cost stream of its own by default (named after the
        constraint), or folded into the reward's end score, ``R - λ·C``, under reward shaping (``FixedPenalty``,
        safe-rlhf's ``PPORewardShapingTrainer``).
        """
        kl_coeff = self.ppo.kl_coeff if self.ppo.kl_penalty == "reward" else 0.0
        shaping = {"kl_coeff": kl_coeff, "score_clip": self.ppo.score_clip}
        rewards, costs = end_rewards, {}
        for k, constraint in enumerate(self.constraints):
            ends = constraint.solver.end_score_streams(rewards, stream_costs(constraint, end_costs[:, k]))
            rewards = ends["reward"]
            if "cost" in ends:
                costs[constraint.name] = ends["cost"]
        streams = {"reward": kl_shaped_rewards(rewards, logprobs, ref_logprobs, mask, kl_sign=-1.0, **shaping)}
        for name, scores in costs.items():
            streams[name] = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_sign=1.0, **shaping)
        return streams  # each (N, A)

    def step_multipliers(self, rollout: Rollout, categories: list[str | None]) -> dict[str, float]:
        """Record each constraint's costs and take one solver step per constraint; return the metrics to log.

        Every rank must step λ_k from the same number, or the multipliers drift apart: the episode cost
        ``J_k`` is reduced over ranks. A category-bound constraint that has seen none of its prompts yet
        (on any rank) keeps its λ_k, which is logged all the same. One constraint logs ``solver/...`` and
        ``rollout/episode_cost`` as a single-constraint run always has; several log ``solver/<name>/...`` and
        ``rollout/episode_cost/<name>``.
        """
        stats: dict[str, float] = {}
        for k, constraint in enumerate(self.constraints):
            self.ledger.record(constraint, rollout.end_costs[:, k], categories)
            mean = self.episode_cost(constraint)
            if mean is None:  # none of its category's prompts yet: λ_k stays, and is logged as it is
                found: dict[str, float] = {"solver/multiplier": constraint.solver.multiplier}
            else:
                solver_input = self.ledger.solver_input(constraint, mean)
                found = {**constraint.solver.update(solver_input), "rollout/episode_cost": solver_input}
            single = len(self.constraints) == 1
            stats |= found if single else {metric_of(key, constraint.name): value for key, value in found.items()}
        self.ledger.note_multipliers()
        return stats

    def episode_cost(self, constraint: Constraint) -> float | None:
        """Mean of the ranks' windows of ``constraint`` (None when no rank has counted a response yet).

        A constraint over every prompt averages each rank's mean (every rank counts as many responses);
        a category-bound one divides the summed windows by their summed counts.
        """
        total, count = self.ledger.local_totals(constraint)
        if constraint.category is None:
            local = torch.tensor(total / count, device=self.device, dtype=torch.float64)
            return float(self.trainer.strategy.reduce(local, reduce_op="mean"))
        sums = torch.tensor([total, float(count)], device=self.device, dtype=torch.float64)
        total, counted = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        return None if counted == 0 else total / counted

    def rollout_stats(self, rollout: Rollout) -> dict[str, Tensor]:
        """Mean reward, cost (each constraint's, by name when there are several), KL to the reference, length."""
        names = [c.name for c in self.constraints]
        costs = {"rollout/cost": rollout.end_costs[:, 0].mean()} if len(names) == 1 else {
            f"rollout/cost/{name}": rollout.end_costs[:, k].mean() for k, name in enumerate(names)
        }  # fmt: skip
        kl = kl_to_reference(rollout.old_logprobs, rollout.ref_logprobs, rollout.mask)  # 0 without a reference
        return {
            "rollout/reward": rollout.end_rewards.mean(),
            **costs,
            **({"rollout/kl": kl} if self.reference is not None else {}),  # no reference (β = 0): no KL to log
            "rollout/response_length": rollout.mask.sum(-1).float().mean(),
        }

    def policy_update(self, minibatch: Rollout, ptx: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """One optimiser step on the actor and its critics (+ PTX) with one combined backward."""
        optimizer = self.optimizers()
        assert isinstance(optimizer, LightningOptimizer)
        start = minibatch.input_ids.shape[1] - minibatch.mask.shape[1]
        loss, stats = self.actor_loss(minibatch, start)
        for name in self.critic_names():
            critic_loss, critic_stats = self.critic_loss(name, getattr(self, critic_attribute(name)), minibatch, start)
            loss = loss + critic_loss
            stats |= critic_stats
        if ptx is not None:
            assert self.actor is not None  # configure_model ran
            logits = self.actor(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"]).logits
            ptx_loss, _ = lm_loss(logits, ptx["labels"])
            loss = loss + self.ppo.ptx_coeff * ptx_loss
            stats["loss/ptx"] = ptx_loss.detach()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.ppo.max_grad_norm is not None:
            # A LightningOptimizer is an instance of the optimizer class it wraps (Lightning subclasses it on the fly).
            clipped = cast(Optimizer, optimizer)
            self.clip_gradients(clipped, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        cast(LRScheduler, self.lr_schedulers()).step()  # the one scheduler configure_optimizers returns
        return stats

    def actor_loss(self, minibatch: Rollout, start: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate on the constraints' Lagrangian advantage, plus ``β·k3`` when the KL is a loss term.

        The advantage is ``(A_r - Σ_k λ_k w_k A_ck) / (1 + Σ_k λ_k w_k)`` over the constraints that keep a cost
        stream (Safe RLHF's ``(A_r - λ·A_c) / (1 + λ)`` for one); APPO keeps only the tokens its mask keeps.
        """
        assert self.actor is not None  # configure_model ran
        logprobs = response_logprobs(self.actor, minibatch.input_ids, minibatch.attention_mask, start)
        advantages = self.lagrangian_advantages(minibatch)  # (N, A)
        if self.ppo.appo is None:
            loss, stats = clipped_surrogate_loss(
                logprobs,
                minibatch.old_logprobs,
                advantages,
                minibatch.mask,
                self.ppo.clip_eps,
                self.ppo.loss_aggregation,
            )
        else:  # APPO: only the tokens whose Lagrangian critic value agrees with their advantage
            multiplier = torch.tensor(self.constraints[0].solver.multiplier, device=logprobs.device)  # APPO: one
            kept = appo_lagrangian_mask(
                minibatch.reward_values, minibatch.cost_values[:, 0], minibatch.reward_advantages,
                minibatch.cost_advantages[:, 0], minibatch.mask, multiplier, self.ppo.appo.baseline,
            )  # fmt: skip
            loss, stats = appo_surrogate_loss(
                logprobs, minibatch.old_logprobs, advantages, kept, minibatch.mask, self.ppo.clip_eps
            )
        stats = {"loss/actor": loss.detach(), **stats}
        if self.ppo.kl_penalty == "loss" and self.reference is not None:
            kl_loss, kl_stats = k3_kl_loss(logprobs, minibatch.ref_logprobs, minibatch.mask, self.ppo.loss_aggregation)
            loss = loss + self.ppo.kl_coeff * kl_loss
            stats |= kl_stats
        return loss, stats

    def lagrangian_advantages(self, minibatch: Rollout) -> Tensor:
        """The actor's advantage from the reward stream and the cost streams of the constraints that keep one."""
        columns = [k for k, c in enumerate(self.constraints) if "cost" in c.solver.stream_names()]  # as streamed()
        # λ as float32 first, then the advantages' dtype: as the stage has always built it, bit for bit.
        multipliers = torch.tensor(
            [self.constraints[k].solver.multiplier for k in columns], device=minibatch.reward_advantages.device
        )
        weighted = any(self.constraints[k].category is not None for k in columns)
        return constrained_advantage(
            minibatch.reward_advantages,
            minibatch.cost_advantages[:, columns],
            multipliers,
            minibatch.cost_weights[:, columns] if weighted else None,
            self.ppo.normalize_advantage,
        )

    def critic_loss(
        self, name: str, critic: nn.Module, minibatch: Rollout, start: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value loss of the ``name`` critic against its GAE returns."""
        values = response_values(critic, minibatch.input_ids, minibatch.attention_mask, start)
        if name == "reward":
            old_values, returns = minibatch.reward_values, minibatch.reward_returns
        else:
            k = [c.name for c in self.constraints].index(name)
            old_values, returns = minibatch.cost_values[:, k], minibatch.cost_returns[:, k]
        loss, stats = value_loss(values, old_values, returns, minibatch.mask, clip_range=self.ppo.value_clip)
        return loss, {
            f"loss/{name}_critic": loss.detach(),
            **{f"{name}_critic/{key}": value for key, value in stats.items()},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Each constraint's solver state, cost window and λ's history, as plain Python data."""
        checkpoint["constraints"] = self.ledger.state_dict()
        drop_frozen(checkpoint, self)  # with LoRA, the trainable tensors only
        save_template(self, checkpoint)

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own cost windows (``reliability.RankStates`` saves them for every rank, not rank 0's only)."""
        return {"cost_windows": self.ledger.rank_state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Resume with this rank's cost windows."""
        self.ledger.load_rank_state_dict(state["cost_windows"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the same λ's, solver states and cost windows."""
        self.ledger.load_state_dict(checkpoint["constraints"])
        restore_frozen(checkpoint, self)  # with LoRA, the frozen bases come from their dirs
        load_template(self, checkpoint)

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
        # Written before the dir is renamed into place.
        extra = {"multiplier_history.json": json.dumps(self.ledger.export())}
        extra |= policy_files(trained_template(self))  # lit_saferlhf.json: the prompts' template
        assert self.actor is not None  # configure_model ran
        return export(self.actor, self.tokenizer, out, state_dict=state_dict, extra_files=extra)

    def updates_per_rollout(self) -> int:
        """Optimiser steps per rollout: ``ppo.epochs`` passes over its sequences in minibatches.

        A smaller last prompt batch of an epoch takes fewer.
        """
        data = self.trainer.datamodule  # type: ignore[attr-defined]  # Lightning sets it at fit; Trainer declares none
        rollout_size = data.batch_size * self.generation.num_return_sequences
        return self.ppo.epochs * -(-rollout_size // self.ppo.minibatch_size)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """One AdamW: the actor and each critic in their own parameter groups, each with its schedule."""
        # Lightning's estimate is min(prompt batches, max_steps), but max_steps counts optimiser steps, not rollouts.
        steps = int(self.trainer.estimated_stepping_batches) * self.updates_per_rollout()
        total = steps if self.trainer.max_steps == -1 else min(steps, self.trainer.max_steps)
        assert self.actor is not None  # configure_model ran
        networks: list[tuple[nn.Module, OptimizerArgs]] = [(self.actor, self.actor_args)]
        networks += [(getattr(self, critic_attribute(name)), self.critic_args) for name in self.critic_names()]
        optimizer, scheduler = build_optimizer(networks, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_estimator(
    advantage: AdvantageEstimator, generation: GenerationArgs, reward_critic: str | None, cost_critic: str | None
) -> None:
    """Refuse settings the estimator cannot use: too few samples per prompt, critic dirs without critics."""
    name = type(advantage).__name__
    if generation.num_return_sequences < advantage.min_group_size:
        raise ConfigError(
            "model.generation.num_return_sequences",
            f"{name} compares the samples of each prompt and needs at least {advantage.min_group_size}, got "
            f"{generation.num_return_sequences} (with one sample every advantage would be 0)",
        )
    given = [key for key, path in (("reward_critic", reward_critic), ("cost_critic", cost_critic)) if path]
    if given and not advantage.needs_critics:
        raise ConfigError(f"model.{given[0]}", f"{name} uses no critics; leave it unset")


def response_logprobs(model: nn.Module | ReferencePolicy, sequences: Tensor, attention: Tensor, start: int) -> Tensor:
    """Log-probs of the response tokens ``sequences[:, start:]`` under ``model``, ``(N, A)``.

    From the last hidden states in chunks (:func:`lit_saferlhf.models.logprobs.response_logprobs`): the
    ``(N, L, V)`` logits never exist at once.
    """
    return chunked_response_logprobs(model, sequences, attention, start)


def required(paths: dict[str, str | None], name: str) -> str:
    """``paths[name]``, set for every network the run builds (the constructor refuses a missing one)."""
    path = paths[name]
    assert path is not None
    return path


def response_values(critic: nn.Module, sequences: Tensor, attention: Tensor, start: int) -> Tensor:
    """A critic's value of the state before each response token, ``(N, A)``."""
    return critic(sequences, attention).scores[:, start - 1 : -1]


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


def per_sample(categories: list[str | None] | None, n: int) -> list[str | None]:
    """Each of the ``n`` sampled sequences' prompt category: the batch's per prompt, repeated for its samples."""
    if not categories:
        return [None] * n
    group = n // len(categories)
    return [category for category in categories for _ in range(group)]


def critic_attribute(name: str) -> str:
    """The attribute of a stream's critic.

    ``reward_critic``, ``cost_critic`` (the constraint named ``cost``: a single-solver run's), ``cost_critic_<name>``.
    """
    return "reward_critic" if name == "reward" else "cost_critic" if name == "cost" else f"cost_critic_{name}"


def metric_of(key: str, constraint: str) -> str:
    """A solver metric of one of several constraints: ``solver/multiplier`` -> ``solver/<constraint>/multiplier``."""
    family, _, metric = key.partition("/")
    return f"{family}/{constraint}/{metric}"
