"""The scorer contract: sampled (prompt, response) pairs in, one or more named score streams out.

A ``Scorer`` turns a batch of sampled responses into scores, one value per response in each of its
named streams: a score model's end score, a guard model's probability that it would answer "unsafe"
(and of each harm category it names), a rule written as a Python function. PPO-Lagrangian's
constraints take their costs from scorers (``model.init_args.scorers``, named in
``model.init_args.constraints``), so a run can be constrained by a guard model or a rule without a
cost-model stage. Built-ins live in ``plugins/scorers`` (installed as ``lit_saferlhf_plugins.scorers``:
``ScoreModelScorer``, ``GuardScorer``, ``FunctionScorer``); other packages register theirs under the
entry-point group ``lit_saferlhf.scorers``.

A scorer is an ``nn.Module`` so that the networks it builds in :meth:`Scorer.configure` are placed,
sharded and checkpointed with the stage's other frozen networks. It is frozen: it never trains.

Shapes: ``N`` sampled sequences, ``P`` prompt columns (left-padded), ``A`` response columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_saferlhf.errors import ConfigError, LitSafeRLHFError


@dataclass(frozen=True)
class Samples:
    """A batch of sampled responses, in the policy's token ids and as text."""

    input_ids: Tensor
    """``(N, P + A)`` prompt (left-padded) + response (right-padded) ids of the policy's tokenizer."""
    attention_mask: Tensor
    """``(N, P + A)``: 1 on real tokens."""
    prompt_length: int
    """``P``: the response of every row starts at this column."""
    prompts: tuple[str, ...]
    """The user's prompt of each row, without any template (``N`` texts)."""
    responses: tuple[str, ...]
    """Each row's response as text, special tokens removed (``N`` texts)."""
    categories: tuple[str | None, ...]
    """Each row's prompt category from the prompt data (``data.init_args.category_column``), or None."""

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class ScorerContext:
    """What a scorer may need to build its networks (given by the stage in ``configure_model``)."""

    policy_dir: str
    """The policy the stage trains (a score model over the same tokens reads its ids)."""
    policy_tokenizer: PreTrainedTokenizerBase
    """The tokenizer of ``Samples.input_ids``."""
    dtype: str | None
    """The weights dtype of the stage's networks (None: float32)."""
    place: Callable[[nn.Module], nn.Module]
    """Freeze a network and shard it as the strategy asks; a scorer keeps what it returns."""


class ScorerError(LitSafeRLHFError, ValueError):
    """A scorer returned something other than one finite number per response in each of its streams."""


class Scorer(nn.Module, ABC):
    """Scores sampled responses: ``Samples`` in, ``{stream name: (N,) scores}`` out."""

    def stream_names(self) -> tuple[str, ...]:
        """The streams :meth:`score` returns, the first being the scorer's main one (default: ``("score",)``)."""
        return ("score",)

    def configure(self, context: ScorerContext) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Build the scorer's networks (called once, in the stage's ``configure_model``); none by default."""

    @abstractmethod
    def score(self, samples: Samples) -> dict[str, Tensor]:
        """Score every response: one ``(N,)`` float tensor per name of :meth:`stream_names`."""


def checked_scores(name: str, scorer: Scorer, samples: Samples) -> dict[str, Tensor]:
    """``scorer.score(samples)``, checked: every stream present, ``(N,)``, finite; as float32 on the ids' device.

    Args:
        name: The scorer's key in ``model.init_args.scorers``, for messages.
        scorer: The scorer.
        samples: The batch it scores.

    Raises:
        ScorerError: A stream is missing, has another shape, or holds NaN or an infinity.
    """
    with torch.no_grad():
        scores = scorer.score(samples)
    where = f"scorer {name!r} ({type(scorer).__name__})"
    out = {}
    for stream in scorer.stream_names():
        if stream not in scores:
            raise ScorerError(f"{where} returned no {stream!r} stream (it returned {sorted(scores)})")
        value = torch.as_tensor(scores[stream])
        if tuple(value.shape) != (len(samples),):
            raise ScorerError(
                f"{where}, stream {stream!r}: expected one score per response, shape ({len(samples)},), "
                f"got shape {tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ScorerError(f"{where}, stream {stream!r}: {bad} of {len(samples)} scores are NaN or infinite")
        out[stream] = value.to(device=samples.input_ids.device, dtype=torch.float32)
    return out


def split_stream_key(key: str, scorers: dict[str, Scorer], field: str) -> tuple[str, str]:
    """The (scorer, stream) that ``key`` (``guard`` or ``guard.S1``) names, or a ``ConfigError`` at ``field``.

    Args:
        key: A constraint's ``cost``.
        scorers: The stage's scorers by name.
        field: The config key, for the message.
    """
    name, _, stream = key.partition(".")
    scorer = scorers.get(name)
    if scorer is None:
        known = ", ".join(sorted(scorers)) or "none"
        raise ConfigError(field, f"the name of a scorer in model.init_args.scorers (have: {known})", key)
    streams = scorer.stream_names()
    stream = stream or streams[0]
    if stream not in streams:
        raise ConfigError(field, f"one of {name!r}'s streams: {', '.join(streams)}", key)
    return name, stream
