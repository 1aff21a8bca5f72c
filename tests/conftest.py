"""Shared test fixtures: the real data samples in ../shared/data (read in place, never copied)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import fit

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public samples that sits beside the checkout (as in CI)."""
    assert SHARED_DATA.is_dir(), f"expected the shared data folder at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny configs as shipped (a few epochs each, ~45 s on 2 CPU cores).

    For the inner loop, ``LIT_SAFERLHF_TINY_MODELS=outputs/tiny/pipeline`` reuses a finished pipeline's
    ``{sft,reward,cost}/model`` instead of training them again (CI never sets it).
    """
    reuse = os.environ.get("LIT_SAFERLHF_TINY_MODELS")
    if reuse:
        root = Path(reuse).resolve()
        return {"root": root, **{name: root / name / "model" for name in ("sft", "reward", "cost")}}
    root = tmp_path_factory.mktemp("tiny")
    sft = fit("tiny/sft.yaml", root / "sft")
    start = f"--model.init_args.model.path={sft}"
    return {
        "root": root,
        "sft": sft,
        "reward": fit("tiny/reward.yaml", root / "reward", start),
        "cost": fit("tiny/cost.yaml", root / "cost", start),
    }


@pytest.fixture(scope="session")
def tiny_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export dir of a tiny guard model trained on the safety world's guard split (one epoch, a few seconds).

    It answers ``safe`` or ``unsafe <EHD|IHD|MHD>`` after a pair in the compact guard format
    (``GuardScorer(path, format="compact")``); ``cli_configs/tiny/guard_sft.yaml`` with one epoch.
    """
    return fit("tiny/guard_sft.yaml", tmp_path_factory.mktemp("guard"), "--trainer.max_epochs=1")


@pytest.fixture(autouse=True)
def restore_environment() -> Iterator[None]:
    """Undo what a test's in-process launch wrote into ``os.environ`` (Lightning sets MASTER_PORT, WORLD_SIZE,
    LOCAL_RANK, ...): left behind, they make later subprocesses think they are ranks of a finished job."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
