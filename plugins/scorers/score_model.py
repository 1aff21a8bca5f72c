"""Score-model scorers: a frozen reward or cost model reading the policy's token ids; its end score is the score."""

from __future__ import annotations

from torch import Tensor

from lit_saferlhf.data.tokenizers import TokenizerMismatchError, load_tokenizer, tokenizer_difference
from lit_saferlhf.models.causal_lm import ModelSource
from lit_saferlhf.models.score_model import ScoreModel
from lit_saferlhf.scorers import Samples, Scorer, ScorerContext


class ScoreModelScorer(Scorer):
    """A frozen score model in any layout the stages accept (ours, transformers', safe-rlhf's); stream ``score``.

    It reads ``Samples.input_ids`` as they are, so it must have been trained with the policy's tokenizer
    (checked at start-up) and the policy's template; its score is the end score of each sequence.

    Args:
        path: The score model's dir or hub name (a reward- or cost-model export).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def configure(self, context: ScorerContext) -> None:
        """Check the score model's tokenizer is the policy's, then build and place it.

        Raises:
            TokenizerMismatchError: The two tokenizers differ (the ids would mean other tokens).
            ModelLayoutError: ``path`` holds no score head (a causal LM or base model).
        """
        source = ModelSource(path=self.path, dtype=context.dtype)
        difference = tokenizer_difference(context.policy_tokenizer, load_tokenizer(source))
        if difference is not None:
            raise TokenizerMismatchError(
                f"scorer {self.path}: its tokenizer differs from the policy's ({context.policy_dir}): {difference}; "
                "a score model reads the policy's token ids, so train it from the policy's tokenizer"
            )
        model = ScoreModel.from_source(source, context.policy_tokenizer, role="ScoreModelScorer")
        self.model = context.place(model)

    def score(self, samples: Samples) -> dict[str, Tensor]:
        """``{"score": (N,)}``: the end score of each prompt + response."""
        return {"score": self.model(samples.input_ids, samples.attention_mask).end_scores}
