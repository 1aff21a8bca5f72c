"""Data: readers, schema adapters, templates, collators, datamodules and the safety world."""

from lit_saferlhf.data.adapters import (
    HHRLHF,
    Adapter,
    Alpaca,
    PKUSafeRLHF,
    PromptList,
    PromptResponse,
    load_records,
)
from lit_saferlhf.data.datamodules import CostData, PromptData, RecordData, RewardData, SFTData
from lit_saferlhf.data.preference import PreferenceData
from lit_saferlhf.data.records import (
    BadRecordError,
    Message,
    PreferenceRecord,
    PromptRecord,
    SafetyPreferenceRecord,
    SFTRecord,
)
from lit_saferlhf.data.templates import ChatTemplate, PlainTemplate, SafeRLHFTemplate, Template

__all__ = [
    "HHRLHF",
    "Adapter",
    "Alpaca",
    "BadRecordError",
    "ChatTemplate",
    "CostData",
    "Message",
    "PKUSafeRLHF",
    "PlainTemplate",
    "PreferenceData",
    "PreferenceRecord",
    "PromptData",
    "PromptList",
    "PromptRecord",
    "PromptResponse",
    "RecordData",
    "RewardData",
    "SFTData",
    "SFTRecord",
    "SafeRLHFTemplate",
    "SafetyPreferenceRecord",
    "Template",
    "load_records",
]
