r"""``lit-saferlhf merge``: a linear weight merge of Hugging Face causal-LM exports (P-SACPO).

P-SACPO (Wachi et al., NeurIPS 2024; METHODS.md §5) replaces retraining SACPO's safety step for every
λ by merging the helpfulness-aligned model θ_r with the safety-aligned one θ*:
``θ_q = (1 − q)·θ_r + q·θ*``. This is mergekit's ``linear`` method, which the authors used (weights
``(1 − q, q)``)::

    lit-saferlhf merge --models outputs/tiny/offline/sacpo_helpful/model outputs/tiny/offline/sacpo_safe/model \
        --weights 0.25 0.75 --out outputs/tiny/offline/p_sacpo_0.75/model

Every model must have the same architecture (tensor names and shapes) and the same tokenizer (vocabulary
and special tokens). The tokenizer and config come from the first model; ``merge.json`` beside the
weights records the inputs and the weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lit_saferlhf.data.tokenizers import check_tokenizers
from lit_saferlhf.errors import CommandParser, ConfigError, DataError, ModelDirError, output_dir
from lit_saferlhf.models.causal_lm import export
from lit_saferlhf.models.layouts import check_model_path, require_policy


def linear_merge(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``Σ_k w_k θ_k`` tensor by tensor, computed in float32 and cast back to the first model's dtypes.

    Args:
        states: State dicts with the same tensor names and shapes.
        weights: One weight per state dict (P-SACPO: ``(1 − q, q)``).

    Raises:
        ConfigError: The counts differ.
        DataError: A tensor is missing or has another shape in some model.
    """
    if len(states) != len(weights) or len(states) < 2:
        found = f"{len(states)} models and {len(weights)} weights"
        raise ConfigError("merge --weights", "one weight per model, and at least 2 models", found)
    first = states[0]
    for number, state in enumerate(states[1:], start=2):
        if state.keys() != first.keys():
            different = sorted(state.keys() ^ first.keys())[:3]
            raise DataError(f"merge: model {number} has other tensors than model 1 (e.g. {different})")
        for name, tensor in state.items():
            if tensor.shape != first[name].shape:
                shapes = f"{tuple(first[name].shape)} in model 1, {tuple(tensor.shape)} in model {number}"
                raise DataError(f"merge: tensor {name!r} has shape {shapes}")
    merged: dict[str, Tensor] = {}
    for name in first:
        total = sum(w * state[name].float() for w, state in zip(weights, states, strict=True))
        assert isinstance(total, Tensor)  # at least 2 states: never sum()'s empty-sequence 0
        merged[name] = total.to(first[name].dtype)
    return merged


def merge_command(argv: Sequence[str]) -> Path:
    """Parse ``argv``, merge the models, and write the merged export."""
    parser = CommandParser(prog="lit-saferlhf merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="Hugging Face causal-LM dirs (2 or more)")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per model")
    parser.add_argument("--out", required=True, help="the merged model's dir (replaced if it exists)")
    parser.add_argument(
        "--no-normalize", action="store_true", help="use the weights as given instead of dividing them by their sum"
    )
    args = parser.parse_args(argv)
    weights = args.weights if args.no_normalize else normalized(args.weights)
    output_dir(Path(args.out).parent, "--out")
    models = [load_policy(path) for path in args.models]
    check_tokenizers([("--models", path) for path in args.models])  # the merge keeps the first model's tokenizer
    merged = linear_merge([model.state_dict() for model in models], weights)
    models[0].load_state_dict(merged)
    out = export(models[0], AutoTokenizer.from_pretrained(args.models[0]), args.out)
    (out / "merge.json").write_text(json.dumps({"method": "linear", "models": args.models, "weights": weights}))
    print(f"merged {len(models)} models with weights {weights} into {out}")
    return out


def load_policy(path: str) -> PreTrainedModel:
    """The causal LM in ``path``, refused as ``--models`` when missing, a score model, or not loadable."""
    check_model_path(path, "--models")
    require_policy(path, "--models")
    try:
        return AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as error:  # transformers: no such hub model, no weights, an unknown model type
        raise ModelDirError("--models", path, "not a causal-LM dir", " ".join(str(error).split())[:200]) from error


def normalized(weights: Sequence[float]) -> list[float]:
    """The weights divided by their sum (mergekit's ``normalize: true``)."""
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ConfigError("merge --weights", "non-negative weights with a positive sum", list(weights))
    return [w / total for w in weights]
