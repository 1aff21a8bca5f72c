"""A toy plugin of every kind, from a package of its own, run by short name from YAML through ``lit-saferlhf fit``.

The toys live in a temporary package, ``toy_lab``, whose ``.dist-info`` registers each under its kind's
entry-point group, as a lab's ``pyproject.toml`` would. Nothing of the project knows them: adding a
constraint solver, an advantage estimator, a generation backend, an offline objective or a scorer touches no core
file. Each toy appends a line to a file on every call, so the test sees that it ran.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lit_saferlhf.cli import main
from lit_saferlhf.registry import KINDS
from tests.helpers import CONFIGS, column, metrics

TOY_LAB = {
    "__init__.py": '''
def record(path: str, line: str) -> None:
    """Append ``line`` to the file ``path``: what the test reads to see which toy ran."""
    with open(path, "a") as file:
        file.write(line + "\\n")
''',
    "solvers.py": '''
from lit_saferlhf.solvers import ConstraintSolver
from toy_lab import record


class ToyHalfStep(ConstraintSolver):
    """λ moves halfway to the violation: ``λ ← max(0, (λ + J_c - d) / 2)``."""

    def __init__(self, record: str, cost_limit: float = 0.0, init_multiplier: float = 0.0) -> None:
        super().__init__(cost_limit, init_multiplier)
        self.record = record

    def update(self, episode_cost: float) -> dict[str, float]:
        record(self.record, "solver")
        self.multiplier = max(0.0, 0.5 * (self.multiplier + episode_cost - self.cost_limit))
        return {"solver/multiplier": self.multiplier, "solver/toy_half_step": self.multiplier}
''',
    "advantages.py": '''
from lit_saferlhf.advantages import AdvantageEstimator
from toy_lab import record


class ToyReturnToGo(AdvantageEstimator):
    """No critic: a token's advantage is the stream summed from it to the end of the response."""

    needs_critics = False

    def __init__(self, record: str) -> None:
        self.record = record

    def estimate(self, stream, mask, group_size, values=None):
        record(self.record, "advantage")
        return (stream * mask).flip(-1).cumsum(-1).flip(-1) * mask, None
''',
    "generators.py": '''
from lit_saferlhf.generators import Generator
from toy_lab import record


class ToyGreedy(Generator):
    """Greedy decoding with Hugging Face ``generate``."""

    def __init__(self, record: str) -> None:
        self.record = record

    def generate(self, model, input_ids, attention_mask, args, eos_id, pad_id):
        record(self.record, "generator")
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.num_return_sequences, eos_token_id=eos_id, pad_token_id=pad_id,
        )
''',
    "objectives.py": '''
import torch

from lit_saferlhf.losses import ordered
from lit_saferlhf.objectives import Objective
from toy_lab import record


class ToyHinge(Objective):
    """``max(0, m - h)`` on the helpfulness pairs, ``h`` the log-ratio margin of the better response."""

    requires = ("better",)

    def __init__(self, record: str, margin: float = 1.0) -> None:
        self.record, self.margin = record, margin

    def __call__(self, batch):
        record(self.record, "objective")
        chosen, rejected = ordered(batch.logratios, batch.better)
        h = chosen - rejected
        return torch.relu(self.margin - h).mean(), {"toy_margin": h.mean().detach()}
''',
    "scorers.py": '''
import torch

from lit_saferlhf.scorers import Scorer
from toy_lab import record


class ToyWordCount(Scorer):
    """A rule as a cost: the number of words of each response."""

    def __init__(self, record: str) -> None:
        super().__init__()
        self.record = record

    def score(self, samples):
        record(self.record, "scorer")
        return {"score": torch.tensor([float(len(text.split())) for text in samples.responses])}
''',
}
"""The lab's package: one module per kind, as a lab would lay it out."""

TOYS = {
    "solver": "toy_lab.solvers:ToyHalfStep",
    "advantage estimator": "toy_lab.advantages:ToyReturnToGo",
    "generator": "toy_lab.generators:ToyGreedy",
    "objective": "toy_lab.objectives:ToyHinge",
    "scorer": "toy_lab.scorers:ToyWordCount",
}
"""What ``toy_lab``'s ``pyproject.toml`` would declare: one entry point per kind, named after its class."""


@pytest.fixture(scope="module")
def toy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``toy_lab`` "installed": its package and ``.dist-info`` in a folder on ``sys.path``; unloaded after."""
    site = tmp_path_factory.mktemp("site")
    (site / "toy_lab").mkdir()
    for name, source in TOY_LAB.items():
        (site / "toy_lab" / name).write_text(source.lstrip())
    dist_info = site / "toy_lab-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-lab\nVersion: 0.1\n")
    groups = [f"[{KINDS[kind].group}]\n{target.split(':')[1]} = {target}\n" for kind, target in TOYS.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(groups))
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    for name in [name for name in sys.modules if name == "toy_lab" or name.startswith("toy_lab.")]:
        del sys.modules[name]


def fit(config: str, out: Path, toys: dict, *overrides: str) -> None:
    """``lit-saferlhf fit --config cli_configs/<config> --config <toys as YAML>``, outputs under ``out``."""
    (out / "toys.yaml").write_text(yaml.safe_dump({"model": {"init_args": toys}}))
    main(
        [
            "fit",
            f"--config={CONFIGS / config}",
            f"--config={out / 'toys.yaml'}",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--model.init_args.export_dir={out / 'model'}",
            "--trainer.enable_progress_bar=false",
            *overrides,
        ]
    )


def calls(record: Path) -> Counter[str]:
    return Counter(record.read_text().split())


def test_toy_solver_estimator_and_generator_run_a_ppo_stage_by_short_name(
    toy_lab: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    record = str(tmp_path / "calls.txt")
    toys = {  # short names only: the entry points made them known
        "solver": {"class_path": "ToyHalfStep", "init_args": {"record": record}},
        "advantage": {"class_path": "ToyReturnToGo", "init_args": {"record": record}},
        "generator": {"class_path": "ToyGreedy", "init_args": {"record": record}},
    }
    fit(
        "tiny/ppo_lag.yaml",
        tmp_path,
        toys,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
    )
    # Two rollouts: each generates once, estimates the reward and the cost stream apart, then steps λ once.
    assert calls(tmp_path / "calls.txt") == {"generator": 2, "advantage": 4, "solver": 2}
    rows = metrics(tmp_path)
    assert len(column(rows, "solver/toy_half_step")) == 2
    assert not any(name.startswith("loss/reward_critic") for name in rows[0])  # the toy estimator has no critic
    history = json.loads((tmp_path / "model" / "multiplier_history.json").read_text())
    assert history["solver"] == "ToyHalfStep"
    assert history["multiplier"] == pytest.approx(column(rows, "solver/toy_half_step"))  # logged in float32
    config = (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
    for target in ("toy_lab.solvers.ToyHalfStep", "toy_lab.advantages.ToyReturnToGo", "toy_lab.generators.ToyGreedy"):
        assert f"class_path: {target}" in config


def test_toy_objective_runs_the_offline_stage_by_short_name(
    toy_lab: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    record = str(tmp_path / "calls.txt")
    fit(
        "tiny/offline/dpo.yaml",
        tmp_path,
        {"objective": {"class_path": "ToyHinge", "init_args": {"record": record, "margin": 2.0}}},
        f"--model.init_args.policy={tiny_models['sft']}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.limit=32",
        "--data.init_args.batch_size=8",
    )
    assert calls(tmp_path / "calls.txt")["objective"] >= 2  # every training step (and validation)
    rows = metrics(tmp_path)
    assert len(column(rows, "train/objective/toy_margin")) == 2
    summary = json.loads((tmp_path / "model" / "objective.json").read_text())
    assert summary["objective"] == "ToyHinge"
    assert summary["settings"]["margin"] == 2.0


def test_toy_scorer_is_a_constraints_cost_by_short_name(
    toy_lab: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    record = str(tmp_path / "calls.txt")
    solver = {"class_path": "lit_saferlhf_plugins.solvers.DualAscent", "init_args": {"cost_limit": 3.0}}
    toys = {
        "solver": None,
        "scorers": {"words": {"class_path": "ToyWordCount", "init_args": {"record": record}}},
        "constraints": [{"name": "length", "cost": "words", "solver": solver}],
    }
    fit(
        "tiny/ppo_lag.yaml",
        tmp_path,
        toys,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        "--model.init_args.cost_model=null",  # the toy is the only cost: no cost model
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
    )
    assert calls(tmp_path / "calls.txt") == {"scorer": 2}  # once per rollout
    costs = column(metrics(tmp_path), "rollout/cost")
    assert len(costs) == 2
    assert all(cost >= 1.0 for cost in costs)  # word counts of non-empty answers
    assert "class_path: toy_lab.scorers.ToyWordCount" in (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
