"""Stage modules, one LightningModule each.

SFT (1), reward model (2), cost model (3), PPO-Lagrangian (4), and offline preference optimisation
(in place of or beside 4).
"""

from lit_saferlhf.stages.cost import CostModelModule
from lit_saferlhf.stages.ppo_lag import PPOArgs, PPOLagrangian
from lit_saferlhf.stages.preference import PreferenceOptimization, ScoreSource
from lit_saferlhf.stages.reward import RewardModelModule, ScoreModelStage
from lit_saferlhf.stages.sft import SFTModule

__all__ = [
    "CostModelModule",
    "PPOArgs",
    "PPOLagrangian",
    "PreferenceOptimization",
    "RewardModelModule",
    "SFTModule",
    "ScoreModelStage",
    "ScoreSource",
]
