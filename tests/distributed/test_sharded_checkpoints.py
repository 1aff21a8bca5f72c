"""Sharded checkpoints: atomic folders under FSDP2, resume from a folder, full-state gathering, ``lit-saferlhf export``.

The FSDP2 tests run the real CLI on 2 CPU processes (tiny SFT, 256 demonstrations: 4 steps an epoch,
checkpoints every 2 steps); one run is killed while it replaces ``last.ckpt`` and another resumes it.
The FSDP1 and DeepSpeed ZeRO-3 tests shard the tiny SFT network over 2 gloo processes the way
Lightning's ``FSDPStrategy`` and ``DeepSpeedStrategy`` do (Lightning runs those only on GPUs) with
this file as the worker script.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import lightning.pytorch.strategies.model_parallel as model_parallel
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lit_saferlhf.strategies as strategies
from lit_saferlhf.callbacks.checkpoints import partial_path
from lit_saferlhf.cli import main
from lit_saferlhf.commands.export import build_stage, checkpoint_kind, export_checkpoint, load_checkpoint
from lit_saferlhf.commands.pipeline import newest_checkpoint
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm
from lit_saferlhf.models.sharding import full_state_dict
from lit_saferlhf.strategies import discard, exchange, move_into_place
from tests.distributed.test_reliability import train_steps
from tests.distributed.test_strategies import STRATEGIES, clean_environment, fit_on_two_processes, run_stage

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SFT = REPO / "cli_configs/tiny/sft.yaml"
FSDP2 = REPO / "cli_configs/strategies/fsdp2.yaml"
CRASH_AT_STEP = 6


# ----------------------------------------------------------------------------------------------------------------
# Moving a finished folder into place, and deleting one
# ----------------------------------------------------------------------------------------------------------------


def make_folder(path: Path, step: int) -> Path:
    """A stand-in checkpoint folder whose ``meta.pt`` holds ``step``."""
    path.mkdir(parents=True)
    (path / "shard.distcp").write_bytes(b"x" * step)
    (path / "meta.pt").write_text(str(step))
    return path


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_finished_folder_replaces_the_older_checkpoint(
    can_exchange: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not can_exchange:  # a file system without renameat2's exchange (NFS, macOS)
        monkeypatch.setattr(strategies, "exchange", lambda first, second: False)
    target = make_folder(tmp_path / "last.ckpt", step=4)
    move_into_place(make_folder(partial_path(target), step=6), target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]  # the older one is deleted
    assert (target / "meta.pt").read_text() == "6"

    shutil.rmtree(target)
    target.write_bytes(b"a single-file checkpoint of an earlier run")
    move_into_place(make_folder(partial_path(target), step=8), target)
    assert (target / "meta.pt").read_text() == "8"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]

    move_into_place(make_folder(partial_path(tmp_path / "new.ckpt"), step=2), tmp_path / "new.ckpt")
    assert (tmp_path / "new.ckpt" / "meta.pt").read_text() == "2"


def test_folders_are_exchanged_atomically_on_linux(tmp_path: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    first, second = make_folder(tmp_path / "a", step=1), make_folder(tmp_path / "b", step=2)
    assert exchange(first, second)
    assert (first / "meta.pt").read_text() == "2"
    assert (second / "meta.pt").read_text() == "1"


def test_a_checkpoint_folder_is_renamed_away_before_it_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_folder(tmp_path / "epoch=0-step=2.ckpt", step=2)

    def fail(path: Path) -> None:
        raise OSError("killed halfway through deleting")

    monkeypatch.setattr(shutil, "rmtree", fail)
    with pytest.raises(OSError, match="halfway"):
        discard(checkpoint)
    assert [path.name for path in tmp_path.iterdir()] == [partial_path(checkpoint).name]  # no checkpoint name left
    monkeypatch.undo()
    discard(make_folder(checkpoint, step=4))  # the leftover is cleared first
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 through the CLI: a crash while replacing last.ckpt, a resume from the folder, and its export
# ----------------------------------------------------------------------------------------------------------------


class CrashWhileSaving(L.Callback):
    """SIGKILLs every rank while ``last.ckpt`` is saved at step ``CRASH_AT_STEP``: shards written, the rest not."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        real = model_parallel._distributed_checkpoint_save
        last = {"last.ckpt", partial_path(Path("last.ckpt")).name}  # with or without FSDP2Strategy

        def save_then_die(state: dict[str, Any], path: Path) -> None:
            real(state, path)
            if trainer.global_step == CRASH_AT_STEP and Path(path).name in last:
                os.kill(os.getpid(), signal.SIGKILL)

        model_parallel._distributed_checkpoint_save = save_then_die


def sft_overrides(checkpoints: Path) -> list[str]:
    """Two epochs of 4 steps on 2 ranks, a checkpoint folder every 2 steps (top-1 plus ``last.ckpt``)."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(checkpoints), "save_last": True, "every_n_train_steps": 2},
    }
    return [
        "--trainer.max_epochs=2",
        "--data.init_args.limit=256",
        "--trainer.log_every_n_steps=1",
        f"--trainer.callbacks+={json.dumps(checkpoint)}",
    ]


def run_until_killed(out: Path, *overrides: str) -> int:
    """``lit-saferlhf fit`` of the tiny SFT under FSDP2 on 2 CPU processes, which kill themselves; the exit status."""
    run = fit_on_two_processes([f"--config={SFT}", *STRATEGIES["fsdp2"]], out, *overrides)
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.returncode


def saved_step(path: Path) -> int:
    """The global step stored in a checkpoint folder."""
    return torch.load(path / "meta.pt", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run killed while replacing ``last.ckpt`` at step 6, then resumed from that folder to step 8."""
    root = tmp_path_factory.mktemp("fsdp2")
    stage_dir = root / "sft"  # the pipeline's layout: <stage>/checkpoints
    checkpoints, last = stage_dir / "checkpoints", stage_dir / "checkpoints" / "last.ckpt"
    crash = "--trainer.callbacks+=test_sharded_checkpoints.CrashWhileSaving"
    run_until_killed(stage_dir, *sft_overrides(checkpoints), crash)
    crashed = {
        "entries": sorted(path.name for path in checkpoints.iterdir()),
        "last_step": saved_step(last),
        "last": load_checkpoint(last)["state_dict"],
        "step_6": load_checkpoint(checkpoints / f"epoch=1-step={CRASH_AT_STEP}.ckpt")["state_dict"],
        "partial_kind": checkpoint_kind(partial_path(last)),
        "pipeline_resumes_from": newest_checkpoint(stage_dir),
    }
    resumed = root / "resumed"
    records = run_stage("sft", "fsdp2", resumed, *sft_overrides(checkpoints), f"--ckpt_path={last}")
    return {"crashed": crashed, "records": records, "checkpoints": checkpoints, "resumed": resumed}


@pytest.mark.slow
def test_a_crash_while_replacing_a_checkpoint_leaves_the_previous_one(sharded_run: dict[str, Any]) -> None:
    crashed, last = sharded_run["crashed"], sharded_run["checkpoints"] / "last.ckpt"
    # Top-1 kept only the newest periodic folder (steps 2 and 4 were removed); the half-written folder is hidden.
    assert crashed["entries"] == sorted([partial_path(last).name, "epoch=1-step=6.ckpt", "last.ckpt"])
    assert crashed["partial_kind"] is None  # its meta.pt was never written: nothing takes it for a checkpoint
    assert crashed["last_step"] == 4
    assert crashed["last"].keys() == crashed["step_6"].keys()
    assert any(not torch.equal(crashed["last"][key], crashed["step_6"][key]) for key in crashed["last"])  # step 4's
    assert crashed["pipeline_resumes_from"] == last  # a folder counts as a checkpoint for `lit-saferlhf pipeline`


@pytest.mark.slow
def test_resuming_from_a_sharded_folder_continues_the_step_count(sharded_run: dict[str, Any]) -> None:
    records, checkpoints = sharded_run["records"], sharded_run["checkpoints"]
    assert all(record["sharded_params"] == record["params"] > 0 for record in records)
    assert train_steps(sharded_run["resumed"], 0) == [4, 5, 6, 7]
    assert saved_step(checkpoints / "last.ckpt") == 8
    # The leftover partial folder is gone, and so is step 6's folder from the killed run (written after the
    # last.ckpt the run resumed from): the resumed run saved its own step 6 under that name, no -v1 names.
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch=1-step=8.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_export_of_a_sharded_folder_equals_the_end_of_fit_export(sharded_run: dict[str, Any], tmp_path: Path) -> None:
    last, fit_export = sharded_run["checkpoints"] / "last.ckpt", sharded_run["resumed"] / "model"
    main(["export", "--config", str(SFT), "--config", str(FSDP2), "--ckpt_path", str(last), "--out", str(tmp_path)])
    exported, expected = load_file(tmp_path / "model.safetensors"), load_file(fit_export / "model.safetensors")
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[key], expected[key]) for key in expected)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.items() if key in expected)


# ----------------------------------------------------------------------------------------------------------------
# FSDP1 and DeepSpeed ZeRO-3: gather for the end-of-fit export, and export their checkpoint folders
# ----------------------------------------------------------------------------------------------------------------


def wrap_fsdp1(module: L.LightningModule) -> torch.nn.Module:
    """Shard ``module`` as Lightning's ``FSDPStrategy`` does with fsdp.yaml: decoder-layer units, checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = ModuleWrapPolicy({LlamaDecoderLayer})
    full_numel = sum(param.numel() for param in module.parameters())
    cpu = torch.device("cpu")
    root = FullyShardedDataParallel(module, auto_wrap_policy=policy, device_id=cpu, use_orig_params=True)
    apply_activation_checkpointing(root, check_fn=lambda submodule: isinstance(submodule, LlamaDecoderLayer))
    assert sum(param.numel() for param in root.parameters()) < full_numel  # this rank holds a shard
    return root


def save_fsdp1_folder(root: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """What ``FSDPStrategy(state_dict_type="sharded")`` saves: the shards under ``model``, then ``meta.pt``."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(root, StateDictType.SHARDED_STATE_DICT):
        state = root.state_dict()
    _distributed_checkpoint_save({"model": state}, path)
    if torch.distributed.get_rank() == 0:
        torch.save(metadata, path / "meta.pt")


def wrap_zero3(module: L.LightningModule) -> Any:
    """Partition ``module`` as Lightning's ``DeepSpeedStrategy(stage=3)`` does (its engine wraps the module itself)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=module, config=config, model_parameters=list(module.parameters()))
    params = list(module.parameters())
    assert sum(param.ds_tensor.numel() for param in params) < sum(param.ds_numel for param in params)  # a shard
    return engine


def save_zero3_folder(engine: Any, path: Path, metadata: dict[str, Any]) -> None:
    """What ``DeepSpeedStrategy.save_checkpoint`` writes: DeepSpeed's folder, Lightning's state as client state."""
    engine.save_checkpoint(str(path), client_state=metadata, tag="checkpoint")


def gather_worker(kind: str, out: Path) -> None:
    """One rank: the tiny SFT stage with perturbed weights, sharded as ``kind``, gathered and exported as at the end
    of ``fit``; then a checkpoint folder as that strategy writes it. Rank 0 saves the weights it started from."""
    if kind == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    module = build_stage([f"--config={SFT}"])  # the same random init on every rank (the config's seed)
    generator = torch.Generator().manual_seed(0)  # off the config's init, so an export that ignored them would show
    with torch.no_grad():
        for param in module.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
    expected = {key: value.clone() for key, value in module.model.state_dict().items()}
    root = wrap_zero3(module) if kind == "zero3" else wrap_fsdp1(module)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), global_rank=rank, datamodule=None)

    state = full_state_dict(module, "model")  # what on_train_end does
    if rank == 0:
        module.export_to(out / "fit_export", state)
        torch.save(expected, out / "expected.pt")
    metadata = {"global_step": 3, "hyper_parameters": {"_class_path": "lit_saferlhf.stages.SFTModule"}}
    (save_zero3_folder if kind == "zero3" else save_fsdp1_folder)(root, out / "checkpoint.ckpt", metadata)
    torch.distributed.barrier()
    if kind == "zero3":
        load_into_zero3(out / "fit_export", expected)
    torch.distributed.destroy_process_group()


def load_into_zero3(export: Path, expected: dict[str, torch.Tensor]) -> None:
    """Build the exported policy partitioned over both ranks, as ``configure_model`` under ZeRO-3 does (only rank 0
    reads the files); gathered, every rank holds the exported weights."""
    import deepspeed

    source = ModelSource(path=str(export))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build_causal_lm(source, load_tokenizer(source))
    params = list(model.parameters())
    assert sum(param.ds_tensor.numel() for param in params) < sum(param.ds_numel for param in params)  # a shard
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[key], expected[key]) for key in expected)


def run_workers(kind: str, out: Path) -> None:
    """``gather_worker`` on 2 gloo processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **clean_environment(),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
    }
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, kind, str(out)], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        outputs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp1", "zero3"])
def test_fsdp1_and_zero3_gather_the_full_state_and_their_folders_export(kind: str, tmp_path: Path) -> None:
    run_workers(kind, tmp_path)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for exported in (
        tmp_path / "fit_export",  # gathered from the sharded network by full_state_dict, as on_train_end does
        export_checkpoint([f"--config={SFT}"], tmp_path / "checkpoint.ckpt", tmp_path / "export"),  # from the folder
    ):
        weights = load_file(exported / "model.safetensors")
        assert weights.keys() == expected.keys(), exported
        assert all(torch.equal(weights[key], expected[key]) for key in expected), exported


if __name__ == "__main__":
    gather_worker(sys.argv[1], Path(sys.argv[2]))
    # The rank's work is done and written. Skip the interpreter's teardown: a native thread that DeepSpeed's
    # CPU ops leave behind sometimes aborts it ("terminate called without an active exception", status -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
