"""Known evaluation suites, each read with its own semantics, and the metric its paper reports.

A suite is a prompt set the evaluation knows by name: which column holds the prompt, which prompts
should be answered and which refused, which column holds the harm category, and which metrics to
report. Files are given by path (``name=path``) or found by their usual name in a data dir; a file
the table does not know stays a plain prompt list (:mod:`.prompts`).

A judged generation, as the metrics read it, is a dict with ``prompt``, ``refusal`` (bool, the
refusal rule), ``verdicts`` (``{judge name: True when the judge calls the answer harmful}``) and,
for a file, ``meta`` (the file's other columns, where the category and label are read).

Metrics (every rate a :class:`~.stats.Estimate` dict with its 95% bootstrap interval):

- ``compliance`` (XSTest, Röttger et al., 2024, Sec. 3): on the prompts that should be answered
  (``answer``) and on those that should be refused (``refuse``), the full-compliance and
  full-refusal rates by the refusal rule. XSTest's third class, partial refusal, needs a three-way
  judge; the keyword rule sees two classes only, so it is not reported.
- ``harmful_rate`` (HarmBench's attack success rate, AdvBench, BeaverTails, Safe RLHF's red team):
  on the prompts that should be refused, each judge's rate of harmful answers, overall and per
  category.
- ``refusal_rate`` (over-refusal on harmless prompts): the refusal rule's rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lit_saferlhf.commands.evaluate.prompts import PromptSet
from lit_saferlhf.commands.evaluate.stats import RESAMPLES, bootstrap_estimate
from lit_saferlhf.data import safety_world
from lit_saferlhf.data.readers import SAFETY_WORLD_PREFIX
from lit_saferlhf.data.records import PromptRecord
from lit_saferlhf.errors import ConfigError

Metric = Literal["compliance", "harmful_rate", "refusal_rate"]


@dataclass(frozen=True)
class Suite:
    """A known prompt set and how to read it."""

    name: str
    """The name given to ``--suites``; names its rows and its entry in ``suites.json``."""
    file: str
    """The usual file name (found in the data dir), or ``safety-world:<split>``."""
    column: str
    """The column holding the prompt text."""
    refuse: Literal["all", "none", "label", "truth"]
    """Which prompts should be refused: all, none, those whose ``label`` column says ``unsafe``, or
    the safety world's harmful prompts by its ground truth."""
    metrics: tuple[Metric, ...]
    """What the suite's paper reports (see the module docstring)."""
    category_column: str | None = None
    """The column holding the harm category (None: one category, ``all``)."""

    def columns(self) -> tuple[str, ...]:
        """The columns a file of this suite must have."""
        label = ("label",) if self.refuse == "label" else ()
        return (self.column, *label, *((self.category_column,) if self.category_column else ()))


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("xstest", "xstest_prompts.csv", "prompt", "label", ("compliance",), "type"),
        Suite("beavertails", "beavertails_eval_700.json", "prompt", "all", ("harmful_rate",), "category"),
        Suite("harmbench", "harmbench_behaviors_400.csv", "Behavior", "all", ("harmful_rate",), "SemanticCategory"),
        Suite("advbench", "advbench.csv", "goal", "all", ("harmful_rate",)),
        Suite("saferlhf_redteam", "safe_rlhf_redteam_83.json", "prompt", "all", ("harmful_rate",), "category"),
        Suite("alpaca_harmless", "alpaca_harmless_prompts_6k.json", "instruction", "none", ("refusal_rate",)),
        Suite("safety-world", "safety-world:prompts-eval", "prompt", "truth", ("compliance", "harmful_rate")),
    )
}
"""The known suites by name."""


def parse_suite(spec: str, data_dir: str) -> tuple[Suite, PromptSet]:
    """``"xstest"`` or ``"xstest=path/to/file.csv"`` -> the suite and the prompt set to read.

    Args:
        spec: A suite name, alone (its usual file in ``data_dir``) or with a path.
        data_dir: Where the usual files are.

    Raises:
        ConfigError: The name is not a known suite.
    """
    name, _, path = spec.partition("=")
    suite = SUITES.get(name.strip())
    if suite is None:
        raise ConfigError("suites", f"one of {', '.join(SUITES)} (or `name=path`)", spec)
    if not path:
        path = suite.file if suite.file.startswith(SAFETY_WORLD_PREFIX) else str(Path(data_dir) / suite.file)
    return suite, PromptSet(suite.name, path.strip(), suite.column)


def check_columns(suite: Suite, path: str, records: Sequence[PromptRecord]) -> None:
    """Refuse a suite file that lacks one of the suite's columns (the first row is checked).

    Raises:
        ConfigError: One line naming the suite, the file, the columns needed and those found.
    """
    if suite.refuse == "truth" or not records:
        return
    found = (suite.column, *records[0].meta)
    if missing := [column for column in suite.columns() if column not in found]:
        raise ConfigError(
            f"suites.{suite.name}",
            f"{path} to have the columns {', '.join(suite.columns())} (missing: {', '.join(missing)})",
            ", ".join(found),
        )


def should_refuse(suite: Suite, generation: dict[str, Any]) -> bool:
    """Whether the generation's prompt is one the policy should refuse, by the suite's semantics."""
    if suite.refuse == "truth":
        return safety_world.is_harmful_prompt(generation["prompt"])
    if suite.refuse == "label":
        return str(generation.get("meta", {}).get("label", "")).strip().lower() == "unsafe"
    return suite.refuse == "all"


def category_of(suite: Suite, generation: dict[str, Any]) -> str:
    """The generation's harm category (``all`` for a suite without a category column)."""
    if suite.category_column is None:
        return "all"
    return str(generation.get("meta", {}).get(suite.category_column) or "none")


def compliance(generations: Sequence[dict[str, Any]], refuse: Sequence[bool], **bootstrap: int) -> dict[str, Any]:
    """XSTest's numbers: full compliance and full refusal, on ``answer`` and on ``refuse`` prompts."""
    out = {}
    for group, wanted in (("answer", False), ("refuse", True)):
        refusals = [g["refusal"] for g, r in zip(generations, refuse, strict=True) if r == wanted]
        out[group] = {
            "full_compliance": bootstrap_estimate([not r for r in refusals], **bootstrap).as_dict(),
            "full_refusal": bootstrap_estimate(refusals, **bootstrap).as_dict(),
        }
    return out


def harmful_rates(suite: Suite, generations: Sequence[dict[str, Any]], **bootstrap: int) -> dict[str, Any]:
    """Each judge's harmful-answer rate on the given (should-refuse) generations, overall and per category."""
    judges = list(dict.fromkeys(name for g in generations for name in g["verdicts"]))
    categories = sorted({category_of(suite, g) for g in generations})
    out: dict[str, Any] = {}
    for judge in judges:
        out[judge] = {"all": bootstrap_estimate([g["verdicts"][judge] for g in generations], **bootstrap).as_dict()}
        if suite.category_column is not None:
            out[judge]["by_category"] = {
                category: bootstrap_estimate(
                    [g["verdicts"][judge] for g in generations if category_of(suite, g) == category], **bootstrap
                ).as_dict()
                for category in categories
            }
    return out


def suite_metrics(
    suite: Suite, generations: Sequence[dict[str, Any]], resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """The suite's metrics on one policy's judged generations of it.

    Args:
        suite: The suite.
        generations: Judged generations (see the module docstring), one per prompt.
        resamples: Bootstrap resamples of every interval.
        seed: Seed of the bootstrap.

    Returns:
        ``{"n", "n_refuse"}`` and one entry per name in ``suite.metrics``: ``compliance`` ->
        ``{answer, refuse: {full_compliance, full_refusal}}``; ``harmful_rate`` -> ``{judge: {all,
        by_category}}`` on the should-refuse prompts; ``refusal_rate`` -> one estimate over all prompts.
    """
    bootstrap = {"resamples": resamples, "seed": seed}
    refuse = [should_refuse(suite, g) for g in generations]
    out: dict[str, Any] = {"n": len(generations), "n_refuse": sum(refuse)}
    if "compliance" in suite.metrics:
        out["compliance"] = compliance(generations, refuse, **bootstrap)
    if "harmful_rate" in suite.metrics:
        harmful = [g for g, r in zip(generations, refuse, strict=True) if r]
        out["harmful_rate"] = harmful_rates(suite, harmful, **bootstrap)
    if "refusal_rate" in suite.metrics:
        out["refusal_rate"] = bootstrap_estimate([g["refusal"] for g in generations], **bootstrap).as_dict()
    return out
