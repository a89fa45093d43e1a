"""Multi-process training (DDP, gloo, 2 CPU processes) against one process on the same datasets."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import amortize as am
from amortize.checkpoint import load_checkpoint
from amortize.distributed import ShardedStep, fit_distributed, fit_sharded, free_port, init_process_group
from amortize.errors import AmortizeError, ConfigError

from .conftest import normal_known

STEPS, GLOBAL_BATCH, WORLD = 5, 16, 2
OPTIONS = dict(steps=STEPS, batch_size=GLOBAL_BATCH, pilot_structures=2, warmup=2, lr=1e-2, log_every=1, progress=False)


def make_amortizer() -> am.Amortizer:
    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))
    return am.Amortizer(normal_known, sampler, hidden=16, seed=7)


def _rank(rank: int, port: int, out: str) -> None:
    """One DDP process (spawned): train, then save its per-step losses and weights."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    info = init_process_group("gloo")
    try:
        a = make_amortizer()
        losses: list[float] = []
        fit_distributed(
            a,
            callback=lambda step, value: losses.append(value),
            checkpoint_path=f"{out}/ck.pt",  # the same path on both ranks: only rank 0 writes it
            log_dir=f"{out}/tb",
            **OPTIONS,
        )
        torch.save({"losses": losses, "state": a.guide.state_dict(), "rank": info.rank}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process_on_the_same_shards(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    ref = make_amortizer()
    losses: list[float] = []
    fit_sharded(ref, WORLD, callback=lambda step, value: losses.append(value), **OPTIONS)

    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    for r in ranks:
        assert len(r["losses"]) == STEPS
        rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], losses)]
        assert max(rel) < 1e-5, (r["rank"], r["losses"], losses)
    print(f"loss curves: 2 processes {ranks[0]['losses']}, 1 process {losses}")
    assert len({round(v, 6) for v in losses}) == STEPS  # a new structure and new datasets every step
    # DDP kept the two processes' weights identical, and equal to the one-process run's
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
        torch.testing.assert_close(v, ref.guide.state_dict()[k], rtol=1e-5, atol=1e-6)
    # only rank 0 wrote: one checkpoint at the last step, one TensorBoard event file
    assert load_checkpoint(tmp_path / "ck.pt")["step"] == STEPS
    assert len([p for p in Path(tmp_path / "tb").iterdir() if p.name.startswith("events.out")]) == 1


def test_shards_are_different_datasets_and_reproducible():
    a = make_amortizer()
    structure = a.sampler.sample(torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    before = torch.get_rng_state()

    def shard(step: int, k: int) -> torch.Tensor:
        with ShardedStep.stream(a, step, k):
            return am.simulate(a.model, a.structure, structure, 8).data.y

    y00, y01, y10 = shard(0, 0), shard(0, 1), shard(1, 0)
    assert not torch.equal(y00, y01) and not torch.equal(y00, y10)  # each shard and step its own datasets
    assert torch.equal(y00, shard(0, 0))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched


def test_one_shard_step_is_the_mean_of_shard_losses():
    """The global loss of a sharded step is the mean over shards; the same in one process or two."""
    a = make_amortizer()
    a.fit(steps=1, batch_size=8, pilot_structures=1, progress=False)
    cfg = am.TrainConfig(batch_size=8)
    gen_state = a.generator.get_state()
    value = ShardedStep(2)(a, cfg, a.generator)
    grads = {n: p.grad.clone() for n, p in a.guide.named_parameters() if p.grad is not None}
    a.generator.set_state(gen_state)
    shard_losses = []
    structure = a.sampler.sample(a.generator)
    for k in range(2):
        with ShardedStep.stream(a, a.step, k):
            sim = am.simulate(a.model, a.structure, structure, 4)
            shard_losses.append(float(am.train.batch_loss(a, cfg, sim).detach()))
    assert value == pytest.approx(sum(shard_losses) / 2, rel=1e-6)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_bad_shard_setups_are_refused():
    with pytest.raises(ConfigError, match="equal shards"):
        a = make_amortizer()
        fit_sharded(a, 3, steps=1, batch_size=8, pilot_structures=1, progress=False)
    with pytest.raises(ConfigError, match="every shard"):
        ShardedStep(2, [1])
    with pytest.raises(AmortizeError, match="init_process_group"):
        fit_distributed(make_amortizer(), steps=1)
    saved = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        with pytest.raises(ConfigError, match="torchrun"):
            init_process_group()
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
