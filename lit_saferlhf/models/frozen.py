"""Frozen networks: ``frozen()``, and PPO-Lagrangian's shared frozen bases under LoRA.

With LoRA, PPO-Lagrangian keeps one copy of each base network: the reference policy is the actor
with its adapters switched off (``ReferencePolicy``), and the frozen reward (cost) model is its
critic's backbone with the adapter switched off plus the reward (cost) model's own head
(``FrozenScoreTwin``). Six networks then need three bases (policy, reward, cost) instead of six.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from lit_saferlhf.losses import end_scores
from lit_saferlhf.models.peft import adapters_off
from lit_saferlhf.models.score_model import ScoreHead, ScoreModel, ScoreNormalizer, ScoreOutput, end_mask
from lit_saferlhf.models.sharding import ModuleT, full_tensor
from lit_saferlhf.models.zero3 import load_partitioned, partitioning

if TYPE_CHECKING:
    from peft import PeftModel


class ReferencePolicy:
    """The frozen reference policy as the actor with its adapters off: no second copy of the weights.

    A plain object, not a module: the actor's weights stay registered once, under the actor. It runs
    the actor (or its decoder, for chunked log-probs) with every adapter off and in eval mode (no
    dropout), as a separate frozen reference would; other attributes (``config``, the output layer)
    are the actor's.
    """

    def __init__(self, actor: nn.Module) -> None:
        self.actor = actor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The actor's forward with every adapter off, in eval mode."""
        return self.without_adapters(self.actor, *args, **kwargs)

    def get_decoder(self) -> Any:
        """The actor's decoder, called with every adapter off."""
        decoder = cast("PeftModel", self.actor).get_decoder()  # the actor of a shared base wraps adapters
        return lambda *args, **kwargs: self.without_adapters(decoder, *args, **kwargs)

    def without_adapters(self, network: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``network(*args, **kwargs)`` with the actor's adapters off, in eval mode."""
        with adapters_off(self.actor), eval_mode(self.actor):
            return network(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "actor":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.actor, name)

    def eval(self) -> ReferencePolicy:
        """Always evaluated in eval mode (see ``__call__``)."""
        return self


class FrozenScoreTwin(nn.Module):
    """The frozen reward (cost) model as its critic's backbone with the adapter off, plus its own head.

    Only the head and the normaliser (the reward model's, copied at start-up, frozen) are this module's;
    the backbone is the critic's and is not registered here, so its weights are held and saved once.
    The critic's whole forward runs (so sharded strategies gather its weights as usual) and the
    backbone's output is taken from a hook.

    Args:
        critic: A score model whose backbone is a ``peft`` model, its head still the reward model's.
    """

    critic: ScoreModel  # in __dict__, not registered: nn.Module's typing would see a submodule or tensor

    def __init__(self, critic: ScoreModel) -> None:
        super().__init__()
        self.__dict__["critic"] = critic  # not a submodule: held and saved under the critic only
        head = {name: full_tensor(param) for name, param in critic.score_head.named_parameters()}
        self.score_head: ScoreHead = type(critic.score_head)(
            head["weight"].shape[1], 1, bias="bias" in head, dtype=head["weight"].dtype
        )
        load_head(self.score_head, head)
        self.score_head.requires_grad_(False)
        self.normalizer: ScoreNormalizer = copy.deepcopy(critic.normalizer)
        self.end_token, self.pad_token_id = critic.end_token, critic.pad_token_id  # the reward model's end rule

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        """The reward model's ``ScoreOutput`` for ``input_ids`` ``(B, L)``."""
        captured: list[Tensor] = []
        hook = self.critic.backbone.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
        try:
            with adapters_off(self.critic.backbone), eval_mode(self.critic):
                self.critic(input_ids, attention_mask)
        finally:
            hook.remove()
        scores = self.score_head(captured[0]).squeeze(-1).float()  # (B, L)
        ends = end_mask(input_ids, attention_mask, self.end_token, self.pad_token_id)
        return ScoreOutput(scores=scores, end_scores=self.normalizer(end_scores(scores, ends)))


def load_head(head: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy ``tensors`` into a new head, which DeepSpeed ZeRO-3 may have partitioned as it was built."""
    if partitioning():
        load_partitioned(head, tensors)
    else:
        head.load_state_dict(tensors)


def shared_frozen(trained: nn.Module) -> ReferencePolicy | FrozenScoreTwin:
    """The frozen network that shares ``trained``'s base: the reference of an actor, the reward model of a critic."""
    if isinstance(trained, ScoreModel):
        return FrozenScoreTwin(trained)
    return ReferencePolicy(trained)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, the previous mode of every submodule restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def frozen(network: ModuleT) -> ModuleT:
    """No gradients (never in the optimiser), and every call in eval mode (no dropout).

    The network follows the stage's train/eval mode like every other module (Lightning warns of modules
    left in eval mode at the start of training); its forward, and its decoder's (which the chunked
    log-probs call alone), switch it to eval mode for the call and back after.
    """
    network.requires_grad_(False)
    get_decoder = getattr(network, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for module in (network, decoder) if isinstance(decoder, nn.Module) and decoder is not network else (network,):
        modes: list[list[tuple[nn.Module, bool]]] = []  # a stack: the network's forward calls its decoder's
        module.register_forward_pre_hook(functools.partial(_enter_eval, modes=modes))  # partials pickle, lambdas not
        module.register_forward_hook(functools.partial(_leave_eval, modes=modes), always_call=True)
    return network


def _enter_eval(module: nn.Module, args: Any, modes: list[list[tuple[nn.Module, bool]]]) -> None:
    modes.append([(each, each.training) for each in module.modules()])
    module.eval()


def _leave_eval(module: nn.Module, args: Any, output: Any, modes: list[list[tuple[nn.Module, bool]]]) -> None:
    for each, training in modes.pop():
        each.training = training
