"""Built-in critic-free advantage estimators: group-normalised (GRPO) and leave-one-out (RLOO).

The default, ``GAE`` (a critic per stream), lives beside the contract in ``lit_saferlhf.advantages``.
"""

from lit_saferlhf_plugins.advantages.group import GroupNormalized, LeaveOneOut

__all__ = ["GroupNormalized", "LeaveOneOut"]
