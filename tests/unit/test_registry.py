"""Solver discovery: built-ins, a third-party entry point, broken entry points, short names in jsonargparse."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from lit_saferlhf.registry import KINDS, PluginError, load_kind
from lit_saferlhf.solvers import ConstraintSolver
from lit_saferlhf_plugins.solvers import DualAscent, FixedPenalty, PIDLagrangian

HALF_STEP_SOURCE = '''
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


def not_a_solver():
    return None
'''


def _install_fake_distribution(root: Path, package: str, entry_points: dict[str, str]) -> None:
    """Write ``package/__init__.py`` and a ``.dist-info`` registering ``entry_points`` as solvers."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(HALF_STEP_SOURCE)
    dist_info = root / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{KINDS['solver'].group}]\n{lines}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` to install fake distributions into; their modules are unloaded after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.endswith("lab_solvers"):
            del sys.modules[name]
    gc.collect()  # drop the fake classes from ConstraintSolver.__subclasses__()


def test_builtins_are_found_without_any_plugin() -> None:
    solvers = load_kind("solver")
    assert solvers["FixedPenalty"] is FixedPenalty
    assert solvers["DualAscent"] is DualAscent
    assert solvers["PIDLagrangian"] is PIDLagrangian


def test_third_party_entry_point_is_loaded(site: Path) -> None:
    _install_fake_distribution(site, "my_lab_solvers", {"HalfStep": "my_lab_solvers:HalfStep"})
    solvers = load_kind("solver")
    half_step = solvers["HalfStep"]
    assert issubclass(half_step, ConstraintSolver)
    assert half_step.__module__ == "my_lab_solvers"
    assert half_step(some_arg=2).update(3.0) == {"solver/multiplier": 1.5}
    assert {"FixedPenalty", "DualAscent", "PIDLagrangian"} <= set(solvers)


def test_entry_point_to_a_non_solver_names_the_entry_point_and_distribution(site: Path) -> None:
    _install_fake_distribution(site, "broken_lab_solvers", {"NotASolver": "broken_lab_solvers:not_a_solver"})
    with pytest.raises(PluginError, match="not a subclass of") as info:
        load_kind("solver")
    assert "'NotASolver'" in str(info.value)
    assert "broken_lab_solvers 0.1" in str(info.value)  # the distribution that declares it


def test_entry_point_that_fails_to_import_names_the_entry_point_and_distribution(site: Path) -> None:
    _install_fake_distribution(site, "typo_lab_solvers", {"Missing": "typo_lab_solvers:HalfStp"})
    with pytest.raises(PluginError, match="failed to load") as info:
        load_kind("solver")
    assert "'Missing'" in str(info.value)
    assert "typo_lab_solvers 0.1" in str(info.value)
    assert "HalfStp" in str(info.value)


def test_entry_point_reusing_a_builtin_name_is_rejected(site: Path) -> None:
    _install_fake_distribution(site, "clash_lab_solvers", {"DualAscent": "clash_lab_solvers:HalfStep"})
    with pytest.raises(PluginError, match="already taken by") as info:
        load_kind("solver")
    assert "clash_lab_solvers 0.1" in str(info.value)


def _solver_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--solver", type=ConstraintSolver)
    return parser


def test_jsonargparse_resolves_a_plugin_by_short_name(site: Path) -> None:
    _install_fake_distribution(site, "my_lab_solvers", {"HalfStep": "my_lab_solvers:HalfStep"})
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
    assert solver.uses_cost is (config != "ppo.yaml")


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
    _install_fake_distribution(site, "cli_lab_solvers", {"QuarterStep": "cli_lab_solvers:QuarterStep"})
    source = (site / "cli_lab_solvers" / "__init__.py").read_text().replace("HalfStep", "QuarterStep")
    (site / "cli_lab_solvers" / "__init__.py").write_text(source)
    config = Path(__file__).resolve().parents[2] / "cli_configs" / "tiny" / "ppo_lag.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", f"--config={config}", "--model.solver=QuarterStep", "--model.solver.some_arg=3", "--print_config"]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: cli_lab_solvers.QuarterStep" in printed
    assert "some_arg: 3" in printed


@pytest.mark.parametrize("config", ["fixed_penalty.yaml", "dual_ascent.yaml", "pid_lagrangian.yaml"])
def test_solver_fragment_keeps_the_stage_cost_limit(config: str, tmp_path: Path) -> None:
    # The constraint threshold d belongs to the experiment, not to the solver's rule: it must survive a swap.
    base = {"class_path": "DualAscent", "init_args": {"cost_limit": -5.0}}
    assert solver_after_fragment(base, config, tmp_path).cost_limit == -5.0
