"""Start-up checks of a stage against its strategy."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

from lit_saferlhf.callbacks.guards import StrategyCheck, UnsupportedCombinationError, check_strategy
from lit_saferlhf.commands.fit import cli_main
from lit_saferlhf.generators import HFGenerate
from tests.helpers import CONFIGS


class RolloutStage(L.LightningModule):
    """Stands in for PPO-Lagrangian: manual optimisation and a generator."""

    def __init__(self, synced_gpus: bool | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = HFGenerate(synced_gpus)


def on_two_processes(strategy: Strategy) -> Strategy:
    strategy.cluster_environment = LightningEnvironment()
    strategy.cluster_environment.set_world_size(2)
    return strategy


def test_manual_optimisation_under_fsdp1_is_refused_pointing_at_fsdp2() -> None:
    with pytest.raises(UnsupportedCombinationError, match=r"RolloutStage uses manual optimisation.*fsdp2\.yaml"):
        check_strategy(FSDPStrategy(), RolloutStage())
    check_strategy(FSDPStrategy(), L.LightningModule())  # automatic optimisation (SFT, reward, cost) is fine
    check_strategy(on_two_processes(ModelParallelStrategy()), RolloutStage())  # FSDP2 supports it


@pytest.mark.parametrize(
    ("strategy", "refused"),
    [
        (on_two_processes(ModelParallelStrategy()), True),
        (on_two_processes(DeepSpeedStrategy(stage=3)), True),
        (on_two_processes(DeepSpeedStrategy(stage=2)), False),  # every rank holds the whole policy
        (on_two_processes(DDPStrategy()), False),
        (ModelParallelStrategy(), False),  # one process: nobody to wait for
    ],
)
def test_unsynced_generation_is_refused_where_sharded_weights_would_hang_it(strategy: Strategy, refused: bool) -> None:
    if refused:
        with pytest.raises(UnsupportedCombinationError, match="synced_gpus is false"):
            check_strategy(strategy, RolloutStage(synced_gpus=False))
    else:
        check_strategy(strategy, RolloutStage(synced_gpus=False))
    check_strategy(strategy, RolloutStage(synced_gpus=None))  # the default syncs whenever distributed


def test_every_cli_run_checks_its_strategy_at_setup() -> None:
    cli = cli_main([f"--config={CONFIGS / 'tiny/sft.yaml'}", "--trainer.logger=false"], run=False)
    (check,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, StrategyCheck)]
    with pytest.raises(UnsupportedCombinationError):
        check.setup(SimpleNamespace(strategy=FSDPStrategy()), RolloutStage(), "fit")
