"""Function scorers: any Python callable by import path, e.g. a rule, a format check, a ground truth."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.scorers import Samples, Scorer


class FunctionScorer(Scorer):
    """Scores with a Python function; its one stream is ``score``.

    The function is called per pair, ``fn(prompt: str, response: str, **kwargs) -> float``, or, with
    ``batched``, once per batch, ``fn(prompts: list[str], responses: list[str], **kwargs) -> Sequence[float] |
    Tensor`` (one number per response, in order). Prompts are the user's text without any template, responses
    the sampled text without special tokens. ``lit_saferlhf.data.safety_world:cost`` is one: the world's true
    cost. A result of another shape, or NaN, stops the run with one line (``scorers.checked_scores``).

    Args:
        function: Import path of the callable, ``package.module:function`` or ``package.module.function``.
        kwargs: Keyword arguments passed to every call.
        batched: Call once per batch with lists instead of once per pair.
    """

    def __init__(self, function: str, kwargs: dict[str, Any] | None = None, batched: bool = False) -> None:
        super().__init__()
        self.function, self.kwargs, self.batched = function, dict(kwargs or {}), batched
        self.fn = import_callable(function)

    def score(self, samples: Samples) -> dict[str, Tensor]:
        """``{"score": (N,)}``: the function's value for each response."""
        if self.batched:
            values = self.fn(list(samples.prompts), list(samples.responses), **self.kwargs)
        else:
            values = [self.fn(p, r, **self.kwargs) for p, r in zip(samples.prompts, samples.responses, strict=True)]
        return {"score": torch.as_tensor(values, dtype=torch.float32)}


def import_callable(path: str) -> Callable[..., Any]:
    """The callable that ``path`` (``package.module:name`` or ``package.module.name``) names.

    Raises:
        ConfigError: The module cannot be imported, has no such attribute, or it is not callable.
    """
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError("function", f"an importable callable, `package.module:function` ({error})", path) from error
    if not callable(fn):
        raise ConfigError("function", "an importable callable, `package.module:function`", path)
    return fn
