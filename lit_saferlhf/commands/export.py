r"""``lit-saferlhf export``: turn any training checkpoint of a stage into the Hugging Face dir its ``fit`` exports.

    lit-saferlhf export --config cli_configs/tiny/sft.yaml --ckpt_path outputs/tiny/sft/checkpoints/last.ckpt \
        --out outputs/tiny/sft/step_last

The stage is built from the same arguments as ``fit`` (configs and flags; no Trainer, no data,
nothing distributed), its networks on CPU without sharding; its weights are loaded from the
checkpoint, whichever strategy wrote it, and the stage's own ``export_to`` writes the dir, so it is
the same as the end-of-fit export.
Checkpoints it reads:

- a single ``.ckpt`` file (one device, DDP, FSDP ``state_dict_type: full``, DeepSpeed after
  ``convert_zero_checkpoint_to_fp32_state_dict``), loaded with ``weights_only=True``;
- a distributed checkpoint folder (FSDP2 / ``ModelParallelStrategy``, FSDP ``state_dict_type: sharded``):
  shards + ``meta.pt``, gathered into one state in memory;
- a DeepSpeed ZeRO folder (``latest`` + a tag folder): DeepSpeed's fp32 master weights
  (``zero_to_fp32``). DeepSpeed pickles its folders, so they are read with ``weights_only=False``:
  export only DeepSpeed checkpoints you trust.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import lightning as L
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from rich.console import Console
from torch import Tensor

from lit_saferlhf.commands.fit import configure_parsing
from lit_saferlhf.errors import CommandParser, DataError, InputNotFoundError, output_dir, require
from lit_saferlhf.models.peft import restore_frozen

CheckpointKind = Literal["file", "distributed", "deepspeed"]
DEEPSPEED_LATEST = "latest"
"""The file in a DeepSpeed checkpoint folder that names its tag folder."""
WEIGHT_KEYS = {"state_dict", "model"}
"""Where the weights are in a distributed checkpoint: ``ModelParallelStrategy`` / ``FSDPStrategy``."""
DEEPSPEED_WRAPPER = "_forward_module."
"""The prefix of Lightning's DeepSpeed wrapper on the weight names."""

console = Console(stderr=True)


class ExportableStage(Protocol):
    """What this command needs of a stage module besides LightningModule's API: every built-in stage has it."""

    def export_to(self, out: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the stage's network as the Hugging Face dir its ``fit`` exports; the dir."""
        ...


def checkpoint_kind(path: Path) -> CheckpointKind | None:
    """What wrote ``path``: a single file, a distributed (DCP) folder, a DeepSpeed folder; None if not a checkpoint.

    A folder counts only when its last file is there (``meta.pt``, ``latest``), which Lightning and
    DeepSpeed write after everything else.
    """
    if path.is_file():
        return "file"
    if (path / _METADATA_FILENAME).is_file():
        return "distributed"
    if (path / DEEPSPEED_LATEST).is_file():
        return "deepspeed"
    return None


def require_checkpoint(path: Path) -> CheckpointKind:
    """The kind of checkpoint at ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a checkpoint.
    """
    if not path.exists():
        raise InputNotFoundError(f"--ckpt_path {path}: no such file or folder")
    kind = checkpoint_kind(path)
    if kind is None:
        raise DataError(
            f"--ckpt_path {path}: not a checkpoint. Expected a .ckpt file, a distributed checkpoint folder "
            f"(with {_METADATA_FILENAME}) or a DeepSpeed checkpoint folder (with {DEEPSPEED_LATEST!r})"
        )
    return kind


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's full (unsharded) weights under ``state_dict``, plus everything else it saved, on CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a checkpoint.
    """
    kind = require_checkpoint(path)
    if kind == "file":
        return load_file_checkpoint(path)
    if kind == "distributed":
        return load_distributed_checkpoint(path)
    return load_deepspeed_checkpoint(path)


def load_file_checkpoint(path: Path) -> dict[str, Any]:
    """A single-file Lightning checkpoint (``weights_only=True``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise DataError(f"--ckpt_path {path}: not a checkpoint that torch.load reads safely ({error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataError(f"--ckpt_path {path}: not a Lightning checkpoint (it has no 'state_dict')")
    return checkpoint


def load_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """A distributed checkpoint folder's weights, gathered in this process (optimizer states are not read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    loaded: dict[str, Any] = {}
    planner = _EmptyStateDictLoadPlanner(keys=WEIGHT_KEYS)  # the weights only, not the optimizer states
    _load_state_dict(loaded, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    (weights,) = loaded.values()
    metadata = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
    return {**metadata, "state_dict": weights}


def load_deepspeed_checkpoint(path: Path) -> dict[str, Any]:
    """A DeepSpeed ZeRO folder's fp32 weights, and Lightning's state saved beside them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files
    from lightning.pytorch.utilities.deepspeed import ds_checkpoint_dir

    weights = get_fp32_state_dict_from_zero_checkpoint(path)
    metadata = torch.load(get_model_state_files(ds_checkpoint_dir(path))[0], map_location="cpu", weights_only=False)
    return {**metadata, "state_dict": {key.removeprefix(DEEPSPEED_WRAPPER): value for key, value in weights.items()}}


class StageCLI(LightningCLI):
    """Parses configs exactly as ``lit-saferlhf fit`` does, but builds no Trainer (so no strategy starts up)."""

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (``sys.argv`` holds the export command's own arguments, which are not LightningCLI's)."""
        assert isinstance(args, list)  # build_stage passes the fit arguments as a list
        self.config = parser.parse_args(args)

    def instantiate_classes(self) -> None:
        """Instantiate the config's classes; ``self.model`` is the stage."""
        self.config_init = self.parser.instantiate_classes(self.config)
        self.model = self.config_init["model"]


def build_stage(fit_args: Sequence[str]) -> L.LightningModule:
    """The stage module that ``lit-saferlhf fit <fit_args>`` would train, its networks built on CPU, unsharded.

    Args:
        fit_args: ``fit``'s arguments (``--config`` files and flags), without ``fit`` and ``--ckpt_path``.
    """
    configure_parsing()
    cli = StageCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=list(fit_args),
        run=False,
    )
    module = cli.model
    module.configure_model()  # no trainer, no device mesh: whole networks on CPU
    return module


def check_stage(module: L.LightningModule, checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another stage, or of another network than the config builds.

    Raises:
        ValueError: The checkpoint names another stage class, or its weight names differ (the first few are named).
    """
    built = type(module).__name__
    saved = str(checkpoint.get("hyper_parameters", {}).get("_class_path", built)).rsplit(".", 1)[-1]
    if saved != built:
        raise DataError(f"--ckpt_path {path} is a {saved} checkpoint, but the configs build a {built}")
    expected, found = module.state_dict().keys(), checkpoint["state_dict"].keys()
    missing, unexpected = [k for k in expected if k not in found], [k for k in found if k not in expected]
    if missing or unexpected:
        raise DataError(
            f"--ckpt_path {path} does not hold the weights of the {built} the configs build "
            f"(another stage or another model?): {len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"
        )


def export_checkpoint(fit_args: Sequence[str], ckpt_path: str | Path, out: str | Path) -> Path:
    """Build the stage from ``fit_args``, load the weights of ``ckpt_path`` and write its Hugging Face dir to ``out``.

    Args:
        fit_args: The arguments the stage was fitted with (``--config`` files and flags), without ``fit`` and
            ``--ckpt_path``. Trainer settings (a GPU strategy fragment, say) are parsed but not used.
        ckpt_path: A checkpoint file or folder of that stage, from any strategy.
        out: The dir to write (replaced atomically if it exists).

    Returns:
        ``out``.
    """
    path = Path(ckpt_path)
    kind = require_checkpoint(path)  # fail before the slow build
    with console.status("Building the stage from its configs"):
        module = build_stage(fit_args)
    with console.status(f"Loading the {kind} checkpoint {path}"):
        checkpoint = load_checkpoint(path)
        restore_frozen(checkpoint, module)  # LoRA checkpoints hold no frozen base: the built one is kept
        check_stage(module, checkpoint, path)
        weights: dict[str, Tensor] = checkpoint["state_dict"]
        module.load_state_dict(weights)
        module.on_load_checkpoint(checkpoint)  # stage state saved with the weights (PPO: λ's history)
    with console.status(f"Writing {out}"):
        written = cast(ExportableStage, module).export_to(out)
    step = checkpoint.get("global_step", "?")
    console.print(f"Exported {type(module).__name__} at step {step} from {path} to {written}", soft_wrap=True)
    return written


def export_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf export``: write a stage's Hugging Face dir from one of its training checkpoints."""
    parser = CommandParser(
        prog="lit-saferlhf export",
        usage="lit-saferlhf export --config STAGE.yaml [more fit arguments] --ckpt_path CKPT --out DIR",
        description=export_command.__doc__,
        epilog="Every other argument is parsed as `lit-saferlhf fit` parses it (--config, --model.*, --trainer.*): "
        "pass those the stage was fitted with.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="a .ckpt file, a distributed or a DeepSpeed checkpoint folder"
    )
    parser.add_argument("--out", required=True, help="the Hugging Face dir to write")
    args, fit_args = parser.parse_known_args(list(argv))
    require(not Path(args.out).exists() or Path(args.out).is_dir(), "--out", "a dir or a path not there yet", args.out)
    output_dir(Path(args.out).absolute().parent, "--out")
    export_checkpoint(fit_args, args.ckpt_path, args.out)
