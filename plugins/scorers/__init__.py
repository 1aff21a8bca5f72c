"""Built-in scorers (``lit_saferlhf.scorers``): score models, guard models, Python functions."""

from lit_saferlhf_plugins.scorers.function import FunctionScorer
from lit_saferlhf_plugins.scorers.guard import GuardScorer
from lit_saferlhf_plugins.scorers.score_model import ScoreModelScorer

__all__ = ["FunctionScorer", "GuardScorer", "ScoreModelScorer"]
