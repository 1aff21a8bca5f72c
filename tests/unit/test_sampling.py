"""Resumable batches: per-rank shares, per-epoch shuffles, and a loader that continues mid-epoch."""

from __future__ import annotations

import pytest

from lit_saferlhf.data.sampling import ResumableLoader, ResumableSampler

DATA = list(range(20))


def loader(rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 7) -> ResumableLoader:
    sampler = ResumableSampler(DATA, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return ResumableLoader(DATA, batch_size=3, collate_fn=list, sampler=sampler)


def epoch(data: ResumableLoader, number: int) -> list[list[int]]:
    data.sampler.set_epoch(number)  # as Lightning does before each epoch
    return list(data)


def test_ranks_share_the_data_without_overlap() -> None:
    shares = [[i for batch in epoch(loader(rank, 2), 0) for i in batch] for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == DATA
    assert len(shares[0]) == len(shares[1]) == 10


def test_each_epoch_is_a_fresh_shuffle_that_can_be_drawn_again() -> None:
    first, second = epoch(loader(), 0), epoch(loader(), 1)
    assert first != second
    assert sorted(i for batch in first for i in batch) == DATA
    assert epoch(loader(), 1) == second  # seed + epoch fixes the order
    assert epoch(loader(seed=8), 1) != second
    assert epoch(loader(shuffle=False), 3) == [DATA[i : i + 3] for i in range(0, 20, 3)]


def test_a_loader_restored_mid_epoch_draws_exactly_the_remaining_batches() -> None:
    original = loader()
    original.sampler.set_epoch(2)
    batches = iter(original)
    drawn = [next(batches) for _ in range(4)]
    state = original.state_dict()
    assert state == {"epoch": 2, "seed": 7, "batches": 4}

    restored = loader(seed=0)  # a resumed run's seed may differ: the checkpoint's wins
    restored.load_state_dict(state)
    assert len(restored) == len(original) == 7  # Lightning counts the 4 already trained on
    rest = epoch(restored, 2)
    assert drawn + rest == epoch(loader(), 2)
    assert restored.state_dict()["batches"] == 7  # a checkpoint after the resume counts every batch of the epoch
    assert epoch(restored, 3) == epoch(loader(), 3)  # the next epoch starts from its beginning


@pytest.mark.parametrize("batches", [0, 7])
def test_a_state_saved_at_an_epoch_boundary_starts_the_next_epoch_whole(batches: int) -> None:
    restored = loader()
    restored.load_state_dict({"epoch": 1, "seed": 7, "batches": batches})
    assert epoch(restored, 2) == epoch(loader(), 2)
