"""``lit-saferlhf export`` from single-file checkpoints, its errors, and how the end-of-fit export gathers weights.

The runs are the tiny SFT and cost configs cut to 2 steps each (64 records, batches of 32), and 2
PPO rollouts from them, with ``last.ckpt`` saved every step; sharded folders are exported in
``tests/distributed/test_sharded_checkpoints.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lit_saferlhf.models.sharding as sharding
from lit_saferlhf.commands.export import export_command
from lit_saferlhf.commands.pipeline import newest_checkpoint
from lit_saferlhf.models.sharding import full_state_dict
from tests.helpers import CONFIGS, fit

SFT, COST, PPO = CONFIGS / "tiny/sft.yaml", CONFIGS / "tiny/cost.yaml", CONFIGS / "tiny/ppo_lag.yaml"


def quick_fit(config: Path, out: Path, *overrides: str) -> Path:
    """Two steps of a tiny stage with ``last.ckpt`` after each; the end-of-fit export."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, "every_n_train_steps": 1},
    }
    quick = ["--trainer.max_epochs=1", "--data.init_args.limit=64", f"--trainer.callbacks+={json.dumps(checkpoint)}"]
    return fit(str(config.relative_to(CONFIGS)), out, *quick, *overrides)


def fragment(path: Path, init_args: dict[str, Any]) -> Path:
    """A config fragment that sets ``model.init_args`` (the links a pipeline adds), as JSON (a YAML subset)."""
    path.write_text(json.dumps({"model": {"init_args": init_args}}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SFT run, a cost model run from its export, and PPO from both (the cost model as reward model too)."""
    root = tmp_path_factory.mktemp("consolidate")
    sft = quick_fit(SFT, root / "sft")
    cost_start = fragment(root / "cost_start.yaml", {"model": {"path": str(sft)}})
    cost = quick_fit(COST, root / "cost", f"--config={cost_start}")
    ppo_start = fragment(
        root / "ppo_start.yaml", {"policy": str(sft), "reward_model": str(cost), "cost_model": str(cost)}
    )
    rollouts = [
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=4",
        "--model.init_args.ppo.minibatch_size=2",
    ]
    ppo = quick_fit(PPO, root / "ppo", f"--config={ppo_start}", *rollouts)
    return {"sft": sft, "cost": cost, "ppo": ppo, "ppo_start": ppo_start}


def export(tmp_path: Path, ckpt_path: Path, *fit_args: str) -> Path:
    """``lit-saferlhf export <fit arguments> --ckpt_path ... --out <tmp_path>/exported``, errors raised as they are
    (the CLI's boundary, which prints them as one line, is tested in tests/bad_input)."""
    out = tmp_path / "exported"
    export_command([*fit_args, f"--ckpt_path={ckpt_path}", f"--out={out}"])
    return out


def assert_same_weights(exported: Path, expected: Path, name: str) -> None:
    got, want = load_file(exported / name), load_file(expected / name)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize(
    "strategy",
    [(), *((path,) for path in sorted((CONFIGS / "strategies").glob("*.yaml")))],
    ids=lambda fragments: fragments[0].stem if fragments else "alone",
)
def test_exporting_an_sft_checkpoint_gives_the_end_of_fit_export(
    strategy: tuple[Path, ...], runs: dict[str, Path], tmp_path: Path
) -> None:
    # The fit configs as given, a GPU strategy fragment among them: no Trainer is built, so it exports on a CPU.
    configs = [f"--config={config}" for config in (SFT, *strategy)]
    exported = export(tmp_path, runs["sft"].parent / "checkpoints" / "last.ckpt", *configs)
    assert_same_weights(exported, runs["sft"], "model.safetensors")  # trained weights, not the config's random init
    assert json.loads((exported / "config.json").read_text()) == json.loads((runs["sft"] / "config.json").read_text())
    assert (exported / "tokenizer.json").read_text() == (runs["sft"] / "tokenizer.json").read_text()


def test_exporting_a_cost_checkpoint_gives_the_end_of_fit_export(runs: dict[str, Path], tmp_path: Path) -> None:
    # Fitted with a config fragment that starts from the SFT export; the same setting as a flag works too.
    start = f"--model.init_args.model.path={runs['sft']}"
    exported = export(tmp_path, runs["cost"].parent / "checkpoints" / "last.ckpt", f"--config={COST}", start)
    assert_same_weights(exported, runs["cost"], "model.safetensors")  # the backbone and the head (score.weight)
    assert (exported / "score_model.json").read_text() == (runs["cost"] / "score_model.json").read_text()


def test_exporting_a_ppo_checkpoint_gives_the_policy_and_the_multiplier_history(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    configs = [f"--config={PPO}", f"--config={runs['ppo_start']}"]
    exported = export(tmp_path, runs["ppo"].parent / "checkpoints" / "last.ckpt", *configs)
    assert_same_weights(exported, runs["ppo"], "model.safetensors")
    history = json.loads((exported / "multiplier_history.json").read_text())
    assert history == json.loads((runs["ppo"] / "multiplier_history.json").read_text())
    assert len(history["multiplier"]) == 2  # restored from the checkpoint's solver state


def test_a_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path .*no_such\.ckpt: no such file or folder"):
        export(tmp_path, tmp_path / "no_such.ckpt", f"--config={SFT}")


def test_what_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.ckpt: not a checkpoint that torch.load reads"):
        export(tmp_path, tmp_path / "notes.ckpt", f"--config={SFT}")
    (tmp_path / "half.ckpt").mkdir()  # a folder left without its meta.pt
    with pytest.raises(ValueError, match=r"half\.ckpt: not a checkpoint\. Expected a \.ckpt file, a distributed"):
        export(tmp_path, tmp_path / "half.ckpt", f"--config={SFT}")
    assert not (tmp_path / "exported").exists()


def test_a_checkpoint_of_another_stage_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    cost_checkpoint = runs["cost"].parent / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"is a CostModelModule checkpoint, but the configs build a SFTModule"):
        export(tmp_path, cost_checkpoint, f"--config={SFT}")

    # Without the stage's name in its hyper-parameters, the weight names tell.
    checkpoint = torch.load(cost_checkpoint, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, tmp_path / "anonymous.ckpt")
    names = r"\d+ missing, e\.g\. \['model\.model\.embed_tokens\.weight'.* unexpected, e\.g\. \['model\.backbone\."
    with pytest.raises(ValueError, match=names):
        export(tmp_path, tmp_path / "anonymous.ckpt", f"--config={SFT}")
    assert not (tmp_path / "exported").exists()


def test_the_pipeline_resumes_from_checkpoint_folders_but_not_half_written_ones(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "last.ckpt").mkdir(parents=True)  # a folder without meta.pt: never finished
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"a SLURM checkpoint")
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").write_bytes(b"Lightning's state, written last")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------------------------------------------
# full_state_dict: which gathering each strategy gets (run for real on 2 processes in tests/distributed)
# ----------------------------------------------------------------------------------------------------------------


class TwoNetworks(L.LightningModule):
    """A stage-like module: a trained ``actor`` and a frozen ``reference`` (with a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.actor, self.reference = nn.Linear(2, 3), nn.Linear(3, 1)
        self.actor.register_buffer("count", torch.ones(()))


def attach(module: L.LightningModule, root: nn.Module, rank: int = 0) -> None:
    """A trainer whose strategy's model is ``root``, on ``rank``."""
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), global_rank=rank)


def test_whole_networks_need_no_gathering() -> None:
    module = TwoNetworks()
    attach(module, module)  # one device or DDP: the strategy's model holds no FSDP unit
    assert full_state_dict(module, "actor") is None


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_parameters_are_gathered_one_at_a_time_on_every_rank(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed

    module = TwoNetworks()
    for index, param in enumerate(module.parameters()):
        param.ds_id = index  # what ZeRO-3 partitioning marks its parameters with
    attach(module, module, rank)
    gathered: list[list[torch.Size]] = []

    @contextlib.contextmanager
    def gather(params: list[nn.Parameter], modifier_rank: int | None) -> Iterator[None]:
        assert modifier_rank is None  # read-only: no rank's changes are broadcast back
        gathered.append([param.shape for param in params])
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gather)
    state = full_state_dict(module, "actor")
    assert gathered == [[module.actor.weight.shape], [module.actor.bias.shape]]  # a collective: every rank gathers
    if rank == 0:
        assert state.keys() == {"weight", "bias", "count"}  # the network's own names, buffers too
        assert all(torch.equal(state[key], value) for key, value in module.actor.state_dict().items())
        assert state["weight"].data_ptr() != module.actor.weight.data_ptr()  # copied before the shard is freed
    else:
        assert state == {}


class FakeFSDP(nn.Module):
    """Stands in for torch's FSDP1 root around the LightningModule: its state carries the module's names."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.wrapped = module
        self.calls: list[Any] = []

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.wrapped.state_dict()

    @staticmethod
    def state_dict_type(root: nn.Module, kind: Any, config: Any) -> contextlib.AbstractContextManager:
        root.calls.append((kind, config))
        return contextlib.nullcontext()


def test_fsdp1_gathers_the_root_and_keeps_the_networks_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharding, "FullyShardedDataParallel", FakeFSDP)
    module = TwoNetworks()
    root = FakeFSDP(module)
    attach(module, root)
    state = full_state_dict(module, "actor")
    assert state.keys() == {"weight", "bias", "count"}  # "actor." removed, the reference left out
    assert torch.equal(state["weight"], module.actor.weight)
    ((kind, config),) = root.calls
    assert kind == sharding.StateDictType.FULL_STATE_DICT
    assert config.rank0_only
    assert not config.offload_to_cpu  # the weights are on the CPU already; on GPUs they are offloaded
