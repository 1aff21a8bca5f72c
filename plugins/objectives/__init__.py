"""Built-in offline objectives: DPO, IPO, KTO, BFPO, SafeDPO, C-DPO, MoCAN and PeCAN."""

from lit_saferlhf_plugins.objectives.bfpo import BFPO
from lit_saferlhf_plugins.objectives.can import MoCAN, PeCAN
from lit_saferlhf_plugins.objectives.cdpo import CDPO
from lit_saferlhf_plugins.objectives.dpo import DPO, IPO, KTO
from lit_saferlhf_plugins.objectives.safe_dpo import SafeDPO

__all__ = ["BFPO", "CDPO", "DPO", "IPO", "KTO", "MoCAN", "PeCAN", "SafeDPO"]
