r"""FDC selection (Equilibrate RLHF, ``METHODS.md`` §2 (b-1)): a safety set with a quota per risk category.

Equilibrate RLHF trains on a small safety set mixed across three kinds of risk rather than on
more of the same: 14k = 10k EHD (explicit) + 3k IHD (implicit) + 1k MHD (mixed). ``lit-saferlhf
select`` builds such a set from any data the readers read, taking each record's category from

- its ``risk_category`` field (the default; ``safety-world:pairs-risk`` has it),
- a labels file (``--labels``): one row per prompt with the prompt text in ``question_y`` and the
  label in ``category``, as the authors' released ``beavertails_selected_relabelled.json``; records
  are matched on the prompt text (whitespace-normalised),
- or a classifier (``--classifier``): ``safety-world`` (the world's truth,
  :func:`lit_saferlhf.data.safety_world.risk_category`), an import path ``module:name`` of any callable
  ``prompt -> label or None`` (a class is instantiated without arguments), or a Hugging Face
  text-classification model dir (its ``id2label`` names are the labels).

Labels are read as our names (``EHD``/``IHD``/``MHD``/``benign``/``benign_risky``/``other``) or
Equilibrate's (``Factual Risk``/``Intentional Risk``/``Mixed Risk``/``OTHER``/``No risk``), case and
spaces ignored. Every record read is counted in the report: per category, *unlabelled* (no label)
and *unknown* (a label that is none of the names above, counted per label). Only the quota
categories are selected; the rest are reported, never dropped silently. The quotas are exact
(largest remainder of ``total`` over the ratio); a category with fewer records than its quota is an
error naming it. The draw is seeded. Each selected record is written as read, its ``risk_category``
set to our name, followed by a report (printed, and written as ``<out>.report.json``)::

    lit-saferlhf select --data safety-world:pairs-risk --total 1400 --out outputs/fdc/pairs.jsonl
    lit-saferlhf select --data pku.jsonl --labels beavertails_selected_relabelled.json \
        --total 14000 --ratio 10:3:1 --out fdc.jsonl
    lit-saferlhf select --data prompts.jsonl --classifier my_lab.judge:classify --total 140 --out fdc.jsonl
"""

from __future__ import annotations

import importlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lit_saferlhf.data.readers import RowOrError, read_rows
from lit_saferlhf.errors import CommandParser, ConfigError, DataError, ModelDirError, output_dir

HARMFUL = ("EHD", "IHD", "MHD")
"""The quota categories, in the order of ``--ratio``."""
DEFAULT_RATIO = (10.0, 3.0, 1.0)
"""Equilibrate RLHF's 10k : 3k : 1k EHD : IHD : MHD."""
EQUILIBRATE_NAMES: dict[str, str] = {
    "EHD": "Factual Risk",
    "IHD": "Intentional Risk",
    "MHD": "Mixed Risk",
    "other": "OTHER",
    "benign": "No risk",
}
"""Our category name -> the label of the authors' classification prompt and released file."""
CATEGORIES: tuple[str, ...] = ("EHD", "IHD", "MHD", "benign", "benign_risky", "other")
_ALIASES: dict[str, str] = {
    **{name.lower(): name for name in CATEGORIES},
    **{label.lower(): name for name, label in EQUILIBRATE_NAMES.items()},
}

Labeller = Callable[[dict[str, Any]], object]
"""A record -> its raw label (None when it has none)."""


def canonical_category(label: object) -> str | None:
    """Our name for a label (``"Factual Risk"`` -> ``"EHD"``), or None when it is no known name."""
    if not isinstance(label, str):
        return None
    return _ALIASES.get(" ".join(label.split()).lower())


def equilibrate_label(category: str) -> str:
    """The authors' label of one of our categories (``"EHD"`` -> ``"Factual Risk"``)."""
    return EQUILIBRATE_NAMES[category]


def parse_ratio(text: str) -> tuple[float, ...]:
    """``"10:3:1"`` -> ``(10.0, 3.0, 1.0)``: three non-negative numbers with a positive sum."""
    try:
        ratio = tuple(float(part) for part in text.split(":"))
    except ValueError:
        ratio = ()
    if len(ratio) != len(HARMFUL) or min(ratio) < 0 or sum(ratio) <= 0:
        raise ConfigError("ratio", "three non-negative numbers EHD:IHD:MHD with a positive sum, e.g. 10:3:1", text)
    return ratio


def quotas_from_ratio(total: int, ratio: Sequence[float] = DEFAULT_RATIO) -> dict[str, int]:
    """Records per category, summing to ``total`` exactly (largest remainder; ties to the earlier category).

    ``quotas_from_ratio(14)`` is ``{"EHD": 10, "IHD": 3, "MHD": 1}``; ``quotas_from_ratio(10)`` is
    ``{"EHD": 7, "IHD": 2, "MHD": 1}`` (shares 7.14, 2.14, 0.71).
    """
    if total < 0:
        raise ConfigError("total", "a number of records >= 0", total)
    shares = [total * weight / sum(ratio) for weight in ratio]
    quotas = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (quotas[i] - shares[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return dict(zip(HARMFUL, quotas, strict=True))


@dataclass(frozen=True)
class SelectionReport:
    """What a selection read and chose; every record read is in exactly one of the counts."""

    read: int
    """Records read."""
    categories: dict[str, int]
    """Records per known category (our names)."""
    unlabelled: int
    """Records without a label (no field, no row in the labels file, or the classifier said None)."""
    unknown: dict[str, int]
    """Records per label that is no known category name."""
    quotas: dict[str, int]
    """Records asked for per quota category."""
    selected: dict[str, int]
    """Records chosen per quota category (equal to ``quotas``)."""

    def lines(self) -> list[str]:
        """The report as printed lines."""
        known = ", ".join(f"{name} {n}" for name, n in sorted(self.categories.items())) or "none"
        unknown = ", ".join(f"{label!r} {n}" for label, n in sorted(self.unknown.items())) or "none"
        chosen = ", ".join(f"{name} {self.selected[name]}/{n}" for name, n in self.quotas.items())
        return [
            f"read {self.read} records: {known}",
            f"unlabelled: {self.unlabelled}; unknown labels: {unknown}",
            f"selected {sum(self.selected.values())} (selected/quota): {chosen}",
            f"not selected: {self.read - sum(self.selected.values())} (other categories and the rest of each pool)",
        ]


def select_records(
    rows: Iterable[RowOrError], label_of: Labeller, quotas: dict[str, int], seed: int = 0
) -> tuple[list[dict[str, Any]], SelectionReport]:
    """Draw ``quotas[c]`` records of each category ``c`` (seeded), and count everything read.

    Args:
        rows: ``(location, record)`` pairs, as :func:`lit_saferlhf.data.readers.read_rows` yields (an
            unreadable record is its BadRecordError).
        label_of: A record's raw label (any known name, see :func:`canonical_category`) or None.
        quotas: Records wanted per category.
        seed: Seed of the draw and of the output order.

    Returns:
        The selected records (copies, ``risk_category`` set to our name; shuffled) and the report.

    Raises:
        DataError: A record could not be read, or a category has fewer records than its quota.
    """
    pools: dict[str, list[dict[str, Any]]] = {name: [] for name in CATEGORIES}
    unknown: Counter[str] = Counter()
    unlabelled = read = 0
    for location, row in rows:
        if isinstance(row, Exception):
            raise DataError(f"{row}; fix or remove the record ({location})")
        read += 1
        label = label_of(row)
        category = canonical_category(label)
        if category is None and label is not None:
            unknown[str(label)] += 1
        unlabelled += label is None
        if category is not None:
            pools[category].append({**row, "risk_category": category})
    rng = random.Random(f"fdc-select:{seed}")
    selected: list[dict[str, Any]] = []
    for name, quota in quotas.items():
        if len(pools[name]) < quota:
            raise DataError(
                f"category {name}: quota {quota} but only {len(pools[name])} of the {read} records read carry it "
                f"({unlabelled} unlabelled, {sum(unknown.values())} with unknown labels); "
                "lower --total or change --ratio"
            )
        selected += rng.sample(pools[name], quota)
    rng.shuffle(selected)
    counts = {name: len(pool) for name, pool in pools.items() if pool}
    return selected, SelectionReport(read, counts, unlabelled, dict(unknown), dict(quotas), dict(quotas))


# ----------------------------------------------------------------------------------------------
# Where the labels come from
# ----------------------------------------------------------------------------------------------


def field_labeller(field: str = "risk_category") -> Labeller:
    """Labels from a field of each record (missing or null: unlabelled)."""
    return lambda row: row.get(field)


def _normalised(text: object) -> str:
    return " ".join(str(text).split())


def labels_file_labeller(path: str, prompt_field: str = "prompt") -> Labeller:
    """Labels from a file with ``question_y`` (the prompt) and ``category`` per row, matched on the prompt text.

    Raises:
        DataError: A row lacks either field, or one prompt has two different labels.
    """
    labels: dict[str, object] = {}
    for location, row in read_rows(path):
        if isinstance(row, Exception) or "question_y" not in row or "category" not in row:
            raise DataError(
                f"{location}: a labels row needs the fields 'question_y' and 'category'; found {row!r:.120}"
            )
        key = _normalised(row["question_y"])
        if key in labels and labels[key] != row["category"]:
            raise DataError(
                f"{location}: prompt {key!r:.80} is labelled {labels[key]!r} earlier and {row['category']!r} here"
            )
        labels[key] = row["category"]
    return lambda row: labels.get(_normalised(row.get(prompt_field, "")))


def classifier_labeller(spec: str, prompt_field: str = "prompt") -> Labeller:
    """Labels from a classifier of the prompt text: ``safety-world``, ``module:name``, or a HF model dir."""
    classify = load_classifier(spec)
    return lambda row: classify(str(row.get(prompt_field, "")))


def load_classifier(spec: str) -> Callable[[str], object]:
    """The classifier ``spec`` names (see the module docstring).

    Raises:
        ConfigError: ``spec`` is no dir, no ``safety-world`` and no importable ``module:name``.
    """
    if spec == "safety-world":
        from lit_saferlhf.data.safety_world import risk_category

        return risk_category
    if Path(spec).is_dir():
        return HFRiskClassifier(spec)
    module, _, name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            "classifier", "'safety-world', a Hugging Face model dir, or an importable module:name", spec
        ) from error
    return found() if isinstance(found, type) else found


class HFRiskClassifier:
    """A Hugging Face text-classification model dir as a classifier: the top label's ``id2label`` name."""

    def __init__(self, path: str) -> None:
        from transformers import pipeline

        try:
            self.pipe = pipeline("text-classification", model=path, tokenizer=path, device="cpu")
        except (OSError, ValueError, KeyError) as error:  # transformers: no weights, no tokenizer, an unknown model
            reason = " ".join(str(error).split())[:200]
            raise ModelDirError("classifier", path, "not a text-classification model dir", reason) from error

    def __call__(self, prompt: str) -> str:
        """The classifier's label of ``prompt``."""
        return self.pipe(prompt)[0]["label"]


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def select_command(argv: Sequence[str]) -> SelectionReport:
    """``lit-saferlhf select``: write an FDC safety set with exact quotas per risk category, and its report."""
    parser = CommandParser(prog="lit-saferlhf select", description=select_command.__doc__)
    parser.add_argument("--data", required=True, nargs="+", help="files or safety-world:<split> to select from")
    parser.add_argument("--out", required=True, help="the selected records as JSONL (report: <out>.report.json)")
    parser.add_argument("--total", required=True, type=int, help="records to select in all")
    parser.add_argument("--ratio", default="10:3:1", help="EHD:IHD:MHD quota ratio (default 10:3:1)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--labels", help="labels file: question_y + category per prompt (BeaverTails-style)")
    source.add_argument("--classifier", help="safety-world, module:name of a callable, or a HF classifier dir")
    parser.add_argument("--field", default="risk_category", help="label field of the records (default risk_category)")
    parser.add_argument("--prompt_field", default="prompt", help="prompt field of the records (default prompt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args(argv)
    if args.labels:
        label_of = labels_file_labeller(args.labels, args.prompt_field)
    elif args.classifier:
        label_of = classifier_labeller(args.classifier, args.prompt_field)
    else:
        label_of = field_labeller(args.field)
    rows = (pair for path in args.data for pair in read_rows(path))
    selected, report = select_records(rows, label_of, quotas_from_ratio(args.total, parse_ratio(args.ratio)), args.seed)
    out = Path(args.out)
    output_dir(out.parent, "--out")
    out.write_text("".join(json.dumps(row) + "\n" for row in selected))
    Path(f"{out}.report.json").write_text(json.dumps({"command": ["select", *argv], **asdict(report)}, indent=2) + "\n")
    print("\n".join([*report.lines(), f"wrote {out} and {out}.report.json"]))
    return report
