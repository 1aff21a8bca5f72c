"""Gather-once decoding under FSDP2 on 2 CPU processes gives exactly the unsharded actor's tokens.

Each rank builds the same random tiny Llama, keeps an unsharded twin, shards the other with
``fully_shard`` (``lit_saferlhf.models.sharding.shard``), and samples with the same seed from all of
them. The ranks use different seeds, so they stop at different steps: the gathered decode must run
without any collective per token (a per-token collective would hang, and the test would time out).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def rank_main(rank: int, out: str) -> None:
    """One rank: sample from the unsharded twin, the gathered copy and the lock-step sharded actor; save all."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lit_saferlhf.generators import GenerationArgs
    from lit_saferlhf.models.sharding import shard
    from lit_saferlhf_plugins.generators.static_cache import StaticCacheGenerate
    from tests.unit.test_rollout import EOS, PAD, left_padded_prompts, tiny_lm

    dist.init_process_group("gloo", rank=rank, world_size=2)
    actor = tiny_lm("llama")
    twin = copy.deepcopy(actor)
    shard(actor, init_device_mesh("cpu", (2,)))
    ids, mask = left_padded_prompts(seed=rank)
    args = GenerationArgs(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95)
    gathered, lock_step = StaticCacheGenerate(gather=True, check_every=2), StaticCacheGenerate(gather=False)
    results = {}
    for rollout in range(2):
        for name, generator, network in (("twin", StaticCacheGenerate(), twin), ("gathered", gathered, actor),
                                         ("lock_step", lock_step, actor)):  # fmt: skip
            torch.manual_seed(100 * rollout + rank)
            results[f"{name}{rollout}"] = generator.generate(network, ids, mask, args, EOS, PAD)
        with torch.no_grad():  # an "update" between rollouts: the gathered copy must be refreshed
            for network in (actor, twin):
                for param in network.parameters():
                    param.mul_(1.05)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_decode_equals_the_unsharded_actor(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    process = subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("gathered decoding hung (a collective per token?)")
    assert process.returncode == 0, output[-4000:]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for rollout in (0, 1):
            assert torch.equal(results[f"gathered{rollout}"], results[f"twin{rollout}"])
            assert torch.equal(results[f"lock_step{rollout}"], results[f"twin{rollout}"])


if __name__ == "__main__":
    torch.multiprocessing.spawn(rank_main, args=(sys.argv[1],), nprocs=2)
