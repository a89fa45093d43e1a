"""Inference over many datasets in one call: ``amortizer.posterior([d1, d2, ...])``."""

from __future__ import annotations

import pytest
import torch

import amortize as am
from amortize import batch as batch_module
from amortize.batch import same_structure
from amortize.errors import DataError
from amortize.importance import CorrectedDraws


def frame(ids: list, y: list[float]) -> am.HierarchicalData:
    return am.HierarchicalData.from_frame({"group": ids, "y": y}, levels=["group"], response="y")


def structure_a(shift: float) -> am.HierarchicalData:  # 3 groups, 6 rows; built anew each time (no shared tensors)
    return frame(["b", "b", "a", "c", "c", "c"], [0.1 + shift, 0.3, -1.0, 2.0 - shift, 1.5, 1.7])


def structure_b(shift: float) -> am.HierarchicalData:  # 4 groups, 8 rows
    return frame([0, 0, 1, 1, 2, 2, 3, 3], [shift, 1.0, -0.5, 0.2, 0.3, 0.4, 2.0, 2.2])


def encoder_calls(a: am.Amortizer) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = a.guide.encoder.register_forward_hook(lambda m, inp, out: calls.append(out.dataset.shape[0]))
    return calls, handle


def test_one_structure_is_one_vectorized_batch(amortizer):
    datasets = [structure_a(0.1 * i) for i in range(5)]
    post = amortizer.posterior(datasets)
    assert isinstance(post, am.Posterior) and len(post) == 5 and post.num_structures == 1
    calls, handle = encoder_calls(amortizer)
    try:
        draws = post.sample(40, seed=0)
    finally:
        handle.remove()
    assert calls == [5]  # one encoder pass over all five datasets
    assert isinstance(draws, list) and len(draws) == 5
    for d in draws:
        assert d["mu"].shape == (40,) and d["theta"].shape == (40, 3)
    members, batch = post.batches[0]
    assert members == [0, 1, 2, 3, 4] and batch.batch_size == 5


def test_batched_posterior_equals_each_datasets_own_posterior(amortizer):
    """Vectorizing changes nothing per dataset: log q of the batch's draws under each dataset's own
    Posterior is the batch's log q, for a list that interleaves two structures."""
    datasets = [structure_a(0.0), structure_b(0.5), structure_a(1.0), structure_b(-1.0), structure_a(2.0)]
    post = amortizer.posterior(datasets)
    assert post.num_structures == 2
    assert [m for m, _ in post.batches] == [[0, 2, 4], [1, 3]]
    draws = post.sample(25, seed=1)
    raw = post.batches[0][1].sample(25, seed=1)  # the first structure's [n, B, ...] draws, same seed
    for j, i in enumerate([0, 2, 4]):
        assert torch.equal(draws[i]["theta"], raw["theta"][:, j]) and torch.equal(draws[i]["mu"], raw["mu"][:, j])
    lp = post.log_prob(draws)
    for i, d in enumerate(datasets):
        assert draws[i]["theta"].shape == (25, d.size("group"))  # input order kept
        own = amortizer.posterior(d).log_prob(draws[i])
        torch.testing.assert_close(lp[i], own, rtol=1e-5, atol=1e-4)
    # and the draws follow each dataset's own q: the mean of mu is close to its own posterior's
    for i, d in enumerate(datasets):
        mine = float(draws[i]["mu"].mean())
        alone = float(amortizer.posterior(d).sample(4000, seed=7)["mu"].mean())
        sd = float(amortizer.posterior(d).sample(4000, seed=8)["mu"].std())
        assert abs(mine - alone) < 5 * sd / 25**0.5, (i, mine, alone, sd)


def test_seeded_batch_draws_reproduce_and_leave_global_rng_alone(amortizer):
    post = amortizer.posterior([structure_a(0.0), structure_b(0.0)])
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = post.sample(10, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    b = post.sample(10, seed=4)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_corrected_diagnostics_and_flags_are_per_dataset(amortizer):
    big = am.StructureSampler(["group"], groups={"group": (32, 32)}, obs=(2, 6)).sample(
        torch.Generator().manual_seed(0)
    )
    datasets = [structure_a(0.0), big.with_response(torch.randn(big.n_obs)), structure_a(0.3)]
    post = amortizer.posterior(datasets)
    corrected = post.sample(30, seed=0, correct=True, oversample=4)
    for c, d in zip(corrected, datasets):
        assert isinstance(c, CorrectedDraws) and c["theta"].shape == (30, d.size("group"))
        assert isinstance(c.pareto_k, float) and isinstance(c.corrected, bool) and c.num_proposals == 100
    diag = post.diagnostics(num_samples=100)
    assert [isinstance(d["pareto_k"], float) for d in diag] == [True] * 3
    assert any("group" in f for f in diag[1]["flags"]) and not diag[1]["ok"]
    assert not any("32 groups" in f for f in diag[0]["flags"] + diag[2]["flags"])
    flags = post.range_flags()
    assert len(flags) == 3 and any("group" in f for f in flags[1])


def test_indexing_gives_each_datasets_own_posterior(amortizer):
    post = amortizer.posterior([structure_a(0.0), structure_b(0.0)])
    one = post[1]
    assert isinstance(one, am.Posterior) and one.batch_size is None and one.data.size("group") == 4
    assert "theta[a]" in post[0].summary(num_samples=20, seed=0).index


def test_same_structure_compares_indices_and_covariate_values():
    assert same_structure(structure_a(0.0), structure_a(5.0))
    assert not same_structure(structure_a(0.0), structure_b(0.0))
    assert not same_structure(structure_a(0.0), frame(["a", "a", "b", "c", "c", "c"], [0.0] * 6))

    def with_x(x: list[float]) -> am.HierarchicalData:
        return am.HierarchicalData.from_frame(
            {"group": [0, 0, 1], "y": [0.0, 1.0, 2.0], "x": x},
            levels=["group"],
            response="y",
            covariates={"obs": ["x"]},
        )

    assert same_structure(with_x([1.0, 2.0, 3.0]), with_x([1.0, 2.0, 3.0]))
    assert not same_structure(with_x([1.0, 2.0, 3.0]), with_x([1.0, 2.0, 4.0]))  # a batch shares covariates


def test_chunked_draws_run_the_encoder_once(amortizer, monkeypatch):
    """Draws too many for one pass come in chunks; the per-dataset and per-group work is not redone per chunk."""
    monkeypatch.setattr(batch_module, "CHUNK_ELEMENTS", 9 * 3 * 200)  # 3 datasets x 9 cells: 200 draws a chunk
    post = amortizer.posterior([structure_a(0.0), structure_a(0.5), structure_a(1.0)])
    calls, handle = encoder_calls(amortizer)
    try:
        draws = post.sample(1000, seed=0)
    finally:
        handle.remove()
    assert calls == [3]
    assert draws[0]["theta"].shape == (1000, 3)
    # the five chunks are independent draws of the same q: their means agree
    mu = draws[0]["mu"].reshape(5, 200).mean(1)
    assert float(mu.std()) < 4 * float(draws[0]["mu"].std()) / 200**0.5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: [], "empty list"),
        (lambda: [structure_a(0.0), "data.csv"], "dataset 1: expected a HierarchicalData"),
        (
            lambda: [
                structure_a(0.0),
                am.HierarchicalData.from_frame(
                    {"district": [0, 0, 1], "group": [0, 1, 2], "y": [0.0, 1.0, 2.0]},
                    levels=["district", "group"],
                    response="y",
                ),
            ],
            r"dataset 1: data has levels \['district', 'group'\]",
        ),
        (
            lambda: [
                structure_a(0.0),
                structure_b(0.0),
                am.HierarchicalData.from_frame(
                    {"group": [0, 0, 1], "y": [0.0, 1.0, 2.0], "x": [1.0, 2.0, 3.0]},
                    levels=["group"],
                    response="y",
                    covariates={"obs": ["x"]},
                ),
            ],
            "dataset 2: covariate 'x'",
        ),
        (lambda: [structure_a(0.0), structure_a(0.0).with_response(None)], "dataset 1: the data has no response"),
        (
            lambda: [
                structure_a(0.0),
                structure_a(1.0),
                structure_a(0.0).with_response(torch.full((6,), float("nan"))),
            ],
            "dataset 2: response 'y': NaN",
        ),
        (
            lambda: [structure_a(0.0), structure_a(0.0).with_response(torch.zeros(2, 6))],
            r"dataset 1: already a batch of 2 datasets",
        ),
    ],
)
def test_bad_lists_raise_named_errors(amortizer, make, message):
    with pytest.raises(DataError, match=message):
        amortizer.posterior(make())


def test_throughput_bench_runs_and_writes_its_tables(tmp_path, capsys):
    """A tiny run of experiments/bench/throughput.py: both tables printed, JSON and markdown written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--batch-sizes", "1", "3", "--groups", "10", "40", "--draws", "20", "--steps", "1", "--repeats", "1"]
    assert bench.main([*args, "--groups-per-dataset", "12", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["batch"] for r in results["throughput"]["rows"]] == [1, 3]
    assert all(r["datasets_per_s"] > 0 and r["draws"] == 20 for r in results["throughput"]["rows"])
    assert [r["groups"] for r in results["scale"]["rows"]] == [10, 40]
    text = (tmp_path / "results.md").read_text()
    assert "datasets/s" in text and "us per group" in text and text in capsys.readouterr().out
