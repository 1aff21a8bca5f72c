"""Batches that resume mid-epoch: a run restarted from a checkpoint draws exactly the batches it had left.

Lightning saves a training DataLoader's position in every checkpoint when the loader has
``state_dict``/``load_state_dict`` (its "stateful" protocol), and restores it before the resumed
epoch starts. :class:`ResumableLoader` is such a loader. Its :class:`ResumableSampler` shuffles with
a generator seeded by ``seed + epoch`` (so an epoch's order can be drawn again), gives each rank
its own share, and can start part-way through an epoch.

The sampler splits by *global* rank and world size. Lightning's default sampler under
``ModelParallelStrategy`` splits by the data-parallel mesh dimension only, so on one node (the
default mesh is nodes x devices) every rank would see the same batches; FSDP2 without tensor
parallelism is data parallel over every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """This rank's indices for one epoch (shuffled by ``seed + epoch``), from sample ``start`` on.

    Args:
        dataset: What is sampled (only its length is read).
        num_replicas: Processes sharing the data (the world size).
        rank: This process's global rank.
        shuffle: Shuffle every epoch (training) or keep the order (validation).
        seed: Shuffling seed, the same on every rank.
    """

    def __init__(self, dataset: Sequence[Any], num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        # torch types the dataset as Dataset; a sampler only reads len(), which any Sequence has.
        super().__init__(cast(Dataset[Any], dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0  # samples of this epoch's share already trained on; skipped by the next iteration only

    def __iter__(self) -> Iterator[int]:
        """The epoch's share from ``start``; ``start`` then goes back to 0 for later epochs."""
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableLoader(DataLoader):
    """A DataLoader whose ``state_dict`` records the epoch, the seed and how many batches were drawn.

    Worker seeds come from the loader's own generator, seeded by ``seed + epoch``, never from the
    global torch stream (see ``reliability.RankStates``). ``len()`` stays the full epoch's length
    after a resume: Lightning counts the batches a restored epoch already trained on and expects
    only the rest.

    Args:
        dataset: The encoded samples.
        batch_size: Samples per batch on this rank.
        collate_fn: Turns a list of samples into a batch.
        sampler: Which samples, in which order.
        num_workers: Worker processes.
    """

    # Narrower than DataLoader's declarations: __init__ takes exactly these and DataLoader stores them as given.
    sampler: ResumableSampler
    batch_size: int

    def __init__(
        self,
        dataset: Sequence[Any],
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        sampler: ResumableSampler,
        num_workers: int = 0,
    ) -> None:
        # Its own generator: starting an epoch would otherwise draw the workers' base seed from the global
        # torch stream, which then differs between a resumed run and the uninterrupted one.
        # torch types the dataset as Dataset; the map-style protocol it reads (len, getitem) is a Sequence's.
        super().__init__(
            cast(Dataset[Any], dataset),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            generator=torch.Generator(),
        )
        self.drawn = 0  # batches of the current epoch handed out so far, counting those skipped on resume
        self.resume_epoch: int | None = None  # the epoch a loaded state belongs to, until that epoch starts

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # torch names its iterator class; any iterator works
        """Batches of the sampler's current epoch, skipping those a loaded state says were drawn.

        A generator, so the sampler is read at the first batch: after Lightning's ``set_epoch``.
        """
        sampler = self.sampler
        resuming, self.resume_epoch = self.resume_epoch == sampler.epoch, None
        self.drawn = self.drawn if resuming else 0
        sampler.start = self.drawn * self.batch_size
        self.generator.manual_seed(sampler.seed + sampler.epoch)  # workers' seeds: a function of the epoch
        for batch in super().__iter__():
            self.drawn += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where this rank's data stands: ``epoch``, ``seed`` and ``batches`` drawn in that epoch."""
        sampler = self.sampler
        return {"epoch": sampler.epoch, "seed": sampler.seed, "batches": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue ``state``'s epoch after its drawn batches (a later epoch starts from its beginning)."""
        sampler = self.sampler
        sampler.seed, sampler.epoch = state["seed"], state["epoch"]
        self.drawn, self.resume_epoch = state["batches"], state["epoch"]


def global_seed() -> int:
    """The seed ``seed_everything`` set for this run (``PL_GLOBAL_SEED``), else 0, as Lightning's own samplers use."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
