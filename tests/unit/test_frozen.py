"""``frozen()``: a frozen network follows the stage's mode, yet every call runs in eval mode (no dropout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_saferlhf.models.frozen import frozen


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(x))


class WithDecoder(nn.Module):
    """A causal-LM-like network: the chunked log-probs call its decoder alone."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder, self.head = Decoder(), nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8))

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(x))


def test_a_frozen_network_stays_in_train_mode_but_runs_without_dropout() -> None:
    torch.manual_seed(0)
    network, x = frozen(WithDecoder()).train(), torch.randn(4, 8)
    assert all(module.training for module in network.modules())  # Lightning sees no module left in eval mode
    assert not any(parameter.requires_grad for parameter in network.parameters())
    expected = network.head[1](network.decoder.linear(x))  # the forward without dropout
    for call in (network, network.get_decoder()):
        first, second = call(x), call(x)
        assert torch.equal(first, second)
        assert all(module.training for module in network.modules())  # back in train mode after the call
    assert torch.equal(network(x), expected)


def test_a_frozen_network_is_restored_after_a_call_that_raises() -> None:
    network = frozen(WithDecoder()).train()
    with pytest.raises(RuntimeError):
        network(torch.randn(4, 3))  # wrong width: the decoder's linear raises
    assert all(module.training for module in network.modules())
