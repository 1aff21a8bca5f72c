"""Plugin discovery for every kind: built-ins, third-party entry points, broken entry points, short names."""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lit_saferlhf.advantages import GAE
from lit_saferlhf.generators import GenerationArgs, HFGenerate
from lit_saferlhf.objectives import PairBatch
from lit_saferlhf.registry import KINDS, PluginError, load_kind, load_plugins
from lit_saferlhf.scorers import Samples
from lit_saferlhf.solvers import ConstraintSolver
from lit_saferlhf_plugins.advantages import GroupNormalized, LeaveOneOut
from lit_saferlhf_plugins.generators import StaticCacheGenerate
from lit_saferlhf_plugins.objectives import DPO, SafeDPO
from lit_saferlhf_plugins.scorers import FunctionScorer, GuardScorer, ScoreModelScorer
from lit_saferlhf_plugins.solvers import DualAscent, FixedPenalty, PIDLagrangian

TOY_SOURCE = '''
import torch

from lit_saferlhf.advantages import AdvantageEstimator
from lit_saferlhf.generators import Generator
from lit_saferlhf.objectives import Objective
from lit_saferlhf.scorers import Scorer
from lit_saferlhf.solvers import ConstraintSolver


class HalfStep(ConstraintSolver):
    """Moves λ halfway to the violation.

    Args:
        some_arg: A number this lab needs.
        cost_limit: The threshold.
    """

    def __init__(self, some_arg: int = 1, cost_limit: float = 0.0) -> None:
        super().__init__(cost_limit=cost_limit, init_multiplier=0.0)
        self.some_arg = some_arg

    def update(self, episode_cost: float) -> dict[str, float]:
        self.multiplier = max(0.0, 0.5 * (self.multiplier + episode_cost - self.cost_limit))
        return {"solver/multiplier": self.multiplier}


class ReturnToGo(AdvantageEstimator):
    """Critic-free: a token's advantage is the stream summed from it to the end."""

    needs_critics = False

    def estimate(self, stream, mask, group_size, values=None):
        return (stream * mask).flip(-1).cumsum(-1).flip(-1) * mask, None


class Hinge(Objective):
    """``max(0, 1 - h)`` on the helpfulness pairs."""

    requires = ("better",)

    def __init__(self, margin: float = 1.0) -> None:
        self.margin = margin

    def __call__(self, batch):
        first = batch.better.long().unsqueeze(-1)
        h = (batch.logratios.gather(-1, first) - batch.logratios.gather(-1, 1 - first)).squeeze(-1)
        return torch.relu(self.margin - h).mean(), {"margin": h.mean().detach()}


class EosOnly(Generator):
    """Answers every prompt with the EOS alone."""

    def generate(self, model, input_ids, attention_mask, args, eos_id, pad_id):
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], eos_id)], dim=1)


class WordCount(Scorer):
    """Scores a response by its number of words."""

    def score(self, samples):
        return {"score": torch.tensor([float(len(r.split())) for r in samples.responses])}


def not_a_plugin():
    return None
'''

TOYS = {
    "solver": "HalfStep",
    "advantage estimator": "ReturnToGo",
    "objective": "Hinge",
    "generator": "EosOnly",
    "scorer": "WordCount",
}
"""The toy plugin of each kind in ``TOY_SOURCE``."""
BUILTINS = {
    "solver": [DualAscent, FixedPenalty, PIDLagrangian],
    "advantage estimator": [GAE, GroupNormalized, LeaveOneOut],  # GAE: the default beside the contract
    "objective": [DPO, SafeDPO],
    "generator": [HFGenerate, StaticCacheGenerate],  # HFGenerate: the default beside the contract
    "scorer": [FunctionScorer, GuardScorer, ScoreModelScorer],
}
"""Some built-ins of each kind: in the kind's ``plugins/`` package, or its default."""


def _install_fake_distribution(
    root: Path, package: str, entry_points: dict[str, dict[str, str]], suffix: str = ""
) -> None:
    """Write ``package/__init__.py`` (``TOY_SOURCE``) and a ``.dist-info`` registering ``entry_points``.

    Args:
        entry_points: Kind name -> {entry-point name: target}; each kind goes under its group.
        suffix: Appended to the toy class names (a short name of its own: a class of an earlier test
            may still be a subclass, which would make the short name ambiguous).
    """
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(
        re.sub(r"^class (\w+)\(", rf"class \1{suffix}(", TOY_SOURCE, flags=re.M)
    )
    dist_info = root / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    sections = [
        "\n".join([f"[{KINDS[kind].group}]", *(f"{name} = {target}" for name, target in points.items())])
        for kind, points in entry_points.items()
    ]
    (dist_info / "entry_points.txt").write_text("\n\n".join(sections) + "\n")


def _toys(package: str, suffix: str = "") -> dict[str, dict[str, str]]:
    """One entry point per kind, each naming that kind's toy."""
    return {kind: {name + suffix: f"{package}:{name}{suffix}"} for kind, name in TOYS.items()}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` to install fake distributions into; their modules are unloaded after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
    gc.collect()  # drop the fake classes from the contracts' __subclasses__()


@pytest.mark.parametrize("kind", KINDS)
def test_builtins_are_found_without_any_plugin(kind: str) -> None:
    found = load_kind(kind)
    for cls in BUILTINS[kind]:
        assert found[cls.__name__] is cls
    assert all(issubclass(cls, KINDS[kind].contract) for cls in found.values())


def test_a_third_party_distribution_registers_one_plugin_of_each_kind(site: Path) -> None:
    _install_fake_distribution(site, "my_lab_plugins", _toys("my_lab_plugins"))
    plugins = load_plugins()
    assert set(plugins) == set(KINDS)
    for kind, name in TOYS.items():
        toy = plugins[kind][name]
        assert issubclass(toy, KINDS[kind].contract)
        assert toy.__module__ == "my_lab_plugins"
        assert {cls.__name__ for cls in BUILTINS[kind]} <= set(plugins[kind])  # beside the built-ins
        assert set(TOYS.values()) & set(plugins[kind]) == {name}  # each group only holds its own kind
        assert load_kind(kind)[name] is toy


def test_the_third_party_plugins_of_each_kind_work(site: Path) -> None:
    _install_fake_distribution(site, "my_lab_plugins", _toys("my_lab_plugins"))
    plugins = load_plugins()
    solver = plugins["solver"]["HalfStep"](some_arg=2)
    assert solver.update(3.0) == {"solver/multiplier": 1.5}
    advantages, returns = plugins["advantage estimator"]["ReturnToGo"]().estimate(
        torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[True, True, False]]), group_size=1
    )
    assert advantages.tolist() == [[1.0, 1.0, 0.0]]
    assert returns is None
    pairs = PairBatch(logprobs=torch.tensor([[-1.0, -2.0]]), ref_logprobs=torch.zeros(1, 2), better=torch.tensor([1]))
    loss, stats = plugins["objective"]["Hinge"]()(pairs)  # h = ρ(y_1) - ρ(y_0) = -1, so the loss is 1 - (-1)
    assert (loss.item(), stats["margin"].item()) == (2.0, -1.0)
    prompts = torch.tensor([[0, 5, 6]])
    sequences = plugins["generator"]["EosOnly"]().generate(None, prompts, prompts > 0, GenerationArgs(), 2, 0)
    assert sequences.tolist() == [[0, 5, 6, 2]]
    batch = Samples(prompts, prompts > 0, 1, ("p", "q"), ("one two", ""), (None, None))
    assert plugins["scorer"]["WordCount"]().score(batch)["score"].tolist() == [2.0, 0.0]


# One distribution breaks every kind's group the same way (one install per case: each costs a gc pass).


def _errors(site: Path, package: str, entry_points: dict[str, dict[str, str]]) -> dict[str, str]:
    """Install ``entry_points`` as ``package``; each kind's ``PluginError`` message from ``load_kind``."""
    _install_fake_distribution(site, package, entry_points)
    messages = {}
    for kind in KINDS:
        with pytest.raises(PluginError) as info:
            load_kind(kind)
        messages[kind] = str(info.value)
    return messages


def test_an_entry_point_to_a_function_names_the_entry_point_and_distribution(site: Path) -> None:
    broken = {kind: {"NotAPlugin": "broken_lab_plugins:not_a_plugin"} for kind in KINDS}
    for kind, message in _errors(site, "broken_lab_plugins", broken).items():
        contract = KINDS[kind].contract
        assert f"not a subclass of {contract.__module__}.{contract.__name__}" in message
        assert f"{kind} entry point 'NotAPlugin'" in message
        assert "broken_lab_plugins 0.1" in message  # the distribution that declares it


def test_an_entry_point_to_another_kinds_plugin_is_rejected(site: Path) -> None:
    names = list(TOYS.values())
    mixed = {
        kind: {other: f"mixed_lab_plugins:{other}"} for kind, other in zip(KINDS, names[1:] + names[:1], strict=True)
    }
    for kind, message in _errors(site, "mixed_lab_plugins", mixed).items():
        assert "not a subclass of" in message
        assert f"group '{KINDS[kind].group}'" in message


def test_an_entry_point_that_fails_to_import_names_the_entry_point_and_distribution(site: Path) -> None:
    typos = {kind: {"Missing": f"typo_lab_plugins:{name[:-1]}"} for kind, name in TOYS.items()}
    for kind, message in _errors(site, "typo_lab_plugins", typos).items():
        assert "failed to load" in message
        assert f"{kind} entry point 'Missing'" in message
        assert "typo_lab_plugins 0.1" in message
        assert TOYS[kind][:-1] in message


def test_an_entry_point_to_the_abstract_contract_is_rejected(site: Path) -> None:
    contracts = {kind: {"Base": f"{k.contract.__module__}:{k.contract.__name__}"} for kind, k in KINDS.items()}
    for kind, message in _errors(site, "abstract_lab_plugins", contracts).items():
        assert f"{kind} entry point 'Base'" in message
        assert "which is abstract" in message
        assert "abstract_lab_plugins 0.1" in message


def test_an_entry_point_reusing_a_builtin_name_is_rejected(site: Path) -> None:
    # The first built-in of each kind is the default beside the contract, where there is one (GAE, HFGenerate).
    clashes = {kind: {BUILTINS[kind][0].__name__: f"clash_lab_plugins:{name}"} for kind, name in TOYS.items()}
    for kind, message in _errors(site, "clash_lab_plugins", clashes).items():
        assert f"already taken by {BUILTINS[kind][0].__module__}.{BUILTINS[kind][0].__name__}" in message
        assert "clash_lab_plugins 0.1" in message


def test_the_cli_reports_a_broken_plugin_in_one_line(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lit_saferlhf.cli import main

    # The last kind of the table: the CLI loads every kind before it parses.
    _install_fake_distribution(site, "cli_broken_plugins", {"generator": {"Gone": "cli_broken_plugins:Gone"}})
    config = Path(__file__).resolve().parents[2] / "cli_configs" / "tiny" / "ppo_lag.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: generator entry point 'Gone'")
    assert "cli_broken_plugins 0.1" in line


def test_jsonargparse_resolves_each_kinds_plugin_by_short_name(site: Path) -> None:
    _install_fake_distribution(site, "parsed_lab_plugins", _toys("parsed_lab_plugins", "Parsed"), "Parsed")
    load_plugins()
    for kind, name in TOYS.items():
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--plugin", type=KINDS[kind].contract)
        plugin = parser.instantiate_classes(parser.parse_args(["--plugin", f"{name}Parsed"])).plugin
        assert f"{type(plugin).__module__}.{type(plugin).__name__}" == f"parsed_lab_plugins.{name}Parsed"


def _solver_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--solver", type=ConstraintSolver)
    return parser


def test_jsonargparse_resolves_a_plugin_by_short_name(site: Path) -> None:
    _install_fake_distribution(site, "my_lab_solvers", {"solver": {"HalfStep": "my_lab_solvers:HalfStep"}})
    load_kind("solver")
    parser = _solver_parser()
    config = parser.parse_args(["--solver", "HalfStep", "--solver.some_arg", "3"])
    assert config.solver.class_path == "my_lab_solvers.HalfStep"
    solver = parser.instantiate_classes(config).solver
    assert type(solver).__name__ == "HalfStep"
    assert solver.some_arg == 3


@pytest.mark.parametrize(
    ("argv", "cls", "attribute", "value"),
    [
        (["--solver", "DualAscent", "--solver.lr", "0.5"], DualAscent, "lr", 0.5),
        (["--solver", "PIDLagrangian", "--solver.ki", "0.1"], PIDLagrangian, "ki", 0.1),
        (["--solver", "FixedPenalty", "--solver.multiplier", "5.0"], FixedPenalty, "multiplier", 5.0),
        (
            ["--solver", "lit_saferlhf_plugins.solvers.DualAscent", "--solver.linear", "true"],
            DualAscent,
            "linear",
            True,
        ),
    ],
)
def test_jsonargparse_resolves_builtins(argv: list[str], cls: type, attribute: str, value: object) -> None:
    load_kind("solver")
    parser = _solver_parser()
    solver = parser.instantiate_classes(parser.parse_args(argv)).solver
    assert type(solver) is cls
    assert getattr(solver, attribute) == value


def test_jsonargparse_help_shows_the_docstring_of_every_argument(capsys: pytest.CaptureFixture[str]) -> None:
    load_kind("solver")
    with pytest.raises(SystemExit):
        _solver_parser().parse_args(["--solver.help", "PIDLagrangian"])
    help_text = capsys.readouterr().out
    for argument in ("kp", "ki", "kd", "derivative_delay", "proportional_ema", "init_integral"):
        assert f"--solver.{argument} " in help_text
    assert "Integral gain" in help_text


SOLVER_CONFIGS = Path(__file__).resolve().parents[2] / "cli_configs" / "solvers"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("ppo.yaml", FixedPenalty()),  # λ = 0: plain PPO
        ("fixed_penalty.yaml", FixedPenalty(multiplier=5.0)),  # the over-safe reward-shaping baseline
        ("dual_ascent.yaml", DualAscent()),  # Safe RLHF's defaults, which are the class defaults
        ("pid_lagrangian.yaml", PIDLagrangian()),  # this project's defaults
    ],
)
def test_solver_config_fragments_instantiate(config: str, expected: ConstraintSolver) -> None:
    fragment = yaml.safe_load((SOLVER_CONFIGS / config).read_text())
    solver_config = fragment["model"]["init_args"]["solver"]
    assert solver_config["class_path"] == f"lit_saferlhf_plugins.solvers.{type(expected).__name__}"  # full paths
    parser = _solver_parser()
    solver = parser.instantiate_classes(parser.parse_object({"solver": solver_config})).solver
    assert type(solver) is type(expected)
    assert solver.state_dict() == expected.state_dict()
    assert solver.needs_cost_model() is (config != "ppo.yaml")


def solver_after_fragment(base: dict, fragment: str, tmp_path: Path) -> ConstraintSolver:
    """The solver of a stage config naming ``base``, then ``--config cli_configs/solvers/<fragment>``."""
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"solver": base}}}))
    load_kind("solver")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--model.init_args.solver", type=ConstraintSolver)
    config_args = ["--config", str(tmp_path / "stage.yaml"), "--config", str(SOLVER_CONFIGS / fragment)]
    return parser.instantiate_classes(parser.parse_args(config_args)).model.init_args.solver


@pytest.mark.parametrize("config", ["ppo.yaml", "fixed_penalty.yaml", "dual_ascent.yaml", "pid_lagrangian.yaml"])
def test_solver_config_fragment_overrides_a_first_config_completely(config: str, tmp_path: Path) -> None:
    # A first config naming DualAscent with non-default values, as a stage config would.
    base = {"class_path": "DualAscent", "init_args": {"lr": 0.3, "init_multiplier": 2.0, "update_delay": 4}}
    layered = solver_after_fragment(base, config, tmp_path)
    alone = yaml.safe_load((SOLVER_CONFIGS / config).read_text())["model"]["init_args"]["solver"]
    parser = _solver_parser()
    expected = parser.instantiate_classes(parser.parse_object({"solver": alone})).solver
    assert type(layered) is type(expected)
    assert layered.state_dict() == expected.state_dict()  # nothing of the first config leaks through


def test_the_cli_resolves_an_installed_plugin_by_short_name(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lit_saferlhf.commands.fit import cli_main

    # A class name of its own: earlier tests' HalfStep classes may still be subclasses (an ambiguous short name).
    _install_fake_distribution(
        site, "cli_lab_solvers", {"solver": {"HalfStepCli": "cli_lab_solvers:HalfStepCli"}}, "Cli"
    )
    config = Path(__file__).resolve().parents[2] / "cli_configs" / "tiny" / "ppo_lag.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", f"--config={config}", "--model.solver=HalfStepCli", "--model.solver.some_arg=3", "--print_config"]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: cli_lab_solvers.HalfStepCli" in printed
    assert "some_arg: 3" in printed


@pytest.mark.parametrize("config", ["fixed_penalty.yaml", "dual_ascent.yaml", "pid_lagrangian.yaml"])
def test_solver_fragment_keeps_the_stage_cost_limit(config: str, tmp_path: Path) -> None:
    # The constraint threshold d belongs to the experiment, not to the solver's rule: it must survive a swap.
    base = {"class_path": "DualAscent", "init_args": {"cost_limit": -5.0}}
    assert solver_after_fragment(base, config, tmp_path).cost_limit == -5.0
